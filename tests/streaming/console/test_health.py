"""The dashboard's deployment table (quotas/console/dashboard.py, fed by streaming/console/sources.py): each
deployment of the catalogue with its breaker and adaptive limit from the counter store, and its last hour from the
ledger in one grouped query."""

import re
import time
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from django.urls import reverse
from django.utils import timezone

from quotas.console.dashboard import deployment_ledger
from quotas.models import Usage
from quotas.store import get_store, reset_stores
from quotas.store.base import OUTCOME_FAILED, OUTCOME_THROTTLED
from streaming.catalogue.models import Deployment, Provider, ServedModel
from streaming.console import sources
from streaming.provider.permits import permit_policy

pytestmark = pytest.mark.django_db


def usage(user, deployment, minutes_ago=1, ttft_ms=None, status=Usage.Status.COMPLETED):
    when = timezone.now() - timedelta(minutes=minutes_ago)
    return Usage.objects.create(request_id=f"req-{Usage.objects.count()}", user=user, model="m", deployment=deployment,
                                status=status, started_at=when, time_to_first_token_ms=ttft_ms, day=when.date(),
                                month=when.strftime("%Y-%m"))


def cells(html, name):
    """The words of each cell of the deployment's row, by the cell's last class."""
    row = re.search(rf'<tr data-deployment="{re.escape(name)}">(.*?)</tr>', html, re.S).group(1)
    found = {}
    for classes, text in re.findall(r'<td class="([^"]*)"[^>]*>(.*?)</td>', row, re.S):
        found[classes.split()[-1]] = re.sub(r"<[^>]+>", " ", text).split()
    return found


@pytest.fixture
def fresh_store():
    """This process's in-memory counter store, empty before and after."""
    reset_stores()
    yield get_store()
    reset_stores()


def test_each_deployment_shows_its_breaker_limit_and_last_hour(admin_client, admin_user, settings, fresh_store):
    settings.UPSTREAM_BREAKER_THRESHOLD, settings.UPSTREAM_BREAKER_MIN_USERS = 2, 1
    settings.UPSTREAM_CONCURRENCY_MAX = 10
    a = Provider.objects.create(name="a", base_url="http://a.test/v1")
    b = Provider.objects.create(name="b", base_url="http://b.test/v1", limit_scope="provider")
    for model, where in (("alpha", (a, b)), ("beta", (b,))):
        served = ServedModel.objects.create(name=model)
        for provider in where:
            Deployment.objects.create(model=served, provider=provider, upstream_model="m")
    keys = {d.name: d.store_key for d in sources.deployments({})}
    assert list(keys) == ["a/m", "b/m"]
    # a/m: its breaker opened by two failures; b/m: its limit cut by a 429.
    store, now, policy = fresh_store, time.time(), permit_policy()
    for holder, outcome, key in (("1", OUTCOME_FAILED, "a/m"), ("2", OUTCOME_FAILED, "a/m"),
                                 ("3", OUTCOME_THROTTLED, "b/m")):
        async_to_sync(store.acquire_permit)(keys[key], holder, policy, now)
        async_to_sync(store.release_permit)(keys[key], holder, outcome, 10, policy, now)
    async_to_sync(store.acquire_permit)(keys["b/m"], "in-flight", policy, now)
    for ttft in (100, 200, 300, None):
        usage(admin_user, "a/m", ttft_ms=ttft)
    usage(admin_user, "a/m", status=Usage.Status.UPSTREAM_ERROR)
    usage(admin_user, "a/m", minutes_ago=61, ttft_ms=9000)  # over an hour ago
    usage(admin_user, "old/m", ttft_ms=50)  # a deployment no longer in the catalogue

    html = admin_client.get(reverse("admin:quotas_usage_dashboard")).content.decode()
    a_row, b_row, old_row = cells(html, "a/m"), cells(html, "b/m"), cells(html, "old/m")
    assert a_row["name"] == ["a/m", "alpha"] and b_row["name"] == ["b/m", "alpha,", "beta"]
    assert a_row["breaker"] == ["open"] and b_row["breaker"] == ["closed"] and old_row["breaker"] == ["unknown"]
    assert (a_row["limit"], b_row["limit"]) == (["10"], ["5"])
    assert b_row["in-flight"] == ["1"]
    assert a_row["p50"] == ["0.20", "s"] and a_row["p95"] == ["0.30", "s"]
    assert (a_row["errors"], a_row["requests"]) == (["20.0%"], ["5"])
    assert (b_row["errors"], b_row["requests"]) == (["–"], ["0"]) and old_row["requests"] == ["1"]

    # Each deployment's name leads to its requests in the ledger.
    url = next(link for link in re.findall(r'href="([^"]+)" title="Its requests', html)
               if "a%2Fm" in link).replace("&amp;", "&")
    ledger = admin_client.get(url)
    assert ledger.status_code == 200 and ledger.context["cl"].result_count == 5


def test_the_last_hour_is_one_grouped_query(admin_user, django_assert_num_queries):
    for deployment in ("a/m", "b/m", "c/m"):
        usage(admin_user, deployment, ttft_ms=120)
    with django_assert_num_queries(1):
        figures = deployment_ledger(timezone.now() - timedelta(hours=1))
    assert {name: (f["requests"], f["p50"]) for name, f in figures.items()} == {
        "a/m": (1, 120), "b/m": (1, 120), "c/m": (1, 120)}
