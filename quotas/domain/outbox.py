"""The alerts' outbox: deliveries (an e-mail, a signed webhook) sent by `manage.py deliver_alerts`, with retries.

A worker claims the rows that are due (`SELECT … FOR UPDATE SKIP LOCKED` on PostgreSQL, so several workers never
take the same row; SQLite's write lock serialises claims), counts the attempt and pushes the row's next attempt
CLAIM_SECONDS ahead before it sends, so a worker that dies mid-delivery leaves the row to be tried again then. A
sent row is marked sent; a failed one is tried again after 1 min, 2, 4, … at most 1 h, and marked failed after
MAX_ATTEMPTS. All the state is in the table: a restart loses nothing. Delivery is at least once (a receiver that took
a webhook but answered too late gets it again): `X-Sluice-Delivery` names the delivery, for receivers to deduplicate.

Webhooks are signed: `X-Sluice-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with
SLUICE_WEBHOOK_SECRET>` (one v1 per secret when several are set, for rotation). docs/operations.md, "Alerts", shows a
receiver's check.
"""

import hashlib
import hmac
import json
import logging
import time
from collections import Counter
from datetime import timedelta
from urllib.parse import urlsplit

import httpx2
from django.conf import settings
from django.core.mail import send_mail
from django.db import connection, transaction
from django.utils import timezone

from ..models import Outbox

logger = logging.getLogger("quotas.alerts")

MAX_ATTEMPTS = 10
BACKOFF_FIRST_SECONDS = 60
BACKOFF_MAX_SECONDS = 3600
# A claimed row is due again after this, should its worker die before it records the outcome.
CLAIM_SECONDS = 300
BATCH_SIZE = 20
WEBHOOK_TIMEOUT_SECONDS = 5.0
SIGNATURE_HEADER = "X-Sluice-Signature"
DELIVERY_HEADER = "X-Sluice-Delivery"
USER_AGENT = "Sluice-Alerts/1"


class DeliveryError(Exception):
    """A failed attempt, described without secrets."""


def backoff_seconds(attempts: int) -> int:
    """The wait after the `attempts`-th failed attempt: 1 min, 2, 4, … at most 1 h."""
    return min(BACKOFF_FIRST_SECONDS * 2 ** max(0, attempts - 1), BACKOFF_MAX_SECONDS)


def webhook_secrets() -> list[str]:
    return [secret.strip() for secret in (settings.SLUICE_WEBHOOK_SECRET or "").split(",") if secret.strip()]


def signature(body: bytes, secrets, timestamp: int) -> str:
    """The X-Sluice-Signature value: t=<timestamp>, and v1=<hex HMAC-SHA256 of "<t>.<body>"> per secret."""
    signed = f"{timestamp}.".encode() + body
    return ",".join([f"t={timestamp}"] + [f"v1={hmac.new(s.encode(), signed, hashlib.sha256).hexdigest()}"
                                          for s in secrets])


def body_of(payload) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def claim(now, limit=BATCH_SIZE) -> list[Outbox]:
    """Take up to `limit` due rows: each attempt counted, each due again only after CLAIM_SECONDS."""
    with transaction.atomic():
        rows = Outbox.objects.filter(status=Outbox.Status.PENDING, next_attempt_at__lte=now).order_by(
            "next_attempt_at", "id")
        if connection.features.has_select_for_update_skip_locked:
            rows = rows.select_for_update(skip_locked=True)
        rows = list(rows[:limit])
        for row in rows:
            row.attempts += 1
            row.next_attempt_at = now + timedelta(seconds=CLAIM_SECONDS)
        Outbox.objects.bulk_update(rows, ["attempts", "next_attempt_at"])
    return rows


def deliver_due(now=None, batch_size=BATCH_SIZE, should_stop=None) -> Counter:
    """Send every delivery due at `now` (default: the current time); returns the outcomes counted: sent, retry
    (tried again later), failed (out of attempts)."""
    now = now or timezone.now()
    outcomes = Counter()
    with httpx2.Client(timeout=WEBHOOK_TIMEOUT_SECONDS, follow_redirects=False,
                       headers={"User-Agent": USER_AGENT}) as http:
        while not (should_stop and should_stop()):
            rows = claim(now, batch_size)
            if not rows:
                break
            for row in rows:
                outcomes[attempt(row, now, http)] += 1
    return outcomes


def attempt(row: Outbox, now, http) -> str:
    """Send one claimed row and record the outcome (unless another worker took the row over meanwhile)."""
    mine = Outbox.objects.filter(pk=row.pk, status=Outbox.Status.PENDING, attempts=row.attempts)
    try:
        send(row, http)
    except Exception as exc:
        error = describe(exc, row)
        if row.attempts >= MAX_ATTEMPTS:
            mine.update(status=Outbox.Status.FAILED, last_error=error)
            logger.error("alert delivery #%s failed for good after %d attempts: %s", row.pk, row.attempts, error)
            return "failed"
        retry_at = now + timedelta(seconds=backoff_seconds(row.attempts))
        mine.update(next_attempt_at=retry_at, last_error=error)
        logger.warning("alert delivery #%s failed (attempt %d), next at %s: %s", row.pk, row.attempts,
                       retry_at.isoformat(), error)
        return "retry"
    mine.update(status=Outbox.Status.SENT, sent_at=now, last_error="")
    return "sent"


def send(row: Outbox, http):
    if row.channel == Outbox.Channel.EMAIL:
        send_mail(row.payload.get("subject", "[Sluice] alert"), row.payload.get("body", ""),
                  settings.DEFAULT_FROM_EMAIL, [row.target])
        return
    body = body_of(row.payload)
    headers = {"Content-Type": "application/json", DELIVERY_HEADER: str(row.pk)}
    secrets = webhook_secrets()
    if secrets:
        # The time of sending (not of scheduling): receivers refuse signatures older than their replay window.
        headers[SIGNATURE_HEADER] = signature(body, secrets, int(time.time()))
    elif row.channel == Outbox.Channel.WEBHOOK:
        raise DeliveryError("SLUICE_WEBHOOK_SECRET is not set: JSON webhooks are only sent signed")
    response = http.post(row.target, content=body, headers=headers)
    if not 200 <= response.status_code < 300:
        raise DeliveryError(f"HTTP {response.status_code} from {_origin(row.target)}")


def _origin(url):
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")


def describe(exc, row) -> str:
    """The error to keep in last_error: no webhook path or query (a Slack URL's path is its secret), no secret."""
    text = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
    redactions = [secret for secret in webhook_secrets()]
    for mailer in getattr(settings, "MAILERS", {}).values():
        if password := mailer.get("OPTIONS", {}).get("password"):
            redactions.append(password)
    if row.channel != Outbox.Channel.EMAIL:
        if row.target.rstrip("/") != _origin(row.target):
            text = text.replace(row.target, _origin(row.target) + "/…")
        parts = urlsplit(row.target)
        redactions += [part for part in (parts.path, parts.query, parts.username, parts.password)
                       if part and part != "/"]
    for secret in sorted(redactions, key=len, reverse=True):
        text = text.replace(secret, "…")
    return text[:500]
