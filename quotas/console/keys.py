"""API keys in the admin (issue 19, item 7): issued on a one-time page, filtered by status, revoked and deleted with
an audit entry each.

The add form's POST redirects to the one-time page (so a refresh is a GET, and issues nothing); the raw key waits in
the operator's session between the two requests and is removed by the page that shows it, so a refresh, the back
button or another tab finds it gone. The session is stored server-side (Django's default, database sessions): a key
not yet shown stays there at most until that page is opened or the session ends; it is worth no more than the
session itself, whose holder may issue keys anyway. (With SESSION_ENGINE set to signed cookies it would travel in a
cookie: keep sessions server-side.)
"""

import json
import shlex
from dataclasses import dataclass

from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Q
from django.http import Http404, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone

from ..domain import catalogue
from ..domain.selectors import caller_limits
from ..models import ApiKey, AuditEntry, Team, TeamMembership
from . import display
from .common import AllowedModelsForm, NulFree

Action = AuditEntry.Action
KEY_FIELDS = ("user", "name", "prefix", "created_at", "last_used_at", "expires_at", "revoked_at", "team",
              "budget_per_day", "budget_per_month")
# What an operator edits on a key's page, audited when it changes.
EDITED_FIELDS = ("name", "expires_at", "allowed_models", "team", "budget_per_day", "budget_per_month")
KEY_LIMIT_FIELDS = ("team", "budget_per_day", "budget_per_month")
NOT_A_MEMBER = "The key's user is not a member of this team (add them on the team's page first)."
ISSUED = "sluice.issued_keys"  # session key: {api key pk: raw key}, until each is shown
PROMPT = "Say hello in five words."


def remember(session, key_id, raw_key):
    issued = dict(session.get(ISSUED, {}))
    issued[str(key_id)] = raw_key
    session[ISSUED] = issued


def take(session, key_id):
    """The raw key of `key_id` if it was never shown (and forget it); None afterwards."""
    issued = dict(session.get(ISSUED, {}))
    raw_key = issued.pop(str(key_id), None)
    if raw_key is not None:
        if issued:
            session[ISSUED] = issued
        else:
            del session[ISSUED]
    return raw_key


@dataclass(frozen=True)
class Snippets:
    curl: str
    python: str
    model: str


def example_model(user_id):
    """A model the key's user may call (the first in the catalogue their limits allow), for the snippets."""
    limits = caller_limits(user_id)
    names = catalogue.model_names()
    allowed = [name for name in names if limits.allows_model(name, names)]
    return (allowed or names or ["MODEL"])[0]


def snippets(base_url, raw_key, model):
    """Ready to paste: a streaming curl (the key exported first, so it stays out of the command line's history) and
    the OpenAI Python SDK pointed at this gateway. `base_url` ends with /v1."""
    body = json.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": PROMPT}]})
    curl = (f"export SLUICE_KEY={shlex.quote(raw_key)}\n"
            f"curl -N {shlex.quote(base_url + '/chat/completions')} \\\n"
            f'  -H "Authorization: Bearer $SLUICE_KEY" \\\n'
            f'  -H "Content-Type: application/json" \\\n'
            f"  -d {shlex.quote(body)}")
    python = (f"from openai import OpenAI\n\n"
              f"client = OpenAI(base_url={base_url!r}, api_key={raw_key!r})\n"
              f"stream = client.chat.completions.create(\n"
              f"    model={model!r}, stream=True,\n"
              f"    messages=[{{\"role\": \"user\", \"content\": {PROMPT!r}}}],\n"
              f")\n"
              f"for chunk in stream:\n"
              f"    if chunk.choices:\n"
              f"        print(chunk.choices[0].delta.content or \"\", end=\"\", flush=True)\n"
              f"print()\n")
    return Snippets(curl, python, model)


# The admin ----------------------------------------------------------------------------------------


class KeyStatusFilter(admin.SimpleListFilter):
    """Active, revoked or expired, as display.key_status decides (revoked wins over expired)."""

    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [("active", "active"), ("revoked", "revoked"), ("expired", "expired")]

    def queryset(self, request, queryset):
        now = timezone.now()
        live = Q(expires_at__isnull=True) | Q(expires_at__gt=now)
        match self.value():
            case "active":
                return queryset.filter(live, revoked_at__isnull=True)
            case "revoked":
                return queryset.filter(revoked_at__isnull=False)
            case "expired":
                return queryset.filter(revoked_at__isnull=True, expires_at__lte=now)
        return queryset


class ApiKeyForm(AllowedModelsForm):
    """A key's models: some of what its user's plan allows (issue 18, item 2), or (none ticked) all of it. Its team:
    one its user is a member of (the choices, once the user is known; checked here when the user is chosen in the same
    form)."""

    none_ticked = ("None ticked: every model the user's plan allows. Ticked: only those (and only those the plan "
                   "allows).")

    class Meta:
        model = ApiKey
        fields = "__all__"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "team" in self.fields and self.instance.user_id:
            # The key's current team stays offered even if its user has left it (a shell): shown, not blanked.
            teams = Q(memberships__user_id=self.instance.user_id) | Q(pk=self.instance.team_id or 0)
            self.fields["team"].queryset = Team.objects.filter(teams).distinct()

    def clean_allowed_models(self):
        # None ticked: stored as null, as a key issued without models has it, so that saving its page (to give it a
        # team or a limit) is not also an audited "allowed_models: – → []" that changes nothing.
        return self.cleaned_data["allowed_models"] or None

    def clean(self):
        cleaned = super().clean()
        team, user = cleaned.get("team"), cleaned.get("user")
        user_id = user.pk if user else self.instance.user_id
        if team and user_id and not TeamMembership.objects.filter(team=team, user_id=user_id).exists():
            self.add_error("team", NOT_A_MEMBER)
        return cleaned


@admin.register(ApiKey)
class ApiKeyAdmin(NulFree, admin.ModelAdmin):
    form = ApiKeyForm
    list_display = ["prefix", "name", "user", "team", "status", "created", "last_used", "expires"]
    list_filter = [KeyStatusFilter, "team"]
    list_select_related = ["user", "team"]
    search_fields = ["prefix", "name", "user__username", "team__name"]
    autocomplete_fields = ["user"]
    actions = ["revoke"]
    add_fields = ["user", "name", "expires_at", "allowed_models", *KEY_LIMIT_FIELDS]
    fields = ["user", "name", "prefix", "created_at", "last_used_at", "expires_at", "allowed_models", *KEY_LIMIT_FIELDS,
              "revoked_at"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]

    def get_fields(self, request, obj=None):
        return self.add_fields if obj is None else self.fields

    def get_readonly_fields(self, request, obj=None):
        return () if obj is None else (*self.readonly_fields, "user")

    @admin.display(description="status")
    def status(self, key):
        state = display.key_status(key, timezone.now())
        title = {"revoked": key.revoked_at, "expired": key.expires_at}.get(state)
        return display.badge(state, display.KEY_KINDS[state], display.when(title) if title else "")

    @admin.display(description="created", ordering="created_at")
    def created(self, key):
        return display.when(key.created_at)

    @admin.display(description="last used", ordering="last_used_at")
    def last_used(self, key):
        return display.when(key.last_used_at)

    @admin.display(description="expires", ordering="expires_at")
    def expires(self, key):
        return display.when(key.expires_at) if key.expires_at else "never"

    def save_model(self, request, obj, form, change):
        # The key as saved is read back for the audit: its money with the database's 6 decimal places, so that "5"
        # typed and "5.000000" stored are one value (not a change at the next save).
        if change:
            before = ApiKey.objects.get(pk=obj.pk)
            super().save_model(request, obj, form, change)
            after = ApiKey.objects.select_related("team").get(pk=obj.pk)
            if entry := AuditEntry.for_save(request.user, before, after, EDITED_FIELDS):
                entry.save()
            return
        obj.raw_key = obj.set_new_key()  # for response_add only; never stored
        super().save_model(request, obj, form, change)
        after = ApiKey.objects.select_related("team").get(pk=obj.pk)
        AuditEntry.entry(request.user, Action.KEY_CREATED, obj, new={
            "user": obj.user.get_username(), "name": obj.name, "prefix": obj.prefix,
            "expires_at": obj.expires_at.isoformat() if obj.expires_at else None,
            "allowed_models": obj.allowed_models or None, **AuditEntry.values(after, KEY_LIMIT_FIELDS)}).save()

    def response_add(self, request, obj, post_url_continue=None):
        # To the one-time page by a redirect: refreshing it repeats a GET, never the POST that issued the key. The
        # raw key waits in the session for that one view (above).
        remember(request.session, obj.pk, obj.raw_key)
        return HttpResponseRedirect(reverse("admin:quotas_apikey_issued", args=[obj.pk]))

    def get_urls(self):
        return [path("<path:object_id>/issued/", self.admin_site.admin_view(self.issued_view),
                     name="quotas_apikey_issued"),
                *super().get_urls()]

    def issued_view(self, request, object_id):
        """The new key, its copy button and snippets, once; afterwards the same page says it was shown."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        key = self.get_object(request, unquote(object_id))
        if key is None:
            raise Http404("No such API key.")
        raw_key = take(request.session, key.pk)
        context = {**self.admin_site.each_context(request), "opts": self.opts, "key": key, "raw_key": raw_key,
                   "title": "API key created" if raw_key else "API key already shown"}
        if raw_key:
            context["snippets"] = snippets(request.build_absolute_uri("/v1"), raw_key, example_model(key.user_id))
        return TemplateResponse(request, "admin/quotas/apikey/issued.html", context)

    @admin.action(description="Revoke the selected keys", permissions=["change"])
    def revoke(self, request, queryset):
        now = timezone.now()
        with transaction.atomic():
            revoked = list(queryset.filter(revoked_at__isnull=True).select_related("user"))
            ApiKey.objects.filter(pk__in=[k.pk for k in revoked]).update(revoked_at=now)
            AuditEntry.objects.bulk_create(
                AuditEntry.entry(request.user, Action.KEY_REVOKED, k, {"revoked_at": None},
                                 {"revoked_at": now.isoformat()}) for k in revoked)
        self.message_user(request, f"{len(revoked)} key(s) revoked; they are refused from the next request on.")

    # Deleting is audited like revoking (issue 19, item 7), from the key's page or the bulk action alike.
    def delete_model(self, request, obj):
        with transaction.atomic():
            self._deleted(request, [obj])
            super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        with transaction.atomic():
            self._deleted(request, list(queryset.select_related("user")))
            super().delete_queryset(request, queryset)

    @staticmethod
    def _deleted(request, deleted):
        AuditEntry.objects.bulk_create(
            AuditEntry.entry(request.user, Action.KEY_DELETED, key, old=AuditEntry.values(key, KEY_FIELDS))
            for key in deleted)
