"""A request's windows and their records in the counter store, built once per user, limits and day.

Building them (policy.request_windows, the store keys, the specs) took ~50 µs for a team key's 10 windows on every
request (docs/performance.md, "Routing and budgets at one stream"), yet they change only when a day ends or a limit
does. The cache is keyed by the limits as authentication read them for this request, not by the user alone: a plan,
override, key, team or membership changed in the database gives other limits, hence another entry, at the next
request; nothing needs invalidating, and the database is still read on every request.
"""

import threading
from dataclasses import dataclass, field
from datetime import datetime

from ..store import WindowSpec
from .admission import team_key, user_key
from .policy import Limits, request_windows

# A window's record outlives the window by a day, so a late settlement still finds it.
WINDOW_MARGIN_SECONDS = 86_400
# Entries kept (one per user and set of limits seen lately; ~5 KB each at 10 windows); the oldest goes first.
TEMPLATES_MAX = 1024
# Specs at different rates kept per entry (two per priced model the caller uses).
RATED_MAX = 16


def window_key(user_id, window):
    """The window's record in the counter store. Token windows "d:…"/"m:…"; money windows "budget_day:…"/
    "budget_month:…" (never the same record). A user's and their keys' under the user's hash tag; a team's pool and
    its members' caps under the team's."""
    scope = window.scope if window.is_money else window.scope[0]
    name = f"{scope}:{window.key}"
    if window.owner == "user":
        return user_key(user_id, name)
    if window.owner == "key":
        return user_key(user_id, f"k{window.owner_id}:{name}")
    if window.owner == "team":
        return team_key(window.owner_id, name)
    return team_key(window.owner_id, f"m{user_id}:{name}")  # a member's cap in the team's pool


@dataclass(frozen=True)
class Template:
    """A request's windows and specs, the same for every `now` in [valid_from, valid_until): the latest start and the
    earliest end of its windows (its days' bounds: a month holds its days)."""

    windows: tuple
    specs: tuple
    valid_from: datetime
    valid_until: datetime
    money: tuple  # per window: Window.is_money
    rated: dict = field(default_factory=dict, compare=False)  # rate -> rated_specs(…, rate)

    def holds(self, now_dt) -> bool:
        return self.valid_from <= now_dt < self.valid_until


_templates = {}  # (user_id, limits, money) -> Template
_lock = threading.Lock()  # the gateway's loop and the database threads (operations, the admin) both build them


def window_specs(user_id, limits: Limits, now_dt, money: bool = False):
    """Every window the request leases (policy.request_windows) and its spec in the store: with `money` (a priced
    request) the budgets' too; an unpriced model costs nothing, so it has no money window."""
    found = template(user_id, limits, now_dt, money)
    return found.windows, list(found.specs)


def template(user_id, limits: Limits, now_dt, money: bool = False) -> Template:
    """window_specs' windows and specs, from the cache when they hold at `now_dt`."""
    key = (user_id, limits, bool(money))
    if now_dt.tzinfo is None or not _hashable(key):  # naive: not comparable to the bounds; a list: not a key
        return _build(user_id, limits, now_dt, money)
    with _lock:
        found = _templates.get(key)
    if found is not None and found.holds(now_dt):
        return found
    found = _build(user_id, limits, now_dt, money)
    with _lock:
        if key not in _templates and len(_templates) >= TEMPLATES_MAX:
            del _templates[next(iter(_templates))]
        _templates[key] = found
    return found


def _hashable(key) -> bool:
    try:
        hash(key)
    except TypeError:  # Limits built by hand with a list of models (tests)
        return False
    return True


def _build(user_id, limits, now_dt, money) -> Template:
    windows = request_windows(limits, now_dt, money)
    specs = tuple(WindowSpec(window_key(user_id, w), w.limit, w.end.timestamp() + WINDOW_MARGIN_SECONDS)
                  for w in windows)
    return Template(windows, specs, max(w.start for w in windows), min(w.end for w in windows),
                    tuple(w.is_money for w in windows))


def rated_specs(money, specs, rate: int):
    """`specs` with `rate` (nanos per token) in the money windows (`money`: per window, is it one), and the rates,
    per window."""
    rates = tuple(rate if is_money else 1 for is_money in money)
    return tuple(WindowSpec(s.key, s.limit, s.expire_at, r) for s, r in zip(specs, rates)), rates

