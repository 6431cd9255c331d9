"""The operators' admin: limits (plans, per-user quotas, the quota on a user's page) here; API keys in keys.py,
teams in teams.py, alerts in alerts.py, the usage ledger and the audit trail in ledger.py; shared behaviour in
common.py (quotas/apps.py imports this module, which imports the others).

A thin interface: limits are read from the database on every request, so what is saved here applies
to the next request without a restart (and to running streams at their next lease). Every change to
who may use what is written to the audit trail. The usage dashboard and the changelist's usage
figures are read in quotas/console/dashboard.py.
"""

import json

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.db.models import Count
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.timesince import timeuntil

from ..domain import operations
from ..domain.policy import LIMIT_FIELDS, Limits, calendar_windows
from ..models import AuditEntry, Plan, UserQuota
from ..store import StoreUnavailable
from . import alerts, dashboard, display, keys, ledger  # noqa: F401 (alerts, keys and ledger register their pages)
from . import spend  # noqa: F401 (registers the spend page, beside the ledger's dashboard)
from . import teams  # registers the teams' page; SluiceUserAdmin lists a user's teams with its inline
from .common import AllowedModelsForm, AuditedAdmin, NulFree
from .timezones import TimezoneSelect

Action = AuditEntry.Action
User = get_user_model()
QUOTA_FIELDS = ("plan", *LIMIT_FIELDS, "suspended", "timezone")

# The site's name in its header, its pages' titles and its front page (issue 19, item 6).
admin.site.site_header = "Sluice"
admin.site.site_title = "Sluice admin"
admin.site.index_title = "Operations"
# The tables get the page's width at 1280 px (issue 19, item 8): the left-hand model list took 300 px of it, and the
# breadcrumbs and the front page lead everywhere it did.
admin.site.enable_nav_sidebar = False


class PlanForm(AllowedModelsForm):
    class Meta:
        model = Plan
        fields = "__all__"


class UserQuotaForm(AllowedModelsForm):
    """A user's override: nothing ticked keeps the plan's models; EVERY_MODEL gives every configured one."""

    EVERY_MODEL = "*"
    none_ticked = "None ticked: the plan's models."

    class Meta:
        model = UserQuota
        fields = "__all__"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.instance.plan_id and "plan" not in self.initial:
            # A new record starts on the default plan (what the user is on without one), so its values show at once.
            self.initial["plan"] = Plan.objects.filter(is_default=True).values_list("pk", flat=True).first()
        self.show_plan_values()

    def show_plan_values(self):
        """Beside each override, the plan's value that a blank one takes ("plan: 10,000"): as the placeholder and in
        the help text, for the plan chosen now; templates/admin/quotas/includes/plan_values.js follows the plan select
        (issue 19, item 6)."""
        values = {str(plan.pk): plan_values(plan) for plan in self.fields["plan"].queryset}
        select = self.fields["plan"].widget
        # The select itself: the admin's related-object wrapper around it shares its class-level attrs across forms.
        select = getattr(select, "widget", select)
        select.attrs["data-plan-values"] = json.dumps(values)
        plan_id = self.data.get(self.add_prefix("plan")) if self.is_bound else self.initial.get("plan")
        chosen = values.get(str(plan_id), {})
        for name in LIMIT_FIELDS:
            field, shown = self.fields[name], chosen.get(name)
            help_id = self.html_id(name)
            field.widget.attrs.update({"data-plan-select": self.html_id("plan"), "data-plan-field": name,
                                       "data-plan-help": help_id})
            if shown and name != "allowed_models":
                field.widget.attrs["placeholder"] = f"plan: {shown}"
            value = format_html('<span class="sluice-plan-value" data-plan-value="{}">{}</span>', help_id,
                                f"plan: {shown}" if shown else "")
            field.help_text = format_html("{} {}", field.help_text, value) if field.help_text else value

    def html_id(self, name):
        # The id a field's BoundField will have (BoundField.auto_id), without making that BoundField now: it copies
        # the field's help text when it is made.
        name = self.add_prefix(name)
        return self.auto_id % name if "%s" in str(self.auto_id) else name if self.auto_id else ""

    def extra_choices(self):
        return [(self.EVERY_MODEL, "every configured model, whatever the plan allows")]

    def ticked(self, stored):
        return [self.EVERY_MODEL] if stored == [] else stored or []

    def clean_allowed_models(self):
        names = self.cleaned_data["allowed_models"]
        if self.EVERY_MODEL not in names:
            return names or None  # stored as null: the plan's value
        if len(names) > 1:
            raise forms.ValidationError("Tick either every configured model or some models, not both.")
        return []


def plan_values(plan):
    """A plan's limits as the override fields show them."""
    values = {name: display.number(getattr(plan, name)) for name in LIMIT_FIELDS if name != "allowed_models"}
    models = plan.allowed_models
    if not isinstance(models, list):
        values["allowed_models"] = "no model (its stored value is not a list)"  # fails closed: see AllowedModelsForm
    else:
        values["allowed_models"] = ", ".join(map(str, models)) or "every configured model"
    return values


# Limits ----------------------------------------------------------------------------------------


@admin.register(Plan)
class PlanAdmin(AuditedAdmin):
    form = PlanForm
    audited_fields = (*LIMIT_FIELDS, "is_default")
    list_display = ["name", "default", "per_day", "per_month", "per_minute", "at_once", "per_request", "models",
                    "users"]
    search_fields = ["name"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(user_count=Count("quotas"))

    @admin.display(ordering="user_count")
    def users(self, plan):
        return display.number(plan.user_count)

    @admin.display(ordering="is_default", description="default")
    def default(self, plan):
        return display.badge("default", "info") if plan.is_default else ""

    @admin.display(ordering="tokens_per_day", description="tokens per day")
    def per_day(self, plan):
        return display.number(plan.tokens_per_day)

    @admin.display(ordering="tokens_per_month", description="tokens per month")
    def per_month(self, plan):
        return display.number(plan.tokens_per_month)

    @admin.display(ordering="requests_per_minute", description="requests per minute")
    def per_minute(self, plan):
        return display.number(plan.requests_per_minute)

    @admin.display(ordering="concurrent_streams", description="streams at once")
    def at_once(self, plan):
        return display.number(plan.concurrent_streams)

    @admin.display(ordering="max_tokens_per_request", description="max tokens per request")
    def per_request(self, plan):
        return display.number(plan.max_tokens_per_request)

    @admin.display(description="models")
    def models(self, plan):
        return plan_values(plan)["allowed_models"]


class ChangePlanForm(forms.Form):
    plan = forms.ModelChoiceField(Plan.objects.all())


@admin.register(UserQuota)
class UserQuotaAdmin(TimezoneSelect, AuditedAdmin):
    form = UserQuotaForm
    audited_fields = QUOTA_FIELDS
    list_display = ["user", "plan", "state", "today", "this_month", "limits", "ledger"]
    list_filter = ["plan", "suspended"]
    list_select_related = ["user", "plan"]
    search_fields = ["user__username", "user__email"]
    autocomplete_fields = ["user"]
    actions = ["change_plan", "suspend", "unsuspend", "reset_windows"]
    fieldsets = [
        (None, {"fields": ["user", "plan", "suspended", "timezone"]}),
        ("Overrides (blank: the plan's value)", {"fields": list(LIMIT_FIELDS)}),
    ]

    def get_queryset(self, request):
        return dashboard.with_window_usage(super().get_queryset(request), timezone.now())

    @admin.display(description="status", ordering="suspended")
    def state(self, quota):
        # A badge, not Django's boolean icon: a green tick beside a suspended user read as "fine" (issue 19, item 8).
        return display.badge("suspended", "bad") if quota.suspended else display.badge("active", "good")

    @admin.display(description="used today", ordering="day_used")
    def today(self, quota):
        return self._usage(quota, 0, quota.day_used)

    @admin.display(description="used this month", ordering="month_used")
    def this_month(self, quota):
        return self._usage(quota, 1, quota.month_used)

    @admin.display(description="other limits")
    def limits(self, quota):
        limits = Limits.combine(quota.plan, quota)
        return format_html('{}/min, {} at once,<div class="sluice-sub">{} per request</div>',
                           display.number(limits.requests_per_minute), display.number(limits.concurrent_streams),
                           display.number(limits.max_tokens_per_request))

    @staticmethod
    def _window(quota, which):
        """The quota's current day (0) or month (1) window, with its effective limit."""
        return calendar_windows(Limits.combine(quota.plan, quota), timezone.now())[which]

    def _usage(self, quota, which, used):
        """"300 of 2,000", and under it the share used and when the window resets (what is left in the title)."""
        window = self._window(quota, which)
        share = f"{min(100, 100 * used // window.limit)}%" if window.limit else "–"
        return format_html('<span title="{} left">{} of {}</span><div class="sluice-sub">{} · resets in {}</div>',
                           display.number(max(0, window.limit - used)), display.number(used),
                           display.number(window.limit), share, timeuntil(window.end, timezone.now(), depth=1))

    @admin.display(description="ledger")
    def ledger(self, quota):
        url = reverse("admin:quotas_usage_changelist") + f"?user__id__exact={quota.user_id}"
        return format_html('<a href="{}">requests</a>', url)

    @admin.action(description="Change the plan of the selected users…", permissions=["change"])
    def change_plan(self, request, queryset):
        form = ChangePlanForm(request.POST if "apply" in request.POST else None)
        if form.is_valid():
            plan = form.cleaned_data["plan"]
            self.message_user(request, f"{operations.set_plan(request.user, queryset, plan)} user(s) moved to {plan}.")
            return None
        return TemplateResponse(request, "admin/quotas/userquota/change_plan.html", {
            **self.admin_site.each_context(request), "opts": self.opts, "title": "Change plan", "form": form,
            "quotas": queryset, "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        })

    @admin.action(description="Suspend the selected users", permissions=["change"])
    def suspend(self, request, queryset):
        self.message_user(request, f"{operations.set_suspended(request.user, queryset, True)} user(s) suspended.")

    @admin.action(description="Unsuspend the selected users", permissions=["change"])
    def unsuspend(self, request, queryset):
        self.message_user(request, f"{operations.set_suspended(request.user, queryset, False)} user(s) unsuspended.")

    @admin.action(description="Reset the current day and month windows", permissions=["change"])
    def reset_windows(self, request, queryset):
        try:
            count = operations.reset_windows(request.user, queryset, timezone.now())
        except StoreUnavailable:
            self.message_user(request, "The ledger was reset but the counter store could not be reached: the "
                                       "old counts stay until it is reset again.", messages.ERROR)
        else:
            self.message_user(request, f"The current windows of {count} user(s) start afresh.")


# Users: the quota inline on Django's own user page --------------------------------------------


class UserQuotaInline(TimezoneSelect, admin.StackedInline):
    model = UserQuota
    form = UserQuotaForm
    fields = ["plan", "suspended", "timezone", *LIMIT_FIELDS]
    verbose_name = verbose_name_plural = "quota (none: the default plan)"


if admin.site.is_registered(User):
    admin.site.unregister(User)


@admin.register(User)
class SluiceUserAdmin(NulFree, UserAdmin):
    inlines = [*UserAdmin.inlines, UserQuotaInline, teams.MembershipsOfUserInline]

    def save_formset(self, request, form, formset, change):
        if formset.model is not UserQuota:
            return super().save_formset(request, form, formset, change)
        quota = UserQuota.objects.select_related("plan").filter(user_id=form.instance.pk)
        before = quota.first()
        super().save_formset(request, form, formset, change)
        after = quota.first()
        if after is None:
            entry = before and AuditEntry.entry(request.user, Action.REMOVED, before,
                                                old=AuditEntry.values(before, QUOTA_FIELDS))
        else:
            entry = AuditEntry.for_save(request.user, before, after, QUOTA_FIELDS)
        if entry:
            entry.save()
