"""What is left of the caller's windows in money and in pools, as /v1/quota and the `x-sluice-budget-*` headers show
it (docs/api.md, "Budgets"). Amounts are exact decimal strings of SLUICE_CURRENCY (nanos underneath: JSON numbers
would round them).

A window's status is `quotas.domain.leases.TokenLease.status`'s entry: limit, used, remaining (in its units: tokens,
or nanos for money), resets_at, reset_seconds, owner ("user", "key", "team", "member"), owner_name, money.
"""

from django.conf import settings

from quotas.domain.money import as_currency

from .errors import duration

PERIODS = ("day", "month")


def amount(nanos: int) -> str:
    """Nanos as a plain decimal of the currency, exactly: 250_000_000 → "0.25"."""
    return f"{as_currency(nanos).normalize():f}"


def _money(entry) -> dict:
    return {"limit": amount(entry["limit"]), "used": amount(entry["used"]), "remaining": amount(entry["remaining"]),
            "resets_at": entry["resets_at"], "reset_seconds": round(entry["reset_seconds"], 3)}


def _tokens(entry) -> dict:
    return {name: entry[name] for name in ("limit", "used", "remaining", "resets_at", "reset_seconds")}


def _owned(status, owner):
    """{"tokens": {period: …}, "budget": {period: …}, "name": …} of one owner's windows, or None without any."""
    entries = {name: e for name, e in status.items() if e["owner"] == owner}
    if not entries:
        return None
    out = {"name": next(iter(entries.values()))["owner_name"], "tokens": {}, "budget": {}}
    for entry_name, entry in entries.items():
        period = entry_name.rsplit(":", 1)[-1].removeprefix("budget_")
        if entry["money"]:
            out["budget"][period] = _money(entry)
        else:
            out["tokens"][period] = _tokens(entry)
    return out


def quota_document(status: dict) -> dict:
    """/v1/quota's money and pools: the user's budgets, and the key's, the team's and the member's windows (each None
    when it does not apply)."""
    user = _owned(status, "user") or {"budget": {}}
    document = {"currency": settings.SLUICE_CURRENCY, "budget": user["budget"] or None}
    for owner in ("key", "team", "member"):
        owned = _owned(status, owner)
        if owned is not None:
            owned = {"name": owned["name"], **({"tokens": owned["tokens"]} if owned["tokens"] else {}),
                     **({"budget": owned["budget"]} if owned["budget"] else {})}
        document[owner] = owned
    return document


def tightest(entries):
    """Of (scope, limit, remaining, reset_seconds) money windows, the one with the least left; None without any."""
    return min(entries, key=lambda entry: entry[2], default=None)


def set_headers(response, entry):
    """The x-sluice-budget-* headers of the money window with the least left (`tightest`): limit, remaining and reset
    like OpenAI's x-ratelimit-*-tokens, its scope ("user:day", "team:month", "key:day", "member:month") and the
    currency. Nothing without a money window."""
    if entry is None:
        return response
    scope, limit, remaining, reset_seconds = entry
    response["x-sluice-budget-limit"] = amount(limit)
    response["x-sluice-budget-remaining"] = amount(max(0, remaining))
    response["x-sluice-budget-reset"] = duration(reset_seconds)
    response["x-sluice-budget-scope"] = scope
    response["x-sluice-budget-currency"] = settings.SLUICE_CURRENCY
    return response


def status_entries(status: dict):
    """`tightest`'s entries from a status (TokenLease.status)."""
    return [(f"{e['owner']}:{name.rsplit(':', 1)[-1].removeprefix('budget_')}", e["limit"], e["remaining"],
             e["reset_seconds"]) for name, e in status.items() if e["money"]]
