"""quotas/domain/outbox.py and `manage.py deliver_alerts`: signed webhooks to a real receiver, retries with backoff
(time driven through `now`), e-mail through Django's locmem backend, several workers, a worker that dies."""

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connections
from django.utils import timezone

from bench.servers import PROJECT_ROOT
from quotas.domain import alerts, outbox
from quotas.domain.policy import Limits, calendar_windows
from quotas.models import AlertRule, Outbox
from tests.support.gateways import database_url, eventually
from tests.support.webhooks import Receiver, verify

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "whsec-tests-0123456789abcdef"


@pytest.fixture(autouse=True)
def fresh_alerts():
    alerts.reset()
    yield
    alerts.reset()


@pytest.fixture
def signed(settings):
    settings.SLUICE_WEBHOOK_SECRET = SECRET


@pytest.fixture
def receiver():
    with Receiver() as running:
        yield running


def operators_rule(**channels):
    return AlertRule.objects.create(name="ops", kind="operators", **channels)


def delivery():
    return Outbox.objects.get()


def test_a_threshold_webhook_is_signed_and_the_receiver_verifies_it(make_user, signed, receiver):
    caller = make_user(tokens_per_day=1000)
    rule = AlertRule.objects.create(name="80 %", kind="user", user=caller.user, thresholds=[80],
                                    webhook_url=receiver.url + "/hooks/abc")
    plan = Limits(1000, 10**9, 60, 4, 4096, ())
    windows = calendar_windows(plan, timezone.now())
    assert asyncio.run(alerts.check(caller.user.pk, plan, windows, (150, 10**9))) == 1  # 850 of 1,000
    now = timezone.now()

    assert outbox.deliver_due(now=now) == {"sent": 1}
    ((path, headers, body),) = receiver.requests
    assert path == "/hooks/abc"
    assert headers["content-type"] == "application/json"
    assert headers["x-sluice-delivery"] == str(delivery().pk)
    signature = headers["x-sluice-signature"]
    assert verify(SECRET, signature, body)
    assert not verify("another-secret", signature, body)
    assert not verify(SECRET, signature, body.replace(b"850", b"851"))  # tampered
    assert not verify(SECRET, signature, body, now=time.time() + 301)  # replayed after the window
    payload = json.loads(body)
    assert payload | {"event_id": 0, "fired_at": "", "text": "", "window": {}} == {
        "type": "quota.threshold", "event_id": 0, "rule": {"id": rule.pk, "name": "80 %"},
        "scope": f"user:{caller.user.pk}", "user": {"id": caller.user.pk, "username": caller.user.username},
        "window": {}, "threshold": 80, "used": 850, "limit": 1000, "unit": "tokens", "percent": 85.0,
        "fired_at": "", "text": ""}
    assert payload["window"] == {"kind": "tokens_day", "key": windows[0].key, "id": f"tokens_day:{windows[0].key}",
                                 "resets_at": windows[0].end.isoformat()}
    assert "850 of 1,000 tokens" in payload["text"]
    row = delivery()
    assert (row.status, row.attempts, row.sent_at, row.last_error) == ("sent", 1, now, "")


def test_several_secrets_each_sign_for_a_rotation(settings, receiver):
    settings.SLUICE_WEBHOOK_SECRET = "new-secret, old-secret"
    operators_rule(webhook_url=receiver.url)
    alerts.fire_operator("counter_store_down", "down")
    assert outbox.deliver_due() == {"sent": 1}
    ((_, headers, body),) = receiver.requests
    assert verify("new-secret", headers["x-sluice-signature"], body)
    assert verify("old-secret", headers["x-sluice-signature"], body)


def test_a_webhook_answered_500_is_retried_with_backoff_then_delivered(signed):
    t0 = timezone.now()
    with Receiver(statuses=[500, 500]) as receiver:
        operators_rule(webhook_url=receiver.url + "/services/T000/B000/s3cr3t-token?key=hush")
        alerts.fire_operator("counter_store_down", "The counter store is down.", now=t0)

        assert outbox.deliver_due(now=t0) == {"retry": 1}
        row = delivery()
        assert (row.status, row.attempts, row.next_attempt_at) == ("pending", 1, t0 + timedelta(minutes=1))
        assert row.last_error == f"HTTP 500 from {receiver.url}"  # no path, no query: a Slack URL's are secret
        assert outbox.deliver_due(now=t0 + timedelta(seconds=59)) == {}  # not due yet
        assert outbox.deliver_due(now=t0 + timedelta(minutes=1)) == {"retry": 1}
        assert delivery().next_attempt_at == t0 + timedelta(minutes=3)  # then 2 minutes
        assert outbox.deliver_due(now=t0 + timedelta(minutes=2, seconds=59)) == {}
        assert outbox.deliver_due(now=t0 + timedelta(minutes=3)) == {"sent": 1}
        assert outbox.deliver_due(now=t0 + timedelta(days=1)) == {}  # sent once

    row = delivery()
    assert (row.status, row.attempts, row.sent_at, row.last_error) == ("sent", 3, t0 + timedelta(minutes=3), "")
    assert len(receiver.requests) == 3
    assert {headers["x-sluice-delivery"] for _, headers, _ in receiver.requests} == {str(row.pk)}
    assert all(verify(SECRET, headers["x-sluice-signature"], body) for _, headers, body in receiver.requests)


def test_a_delivery_fails_for_good_after_ten_attempts_with_backoff_capped_at_an_hour(signed):
    now = timezone.now()
    waits = []
    with Receiver(statuses=[503] * 10) as receiver:
        operators_rule(webhook_url=receiver.url)
        alerts.fire_operator("counter_store_down", "down", now=now)
        for attempt in range(1, 10):
            assert outbox.deliver_due(now=now) == {"retry": 1}
            row = delivery()
            waits.append((row.next_attempt_at - now).total_seconds() / 60)
            now = row.next_attempt_at
        assert outbox.deliver_due(now=now) == {"failed": 1}
        assert outbox.deliver_due(now=now + timedelta(days=1)) == {}
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    row = delivery()
    assert (row.status, row.attempts, row.last_error) == ("failed", 10, f"HTTP 503 from {receiver.url}")
    assert len(receiver.requests) == 10


def test_an_unreachable_receiver_is_retried_and_its_error_kept_without_the_path(signed):
    operators_rule(webhook_url="http://127.0.0.1:1/hooks/very-secret-path")
    alerts.fire_operator("counter_store_down", "down")
    assert outbox.deliver_due() == {"retry": 1}
    error = delivery().last_error
    assert error.startswith("ConnectError") and "very-secret-path" not in error


def test_a_slack_webhook_gets_text(signed, receiver):
    operators_rule(webhook_url=receiver.url + "/services/T0/B0/x", webhook_format="slack")
    alerts.fire_operator("breaker_open", "The breaker of dep-a opened.", subject="dep-a")
    assert outbox.deliver_due() == {"sent": 1}
    ((_, headers, body),) = receiver.requests
    assert json.loads(body) == {"text": "[Sluice] breaker open: dep-a\nThe breaker of dep-a opened."}
    assert verify(SECRET, headers["x-sluice-signature"], body)


def test_json_webhooks_wait_for_a_secret(settings, receiver):
    settings.SLUICE_WEBHOOK_SECRET = ""
    now = timezone.now()
    operators_rule(webhook_url=receiver.url)
    alerts.fire_operator("counter_store_down", "down", now=now)
    assert outbox.deliver_due(now=now) == {"retry": 1}
    assert receiver.requests == [] and "SLUICE_WEBHOOK_SECRET" in delivery().last_error
    settings.SLUICE_WEBHOOK_SECRET = SECRET
    assert outbox.deliver_due(now=now + timedelta(minutes=1)) == {"sent": 1}
    assert verify(SECRET, receiver.requests[0][1]["x-sluice-signature"], receiver.requests[0][2])


def test_an_email_alert_goes_through_django_mail(make_user, mailoutbox):
    caller = make_user(tokens_per_day=1000)
    AlertRule.objects.create(name="day", kind="user", user=caller.user, thresholds=[80], windows=["tokens_day"],
                             emails=["ops@example.com", "billing@example.com"])
    plan = Limits(1000, 10**9, 60, 4, 4096, ())
    asyncio.run(alerts.check(caller.user.pk, plan, calendar_windows(plan, timezone.now()), (100, 10**9)))
    assert outbox.deliver_due() == {"sent": 2}
    assert sorted(mail.to[0] for mail in mailoutbox) == ["billing@example.com", "ops@example.com"]
    mail = mailoutbox[0]
    assert mail.subject == f"[Sluice] {caller.user.username}: 80 % of the daily token limit"
    assert "900 of 1,000 tokens" in mail.body and "Alert rule: day" in mail.body
    assert mail.from_email == "sluice@localhost"


def test_a_delivery_claimed_by_a_worker_that_died_is_sent_once_the_claim_expires(mailoutbox):
    now = timezone.now()
    operators_rule(emails=["ops@example.com"])
    alerts.fire_operator("counter_store_down", "down", now=now)
    assert len(outbox.claim(now)) == 1  # and the worker is killed before it sends
    assert outbox.deliver_due(now=now + timedelta(minutes=1)) == {}
    assert outbox.deliver_due(now=now + timedelta(seconds=outbox.CLAIM_SECONDS)) == {"sent": 1}
    assert delivery().attempts == 2 and len(mailoutbox) == 1


def test_workers_running_at_once_send_each_delivery_once(signed, receiver):
    """SELECT … FOR UPDATE SKIP LOCKED on PostgreSQL (SQLite: its write lock): no row goes to two workers."""
    operators_rule(webhook_url=receiver.url)
    now = timezone.now()
    for minute in range(40):
        alerts.fire_operator("counter_store_down", "down", now=now + timedelta(minutes=10 * minute))
    assert Outbox.objects.count() == 40
    start = threading.Barrier(4)

    def worker():
        try:
            start.wait(timeout=10)
            return outbox.deliver_due(now=now + timedelta(days=1), batch_size=3)["sent"]
        finally:
            connections.close_all()

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(lambda _: worker(), range(4))) == 40
    assert sorted(int(headers["x-sluice-delivery"]) for _, headers, _ in receiver.requests) == sorted(
        Outbox.objects.values_list("pk", flat=True))
    assert set(Outbox.objects.values_list("status", "attempts")) == {("sent", 1)}


def test_the_command_sends_what_is_due_once(mailoutbox):
    operators_rule(emails=["ops@example.com"])
    alerts.fire_operator("counter_store_down", "The counter store is down.")
    out = StringIO()
    call_command("deliver_alerts", "--once", stdout=out)
    assert out.getvalue().strip() == "sent 1"
    assert [mail.subject for mail in mailoutbox] == ["[Sluice] counter store down"]
    call_command("deliver_alerts", "--once", stdout=out)  # nothing more
    assert len(mailoutbox) == 1


def test_the_worker_process_delivers_as_rows_arrive_and_stops_on_sigterm(signed, receiver):
    import os

    operators_rule(webhook_url=receiver.url)
    env = {**os.environ, "DATABASE_URL": database_url(), "SLUICE_WEBHOOK_SECRET": SECRET, "LOG_LEVEL": "WARNING"}
    worker = subprocess.Popen([sys.executable, "manage.py", "deliver_alerts", "--interval", "0.1"], cwd=PROJECT_ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        alerts.fire_operator("counter_store_down", "down")
        eventually(lambda: len(receiver.requests) == 1, timeout=20)
        alerts.fire_operator("breaker_open", "dep-a opened", subject="dep-a")
        eventually(lambda: len(receiver.requests) == 2, timeout=10)
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, err
    assert out.split() == ["sent", "1", "sent", "1"]
    assert set(Outbox.objects.values_list("status", flat=True)) == {"sent"}
