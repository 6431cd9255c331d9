"""What the console's admin pages share: NUL-free searches and filters, audited saves, read-only records."""

from django import forms
from django.contrib import admin
from django.http import QueryDict

from ..domain import catalogue
from ..models import AuditEntry


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


class ReadOnlyAdmin(NulFree, admin.ModelAdmin):
    """Records written by the gateway or by other admin pages: viewable, never edited here."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class AllowedModelsForm(forms.ModelForm):
    """allowed_models ticked among the catalogue's models (quotas/domain/catalogue.py, read when the form is built)
    instead of typed as JSON: a typo can no longer be saved. A name stored earlier and no longer configured is offered
    too, ticked, so that saving another field keeps it (dropping it could widen the list to every model)."""

    allowed_models = forms.MultipleChoiceField(required=False, widget=forms.CheckboxSelectMultiple)
    none_ticked = "None ticked: every configured model."

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        stored = self.initial.get("allowed_models")
        valid = stored is None or isinstance(stored, list) and all(isinstance(name, str) for name in stored)
        names = stored if valid and stored else []
        field = self.fields["allowed_models"]
        configured = catalogue.model_names()
        field.choices = [*self.extra_choices(), *((name, name) for name in configured),
                         *((name, f"{name} (not configured)") for name in names if name not in configured)]
        field.help_text = self.none_ticked
        if not valid:
            # Saved past validation (a shell, an older admin): the plan allows nothing until a choice is saved here.
            field.help_text += f" The stored value {stored!r:.80} is not a list of model names: no model is allowed."
        self.initial["allowed_models"] = self.ticked(stored if valid else None)

    def extra_choices(self):
        return []

    def ticked(self, stored):
        return stored or []
