"""The catalogue in the admin: providers (a write-only key, a connection test) and models with their deployments
(streaming/catalogue/models.py). Imported by streaming/admin.py, which Django's admin autodiscovery finds.

Every add, change and removal is written to quotas' audit trail (audit.py). Nothing here reaches the gateway
directly: each process reloads the catalogue every SLUICE_CATALOGUE_REFRESH seconds (streaming/catalogue/registry.py),
so a saved change serves requests within that time, without a restart.
"""

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Count
from django.http import Http404, HttpResponseRedirect
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from quotas.console.common import NulFree
from streaming.catalogue.models import NAME, Deployment, ModelPrice, Provider, ServedModel
from streaming.catalogue.secrets import SecretsUnavailable
from streaming.gateway.validation import field_rules_problem

from . import audit, connection

MAX_TESTED = 10  # providers one "Test connection" action tests at once


def applies_within():
    return (f"Saved changes reach every gateway process within {settings.SLUICE_CATALOGUE_REFRESH:g} s "
            f"(SLUICE_CATALOGUE_REFRESH), without a restart.")


class AuditedCatalogueAdmin(NulFree, admin.ModelAdmin):
    """Saves and removals with their audit entries, in one transaction with the change."""

    audited_fields = ()

    def audited(self, obj, form=None):
        return audit.values(obj, self.audited_fields)

    def save_model(self, request, obj, form, change):
        with transaction.atomic():
            before = self.audited(type(obj)._default_manager.get(pk=obj.pk)) if change else None
            super().save_model(request, obj, form, change)
            if entry := audit.saved(request.user, obj, before, self.audited(obj, form)):
                entry.save()

    def delete_model(self, request, obj):
        with transaction.atomic():
            self.removed(request, [obj])
            super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        with transaction.atomic():
            self.removed(request, list(queryset))
            super().delete_queryset(request, queryset)

    def removed(self, request, objs):
        audit.AuditEntry.objects.bulk_create(audit.removed(request.user, obj, self.audited(obj)) for obj in objs)

    def get_fieldsets(self, request, obj=None):
        fieldsets = super().get_fieldsets(request, obj)
        first = {**fieldsets[0][1], "description": applies_within()}
        return [(fieldsets[0][0], first), *fieldsets[1:]]


# Providers ---------------------------------------------------------------------------------------------------


class ProviderForm(forms.ModelForm):
    """The key is write-only: encrypted when saved (streaming/catalogue/secrets.py), never put back in the page."""

    api_key = forms.CharField(
        label="API key", required=False, strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Stored encrypted and never shown again; left blank on a change, the stored key stays. A stored "
                  "key is used rather than the environment variable below.")
    clear_api_key = forms.BooleanField(label="Clear the stored key", required=False)

    class Meta:
        model = Provider
        fields = ["name", "base_url", "api_key", "clear_api_key", "api_key_env", "token_limit_field", "limit_scope",
                  "connect_timeout", "first_token_timeout", "enabled"]
        labels = {"base_url": "Base URL", "api_key_env": "Or the key from the environment variable"}

    key_replaced = False

    def clean(self):
        data = super().clean()
        key, clear = data.get("api_key"), data.get("clear_api_key")
        if key and clear:
            self.add_error("clear_api_key", "Enter a new key or clear the stored one, not both.")
        elif key:
            stored = bool(self.instance.api_key_encrypted)
            try:
                self.instance.set_api_key(key)
            except SecretsUnavailable as exc:
                self.add_error("api_key", f"The key cannot be stored: {exc} Or name an environment variable below.")
            else:
                self.key_replaced = stored
        elif clear:
            self.instance.set_api_key("")
        return data


@admin.register(Provider)
class ProviderAdmin(AuditedCatalogueAdmin):
    form = ProviderForm
    audited_fields = audit.PROVIDER_FIELDS
    list_display = ["name", "address", "key", "served", "limit_scope", "status"]
    list_filter = ["enabled"]
    search_fields = ["name", "base_url"]
    actions = ["test_connection"]
    readonly_fields = ["key_source"]
    fieldsets = [
        (None, {"fields": ["name", "base_url", "enabled"]}),
        ("Key", {"fields": ["key_source", "api_key", "clear_api_key", "api_key_env"]}),
        ("Requests", {"fields": ["token_limit_field", "limit_scope", "connect_timeout", "first_token_timeout"]}),
    ]

    def get_fieldsets(self, request, obj=None):
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None:  # nothing stored yet to show or clear
            key = {"fields": ["api_key", "api_key_env"]}
            return [fieldsets[0], ("Key", key), *fieldsets[2:]]
        return fieldsets

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(deployment_count=Count("deployments"))

    def audited(self, obj, form=None):
        return audit.values(obj, self.audited_fields, key_replaced=getattr(form, "key_replaced", False))

    @admin.display(description="key source")
    def key_source(self, provider):
        return provider.key_source

    @admin.display(description="base URL", ordering="base_url")
    def address(self, provider):
        return provider.base_url or format_html('<span class="sluice-sub">{}</span>', "the built-in simulator")

    @admin.display(description="key")
    def key(self, provider):
        return provider.key_source

    @admin.display(description="deployments", ordering="deployment_count")
    def served(self, provider):
        return provider.deployment_count

    @admin.display(description="status", ordering="enabled")
    def status(self, provider):
        return format_html('<span class="sluice-badge sluice-badge--{}">{}</span>',
                           *(("good", "enabled") if provider.enabled else ("muted", "disabled")))

    @admin.action(description="Test connection (list the models, time a first token)", permissions=["change"])
    def test_connection(self, request, queryset):
        providers = list(queryset[:MAX_TESTED + 1])
        if len(providers) > MAX_TESTED:
            self.message_user(request, f"Only the first {MAX_TESTED} selected providers were tested.",
                              messages.WARNING)
        for result in connection.test(providers[:MAX_TESTED], getattr(request, "scope", {})):
            level = messages.SUCCESS if result.ok else messages.ERROR if result.failed else messages.WARNING
            self.message_user(request, result.describe(), level)

    def get_urls(self):
        return [path("<path:object_id>/test-connection/", self.admin_site.admin_view(self.test_view),
                     name="streaming_provider_test"),
                *super().get_urls()]

    def test_view(self, request, object_id):
        """The change page's "Test connection" button (a POST): the action, for this provider."""
        if request.method != "POST":
            return HttpResponseRedirect(reverse("admin:streaming_provider_change", args=[object_id]))
        provider = self.get_object(request, unquote(object_id))
        if provider is None:
            raise Http404("No such provider.")
        if not self.has_change_permission(request, provider):
            raise PermissionDenied
        self.test_connection(request, Provider.objects.filter(pk=provider.pk))
        return HttpResponseRedirect(reverse("admin:streaming_provider_change", args=[provider.pk]))


# Models and their deployments ----------------------------------------------------------------------------------


class NameList(forms.CharField):
    """Names as "a, b" in the page, a list in the record."""

    def prepare_value(self, value):
        return ", ".join(value) if isinstance(value, list) else value

    def to_python(self, value):
        return [name for name in (value or "").replace(",", " ").split() if name]


class ServedModelForm(forms.ModelForm):
    aliases = NameList(required=False, help_text='Other names clients may send, comma-separated: e.g. "default".')

    class Meta:
        model = ServedModel
        fields = ["name", "aliases", "context_length", "field_rules", "enabled"]

    def clean_aliases(self):
        aliases = list(dict.fromkeys(self.cleaned_data["aliases"]))
        for alias in aliases:
            NAME(alias)
        taken = {}
        for other in ServedModel.objects.exclude(pk=self.instance.pk).only("name", "aliases"):
            for name in [other.name, *(other.aliases or [])]:
                taken.setdefault(name, other.name)
        clashes = [f"{alias} ({taken[alias]})" for alias in aliases if alias in taken]
        if clashes:
            raise forms.ValidationError("Already a model's name or alias: " + ", ".join(clashes) + ".")
        return aliases

    def clean_field_rules(self):
        rules = self.cleaned_data.get("field_rules") or {}
        # The gateway's own check of SLUICE_FIELD_RULES, for this one model's rule.
        if problem := field_rules_problem({"*": rules}):
            raise forms.ValidationError(problem.replace(" for '*'", "").capitalize() + ".")
        return rules


class DeploymentInline(admin.TabularInline):
    model = Deployment
    fields = ["provider", "upstream_model", "weight", "priority", "enabled"]
    extra = 0
    verbose_name_plural = ("deployments (requests go to the enabled ones of the best priority by weight; the next "
                           "priority is the fallback)")

    def get_extra(self, request, obj=None, **kwargs):
        return 1 if obj is None else 0


class PriceInline(admin.TabularInline):
    """Prices are added, never edited: a change is a new price from its time on, and each ledger row keeps the one
    it used (docs/quotas.md, "Money")."""

    model = ModelPrice
    fields = ["effective_from", "input", "cached_input", "cache_write", "output", "reasoning"]
    extra = 0
    can_delete = False
    verbose_name_plural = (f"prices per million tokens, in {settings.SLUICE_CURRENCY} (a change is a new price from "
                           f"its time on; a request is priced at the one in effect when it began)")

    def has_change_permission(self, request, obj=None):
        return False  # the rows there stay as they are; new ones can be added


@admin.register(ServedModel)
class ServedModelAdmin(AuditedCatalogueAdmin):
    form = ServedModelForm
    inlines = [DeploymentInline, PriceInline]
    audited_fields = audit.MODEL_FIELDS
    list_display = ["name", "other_names", "served_by", "context_length", "status"]
    list_filter = ["enabled"]
    search_fields = ["name"]
    fieldsets = [(None, {"fields": ["name", "aliases", "context_length", "field_rules", "enabled"]})]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("deployments__provider")

    @admin.display(description="aliases")
    def other_names(self, model):
        return ", ".join(model.aliases or []) or "–"

    @admin.display(description="deployments")
    def served_by(self, model):
        rows = [(d, f"priority {d.priority}, weight {d.weight}" + ("" if d.enabled and d.provider.enabled
                                                                  else ", disabled"))
                for d in model.deployments.all()]
        return format_html_join("", '<div>{} <span class="sluice-sub">{}</span></div>', rows) or "none"

    @admin.display(description="status", ordering="enabled")
    def status(self, model):
        return format_html('<span class="sluice-badge sluice-badge--{}">{}</span>',
                           *(("good", "enabled") if model.enabled else ("muted", "disabled")))

    def removed(self, request, objs):
        # A model's deployments go with it: each removal is audited.
        deployments = [d for obj in objs for d in obj.deployments.select_related("provider", "model")]
        audit.AuditEntry.objects.bulk_create(
            [*(audit.removed(request.user, d, audit.values(d, audit.DEPLOYMENT_FIELDS)) for d in deployments),
             *(audit.removed(request.user, obj, self.audited(obj)) for obj in objs)])

    def save_formset(self, request, form, formset, change):
        """The deployments' saves, each audited: added, changed (from what), removed."""
        if formset.model is ModelPrice:
            with transaction.atomic():
                super().save_formset(request, form, formset, change)
                audit.AuditEntry.objects.bulk_create(
                    audit.saved(request.user, price, None, audit.values(price, audit.PRICE_FIELDS))
                    for price in formset.new_objects)
            return None
        if formset.model is not Deployment:
            return super().save_formset(request, form, formset, change)
        ids = [f.instance.pk for f in formset.forms if f.instance.pk]
        stored = list(Deployment.objects.filter(pk__in=ids).select_related("provider", "model"))
        before = {d.pk: audit.values(d, audit.DEPLOYMENT_FIELDS) for d in stored}
        deleted = {f.instance.pk for f in formset.deleted_forms if f.instance.pk}
        # Made before the rows go (a deleted record loses its pk).
        entries = [audit.removed(request.user, d, before[d.pk]) for d in stored if d.pk in deleted]
        with transaction.atomic():
            super().save_formset(request, form, formset, change)
            for deployment in [*formset.new_objects, *(d for d, _ in formset.changed_objects)]:
                entry = audit.saved(request.user, deployment, before.get(deployment.pk),
                                    audit.values(deployment, audit.DEPLOYMENT_FIELDS))
                if entry:
                    entries.append(entry)
            audit.AuditEntry.objects.bulk_create(entries)
