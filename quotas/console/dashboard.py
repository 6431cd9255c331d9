"""What the admin reads about usage: the quota changelist's window figures and the usage dashboard.

The dashboard shows 30 days of tokens as an SVG bar chart rendered here (no CDN, no chart library),
the top users and models from the daily rollups, refusals and upstream errors from the ledger (one
grouped query each), and the live panel of running streams that streaming/gateway/live_panel.py pushes over a WebSocket (the
page only: the console imports nothing from streaming).
"""

import calendar
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from django.core.exceptions import PermissionDenied
from django.db.models import Case, CharField, Count, DateField, F, Max, Min, OuterRef, Subquery, Sum, Value, When
from django.db.models.functions import Coalesce
from django.template.response import TemplateResponse
from django.utils import formats, timezone

from ..domain.selectors import CHARGED, TOKENS
from ..models import DailyUsage, Usage, UserQuota

DAYS = 30
TOP = 10
CHART_WIDTH, CHART_HEIGHT = 720, 180


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


@dataclass(frozen=True)
class Bar:
    date: date
    prompt_tokens: int
    completion_tokens: int
    x: float
    width: float
    prompt_y: float
    prompt_height: float
    completion_y: float
    completion_height: float
    label: str  # the date under every fifth bar

    @property
    def tokens(self):
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Chart:
    bars: list
    max_tokens: int
    width: int
    height: int
    plot_height: int  # above the date labels


def daily_totals(since: date):
    """{date: row} of the rollups since `since`: one grouped query."""
    rows = (DailyUsage.objects.filter(date__gte=since).values("date").order_by("date")
            .annotate(prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"), requests=Sum("requests"),
                      refusals=Sum("refusals"), upstream_errors=Sum("upstream_errors")))
    return {row["date"]: row for row in rows}


def bar_chart(since: date, totals, days=DAYS, width=CHART_WIDTH, height=CHART_HEIGHT):
    """Stacked bars (prompt below, completion above), one per day, scaled to the busiest day."""
    dates = [since + timedelta(days=i) for i in range(days)]
    peak = max((totals[d]["prompt"] + totals[d]["completion"] for d in dates if d in totals), default=0)
    plot, slot = height - 20, width / days  # 20 px for the date labels
    scale = plot / peak if peak else 0
    bars = []
    for i, day in enumerate(dates):
        row = totals.get(day, {})
        prompt, completion = row.get("prompt") or 0, row.get("completion") or 0
        prompt_h, completion_h = prompt * scale, completion * scale
        bars.append(Bar(day, prompt, completion, x=round(i * slot + 2, 1), width=round(slot - 4, 1),
                        prompt_y=round(plot - prompt_h, 1), prompt_height=round(prompt_h, 1),
                        completion_y=round(plot - prompt_h - completion_h, 1),
                        completion_height=round(completion_h, 1),
                        label=day.strftime("%m-%d") if (days - 1 - i) % 5 == 0 else ""))
    return Chart(bars, peak, width, height, plot)


def top(since: date, field: str):
    """The TOP users or models by tokens since `since`, from the rollups."""
    return list(DailyUsage.objects.filter(date__gte=since).values(name=F(field)).order_by()
                .annotate(tokens=Sum(TOKENS), requests=Sum("requests")).order_by("-tokens")[:TOP])


def outcomes(since: datetime, statuses, by):
    """Ledger rows with these statuses since `since`, counted per `by` (the (status, started_at) index)."""
    return list(Usage.objects.filter(status__in=statuses, started_at__gte=since).values(*by).order_by()
                .annotate(requests=Count("id")).order_by("-requests"))


def render(request, model_admin):
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    since = timezone.now().astimezone(UTC).date() - timedelta(days=DAYS - 1)
    since_dt = datetime.combine(since, time.min, tzinfo=UTC)
    totals = daily_totals(since)
    summary = {name: sum(row[name] or 0 for row in totals.values())
               for name in ("prompt", "completion", "requests", "refusals", "upstream_errors")}
    summary["tokens"] = summary["prompt"] + summary["completion"]
    context = {
        **model_admin.admin_site.each_context(request),
        "opts": model_admin.opts,
        "title": "Usage dashboard",
        "days": DAYS,
        "summary": summary,
        "chart": bar_chart(since, totals),
        "top_users": top(since, "user__username"),
        "top_models": top(since, "model"),
        "refusals": outcomes(since_dt, [Usage.Status.REJECTED, Usage.Status.QUOTA_EXHAUSTED], ("status", "reason")),
        "upstream_errors": outcomes(since_dt, [Usage.Status.UPSTREAM_ERROR], ("reason",)),
    }
    return TemplateResponse(request, "admin/quotas/usage/dashboard.html", context)
