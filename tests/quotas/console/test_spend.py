"""quotas/console/spend.py and quotas/domain/spend.py: the spend page (issue 18, item 6): cost by user, team, key and
model over a period of whole UTC days, its CSV, one grouped query, its errors, who may see it."""

import csv
import io
import itertools
from datetime import UTC, date, datetime, timedelta

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from quotas.console.spend import amount
from quotas.domain.spend import spend
from quotas.models import ApiKey, Team, Usage

URL = "/admin/quotas/usage/spend/"
MARCH = {"from": "2026-03-01", "to": "2026-03-31"}
IN_MARCH = datetime(2026, 3, 15, 12, tzinfo=UTC)
_ids = itertools.count()


def ledger(user, when=IN_MARCH, model="gpt-a", key=None, team=None, prompt=0, completion=0, cost=None,
           status=Usage.Status.COMPLETED):
    return Usage.objects.create(request_id=f"req-spend-{next(_ids)}", user=user, api_key=key, team=team, model=model,
                                status=status, started_at=when, prompt_tokens=prompt, completion_tokens=completion,
                                cost_nanos=cost, charged_nanos=cost, day=when.date(), month=when.strftime("%Y-%m"))


@pytest.fixture(autouse=True)
def _currency(settings):
    settings.SLUICE_CURRENCY = "USD"


@pytest.fixture
def march(django_user_model):
    """Three users, two teams, three keys; priced and unpriced models, a refusal before any model was chosen, and a
    request that did not go through a key. Costs: bob 3, alice 1.750000001, carol nothing priced."""
    alice, bob, carol = (django_user_model.objects.create(username=name) for name in ("alice", "bob", "carol"))
    red, blue = Team.objects.create(name="red"), Team.objects.create(name="blue")
    laptop, server, build = ApiKey.issue(alice, "laptop")[0], ApiKey.issue(bob, "server")[0], ApiKey.issue(carol, "")[0]
    ledger(alice, key=laptop, team=red, model="gpt-a", prompt=100, completion=50, cost=1_500_000_000)
    ledger(alice, key=laptop, team=red, model="gpt-b", prompt=10, completion=5, cost=250_000_001)
    ledger(alice, key=laptop, team=red, model="", status=Usage.Status.REJECTED)
    ledger(bob, key=server, model="gpt-a", prompt=1_000, completion=2_000, cost=3_000_000_000)
    ledger(bob, model="free-model", prompt=7, completion=3)  # the demo chat: a session, no key
    ledger(carol, key=build, team=blue, model="free-model", prompt=1, completion=2)
    return {"alice": alice, "bob": bob, "carol": carol, "red": red, "blue": blue, "laptop": laptop,
            "server": server, "build": build}


def table(response):
    """(name, owner, requests, prompt, completion, cost, share) per row, and the total's."""
    assert response.status_code == 200
    assert not response.context["form"].errors
    rows = [(r["name"], r["owner"], r["requests"], r["prompt_tokens"], r["completion_tokens"], r["cost"],
             None if r["share"] is None else str(r["share"])) for r in response.context["rows"]]
    t = response.context["total"]
    return rows, (t["requests"], t["prompt_tokens"], t["completion_tokens"], t["cost"], str(t["share"]))


TOTAL = (6, 1_118, 2_060, "4.750000001 USD", "100.0")


def test_spend_by_user_sums_each_users_requests_most_expensive_first(admin_client, march):
    response = admin_client.get(URL, {**MARCH, "group": "user"})
    rows, total = table(response)
    assert rows == [("bob", "", 2, 1_007, 2_003, "3.000000 USD", "63.2"),
                    ("alice", "", 3, 110, 55, "1.750000001 USD", "36.8"),
                    ("carol", "", 1, 1, 2, "—", None)]  # nothing priced: unknown, not free
    assert total == TOTAL
    page = response.content.decode()
    assert '<td class="num cost">1.750000001 USD</td>' in page
    assert '<td class="num share">—</td>' in page
    assert '<td class="num cost">4.750000001 USD</td>' in page and "100.0%" in page
    # A user's name opens their requests of the period in the ledger.
    assert f"user__id__exact={march['bob'].pk}&amp;started_at__gte=2026-03-01T00%3A00%3A00%2B00%3A00" in page


def test_spend_by_team_keeps_requests_without_a_team_apart(admin_client, march):
    rows, total = table(admin_client.get(URL, {**MARCH, "group": "team"}))
    assert rows == [("— no team", "", 2, 1_007, 2_003, "3.000000 USD", "63.2"),
                    ("red", "", 3, 110, 55, "1.750000001 USD", "36.8"),
                    ("blue", "", 1, 1, 2, "—", None)]
    assert total == TOTAL


def test_spend_by_key_names_each_key_by_its_prefix_and_name_with_its_user(admin_client, march):
    rows, total = table(admin_client.get(URL, {**MARCH, "group": "key"}))
    laptop, server, build = march["laptop"].prefix, march["server"].prefix, march["build"].prefix
    assert rows == [(f"{server}… (server)", "bob", 1, 1_000, 2_000, "3.000000 USD", "63.2"),
                    (f"{laptop}… (laptop)", "alice", 3, 110, 55, "1.750000001 USD", "36.8"),
                    (f"{build}… (unnamed)", "carol", 1, 1, 2, "—", None),
                    ("— no key", "", 1, 7, 3, "—", None)]
    assert total == TOTAL


def test_spend_by_model(admin_client, march):
    rows, total = table(admin_client.get(URL, {**MARCH, "group": "model"}))
    assert rows == [("gpt-a", "", 2, 1_100, 2_050, "4.500000 USD", "94.7"),
                    ("gpt-b", "", 1, 10, 5, "0.250000001 USD", "5.3"),
                    ("free-model", "", 2, 8, 5, "—", None),
                    ("— no model", "", 1, 0, 0, "—", None)]  # refused before a model was chosen
    assert total == TOTAL


def test_filters_narrow_the_table_and_its_total(admin_client, march):
    def names(**params):
        rows, total = table(admin_client.get(URL, {**MARCH, **params}))
        return [row[0] for row in rows], total[0]

    assert names(group="model", team=march["red"].pk) == (["gpt-a", "gpt-b", "— no model"], 3)
    assert names(group="model", user="bob") == (["gpt-a", "free-model"], 2)
    assert names(group="user", model="gpt-a") == (["bob", "alice"], 2)
    assert names(group="key", team=march["blue"].pk, model="gpt-a") == ([], 0)
    empty = admin_client.get(URL, {**MARCH, "user": "carol", "model": "gpt-a"})
    assert "No requests in this period." in empty.content.decode()
    assert empty.context["total"]["cost"] == "—"


def test_the_period_is_whole_utc_days_both_included(admin_client, django_user_model, settings):
    settings.TIME_ZONE = "Pacific/Kiritimati"  # UTC+14: the site's own days would move every bound
    user = django_user_model.objects.create(username="u")
    for when, cost in ((datetime(2026, 2, 28, 23, 59, 59, 999_999, tzinfo=UTC), 1),  # the day before: out
                       (datetime(2026, 3, 1, tzinfo=UTC), 10),  # the first instant: in
                       (datetime(2026, 3, 31, 23, 59, 59, 999_999, tzinfo=UTC), 100),  # the last day's end: in
                       (datetime(2026, 4, 1, tzinfo=UTC), 1_000)):  # the day after: out
        ledger(user, when=when, cost=cost)
    rows, total = table(admin_client.get(URL, MARCH))
    assert total[0] == 2 and total[3] == "0.00000011 USD"
    _, one_day = table(admin_client.get(URL, {"from": "2026-03-31", "to": "2026-03-31"}))
    assert one_day[0] == 1 and one_day[3] == "0.0000001 USD"
    assert spend(date(2026, 4, 1), date(2026, 4, 1)).total.cost_nanos == 1_000
    _, everything = table(admin_client.get(URL, {"from": "0001-01-01", "to": "9998-12-31"}))  # the widest period
    assert everything[0] == 4 and everything[3] == "0.000001111 USD"


def test_the_default_period_is_this_month_so_far_in_utc(admin_client, django_user_model):
    user = django_user_model.objects.create(username="u")
    now = timezone.now()
    first = datetime(now.year, now.month, 1, tzinfo=UTC)
    ledger(user, when=now, cost=5)
    ledger(user, when=first - timedelta(microseconds=1), cost=7)  # last month
    response = admin_client.get(URL)
    rows, total = table(response)
    assert total[0] == 1 and total[3] == "0.000000005 USD"
    assert response.context["first"] == first.date() and response.context["last"] == now.astimezone(UTC).date()
    page = response.content.decode()
    assert "this month so far (UTC)" in page
    assert f'value="{first.date():%Y-%m-%d}"' in page  # the form shows the dates it used
    assert "<h2 id=\"spend-title\">Spend by user," in page


def test_csv_is_the_same_table_with_its_cells_escaped(admin_client, march, django_user_model):
    tricky = django_user_model.objects.create(username="=HYPERLINK(1)")
    key = ApiKey.issue(tricky, 'work, "main"\nline two')[0]
    ledger(tricky, key=key, model="+sum", prompt=1, completion=1, cost=1)
    response = admin_client.get(URL, {**MARCH, "group": "key", "format": "csv"})
    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="sluice-spend-by-key-2026-03-01-to-2026-03-31.csv"'
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    server, laptop = march["server"].prefix, march["laptop"].prefix
    assert rows[0] == ["API key", "user", "requests", "prompt tokens", "completion tokens", "cost (USD)",
                       "share of cost (%)"]
    assert rows[1] == [f"{server}… (server)", "bob", "1", "1000", "2000", "3.000000", "63.2"]
    assert rows[2] == [f"{laptop}… (laptop)", "alice", "3", "110", "55", "1.750000001", "36.8"]
    assert rows[3] == [f"{key.prefix}… (work, \"main\"\nline two)", "'=HYPERLINK(1)", "1", "1", "1", "0.000000001",
                       "0.0"]  # quoted by the csv module; a formula's first character behind a quote
    assert rows[4][1:] == ["carol", "1", "1", "2", "", ""]  # unpriced: empty cells
    assert rows[-1] == ["total", "", "7", "1119", "2061", "4.750000002", "100.0"]
    by_model = list(csv.reader(io.StringIO(admin_client.get(URL, {**MARCH, "group": "model", "format": "csv"})
                                           .content.decode())))
    assert ["'+sum", "1", "1", "1", "0.000000001", "0.0"] in by_model
    # The page links to its own CSV, defaults filled in.
    page = admin_client.get(URL, {"group": "model"}).content.decode()
    assert "format=csv" in page and "group=model" in page and "from=" in page


@pytest.mark.parametrize("group", ["user", "team", "key", "model"])
def test_one_grouped_query_reads_the_ledger_whatever_the_number_of_groups(admin_client, django_user_model, group,
                                                                         django_assert_max_num_queries):
    def ledger_queries(params):
        with CaptureQueriesContext(connection) as queries:
            response = admin_client.get(URL, params)
        assert response.status_code == 200 and not response.context["form"].errors
        return [q["sql"] for q in queries.captured_queries if '"quotas_usage"' in q["sql"]], len(queries)

    def populate(n):
        for i in range(n):
            user = django_user_model.objects.create(username=f"{group}-{n}-{i}")
            team = Team.objects.create(name=f"{group}-{n}-{i}")
            ledger(user, key=ApiKey.issue(user, f"k{i}")[0], team=team, model=f"m-{n}-{i}", cost=i)

    populate(2)
    admin_client.get(URL)  # the session's first request: the catalogue is read once per process
    few, few_count = ledger_queries({**MARCH, "group": group})
    populate(30)
    many, many_count = ledger_queries({**MARCH, "group": group})
    assert len(few) == len(many) == 1 and "GROUP BY" in many[0]
    assert many_count == few_count  # no query per row
    assert len(table(admin_client.get(URL, {**MARCH, "group": group}))[0]) == 32
    for params in ({**MARCH, "group": group}, {**MARCH, "group": group, "format": "csv"}):
        with django_assert_max_num_queries(6):  # the session, the user, the form's teams, the ledger
            admin_client.get(URL, params)


@pytest.mark.parametrize("params, field", [
    ({"from": "2026-13-01"}, "from"),
    ({"from": "yesterday"}, "from"),
    ({"to": "2026-03-01\x00"}, "to"),
    ({"from": "2026-03-31", "to": "2026-03-01"}, "to"),  # backwards
    ({"from": "2026-03-01", "to": "9999-12-31"}, "to"),  # its next day does not exist
    ({"group": "deployment"}, "group"),
    ({"group": "user\x00"}, "group"),
    ({"team": "999999"}, "team"),
    ({"team": "red"}, "team"),
    ({"user": "nobody"}, "user"),
    ({"user": "ali\x00ce"}, "user"),
    ({"model": "gpt\x00"}, "model"),
    ({"model": "m" * 101}, "model"),
])
def test_bad_input_is_the_forms_error_never_a_500(admin_client, march, params, field):
    for extra in ({}, {"format": "csv"}):  # no CSV of a report that is not there
        response = admin_client.get(URL, {**params, **extra})
        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/html")
        assert list(response.context["form"].errors) == [field]
        assert "rows" not in response.context
        assert 'class="errorlist' in response.content.decode()


def test_only_staff_allowed_to_view_the_ledger_see_the_page(client, django_user_model):
    assert URL == reverse("admin:quotas_usage_spend")
    response = client.get(URL)
    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))
    client.force_login(django_user_model.objects.create_user("member", password="x"))
    response = client.get(URL, {"format": "csv"})
    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))
    clerk = django_user_model.objects.create_user("clerk", password="x", is_staff=True)
    client.force_login(clerk)
    assert client.get(URL).status_code == 403
    assert client.get(URL, {"format": "csv"}).status_code == 403
    clerk.user_permissions.add(Permission.objects.get(codename="view_usage"))
    assert client.get(URL).status_code == 200
    assert client.get(URL, {"format": "csv"})["Content-Type"] == "text/csv; charset=utf-8"


def test_the_page_is_linked_from_the_admin_index_and_the_ledger(admin_client):
    assert URL in admin_client.get(reverse("admin:index")).content.decode()
    assert URL in admin_client.get(reverse("admin:quotas_usage_changelist")).content.decode()
    # The ledger's list is still the ledger's (the page's admin is its subclass).
    assert admin_client.get(reverse("admin:quotas_usage_changelist")).context["cl"].list_display[0] == "request"


def test_amounts_are_exact_decimals_of_the_currency_never_floats():
    assert amount(12_345_678_000) == "12.345678"
    assert amount(1_500) == "0.0000015"
    assert amount(0) == "0.000000"
    assert amount(123_456_789_012_345_678) == "123,456,789.012345678"
    assert amount(123_456_789_012_345_678, grouped=False) == "123456789.012345678"
    assert amount(2**62 + 1) == "4,611,686,018.427387905"  # past a float's 53 bits: exact


def test_the_domain_returns_integer_nanos_and_sums_only_the_priced_rows(django_user_model):
    user = django_user_model.objects.create(username="u")
    ledger(user, cost=2**40)
    ledger(user, cost=2**40 + 1)
    ledger(user, cost=None)
    report = spend(date(2026, 3, 1), date(2026, 3, 31), "model")
    assert [row.cost_nanos for row in report.rows] == [2**41 + 1]
    assert type(report.rows[0].cost_nanos) is int and report.rows[0].requests == 3
    assert report.total.cost_nanos == 2**41 + 1
