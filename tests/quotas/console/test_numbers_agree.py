"""The numbers agree (issue 19, item 10): every refusal a real gateway makes is counted once in
`sluice_refusals_total{reason}` (its /metrics), is one `rejected` row in the ledger, and is one in the dashboard's
"refused" card and table; a mid-stream provider failure is recorded with its code."""

import re
import socket

import httpx2
from django.urls import reverse

from quotas.models import Usage, UserQuota
from tests.support.gateways import METRICS_TOKEN, open_stream, settled_row

BODY = {"model": "sim-small", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def refusals(gateway):
    """{reason: count} of the gateway's sluice_refusals_total."""
    text = httpx2.get(gateway.base_url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    return {reason: float(n) for reason, n in re.findall(r'^sluice_refusals_total\{reason="([^"]+)"\} (\S+)$', text,
                                                         re.MULTILINE)}


def ask(gateway, key, **changes):
    response = httpx2.post(gateway.api_url + "/chat/completions", json={**BODY, **changes},
                           headers={"Authorization": f"Bearer {key}"}, timeout=30)
    return response.status_code, (response.json().get("error") or {}).get("code") if response.status_code >= 400 else ""


def test_every_refusal_is_counted_once_in_the_metrics_the_ledger_and_the_dashboard(sim, make_user, admin_client):
    before = refusals(sim)
    expected = {}

    def refused(code, status, outcome):
        assert outcome == (status, code)
        expected[code] = expected.get(code, 0) + 1

    # Refused by the middleware, before the body is read (no model in the row).
    limited = make_user(requests_per_minute=1)
    assert ask(sim, limited.key) == (200, "")
    refused("rate_limit_exceeded", 429, ask(sim, limited.key))
    suspended = make_user()
    UserQuota.objects.filter(user=suspended.user).update(suspended=True)
    refused("account_suspended", 403, ask(sim, suspended.key))
    # Refused at the completion's admission.
    small = make_user(allowed_models=["sim-large"])
    refused("model_not_found", 404, ask(sim, small.key))
    spent = make_user(tokens_per_day=3)
    refused("insufficient_quota", 429, ask(sim, spent.key, max_tokens=50))
    busy = make_user(concurrent_streams=1)
    sim.control(tokens_per_second=5)
    sock, running_id, _ = open_stream(sim, busy.key, max_tokens=200)
    try:
        refused("concurrency_limit_exceeded", 429, ask(sim, busy.key))
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    settled_row(running_id)
    # Not refusals: an answer, and one the provider broke off mid-stream (recorded with its code).
    sim.control(tokens_per_second=0, fail_midstream_after=2)
    fine = make_user()
    with httpx2.stream("POST", sim.api_url + "/chat/completions", json={**BODY, "stream": True},
                       headers={"Authorization": f"Bearer {fine.key}"}, timeout=30) as response:
        body = response.read().decode()
        failed_id = response.headers["x-request-id"]
    assert '"code": "upstream_error"' in body
    row = settled_row(failed_id)
    assert (row.status, row.reason) == ("upstream_error", "upstream_error")

    after = refusals(sim)
    counted = {reason: after.get(reason, 0) - before.get(reason, 0) for reason in after}
    assert {reason: n for reason, n in counted.items() if n} == expected
    rows = Usage.objects.filter(status=Usage.Status.REJECTED)
    assert {code: rows.filter(reason=code).count() for code in expected} == expected
    assert rows.count() == sum(expected.values())

    context = admin_client.get(reverse("admin:quotas_usage_dashboard"), {"range": "today"}).context
    assert context["summary"]["refused"] == sum(expected.values()) == sum(r["requests"] for r in context["refusals"])
    assert {r["reason"]: r["requests"] for r in context["refusals"]} == expected
    assert [(r["reason"], r["requests"]) for r in context["errors"]] == [("upstream_error", 1)]
    assert "" not in [r["name"] for r in context["top_models"]]  # the middleware's refusals have no model
