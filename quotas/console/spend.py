"""The spend page (issue 18, item 6; docs/operations.md, "Spend"): what requests cost over a period, by user, team,
API key or model, as a table and as CSV.

Thin on purpose: the form checks the input (a bad date, a period backwards, an unknown grouping are the form's errors,
never a 500), quotas/domain/spend.py reads the ledger in one grouped query, and this module only formats what it
returns. Money is shown from integer nanos through Decimal (quotas/domain/money.py), never a float, so the cells and
the total add up to the last digit.

The page belongs to the ledger's admin: its URL sits beside the dashboard's (/admin/quotas/usage/spend/) and it asks
for the ledger's view permission. So that ledger.py keeps defining the ledger's list alone, UsageAdmin is registered
again here as a subclass that adds the page, as admin.py does with the user admin.
"""

import csv
from datetime import UTC
from decimal import Decimal
from urllib.parse import urlencode

from django import forms
from django.conf import settings
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.http import HttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone

from ..domain import catalogue
from ..domain import spend as ledger_spend
from ..domain.money import as_currency
from ..models import Team, Usage
from . import ledger

GROUP_CHOICES = [("user", "user"), ("team", "team"), ("key", "API key"), ("model", "model")]
DEFAULT_GROUP = "user"
NONE = "—"  # an unknown cost, an undefined share
NO_TEAM, NO_KEY, NO_MODEL = "— no team", "— no key", "— no model"
SHARE = Decimal("0.1")
CSV_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet would run as a formula


# The form ----------------------------------------------------------------------------------------


class UsernameField(forms.ModelChoiceField):
    """A user by their username, typed (a select of every user would not scale). A NUL character is refused here:
    PostgreSQL refuses it in a query's text (a 500), and no username contains one."""

    def to_python(self, value):
        if value and "\x00" in value:
            raise forms.ValidationError(self.error_messages["invalid_choice"], code="invalid_choice")
        return super().to_python(value)


class SpendForm(forms.Form):
    """The period (whole UTC days, both included), the grouping and the optional filters, from the query string.

    A parameter left out or blank takes its default (this month so far, by user), so the bare URL is a valid report
    and a bookmarked one stays what it says."""

    group = forms.ChoiceField(choices=GROUP_CHOICES, label="Group by")
    team = forms.ModelChoiceField(Team.objects.only("name"), required=False, empty_label="every team",
                                  error_messages={"invalid_choice": "No such team."})
    user = UsernameField(get_user_model().objects.all(), to_field_name="username", required=False,
                         widget=forms.TextInput(attrs={"placeholder": "every user", "size": 14}),
                         error_messages={"invalid_choice": "No user has this username."})
    model = forms.CharField(required=False, max_length=100,
                            widget=forms.TextInput(attrs={"placeholder": "every model", "list": "spend-models",
                                                          "size": 14}))

    def __init__(self, params, today):
        super().__init__(self.with_defaults(params, today))
        # "from" is a Python keyword: the two dates are added by name.
        self.fields["from"] = forms.DateField(label="From", widget=forms.DateInput(attrs={"type": "date"}))
        self.fields["to"] = forms.DateField(label="to (included)", widget=forms.DateInput(attrs={"type": "date"}))
        self.order_fields(["from", "to", "group", "team", "user", "model"])

    @staticmethod
    def with_defaults(params, today):
        data = params.copy()
        defaults = {"from": today.replace(day=1).isoformat(), "to": today.isoformat(), "group": DEFAULT_GROUP}
        for name, value in defaults.items():
            if not data.get(name):
                data[name] = value
        return data

    def clean(self):
        cleaned = super().clean()
        first, last = cleaned.get("from"), cleaned.get("to")
        if first and last and first > last:
            self.add_error("to", "The period ends before it starts: choose a date on or after its first day.")
        elif last and last.year >= 9999:
            self.add_error("to", "Choose a date before the year 9999.")  # its next day would not exist
        return cleaned


# Formatting --------------------------------------------------------------------------------------


def amount(nanos, grouped=True):
    """Nanos as an exact decimal of the currency, with at least 6 decimals (a budget's precision) and as many more as
    it takes to stay exact: 12_345_678_000 → "12.345678", 1_500 → "0.0000015"."""
    text = f"{as_currency(nanos):{',' if grouped else ''}.9f}"
    whole, fraction = text.split(".")
    return f"{whole}.{fraction.rstrip('0').ljust(6, '0')}"


def money(nanos):
    """"12.345678 USD", or NONE when the cost is unknown (no priced request)."""
    return NONE if nanos is None else f"{amount(nanos)} {settings.SLUICE_CURRENCY}"


def share(nanos, total_nanos):
    """The percentage of the total cost, to a tenth ("45.2"), exact before it is rounded; None when undefined."""
    if nanos is None or not total_nanos:
        return None
    return (Decimal(nanos) * 100 / Decimal(total_nanos)).quantize(SHARE)


def names(group, values):
    """A group's name and who it belongs to (a key's user; "" otherwise)."""
    if group == "user":
        return values["user__username"], ""
    if group == "team":
        return values["team__name"] or NO_TEAM, ""
    if group == "key":
        if values["api_key_id"] is None:
            return NO_KEY, ""
        key = f"{values['api_key__prefix']}… ({values['api_key__name'] or 'unnamed'})"  # as ApiKey.__str__
        return key, values["api_key__user__username"]
    return values["model"] or NO_MODEL, ""


def ledger_url(group, values, first, last):
    """The ledger's list filtered to the group's requests in the period, for the groups its filters can show."""
    filters = {}
    if group == "user":
        filters["user__id__exact"] = values["user_id"]
    elif group == "model" and values["model"]:
        filters["model"] = values["model"]
    else:
        return ""
    start, end = ledger_spend.period_bounds(first, last)
    params = {**filters, "started_at__gte": start.isoformat(), "started_at__lt": end.isoformat()}
    return reverse("admin:quotas_usage_changelist") + "?" + urlencode(params)


def table(report, first, last):
    """The rows as the page and the CSV show them, and the total row."""
    total_nanos = report.total.cost_nanos
    rows = []
    for row in report.rows:
        name, owner = names(report.group, row.group)
        rows.append({"name": name, "owner": owner, "url": ledger_url(report.group, row.group, first, last),
                     **figures(row, total_nanos)})
    return rows, figures(report.total, total_nanos)


def figures(row, total_nanos):
    return {"requests": row.requests, "prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
            "cost_nanos": row.cost_nanos, "cost": money(row.cost_nanos), "share": share(row.cost_nanos, total_nanos)}


# CSV ---------------------------------------------------------------------------------------------


def csv_text(value):
    """A text cell that a spreadsheet will not run: a leading =, +, -, @ (a username, a key's name, a model) becomes
    text behind a quote, as OWASP advises against CSV injection. The csv module does the quoting itself."""
    return f"'{value}" if value.startswith(CSV_FORMULA_STARTS) else value


def csv_response(report, first, last):
    """The page's table as CSV: the same rows, the total last; the cost a plain decimal of the currency (empty when
    unknown), the share a plain percentage."""
    label = dict(GROUP_CHOICES)[report.group]
    rows, total = table(report, first, last)
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="sluice-spend-by-{report.group}-{first}-to-{last}.csv"'
    writer = csv.writer(response)
    writer.writerow([label, *(["user"] if report.group == "key" else []), "requests", "prompt tokens",
                     "completion tokens", f"cost ({settings.SLUICE_CURRENCY})", "share of cost (%)"])
    for row in [*rows, {**total, "name": "total", "owner": ""}]:
        owner = [csv_text(row["owner"] or "")] if report.group == "key" else []
        cost = "" if row["cost_nanos"] is None else amount(row["cost_nanos"], grouped=False)
        writer.writerow([csv_text(row["name"] or ""), *owner, row["requests"], row["prompt_tokens"],
                         row["completion_tokens"], cost, "" if row["share"] is None else row["share"]])
    return response


# The page ----------------------------------------------------------------------------------------


def render(request, model_admin):
    """The form and, when its input is valid, the table (or its CSV with ?format=csv)."""
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    form = SpendForm(request.GET, timezone.now().astimezone(UTC).date())
    context = {**model_admin.admin_site.each_context(request), "opts": model_admin.opts, "title": "Spend",
               "form": form, "currency": settings.SLUICE_CURRENCY, "models": catalogue.model_names()}
    if form.is_valid():
        first, last = form.cleaned_data["from"], form.cleaned_data["to"]
        team, user = form.cleaned_data["team"], form.cleaned_data["user"]
        report = ledger_spend.spend(first, last, form.cleaned_data["group"], team_id=team and team.pk,
                                    user_id=user and user.pk, model=form.cleaned_data["model"] or None)
        if request.GET.get("format") == "csv":
            return csv_response(report, first, last)
        rows, total = table(report, first, last)
        context.update(first=first, last=last, group_label=dict(GROUP_CHOICES)[report.group], rows=rows,
                       total=total, by_key=report.group == "key", csv_query=csv_query(form.data))
    return TemplateResponse(request, "admin/quotas/usage/spend.html", context)


def csv_query(params):
    """The page's query string (its defaults filled in) with format=csv: the download is the table on the screen."""
    query = params.copy()
    query["format"] = "csv"
    return query.urlencode()


class UsageAdmin(ledger.UsageAdmin):
    """The ledger's admin (ledger.py) with the spend page beside its dashboard."""

    def get_urls(self):
        return [path("spend/", self.admin_site.admin_view(self.spend_view), name="quotas_usage_spend"),
                *super().get_urls()]

    def spend_view(self, request):
        return render(request, self)


admin.site.unregister(Usage)
admin.site.register(Usage, UsageAdmin)
