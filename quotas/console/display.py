"""How the admin's tables show values: numbers with thousands separators, seconds, short request ids, badges, and
audit changes as "field: old → new" (issue 19, item 8). Formatting only: no queries.

Badges are <span class="sluice-badge sluice-badge--KIND">; their style is in templates/admin/base_site.html, so that
every admin page has it without static files.
"""

from datetime import datetime

from django.utils import timezone
from django.utils.html import format_html, format_html_join

# A badge's kind (its colour) per ledger status: green when the answer was whole, amber when the user's own limit or
# connection ended it, red when the provider or Sluice failed, blue while it runs, grey for a refusal.
STATUS_KINDS = {
    "completed": "good", "streaming": "info", "quota_exhausted": "warn", "client_disconnected": "muted",
    "client_stalled": "warn", "upstream_error": "bad", "store_unavailable": "bad", "worker_lost": "bad",
    "rejected": "muted",
}
SHORT_ID_HEX = 8  # req_ + 8 hex digits: enough to tell a page's rows apart; the full id is in the title and search


def number(value):
    """12345 → "12,345"; None → "–"."""
    return "–" if value is None else f"{value:,}"


def seconds(milliseconds):
    """A duration in milliseconds as seconds: 1534 → "1.5 s", 12 → "0.01 s"; None → "–"."""
    if milliseconds is None:
        return "–"
    value = milliseconds / 1000
    return f"{value:,.1f} s" if value >= 1 or value == 0 else f"{value:.2f} s"


def when(moment):
    """A timestamp in the site's zone, to the minute, in one short line ("2026-12-04 22:52"); None → "–"."""
    return "–" if moment is None else timezone.localtime(moment).strftime("%Y-%m-%d %H:%M")


def moment(value, now=None):
    """A ledger time, short: "12-04 23:10" this year, "2025-12-04 23:10" before; the full time in its title."""
    if value is None:
        return "–"
    local, now = timezone.localtime(value), timezone.localtime(now or timezone.now())
    shown = local.strftime("%m-%d %H:%M" if local.year == now.year else "%Y-%m-%d %H:%M")
    return format_html('<span title="{}">{}</span>', local.strftime("%Y-%m-%d %H:%M:%S %Z"), shown)


def short_request_id(request_id):
    """"req_5f3a9c1e…" with the whole id as its title (hover, copy); ids of another shape are shown whole."""
    prefix, _, rest = request_id.partition("_")
    if not rest or len(rest) <= SHORT_ID_HEX + 1:
        return request_id
    return format_html('<span class="sluice-id" title="{}">{}_{}…</span>', request_id, prefix, rest[:SHORT_ID_HEX])


def badge(text, kind, title=""):
    return format_html('<span class="sluice-badge sluice-badge--{}" title="{}">{}</span>', kind, title, text)


def status_badge(status, label, reason=""):
    """A ledger status as a badge, with its reason (the error code) beside it when there is one."""
    shown = badge(label, STATUS_KINDS.get(status, "muted"), status)
    return format_html('{}<div class="sluice-reason">{}</div>', shown, reason) if reason else shown


def key_status(key, now):
    """An API key's state: revoked wins over expired (it was an operator's decision)."""
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


KEY_KINDS = {"active": "good", "revoked": "bad", "expired": "muted"}


# The audit trail -------------------------------------------------------------------------------


def audit_value(value, blank="–"):
    """One audited value, as an operator reads it. `blank` is what None means for this target (an override's None is
    the plan's value)."""
    if value is None:
        return blank
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if value else "[]"
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return value
        if moment.tzinfo is not None:
            return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M %Z")
        return value
    return str(value)


def audit_change(old, new, blank="–"):
    """Each changed field on its own line: "field: old → new" (a created record: "– → new"; a removed one: "old → –").
    """
    old, new = old or {}, new or {}
    names = list(dict.fromkeys([*old, *new]))
    return format_html_join(
        "", '<div class="sluice-change"><b>{}:</b> {} → {}</div>',
        ((name, audit_value(old.get(name), blank) if name in old else "–",
          audit_value(new.get(name), blank) if name in new else "–") for name in names))
