"""Alerts in the admin (issue 18, item 6): the rules (each save audited), the events they fired and the outbox of
deliveries with their status (docs/operations.md, "Alerts"). Events and deliveries are the alerts' record: viewable,
never edited; a failed delivery can be sent again."""

from django.contrib import admin, messages
from django.utils import timezone

from ..models import AlertEvent, AlertRule, AuditEntry, Outbox
from .common import AuditedAdmin, ReadOnlyAdmin

RULE_FIELDS = ("name", "kind", "user", "plan", "thresholds", "windows", "emails", "webhook_url", "webhook_format",
               "enabled")


@admin.register(AlertRule)
class AlertRuleAdmin(AuditedAdmin):
    audited_fields = RULE_FIELDS
    list_display = ["name", "kind", "whom", "thresholds", "windows", "channels", "enabled"]
    list_filter = ["kind", "enabled"]
    search_fields = ["name", "user__username", "plan__name"]
    autocomplete_fields = ["user"]
    fields = list(RULE_FIELDS)

    @admin.display(description="for")
    def whom(self, rule):
        return rule.user or rule.plan or rule.get_kind_display()

    @admin.display(description="channels")
    def channels(self, rule):
        found = [*(rule.emails or [])]
        if rule.webhook_url:
            found.append(f"webhook ({rule.get_webhook_format_display()})")
        return ", ".join(found) or "none"

    def delete_model(self, request, obj):
        AuditEntry.entry(request.user, AuditEntry.Action.REMOVED, obj, old=AuditEntry.values(obj, RULE_FIELDS)).save()
        super().delete_model(request, obj)


@admin.register(AlertEvent)
class AlertEventAdmin(ReadOnlyAdmin):
    list_display = ["fired_at", "rule", "scope", "window_key", "threshold", "used", "limit"]
    list_filter = ["threshold"]
    search_fields = ["scope", "window_key", "rule__name"]
    date_hierarchy = "fired_at"


@admin.register(Outbox)
class OutboxAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "channel", "target_shown", "status", "attempts", "next_attempt_at", "sent_at",
                    "last_error"]
    list_filter = ["status", "channel"]
    actions = ["send_again"]

    @admin.display(description="to")
    def target_shown(self, row):
        # A webhook's URL may carry its secret in its path (Slack's do): the host only.
        if row.channel == Outbox.Channel.EMAIL:
            return row.target
        from urllib.parse import urlsplit

        return urlsplit(row.target).netloc or "?"

    def has_change_permission(self, request, obj=None):
        return obj is None and request.user.has_perm("quotas.change_outbox")  # the action, never the form

    @admin.action(description="Send again (failed deliveries: at the worker's next pass)")
    def send_again(self, request, queryset):
        count = queryset.filter(status=Outbox.Status.FAILED).update(
            status=Outbox.Status.PENDING, attempts=0, next_attempt_at=timezone.now())
        messages.success(request, f"{count} failed deliveries will be sent again.")
