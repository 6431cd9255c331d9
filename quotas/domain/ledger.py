"""The ledger: one row per admitted or refused request, settled once, and the daily roll-up.

The ledger is the truth about tokens spent; the counter store is a cache of it (docs/quotas.md).
"""

import functools

from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from ..models import DailyUsage, Usage
from .db import database
from .policy import Limits, calendar_windows


def ledger_row(*, request_id, user_id, api_key_id, model, stream, reserved_tokens, windows, reserved_nanos=None,
               price=None, team_id=None, started_at=None) -> Usage:
    """A request's ledger row, not yet saved (`open_ledger` inserts it, or `close_ledger` with its ending).

    `windows`: the lease's, the user's token windows first (day, month); `started_at`: the instant they were chosen
    for (a pool's window rebuilt from the ledger finds its rows by their start). At a priced model the row holds its
    price and its reservation in money from admission on, so that a money window rebuilt from the ledger counts it.
    `team_id`: the team whose pool it spends from."""
    day, month = windows[:2]
    return Usage(
        request_id=request_id, user_id=user_id, api_key_id=api_key_id, model=model, stream=stream,
        reserved_tokens=reserved_tokens, reserved_nanos=reserved_nanos, team_id=team_id,
        price=price.as_record() if price is not None else None, day=day.start.date(), month=month.key,
        **({"started_at": started_at} if started_at is not None else {}),
    )


@database
def open_ledger(row: Usage):
    """Insert the row of an admitted request (status `streaming`, holding its reservation), while its provider is
    asked and before anything is delivered: a counter store rebuilt from the ledger from then on counts the request
    (docs/quotas.md)."""
    row.heartbeat_at = timezone.now()
    fields, sql, returning = _insert_sql(connection.vendor)
    # What the ORM's insert does for each field (pre_save, then the database's value), without compiling the
    # statement each time: `Model.save()` cost ~150 µs more a row (docs/performance.md, "Prepared ledger writes").
    values = [field.get_db_prep_save(field.pre_save(row, True), connection) for field in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, values)
        meta = Usage._meta
        row.pk = (cursor.fetchone()[0] if returning
                  else connection.ops.last_insert_id(cursor, meta.db_table, meta.pk.column))
    return row


@database
def record_progress(row_id, completion_tokens: int):
    """A running request's sign of life and the completion tokens it has sent so far (never lowered; nothing once
    it has settled): what is charged if its process dies (`claim_abandoned`)."""
    # One UPDATE (two before: the count, then the heartbeat): a write per block leased and per renewal of every
    # running stream (bench/bench_ledger.py counts a request's statements); its SQL written once per database.
    sql, heartbeat = _progress_sql(connection.vendor)
    with connection.cursor() as cursor:
        cursor.execute(sql, (completion_tokens, completion_tokens,
                             heartbeat.get_db_prep_save(timezone.now(), connection), row_id, Usage.Status.STREAMING))


@database
def claim_abandoned(silent_since, limit=200) -> list[Usage]:
    """Claim the rows of requests whose process went silent before `silent_since` (killed, lost its machine): each
    becomes `worker_lost`, with its roll-up, owing its prompt and the completion tokens of its last progress record
    (`row.owed_tokens`). Its `charged_tokens` stay 0 until the windows are charged (`set_charged`): a window rebuilt
    meanwhile does not count it twice. Every process may call this; a row is claimed by exactly one (a conditional
    update)."""
    stale = (Q(heartbeat_at__lt=silent_since) | Q(heartbeat_at__isnull=True, started_at__lt=silent_since))
    claimed = []
    now = timezone.now()
    for row in Usage.objects.filter(stale, status=Usage.Status.STREAMING).order_by("started_at")[:limit]:
        with transaction.atomic():
            won = Usage.objects.filter(pk=row.pk, status=Usage.Status.STREAMING,
                                       heartbeat_at=row.heartbeat_at).update(
                status=Usage.Status.WORKER_LOST, reason="worker_lost", ended_at=now, reserved_tokens=0,
                charged_tokens=0, reserved_nanos=None if row.reserved_nanos is None else 0,
                charged_nanos=None if row.price is None else 0, duration_ms=int((now - row.started_at).total_seconds() * 1000))
            if not won:
                continue
            row.status, row.charged_tokens = Usage.Status.WORKER_LOST, 0
            row.reserved_nanos = None if row.reserved_nanos is None else 0
            row.owed_tokens = row.prompt_tokens + row.completion_tokens
            _roll_up(row)
        claimed.append(row)
    return claimed


@database
def set_charged(row_id, charged_tokens: int, cost_nanos=None, charged_nanos=None):
    """What a claimed row's windows were charged (recovery.settle_abandoned), and at a priced model its cost and what
    its money windows were charged."""
    fields = {"charged_tokens": charged_tokens}
    if cost_nanos is not None:
        fields.update(cost_nanos=cost_nanos, charged_nanos=charged_nanos)
    Usage.objects.filter(pk=row_id).update(**fields)


@database
def close_ledger(row: Usage, **fields) -> bool:
    """Settle the request's one row (inserting it if it was never opened) and its daily roll-up, in one transaction.

    False if the row had been settled already, by another process that took this one for dead (its heartbeat went
    silent for a lease's lifetime: ledger.claim_abandoned): that settlement stands, and the caller must not charge
    the windows again.
    """
    fields.setdefault("ended_at", timezone.now())
    if row.pk is not None and "price" in fields and fields["price"] == row.price:
        # The row holds this price since admission (ledger_row): writing the same JSON again cost ~20 µs a request.
        del fields["price"]
    fields["reserved_tokens"] = 0
    if row.reserved_nanos is not None:
        fields["reserved_nanos"] = 0
    for name, value in fields.items():
        setattr(row, name, value)
    if row.started_at and row.ended_at:
        row.duration_ms = int((row.ended_at - row.started_at).total_seconds() * 1000)
    with transaction.atomic():
        if row.pk is None:
            row.save(force_insert=True)
        else:
            columns, sql = _settle_sql(connection.vendor, (*fields, "duration_ms"))
            with connection.cursor() as cursor:
                cursor.execute(sql, [*(field.get_db_prep_save(getattr(row, field.attname), connection)
                                       for field in columns), row.pk, Usage.Status.STREAMING])
                if not cursor.rowcount:
                    return False
        _roll_up(row)
    return True


@database
def record_refusal(*, request_id, user_id, api_key_id, model, code, limits: Limits):
    """A refused request gets its ledger row too (status `rejected`), for the operator's view."""
    now = timezone.now()
    day, month = calendar_windows(limits, now)
    row = Usage.objects.create(
        request_id=request_id, user_id=user_id, api_key_id=api_key_id, model=model or "",
        status=Usage.Status.REJECTED, reason=code, started_at=now, ended_at=now, duration_ms=0,
        day=day.start.date(), month=month.key,
    )
    _roll_up(row)
    return row


# Prepared ledger writes: the statements on every request's path (its insert, its progress, its settlement), written
# once per database from the model's fields, each value converted by its field as the ORM's own write would
# (`get_db_prep_save`). The ORM compiled each of them on every call: docs/performance.md, "Prepared ledger writes".

def _quoted(name):
    return connection.ops.quote_name(name)


@functools.cache
def _insert_sql(vendor):
    """(the fields, `INSERT INTO usage (…) VALUES (…) [RETURNING id]`, whether it returns the id)."""
    meta = Usage._meta
    fields = [field for field in meta.concrete_fields if not field.primary_key]
    returning = connection.features.can_return_columns_from_insert
    sql = (f"INSERT INTO {_quoted(meta.db_table)} ({', '.join(_quoted(f.column) for f in fields)}) "
           f"VALUES ({', '.join(['%s'] * len(fields))})"
           + (f" RETURNING {_quoted(meta.pk.column)}" if returning else ""))
    return fields, sql, returning


@functools.cache
def _progress_sql(vendor):
    """The progress UPDATE (the count never lowered: CASE, which both databases know) and the heartbeat's field."""
    meta = Usage._meta
    count, heartbeat = _quoted(meta.get_field("completion_tokens").column), meta.get_field("heartbeat_at")
    return (f"UPDATE {_quoted(meta.db_table)} SET {count} = CASE WHEN {count} > %s THEN {count} ELSE %s END, "
            f"{_quoted(heartbeat.column)} = %s "
            f"WHERE {_quoted(meta.pk.column)} = %s AND {_quoted(meta.get_field('status').column)} = %s"), heartbeat


@functools.lru_cache(maxsize=64)
def _settle_sql(vendor, names):
    """The settlement's UPDATE of the fields `names` (a few sets: with or without figures, a price, usage details),
    only while the row is still `streaming`."""
    meta = Usage._meta
    fields = [meta.get_field(name) for name in names]
    return fields, (f"UPDATE {_quoted(meta.db_table)} SET {', '.join(f'{_quoted(f.column)} = %s' for f in fields)} "
                    f"WHERE {_quoted(meta.pk.column)} = %s AND {_quoted(meta.get_field('status').column)} = %s")


_ROLL_UP_COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "refusals", "upstream_errors")


@functools.cache
def _roll_up_sql(vendor):
    """One INSERT … ON CONFLICT DO UPDATE (PostgreSQL and SQLite ≥ 3.24): the day's row gains the request.

    A single statement where the ORM needs an UPDATE, and an INSERT plus a second UPDATE on a user's first
    request of the day; it is on every request's settlement (docs/performance.md).
    """
    meta = DailyUsage._meta
    table = connection.ops.quote_name(meta.db_table)
    column = {f.name: connection.ops.quote_name(f.column) for f in meta.concrete_fields}
    keys = [column["user"], column["model"], column["date"]]
    counters = [column[name] for name in _ROLL_UP_COUNTERS]
    return (f"INSERT INTO {table} ({', '.join(keys + counters)}) VALUES ({', '.join(['%s'] * (len(keys) + len(counters)))}) "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET "
            + ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in counters))


def _roll_up(row):
    values = (row.user_id, row.model, connection.ops.adapt_datefield_value(row.started_at.date()), 1,
              row.prompt_tokens, row.completion_tokens,
              int(row.status == Usage.Status.REJECTED), int(row.status == Usage.Status.UPSTREAM_ERROR))
    with connection.cursor() as cursor:
        cursor.execute(_roll_up_sql(connection.vendor), values)
