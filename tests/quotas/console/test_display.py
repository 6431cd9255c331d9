"""quotas/console/display.py: how the admin's tables show values."""

from datetime import UTC, datetime
from types import SimpleNamespace

from quotas.console import display


def test_numbers_seconds_and_request_ids():
    assert (display.number(1234567), display.number(0), display.number(None)) == ("1,234,567", "0", "–")
    assert [display.seconds(ms) for ms in (1534, 12, 0, 61_000, None)] == ["1.5 s", "0.01 s", "0.0 s", "61.0 s", "–"]
    short = display.short_request_id("req_5f3a9c1e0123456789abcdef01234567")
    assert short == '<span class="sluice-id" title="req_5f3a9c1e0123456789abcdef01234567">req_5f3a9c1e…</span>'
    assert display.short_request_id("req-3") == "req-3"  # nothing to shorten
    assert "&lt;b&gt;" in display.short_request_id("req_<b>0123456789abcdef")  # escaped


def test_ledger_times_drop_the_year_of_this_year():
    now = datetime(2026, 12, 4, 23, 30, tzinfo=UTC)
    assert display.moment(datetime(2026, 12, 4, 23, 10, 5, tzinfo=UTC), now) == (
        '<span title="2026-12-04 23:10:05 UTC">12-04 23:10</span>')
    assert ">2025-12-31 23:59<" in display.moment(datetime(2025, 12, 31, 23, 59, tzinfo=UTC), now)
    assert display.moment(None) == "–"


def test_badges():
    assert display.status_badge("upstream_error", "upstream error", "upstream_timeout") == (
        '<span class="sluice-badge sluice-badge--bad" title="upstream_error">upstream error</span>'
        '<div class="sluice-reason">upstream_timeout</div>')
    assert "sluice-badge--good" in display.status_badge("completed", "completed")
    now = datetime(2026, 3, 1, tzinfo=UTC)
    key = SimpleNamespace(revoked_at=None, expires_at=None)
    assert display.key_status(key, now) == "active"
    key.expires_at = now
    assert display.key_status(key, now) == "expired"
    key.revoked_at = now
    assert display.key_status(key, now) == "revoked"


def test_audit_changes_read_field_old_new():
    change = display.audit_change({"tokens_per_day": 10_000, "suspended": False, "requests_per_minute": None},
                                  {"tokens_per_day": 20_000, "suspended": True, "requests_per_minute": 7},
                                  blank="plan's value")
    assert change == ("<div class=\"sluice-change\"><b>tokens_per_day:</b> 10,000 → 20,000</div>"
                      "<div class=\"sluice-change\"><b>suspended:</b> no → yes</div>"
                      "<div class=\"sluice-change\"><b>requests_per_minute:</b> plan&#x27;s value → 7</div>")
    created = display.audit_change(None, {"allowed_models": ["sim-small", "sim-large"], "name": "<x>"})
    assert "– → sim-small, sim-large" in created and "&lt;x&gt;" in created
    assert display.audit_value("2026-03-01T12:30:00+00:00") == "2026-03-01 12:30 UTC"
    assert display.audit_value("2026-03") == "2026-03" and display.audit_value([]) == "[]"
