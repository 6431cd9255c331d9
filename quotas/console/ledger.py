"""The usage ledger and the audit trail in the admin: read-only lists an operator can read at 1280 px (issue 19,
item 8), fast at millions of rows (docs/operations.md), and the way to the usage dashboard (dashboard.py).
"""

from django.apps import apps
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.db.models import Q
from django.urls import NoReverseMatch, path, reverse
from django.utils.html import format_html

from ..domain import catalogue
from ..models import AuditEntry, DailyUsage, Usage
from . import dashboard, display
from .common import ReadOnlyAdmin, without_nul

Action = AuditEntry.Action
User = get_user_model()


class ModelFilter(admin.SimpleListFilter):
    """The catalogue's models and those in the daily rollups: a DISTINCT over the ledger would scan it all."""

    title = "model"
    parameter_name = "model"

    def lookups(self, request, model_admin):
        used = DailyUsage.objects.order_by().values_list("model", flat=True).distinct()
        return [(name, name) for name in sorted({*catalogue.model_names(), *used}) if name]

    def queryset(self, request, queryset):
        return queryset.filter(model=without_nul(self.value())) if self.value() else queryset


@admin.register(Usage)
class UsageAdmin(ReadOnlyAdmin):
    # What fits at 1280 px (issue 19, item 8); the row's own page has every figure (backpressure, bytes, counted).
    list_display = ["request", "caller", "outcome", "tokens", "started", "duration"]
    list_filter = ["status", ModelFilter, "counted"]
    list_select_related = ["user"]
    search_fields = ["=request_id", "=user__username"]
    search_help_text = "An exact request id or username."
    date_hierarchy = "started_at"
    ordering = ["-started_at"]
    # A million rows: no second COUNT(*) for the unfiltered total.
    show_full_result_count = False

    @admin.display(description="request", ordering="request_id")
    def request(self, row):
        return display.short_request_id(row.request_id)

    @admin.display(description="user · model", ordering="user")
    def caller(self, row):
        return format_html('{}<div class="sluice-sub">{}</div>', row.user, row.model or "–")

    @admin.display(description="status", ordering="status")
    def outcome(self, row):
        return display.status_badge(row.status, row.get_status_display(), row.reason)

    @admin.display(description="tokens")
    def tokens(self, row):
        return format_html('<span title="{} prompt + {} completion">{}</span>', display.number(row.prompt_tokens),
                           display.number(row.completion_tokens), display.number(row.total_tokens))

    @admin.display(description="started", ordering="started_at")
    def started(self, row):
        return display.moment(row.started_at)

    @admin.display(description="duration", ordering="duration_ms")
    def duration(self, row):
        first = row.time_to_first_token_ms
        if first is None:
            return display.seconds(row.duration_ms)
        return format_html('{}<div class="sluice-sub" title="time to the first token">first {}</div>',
                           display.seconds(row.duration_ms), display.seconds(first))

    def get_search_results(self, request, queryset, search_term):
        # The username is looked up first: an OR across the join to auth_user would scan the ledger.
        term = without_nul(search_term).strip()
        if not term:
            return queryset, False
        users = list(User.objects.filter(username=term).values_list("pk", flat=True))
        return queryset.filter(Q(request_id=term) | Q(user_id__in=users)), False

    def changelist_view(self, request, extra_context=None):
        response = super().changelist_view(request, extra_context)
        if getattr(response, "context_data", None) and "cl" in response.context_data:
            # templates/admin/quotas/usage/change_list.html shows it in place of Django's drill-down.
            response.context_data["calendar_hierarchy"] = dashboard.calendar_hierarchy(response.context_data["cl"])
        return response

    def get_urls(self):
        return [path("dashboard/", self.admin_site.admin_view(self.dashboard_view), name="quotas_usage_dashboard"),
                *super().get_urls()]

    def dashboard_view(self, request):
        return dashboard.render(request, self)


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = ["when", "actor", "action", "target", "change"]
    list_filter = ["action", "target_type"]
    list_select_related = ["actor"]
    search_fields = ["target_repr", "=actor__username"]
    date_hierarchy = "at"
    GONE = (Action.REMOVED, Action.KEY_DELETED)  # their target no longer exists: nothing to link to

    @admin.display(description="at", ordering="at")
    def when(self, entry):
        return display.when(entry.at)

    @admin.display(description="target", ordering="target_repr")
    def target(self, entry):
        """The target's name, linked to its admin page while it exists, and what kind of record it is."""
        try:
            opts = apps.get_model(entry.target_type)._meta
        except (LookupError, ValueError):
            return entry.target_repr
        url = None
        if entry.action not in self.GONE:
            try:
                url = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[entry.target_id])
            except NoReverseMatch:
                pass
        name = format_html('<a href="{}">{}</a>', url, entry.target_repr) if url else entry.target_repr
        return format_html('{} <span class="sluice-sub">{}</span>', name, opts.verbose_name)

    @admin.display(description="old → new")
    def change(self, entry):
        # A user quota's blank override is the plan's value.
        blank = "plan's value" if entry.target_type == "quotas.userquota" else "–"
        return display.audit_change(entry.old, entry.new, blank)
