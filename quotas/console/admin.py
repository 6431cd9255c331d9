"""The operators' admin: limits (plans, per-user quotas), API keys, the usage ledger, the audit trail.

A thin interface: limits are read from the database on every request, so what is saved here applies
to the next request without a restart (and to running streams at their next lease). Every change to
who may use what is written to the audit trail. The usage dashboard and the changelist's usage
figures are read in quotas/console/dashboard.py.
"""

import zoneinfo

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.db import transaction
from django.db.models import Count, Q
from django.http import QueryDict
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.timesince import timeuntil

from ..domain import operations
from ..domain.policy import LIMIT_FIELDS, Limits, calendar_windows
from ..models import ApiKey, AuditEntry, DailyUsage, Plan, Usage, UserQuota
from ..store import StoreUnavailable
from . import dashboard

Action = AuditEntry.Action
User = get_user_model()
QUOTA_FIELDS = ("plan", *LIMIT_FIELDS, "suspended", "timezone")


# Shared behaviour ------------------------------------------------------------------------------


def without_nul(text):
    # PostgreSQL refuses NUL characters in any text parameter (a 500), and no stored text contains one.
    return text.replace("\x00", "")


class NulFree:
    """Changelist parameters (search, filters, any lookup) and autocomplete terms without NUL characters."""

    def get_search_results(self, request, queryset, search_term):
        # The autocomplete of fields pointing here searches with its own term.
        return super().get_search_results(request, queryset, without_nul(search_term))

    def changelist_view(self, request, extra_context=None):
        if any("\x00" in key or any("\x00" in value for value in values) for key, values in request.GET.lists()):
            cleaned = QueryDict(mutable=True)
            for key, values in request.GET.lists():
                cleaned.setlist(without_nul(key), [without_nul(value) for value in values])
            request.GET = cleaned
        return super().changelist_view(request, extra_context)


class AuditedAdmin(NulFree, admin.ModelAdmin):
    audited_fields = ()

    def save_model(self, request, obj, form, change):
        before = type(obj)._default_manager.get(pk=obj.pk) if change else None
        super().save_model(request, obj, form, change)
        if entry := AuditEntry.for_save(request.user, before, obj, self.audited_fields):
            entry.save()


class TimezoneSelect:
    """The quota's zone picked from the installed tz database's names (the model validates; no frozen choices)."""

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        if db_field.name == "timezone":
            kwargs["widget"] = forms.Select(choices=[(name, name) for name in sorted(zoneinfo.available_timezones())])
        return super().formfield_for_dbfield(db_field, request, **kwargs)


class AllowedModelsForm(forms.ModelForm):
    """allowed_models ticked among the configured models (SLUICE_MODELS, read when the form is built) instead of typed
    as JSON: a typo can no longer be saved. A name stored earlier and no longer configured is offered too, ticked, so
    that saving another field keeps it (dropping it could widen the list to every model)."""

    allowed_models = forms.MultipleChoiceField(required=False, widget=forms.CheckboxSelectMultiple)
    none_ticked = "None ticked: every configured model."

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        stored = self.initial.get("allowed_models")
        valid = stored is None or isinstance(stored, list) and all(isinstance(name, str) for name in stored)
        names = stored if valid and stored else []
        field = self.fields["allowed_models"]
        field.choices = [*self.extra_choices(), *((name, name) for name in settings.SLUICE_MODELS),
                         *((name, f"{name} (not configured)") for name in names if name not in settings.SLUICE_MODELS)]
        field.help_text = self.none_ticked
        if not valid:
            # Saved past validation (a shell, an older admin): the plan allows nothing until a choice is saved here.
            field.help_text += f" The stored value {stored!r:.80} is not a list of model names: no model is allowed."
        self.initial["allowed_models"] = self.ticked(stored if valid else None)

    def extra_choices(self):
        return []

    def ticked(self, stored):
        return stored or []


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


class ReadOnlyAdmin(NulFree, admin.ModelAdmin):
    """Records written by the gateway or by other admin pages: viewable, never edited here."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


# Limits ----------------------------------------------------------------------------------------


@admin.register(Plan)
class PlanAdmin(AuditedAdmin):
    form = PlanForm
    audited_fields = (*LIMIT_FIELDS, "is_default")
    list_display = ["name", "is_default", "tokens_per_day", "tokens_per_month", "requests_per_minute",
                    "concurrent_streams", "max_tokens_per_request", "users"]
    search_fields = ["name"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(user_count=Count("quotas"))

    @admin.display(ordering="user_count")
    def users(self, plan):
        return plan.user_count


class ChangePlanForm(forms.Form):
    plan = forms.ModelChoiceField(Plan.objects.all())


@admin.register(UserQuota)
class UserQuotaAdmin(TimezoneSelect, AuditedAdmin):
    form = UserQuotaForm
    audited_fields = QUOTA_FIELDS
    list_display = ["user", "email", "plan", "suspended", "today", "left_today", "this_month", "left_this_month",
                    "limits", "ledger"]
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

    @admin.display(ordering="user__email")
    def email(self, quota):
        return quota.user.email

    @admin.display(description="used today", ordering="day_used")
    def today(self, quota):
        return self._used(quota, 0, quota.day_used)

    @admin.display(description="left today")
    def left_today(self, quota):
        return self._left(quota, 0, quota.day_used)

    @admin.display(description="used this month", ordering="month_used")
    def this_month(self, quota):
        return self._used(quota, 1, quota.month_used)

    @admin.display(description="left this month")
    def left_this_month(self, quota):
        return self._left(quota, 1, quota.month_used)

    @admin.display(description="other limits")
    def limits(self, quota):
        limits = Limits.combine(quota.plan, quota)
        return (f"{limits.requests_per_minute}/min, {limits.concurrent_streams} at once, "
                f"{limits.max_tokens_per_request:,} per request")

    @staticmethod
    def _window(quota, which):
        """The quota's current day (0) or month (1) window, with its effective limit."""
        return calendar_windows(Limits.combine(quota.plan, quota), timezone.now())[which]

    def _used(self, quota, which, used):
        return f"{used:,} of {self._window(quota, which).limit:,}"

    def _left(self, quota, which, used):
        window, now = self._window(quota, which), timezone.now()
        return f"{max(0, window.limit - used):,}, resets in {timeuntil(window.end, now)}"

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


# API keys --------------------------------------------------------------------------------------


@admin.register(ApiKey)
class ApiKeyAdmin(NulFree, admin.ModelAdmin):
    list_display = ["prefix", "name", "user", "created_at", "last_used_at", "expires_at", "revoked_at", "active"]
    list_filter = ["revoked_at", "expires_at"]
    list_select_related = ["user"]
    search_fields = ["prefix", "name", "user__username"]
    autocomplete_fields = ["user"]
    actions = ["revoke"]
    add_fields = ["user", "name", "expires_at"]
    fields = ["user", "name", "prefix", "created_at", "last_used_at", "expires_at", "revoked_at"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]

    def get_fields(self, request, obj=None):
        return self.add_fields if obj is None else self.fields

    def get_readonly_fields(self, request, obj=None):
        return () if obj is None else (*self.readonly_fields, "user")

    @admin.display(boolean=True)
    def active(self, key):
        return key.is_active

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        obj.raw_key = obj.set_new_key()  # for response_add only; never stored
        super().save_model(request, obj, form, change)
        AuditEntry.entry(request.user, Action.KEY_CREATED, obj, new={
            "user": obj.user.get_username(), "name": obj.name, "prefix": obj.prefix,
            "expires_at": obj.expires_at.isoformat() if obj.expires_at else None}).save()

    def response_add(self, request, obj, post_url_continue=None):
        # The raw key goes into this response only: not into a message (a cookie or the session).
        return TemplateResponse(request, "admin/quotas/apikey/issued.html", {
            **self.admin_site.each_context(request), "opts": self.opts, "title": "API key created",
            "key": obj, "raw_key": obj.raw_key,
        })

    @admin.action(description="Revoke the selected keys", permissions=["change"])
    def revoke(self, request, queryset):
        now = timezone.now()
        with transaction.atomic():
            keys = list(queryset.filter(revoked_at__isnull=True).select_related("user"))
            ApiKey.objects.filter(pk__in=[k.pk for k in keys]).update(revoked_at=now)
            AuditEntry.objects.bulk_create(
                AuditEntry.entry(request.user, Action.KEY_REVOKED, k, {"revoked_at": None},
                                 {"revoked_at": now.isoformat()}) for k in keys)
        self.message_user(request, f"{len(keys)} key(s) revoked; they are refused from the next request on.")


# The ledger and the audit trail ----------------------------------------------------------------


class ModelFilter(admin.SimpleListFilter):
    """Configured models and those in the daily rollups: a DISTINCT over the ledger would scan it all."""

    title = "model"
    parameter_name = "model"

    def lookups(self, request, model_admin):
        used = DailyUsage.objects.order_by().values_list("model", flat=True).distinct()
        return [(name, name) for name in sorted({*settings.SLUICE_MODELS, *used}) if name]

    def queryset(self, request, queryset):
        return queryset.filter(model=without_nul(self.value())) if self.value() else queryset


@admin.register(Usage)
class UsageAdmin(ReadOnlyAdmin):
    list_display = ["request_id", "user", "model", "status", "reason", "prompt_tokens", "completion_tokens",
                    "started_at", "duration_ms", "backpressure_pauses", "counted"]
    list_filter = ["status", ModelFilter, "counted"]
    list_select_related = ["user"]
    search_fields = ["=request_id", "=user__username"]
    search_help_text = "An exact request id or username."
    date_hierarchy = "started_at"
    ordering = ["-started_at"]
    # A million rows: no second COUNT(*) for the unfiltered total.
    show_full_result_count = False

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
    list_display = ["at", "actor", "action", "target_type", "target_repr", "change"]
    list_filter = ["action", "target_type"]
    list_select_related = ["actor"]
    search_fields = ["target_repr", "=actor__username"]
    date_hierarchy = "at"

    @admin.display(description="old → new")
    def change(self, entry):
        old, new = entry.old or {}, entry.new or {}
        return "; ".join(f"{name}: {old.get(name, '–')} → {new.get(name, '–')}" for name in {**old, **new})


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
    inlines = [*UserAdmin.inlines, UserQuotaInline]

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
