"""Teams in the admin (issue 18, item 6): a team's pools (tokens and money a day and a month, in its time zone) and
its members with their caps, on one page; every change to a team or a membership in the audit trail
(docs/operations.md, "Teams and key limits").

Two refusals keep a key from spending from a pool its user is not in: a member who still has keys naming the team
cannot be removed (the page lists the keys to revoke or move first), and a team that keys still name cannot be deleted
(ApiKey.team is PROTECT: the admin's "cannot delete" page lists them).
"""

from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Count, ProtectedError
from django.forms.models import BaseInlineFormSet
from django.http import HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html

from ..models import AlertRule, ApiKey, AuditEntry, Team, TeamMembership
from . import alerts, display
from .common import NulFree
from .timezones import TimezoneSelect

Action = AuditEntry.Action
TEAM_FIELDS = ("name", "tokens_per_day", "tokens_per_month", "budget_per_day", "budget_per_month", "timezone")
MEMBER_FIELDS = ("team", "user", "budget_per_day", "budget_per_month")


def money(value):
    """A budget as "1,250.50 USD" (more decimals only where it has them); None: "–" (no limit)."""
    if value is None:
        return "–"
    shown = f"{value:,.2f}" if value == round(value, 2) else f"{value.normalize():,f}"
    return f"{shown} {settings.SLUICE_CURRENCY}"


def pool(tokens, budget):
    """A window's pool in one cell: its tokens, and its money under them."""
    shown = f"{display.number(tokens)} tokens" if tokens is not None else "no token limit"
    return format_html('{}<div class="sluice-sub">{}</div>', shown,
                       money(budget) if budget is not None else "no budget")


def saved(obj):
    """The record as the database now holds it: money read back with its 6 decimal places, so that "5" typed and
    "5.000000" stored are one value in the audit trail (not a change the next time the form is saved)."""
    return type(obj)._default_manager.get(pk=obj.pk)


def keys_in_the_way(team, user_ids):
    """The unrevoked keys of these users that name the team: they would spend from a pool their user left (an
    expired key counts too: its expiry can be moved)."""
    return list(ApiKey.objects.filter(team=team, user_id__in=user_ids, revoked_at__isnull=True)
                .select_related("user").order_by("user__username", "prefix"))


def members_keys_error(keys):
    """The refusal, naming each key (prefix and name) and its user, so that the operator knows what to revoke or move.
    """
    listed = "; ".join(f"{key.user}: {key}" for key in keys)
    return ValidationError(
        f"These members still have keys spending from this team's pool: {listed}. Revoke those keys, or give them "
        f"another team (or none) on their pages, before removing the members.", code="member_has_keys")


class MembershipFormSet(BaseInlineFormSet):
    """Refuses to take a user out of the team (their row deleted, or given another user) while keys of theirs still
    name the team."""

    def clean(self):
        super().clean()
        if self.instance.pk is None:
            return
        kept = {self._user_id(form) for form in self.forms if not self._should_delete_form(form)}
        leaving = {form.initial["user"] for form in self.initial_forms} - kept
        if leaving and (keys := keys_in_the_way(self.instance, leaving)):
            raise members_keys_error(keys)

    @staticmethod
    def _user_id(form):
        user = getattr(form, "cleaned_data", {}).get("user")
        return user.pk if user else form.initial.get("user")


class MembershipInline(admin.TabularInline):
    model = TeamMembership
    formset = MembershipFormSet
    fields = ["user", "budget_per_day", "budget_per_month", "joined_at"]
    readonly_fields = ["joined_at"]
    autocomplete_fields = ["user"]
    extra = 1
    verbose_name_plural = (f"members (caps in {settings.SLUICE_CURRENCY} on what each may spend of the pool; "
                           "empty: no cap)")


class MembershipsOfUserInline(admin.TabularInline):
    """A user's teams on the user's page, read-only: memberships are edited on the team's page, where they are
    audited and checked against the user's keys."""

    model = TeamMembership
    fk_name = "user"
    fields = ["team", "budget_per_day", "budget_per_month", "joined_at"]
    readonly_fields = fields
    extra = 0
    verbose_name_plural = "teams (edited on each team's page)"

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_view_permission(self, request, obj=None):
        return obj is not None and super().has_view_permission(request, obj)  # a new user is in no team


@admin.register(Team)
class TeamAdmin(TimezoneSelect, NulFree, admin.ModelAdmin):
    list_display = ["name", "members", "per_day", "per_month", "timezone"]
    search_fields = ["name"]
    inlines = [MembershipInline]
    fieldsets = [
        (None, {"fields": ["name", "timezone", "keys"]}),
        (f"Pool (money in {settings.SLUICE_CURRENCY}; empty: no limit)",
         {"fields": ["tokens_per_day", "tokens_per_month", "budget_per_day", "budget_per_month"]}),
    ]
    readonly_fields = ["keys"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(member_count=Count("memberships"))

    @admin.display(description="members", ordering="member_count")
    def members(self, team):
        return display.number(team.member_count)

    @admin.display(description="pool per day", ordering="tokens_per_day")
    def per_day(self, team):
        return pool(team.tokens_per_day, team.budget_per_day)

    @admin.display(description="pool per month", ordering="tokens_per_month")
    def per_month(self, team):
        return pool(team.tokens_per_month, team.budget_per_month)

    @admin.display(description="API keys")
    def keys(self, team):
        """How many keys spend from the pool, linked to their list (where they are revoked or moved)."""
        if team.pk is None:
            return "–"
        url = reverse("admin:quotas_apikey_changelist") + f"?team__id__exact={team.pk}"
        return format_html('<a href="{}">{} key(s)</a>', url, display.number(team.api_keys.count()))

    def save_model(self, request, obj, form, change):
        before = saved(obj) if change else None
        super().save_model(request, obj, form, change)
        if entry := AuditEntry.for_save(request.user, before, saved(obj), TEAM_FIELDS):
            entry.save()

    def save_formset(self, request, form, formset, change):
        """The memberships' changes, each an entry of its own (target: the membership): added, caps changed, removed.
        """
        if formset.model is not TeamMembership:
            return super().save_formset(request, form, formset, change)
        rows = TeamMembership.objects.filter(team=form.instance).select_related("team", "user")
        before = {row.pk: row for row in rows}
        super().save_formset(request, form, formset, change)
        after = {row.pk: row for row in rows.all()}
        entries = [AuditEntry.for_save(request.user, before.get(pk), row, MEMBER_FIELDS) for pk, row in after.items()]
        entries += [AuditEntry.entry(request.user, Action.REMOVED, row, old=AuditEntry.values(row, MEMBER_FIELDS))
                    for pk, row in before.items() if pk not in after]
        AuditEntry.objects.bulk_create(entry for entry in entries if entry)

    # Deleting: audited from the team's page and the bulk action alike, its memberships with it.
    def delete_model(self, request, obj):
        with transaction.atomic():
            self._removed(request, [obj])
            super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        with transaction.atomic():
            self._removed(request, list(queryset))
            super().delete_queryset(request, queryset)

    @staticmethod
    def _removed(request, teams):
        """The entries of the teams and of what goes with them: their memberships, and their alert rules (CASCADE,
        which would otherwise vanish from the trail)."""
        rows = TeamMembership.objects.filter(team__in=teams).select_related("team", "user")
        rules = AlertRule.objects.filter(team__in=teams).select_related("user", "plan")
        AuditEntry.objects.bulk_create([
            *(AuditEntry.entry(request.user, Action.REMOVED, row, old=AuditEntry.values(row, MEMBER_FIELDS))
              for row in rows),
            *(AuditEntry.entry(request.user, Action.REMOVED, rule, old=AuditEntry.values(rule, alerts.RULE_FIELDS))
              for rule in rules),
            *(AuditEntry.entry(request.user, Action.REMOVED, team, old=AuditEntry.values(team, TEAM_FIELDS))
              for team in teams)])

    # A key that names the team is PROTECT: the confirmation pages list such keys and refuse. One named the team
    # between that page and its POST: the refusal again, never a 500.
    def delete_view(self, request, object_id, extra_context=None):
        try:
            return super().delete_view(request, object_id, extra_context)
        except ProtectedError:
            return HttpResponseRedirect(request.path)  # the confirmation page, which now lists the key

    def response_action(self, request, queryset, **kwargs):
        try:
            return super().response_action(request, queryset, **kwargs)
        except ProtectedError:
            self.message_user(request, "API keys name some of these teams: nothing was deleted. Revoke those keys "
                                       "or give them another team first.", messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())
