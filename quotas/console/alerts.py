"""Alerts in the admin (issue 18, item 6): the rules (each save audited), the events they fired and the outbox of
deliveries with their status (docs/operations.md, "Alerts"). Events and deliveries are the alerts' record: viewable,
never edited; a failed delivery can be sent again.

A rule watches one user, a plan's users, every user, or one team's pool (kind "team", with its team), on token
windows and money windows (budgets)."""

from django.contrib import admin, messages
from django.utils import timezone

from ..models import AlertEvent, AlertRule, AuditEntry, Outbox
from .common import AuditedAdmin, ReadOnlyAdmin

RULE_FIELDS = ("name", "kind", "user", "plan", "team", "thresholds", "windows", "emails", "webhook_url",
               "webhook_format", "enabled")
# A window a rule may name → the pool field of a team that gives it a limit (a team rule on another never fires).
TEAM_POOL_FIELDS = {"tokens_day": "tokens_per_day", "tokens_month": "tokens_per_month",
                    "money_day": "budget_per_day", "money_month": "budget_per_month"}


@admin.register(AlertRule)
class AlertRuleAdmin(AuditedAdmin):
    audited_fields = RULE_FIELDS
    list_display = ["name", "kind", "whom", "thresholds", "windows", "channels", "enabled"]
    list_filter = ["kind", "enabled"]
    search_fields = ["name", "user__username", "plan__name", "team__name"]
    autocomplete_fields = ["user"]
    fields = list(RULE_FIELDS)

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("user", "plan", "team")

    @admin.display(description="for")
    def whom(self, rule):
        if rule.team:
            return f"team {rule.team}"
        return rule.user or rule.plan or rule.get_kind_display()

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        if unlimited := unlimited_windows(obj):
            messages.warning(request, f"The team '{obj.team}' has no limit on {', '.join(unlimited)}: this rule "
                                      "fires on those windows only once the team's pool has one.")

    @admin.display(description="channels")
    def channels(self, rule):
        found = [*(rule.emails or [])]
        if rule.webhook_url:
            found.append(f"webhook ({rule.get_webhook_format_display()})")
        return ", ".join(found) or "none"

    def delete_model(self, request, obj):
        AuditEntry.entry(request.user, AuditEntry.Action.REMOVED, obj, old=AuditEntry.values(obj, RULE_FIELDS)).save()
        super().delete_model(request, obj)


def unlimited_windows(rule):
    """The windows a team rule names that its team's pool does not limit (nothing to cross: told, not refused, since
    the pool may get its limit later)."""
    if rule.kind != AlertRule.Kind.TEAM or rule.team is None or not isinstance(rule.windows, list):
        return []
    return [w for w in rule.windows if w in TEAM_POOL_FIELDS and getattr(rule.team, TEAM_POOL_FIELDS[w]) is None]


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
