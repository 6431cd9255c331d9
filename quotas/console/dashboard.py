"""What the admin reads about usage: the quota changelist's window figures, the ledger's date drill-down, and the
usage dashboard.

The dashboard covers a period the operator picks (today by hour, or whole UTC days): tokens per bucket from the
daily rollups (the ledger, by hour, for one day), refusals, cuts and failures from the ledger in one grouped query
that the cards, the tables and the rate chart all add up, first-token percentiles from the ledger, the top users and
models from the rollups, each linked to the ledger filtered to them. The charts are SVG drawn here (charts.py; no
CDN, no chart library). The live panel of running streams is pushed by streaming/gateway/live_panel.py over a
WebSocket (the page only: the console imports nothing from streaming). The deployments' health (their breakers and
limits from the counter store, their last hour from the ledger) lists the deployments the catalogue names through
quotas/domain/catalogue.py.
"""

import calendar
import math
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from urllib.parse import urlencode

from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db.models import (Case, CharField, Count, DateField, F, IntegerField, Max, Min, OuterRef, Q, Subquery,
                              Sum, Value, When)
from django.db.models.functions import Coalesce, TruncDate, TruncHour
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import formats, timezone

from ..domain import catalogue
from ..domain.selectors import CHARGED, TOKENS
from ..models import DailyUsage, Usage, UserQuota
from ..store import StoreUnavailable, get_store
from . import charts, display

TOP = 10


# The quota changelist --------------------------------------------------------------------------


def _local_value(zones, now, of_local, output_field):
    """An expression for `of_local(now in the row's timezone)`: a Case over the zones in use."""
    by_value = {}
    for zone in zones:
        by_value.setdefault(of_local(now.astimezone(zoneinfo.ZoneInfo(zone))), []).append(zone)
    return Case(*(When(timezone__in=zs, then=Value(v)) for v, zs in by_value.items()),
                default=Value(of_local(now.astimezone(UTC))), output_field=output_field)


def _tokens_counted(**window):
    rows = Usage.objects.filter(user_id=OuterRef("user_id"), counted=True, **window).order_by()
    return Coalesce(Subquery(rows.values("user_id").annotate(tokens=Sum(CHARGED)).values("tokens")), 0)


def with_window_usage(quotas, now):
    """Annotate user quotas with `day_used` and `month_used`: the tokens their current windows count.

    Part of the page's one query (plus one for the zones in use): the windows are calendar days and
    months in each user's timezone, so today's date and month are chosen per row from the few zones
    in use, and summed from the ledger on its (user, day) and (user, month) indexes.
    """
    zones = list(UserQuota.objects.order_by().values_list("timezone", flat=True).distinct())
    quotas = quotas.annotate(window_day=_local_value(zones, now, datetime.date, DateField()),
                             window_month=_local_value(zones, now, lambda local: local.strftime("%Y-%m"), CharField()))
    return quotas.annotate(day_used=_tokens_counted(day=OuterRef("window_day")),
                           month_used=_tokens_counted(month=OuterRef("window_month")))


# The ledger changelist --------------------------------------------------------------------------


def calendar_hierarchy(cl):
    """The context of admin/date_hierarchy.html, as Django's `date_hierarchy` tag gives it but without
    its SELECT DISTINCT over every matching row (a full scan of a million-row ledger): the choices are
    the calendar between the first and the last matching row, from one MIN/MAX on the index.
    """
    field = cl.date_hierarchy
    bounds = cl.queryset.aggregate(first=Min(field), last=Max(field))
    year, month, day = (int(cl.params[key]) if cl.params.get(key) else None
                        for key in (f"{field}__year", f"{field}__month", f"{field}__day"))
    context = {"show": True, "field_name": cl.model._meta.get_field(field).verbose_name, "choices": [],
               "back": {"link": _link(cl), "title": "All dates"}}
    if bounds["first"] is None:
        return {**context, "show": bool(year)}
    first, last = timezone.localdate(bounds["first"]), timezone.localdate(bounds["last"])
    if not year and first.year == last.year:
        year, month = first.year, (first.month if first.month == last.month else None)
    if not year:
        return {**context, "back": None,
                "choices": [{"link": _link(cl, year=y), "title": str(y)} for y in range(first.year, last.year + 1)]}
    if month and day:
        chosen = date(year, month, day)
        return {**context, "back": {"link": _link(cl, year=year, month=month),
                                    "title": formats.date_format(chosen, "YEAR_MONTH_FORMAT")},
                "choices": [{"title": formats.date_format(chosen, "MONTH_DAY_FORMAT")}]}
    if month:
        days = (date(year, month, d) for d in range(1, calendar.monthrange(year, month)[1] + 1))
        return {**context, "back": {"link": _link(cl, year=year), "title": str(year)},
                "choices": [{"link": _link(cl, year=year, month=month, day=d.day),
                             "title": formats.date_format(d, "MONTH_DAY_FORMAT")} for d in days if first <= d <= last]}
    months = (date(year, m, 1) for m in range(1, 13))
    return {**context, "choices": [{"link": _link(cl, year=year, month=m.month),
                                    "title": formats.date_format(m, "YEAR_MONTH_FORMAT")}
                                   for m in months if first.replace(day=1) <= m <= last]}


def _link(cl, **parts):
    field = cl.date_hierarchy
    return cl.get_query_string({f"{field}__{name}": value for name, value in parts.items()}, [f"{field}__"])


# The dashboard ---------------------------------------------------------------------------------


PRESETS = {"today": 1, "7d": 7, "30d": 30, "90d": 90}  # whole UTC days up to today
DEFAULT_PRESET = "30d"
MAX_DAYS = 366
LIVE_STALE_SECONDS = 5  # the live panel says "stale" when no snapshot came for longer (one comes every second)
# Ledger statuses the dashboard counts: refused before any answer; cut at the user's quota; failed (the provider,
# the counter store, or the serving process).
REFUSED = Usage.Status.REJECTED
CUT = Usage.Status.QUOTA_EXHAUSTED
FAILED = (Usage.Status.UPSTREAM_ERROR, Usage.Status.STORE_UNAVAILABLE, Usage.Status.WORKER_LOST)


@dataclass(frozen=True)
class Period:
    """Whole UTC days from `first` to `last` (included): by hour when it is one day, by day otherwise."""

    first: date
    last: date
    preset: str  # a PRESETS key, or "" for dates the operator chose

    @property
    def days(self):
        return (self.last - self.first).days + 1

    @property
    def hourly(self):
        return self.days == 1

    @property
    def start(self):
        return datetime.combine(self.first, time.min, tzinfo=UTC)

    @property
    def end(self):
        return datetime.combine(self.last + timedelta(days=1), time.min, tzinfo=UTC)

    def buckets(self):
        """Each bucket's start: a datetime per hour, or a date per day."""
        if self.hourly:
            return [self.start + timedelta(hours=h) for h in range(24)]
        return [self.first + timedelta(days=d) for d in range(self.days)]

    def describe(self):
        if self.preset == "today":
            return f"Today ({self.first:%Y-%m-%d}, UTC), by hour"
        if self.hourly:
            return f"{self.first:%Y-%m-%d} (UTC), by hour"
        if self.preset:
            return f"The last {self.days} days (UTC)"
        return f"{self.first:%Y-%m-%d} to {self.last:%Y-%m-%d} (UTC)"


def period_from(params, today: date) -> Period:
    """The period a request asks for: ?range=today|7d|30d|90d, or ?from=YYYY-MM-DD&to=YYYY-MM-DD (at most MAX_DAYS,
    none after today). Anything else: the default."""
    first, last = _date(params.get("from")), _date(params.get("to"))
    if first or last:
        first, last = first or last, min(last or today, today)
        first, last = sorted((min(first, today), last))
        return Period(max(first, last - timedelta(days=MAX_DAYS - 1)), last, "")
    preset = params.get("range") if params.get("range") in PRESETS else DEFAULT_PRESET
    return Period(today - timedelta(days=PRESETS[preset] - 1), today, preset)


def _date(text):
    try:
        return date.fromisoformat(text) if text else None
    except ValueError:
        return None


def _bucket(period):
    """The ledger's started_at truncated to the period's buckets (UTC, as the daily rollups)."""
    return TruncHour("started_at", tzinfo=UTC) if period.hourly else TruncDate("started_at", tzinfo=UTC)


def _in(period):
    return Usage.objects.filter(started_at__gte=period.start, started_at__lt=period.end)


def token_totals(period):
    """{bucket: {"prompt", "completion", "requests"}}: the daily rollups (one grouped query), or for one day the
    ledger's settled rows by hour (the rollups count a row when it settles, so rows in progress are left out here
    too)."""
    if period.hourly:
        rows = (_in(period).exclude(status=Usage.Status.STREAMING).annotate(bucket=_bucket(period))
                .values("bucket").order_by()
                .annotate(prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"), requests=Count("id")))
    else:
        rows = (DailyUsage.objects.filter(date__gte=period.first, date__lte=period.last).values(bucket=F("date"))
                .order_by().annotate(prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"),
                                     requests=Sum("requests")))
    return {row["bucket"]: row for row in rows}


def outcome_counts(period):
    """Refused, cut and failed rows of the period, counted per (bucket, status, reason): one grouped query on the
    ledger's (status, started_at) index. The cards, the tables and the rate chart all add these same rows up, so
    they agree (issue 19, item 10)."""
    return list(_in(period).filter(status__in=[REFUSED, CUT, *FAILED]).annotate(bucket=_bucket(period))
                .values("bucket", "status", "reason").order_by().annotate(requests=Count("id")))


def _shown_ms(ms):
    """The time to first token rounded as the dashboard shows it (display.seconds): 1 ms under 0.1 s, 10 ms under 1 s,
    100 ms under 10 s, 1 s above. Counting rows per rounded value gives the percentiles exactly as shown, from a few
    hundred groups per bucket instead of a sort of every row (1M rows over 30 days: 0.4 s instead of 3.5 s)."""
    return Case(When(time_to_first_token_ms__lt=100, then=ms),
                When(time_to_first_token_ms__lt=1000, then=(ms + 5) / 10 * 10),
                When(time_to_first_token_ms__lt=10_000, then=(ms + 50) / 100 * 100),
                default=(ms + 500) / 1000 * 1000, output_field=IntegerField())


def first_token_percentiles(period):
    """({bucket: (p50 ms, p95 ms)}, (p50, p95) over the period) of the time to first token, by nearest rank over the
    ledger's rows that had a first token: one grouped query (rows per bucket and rounded value)."""
    rows = (_in(period).filter(time_to_first_token_ms__isnull=False)
            .annotate(bucket=_bucket(period), ms=_shown_ms(F("time_to_first_token_ms")))
            .values_list("bucket", "ms").order_by().annotate(n=Count("id")))
    by_bucket, overall = {}, {}
    for bucket, ms, n in rows:
        counts = by_bucket.setdefault(bucket, {})
        counts[ms] = counts.get(ms, 0) + n
        overall[ms] = overall.get(ms, 0) + n
    return {bucket: _p50_p95(counts) for bucket, counts in by_bucket.items()}, _p50_p95(overall)


def _p50_p95(counts):
    """The nearest-rank 50th and 95th percentiles of {value: how many}; (None, None) when empty."""
    total = sum(counts.values())
    wanted = [-(-total * 50 // 100), -(-total * 95 // 100)]  # ceil(p × n)
    found, seen = [], 0
    for value in sorted(counts):
        seen += counts[value]
        while wanted and seen >= wanted[0]:
            found.append(value)
            wanted.pop(0)
    return tuple(found) if found else (None, None)


def top(period, field, **exclude):
    """The TOP users or models by tokens in the period, from the rollups."""
    return list(DailyUsage.objects.filter(date__gte=period.first, date__lte=period.last).exclude(**exclude)
                .values(name=F(field), key=F(field.replace("__username", "_id"))).order_by()
                .annotate(tokens=Sum(TOKENS), requests=Sum("requests")).order_by("-tokens", "name")[:TOP])


def ledger_link(period, **filters):
    """The ledger's changelist, filtered to the period (and `filters`)."""
    params = {**filters, "started_at__gte": period.start.isoformat(), "started_at__lt": period.end.isoformat()}
    return reverse("admin:quotas_usage_changelist") + "?" + urlencode(params)


def _summarise(period, totals, outcomes):
    summary = {name: sum(row[name] or 0 for row in totals.values()) for name in ("prompt", "completion", "requests")}
    summary["tokens"] = summary["prompt"] + summary["completion"]
    for name, statuses in (("refused", [REFUSED]), ("cut", [CUT]), ("failed", FAILED)):
        summary[name] = sum(row["requests"] for row in outcomes if row["status"] in statuses)
    return summary


def _by_reason(period, outcomes, statuses, status_filter):
    """Table rows: the outcomes of these statuses per reason (and status), busiest first, each linked to its rows."""
    counted = {}
    for row in outcomes:
        if row["status"] in statuses:
            key = (row["status"], row["reason"])
            counted[key] = counted.get(key, 0) + row["requests"]
    return [{"status": status, "reason": reason, "requests": n,
             "url": ledger_link(period, **{status_filter: status, "reason__exact": reason})}
            for (status, reason), n in sorted(counted.items(), key=lambda item: (-item[1], item[0]))]


def _charts(period, totals, outcomes, percentiles):
    buckets = period.buckets()
    if period.hourly:
        texts = [f"{b:%H}:00" for b in buckets]
        titles = [f"{b:%Y-%m-%d %H}:00–{b + timedelta(hours=1):%H}:00 UTC" for b in buckets]
    else:
        texts = [f"{b:%m-%d}" for b in buckets]
        titles = [f"{b:%Y-%m-%d}" for b in buckets]
    rows = [totals.get(b, {}) for b in buckets]
    tokens = charts.stacked_bars(
        [(row.get("prompt") or 0, row.get("completion") or 0) for row in rows], ("prompt", "completion"),
        [f"{t}: {display.number((r.get('prompt') or 0) + (r.get('completion') or 0))} tokens "
         f"({display.number(r.get('prompt') or 0)} prompt, {display.number(r.get('completion') or 0)} completion), "
         f"{display.number(r.get('requests') or 0)} requests" for t, r in zip(titles, rows)], texts)

    ttft = [percentiles.get(b, (None, None)) for b in buckets]
    seconds = [(None if p50 is None else p50 / 1000, None if p95 is None else p95 / 1000) for p50, p95 in ttft]
    first_token = charts.line_chart(
        [("p50", "p50", [s[0] for s in seconds]), ("p95", "p95", [s[1] for s in seconds])],
        [f"{t}: " + (f"p50 {display.seconds(p50)}, p95 {display.seconds(p95)}" if p50 is not None else "no first token")
         for t, (p50, p95) in zip(titles, ttft)], texts)

    refused, failed = {}, {}
    for row in outcomes:
        counts = refused if row["status"] == REFUSED else failed if row["status"] in FAILED else None
        if counts is not None:
            counts[row["bucket"]] = counts.get(row["bucket"], 0) + row["requests"]
    error_rates, refusal_rates, rate_titles = [], [], []
    for b, t, row in zip(buckets, titles, rows):
        requests = row.get("requests") or 0
        admitted = requests - refused.get(b, 0)
        # Of the requests admitted, the share that failed; of all requests, the share refused.
        error_rates.append(100 * failed.get(b, 0) / admitted if admitted > 0 else None)
        refusal_rates.append(100 * refused.get(b, 0) / requests if requests else None)
        rate_titles.append(f"{t}: {failed.get(b, 0)} failed of {admitted} admitted, "
                           f"{refused.get(b, 0)} refused of {requests} requests" if requests else f"{t}: no requests")
    rates = charts.line_chart([("errors", "errors", error_rates), ("refused", "refused", refusal_rates)],
                              rate_titles, texts)
    return {"tokens": _scaled(tokens, display.number), "first_token": _scaled(first_token, lambda v: f"{v:g} s"),
            "rates": _scaled(rates, lambda v: f"{v:g}%")}


def _scaled(chart, fmt):
    """The chart with the texts of its scale: its top and its middle."""
    half = chart.peak / 2
    return {"chart": chart, "scale": {"top": fmt(chart.peak), "middle": fmt(int(half) if half == int(half) else half)}}


# Deployments (issue 17, item 7) --------------------------------------------------------------------------------


HEALTH_WINDOW = timedelta(hours=1)


def deployment_health(scope, now):
    """A row per deployment: its breaker and adaptive limit now, from its record in the counter store (one round
    trip), and its last hour from the ledger's `deployment` column (one grouped query). The deployments come from the
    catalogue (quotas/domain/catalogue.py), and those the ledger names that it no longer has follow."""
    deployments = catalogue.deployments(scope)
    since = now - HEALTH_WINDOW
    last_hour = deployment_ledger(since)
    states = upstream_states([d.store_key for d in deployments], now.timestamp())
    known = {d.name for d in deployments}
    gone = [catalogue.Deployment(name, "") for name in sorted(last_hour) if name not in known]
    rows = []
    for deployment in [*deployments, *gone]:
        figures = last_hour.get(deployment.name, {"requests": 0, "failed": 0, "p50": None, "p95": None})
        requests = figures["requests"]
        rows.append({
            "name": deployment.name, "models": ", ".join(deployment.models),
            **_upstream_state(states, deployment.store_key, now.timestamp()),
            "p50": display.seconds(figures["p50"]), "p95": display.seconds(figures["p95"]),
            "requests": requests, "failed": figures["failed"],
            "error_rate": f"{100 * figures['failed'] / requests:.1f}%" if requests else "–",
            "url": reverse("admin:quotas_usage_changelist") + "?" + urlencode(
                {"deployment": deployment.name, "started_at__gte": since.isoformat()}),
        })
    return rows


def deployment_ledger(since):
    """{deployment: {"requests", "failed" (upstream errors), "p50", "p95" (first token, ms)}} since `since`: one
    query grouped by deployment and rounded first-token time, like first_token_percentiles."""
    rows = (Usage.objects.filter(started_at__gte=since).exclude(deployment="")
            .annotate(ms=_shown_ms(F("time_to_first_token_ms"))).values_list("deployment", "ms").order_by()
            .annotate(n=Count("id"), failed=Count("id", filter=Q(status=Usage.Status.UPSTREAM_ERROR))))
    found = {}
    for name, ms, n, failed in rows:
        entry = found.setdefault(name, {"requests": 0, "failed": 0, "ms": {}})
        entry["requests"] += n
        entry["failed"] += failed
        if ms is not None:
            entry["ms"][ms] = entry["ms"].get(ms, 0) + n
    for entry in found.values():
        entry["p50"], entry["p95"] = _p50_p95(entry.pop("ms"))
    return found


def upstream_states(keys, now):
    """{store key: UpstreamState} of the deployments' records, or None when the counter store is unavailable."""

    async def read():  # in the loop: a Redis store belongs to one
        return await get_store().upstream_states(keys, now)

    try:
        return async_to_sync(read)() if keys else {}
    except StoreUnavailable:
        return None


def _upstream_state(states, key, now):
    """The breaker (a badge's text, kind and title) and the limit, as the table shows them."""
    if states is None or not key:
        unknown = "the counter store is unavailable" if key else "no longer in the catalogue"
        return {"breaker": ("unknown", "muted", unknown), "limit": "–", "in_flight": "–"}
    state = states.get(key)
    open_until = state.open_until if state else 0.0
    if not settings.UPSTREAM_BREAKER_THRESHOLD:
        breaker = ("off", "muted", "UPSTREAM_BREAKER_THRESHOLD is 0")
    elif open_until > now:
        breaker = ("open", "bad", f"requests are refused for {math.ceil(open_until - now)} s more")
    elif open_until:
        breaker = ("half-open", "warn", "the next request probes it")
    else:
        breaker = ("closed", "good", "")
    top, bottom = settings.UPSTREAM_CONCURRENCY_MAX, settings.UPSTREAM_CONCURRENCY_MIN
    if not top:
        limit = "none"
    else:
        stored = state.limit if state and state.limit is not None else top
        limit = f"{round(max(bottom, min(top, stored)), 1):g}"
    return {"breaker": breaker, "limit": limit, "in_flight": state.permits if state else 0}


def render(request, model_admin):
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    period = period_from(request.GET, timezone.now().astimezone(UTC).date())
    totals = token_totals(period)
    outcomes = outcome_counts(period)
    percentiles, overall = first_token_percentiles(period)
    top_users = top(period, "user__username")
    for row in top_users:
        row["url"] = ledger_link(period, user__id__exact=row["key"])
    # Refusals before a model was chosen (a suspended user, the request rate) have no model: not a row of their own.
    top_models = top(period, "model", model="")
    for row in top_models:
        row["url"] = ledger_link(period, model=row["name"])
    context = {
        **model_admin.admin_site.each_context(request),
        "opts": model_admin.opts,
        "title": "Usage dashboard",
        "period": period,
        "presets": [(key, label, key == period.preset) for key, label in
                    (("today", "Today"), ("7d", "7 days"), ("30d", "30 days"), ("90d", "90 days"))],
        "today": timezone.now().astimezone(UTC).date(),
        "summary": _summarise(period, totals, outcomes),
        "first_token": {"p50": display.seconds(overall[0]), "p95": display.seconds(overall[1])},
        "charts": _charts(period, totals, outcomes, percentiles),
        "top_users": top_users,
        "top_models": top_models,
        "refusals": _by_reason(period, outcomes, [REFUSED], "status__exact"),
        "cut": sum(row["requests"] for row in outcomes if row["status"] == CUT),
        "cut_url": ledger_link(period, status__exact=CUT),
        "errors": _by_reason(period, outcomes, FAILED, "status__exact"),
        "live_stale_seconds": LIVE_STALE_SECONDS,
        "deployments": deployment_health(getattr(request, "scope", {}), timezone.now()),
    }
    return TemplateResponse(request, "admin/quotas/usage/dashboard.html", context)
