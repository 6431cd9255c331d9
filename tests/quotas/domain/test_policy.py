"""quotas/domain/policy.py: plain values in, plain values out; no database."""

from datetime import datetime, timezone
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from quotas.domain import policy, tokens

PLAN = SimpleNamespace(tokens_per_day=1000, tokens_per_month=20000, requests_per_minute=60, concurrent_streams=4,
                       max_tokens_per_request=512, allowed_models=["a"])


def test_overrides_replace_only_what_they_set():
    override = SimpleNamespace(tokens_per_day=50, tokens_per_month=None, requests_per_minute=None,
                               concurrent_streams=1, max_tokens_per_request=None, allowed_models=None,
                               suspended=True, timezone="Europe/Paris")
    limits = policy.Limits.combine(PLAN, override)
    assert (limits.tokens_per_day, limits.tokens_per_month, limits.concurrent_streams) == (50, 20000, 1)
    assert limits.allowed_models == ("a",) and limits.suspended and limits.timezone == "Europe/Paris"
    assert policy.Limits.combine(PLAN).tokens_per_day == 1000


def test_allowed_models_empty_means_every_configured_model():
    limits = policy.Limits.combine(SimpleNamespace(**{**vars(PLAN), "allowed_models": []}))
    assert limits.allows_model("x", ["x", "y"]) and not limits.allows_model("z", ["x", "y"])
    assert not policy.Limits.combine(PLAN).allows_model("x", ["a", "x"])


def test_calendar_windows_follow_the_users_timezone():
    limits = policy.Limits.combine(PLAN, SimpleNamespace(timezone="America/New_York", suspended=False))
    # 03:30 UTC on 1 March is still 28 February in New York.
    now = datetime(2026, 3, 1, 3, 30, tzinfo=timezone.utc)
    day, month = policy.calendar_windows(limits, now)
    assert (day.key, month.key) == ("2026-02-28", "2026-02")
    assert day.end.astimezone(timezone.utc) == datetime(2026, 3, 1, 5, 0, tzinfo=timezone.utc)
    assert month.end.astimezone(timezone.utc) == datetime(2026, 3, 1, 5, 0, tzinfo=timezone.utc)
    assert day.seconds_left(now) == 1.5 * 3600


def test_a_dst_day_is_23_hours_long():
    limits = policy.Limits.combine(PLAN, SimpleNamespace(timezone="Europe/Paris", suspended=False))
    day, _ = policy.calendar_windows(limits, datetime(2026, 3, 29, 12, 0, tzinfo=timezone.utc))
    assert (day.end.astimezone(timezone.utc) - day.start.astimezone(timezone.utc)).total_seconds() == 23 * 3600


def test_december_rolls_into_next_year():
    limits = policy.Limits.combine(PLAN)
    _, month = policy.calendar_windows(limits, datetime(2026, 12, 31, 23, 0, tzinfo=timezone.utc))
    assert month.end == datetime(2027, 1, 1, tzinfo=month.end.tzinfo)


def test_text_is_counted_in_o200k_base_tokens():
    assert policy.estimate_tokens("Hello, world!") == 4  # "Hello" "," " world" "!"
    assert policy.estimate_tokens("日本語") == 2
    assert policy.estimate_tokens("") == 0


def test_the_prompt_is_counted_as_openai_frames_it():
    # 3 to prime the reply; per message 3, its role, its content.
    assert policy.estimate_prompt_tokens([{"role": "user", "content": "hi"}]) == 3 + (3 + 1 + 1)
    messages = [
        {"role": "system", "content": "You are terse."},  # 3 + 1 + 4
        {"role": "user", "name": "alice", "content": [{"type": "text", "text": "Describe it:"},  # 3 + 1 + (1 + 1) + 3
                                                      {"type": "image_url", "image_url": {"url": "https://x.test/a"}}]},
        {"role": "assistant", "content": None,  # 3 + 1 + "get_weather" 2 + its arguments 5
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},  # 3 + 1 + 3 + 2
    ]
    assert policy.estimate_prompt_tokens(messages) == (3 + (3 + 1 + 4) + (3 + 1 + 2 + 3 + policy.NON_TEXT_PART_TOKENS)
                                                       + (3 + 1 + 2 + 5) + (3 + 1 + 3 + 2))


def test_a_streamed_delta_counts_its_tokens_and_at_least_one():
    assert policy.chunk_tokens(" the") == 1
    assert policy.chunk_tokens("") == 1
    assert policy.chunk_tokens(" three small words") == 3


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40))
def test_a_deltas_count_is_the_tokenizers_the_first_time_and_every_time_after(text):
    expected = max(1, tokens.count(text))
    assert policy.chunk_tokens(text) == expected
    assert policy.chunk_tokens(text) == expected  # from the kept counts, if it was short enough to keep


def test_the_kept_counts_stay_bounded_and_right():
    words = [f" w{i}" for i in range(policy._COUNTS_KEPT + 2_000)]
    assert [policy.chunk_tokens(word) for word in words] == [max(1, tokens.count(word)) for word in words]
    assert len(policy._counts) <= policy._COUNTS_KEPT
    long = "x" * (policy._SHORT_DELTA + 1)
    policy.chunk_tokens(long)
    assert long not in policy._counts  # a long delta (or a prompt's text) is counted, not kept


def test_max_tokens_is_clamped_to_plan_and_remaining():
    assert policy.clamp_max_tokens(None, 512, 10_000) == 512
    assert policy.clamp_max_tokens(100, 512, 10_000) == 100
    assert policy.clamp_max_tokens(1000, 512, 40) == 40
    assert policy.clamp_max_tokens(5, 512, 0) == 0
    # n choices share what remains; each gets the same budget (issue 16).
    assert policy.clamp_max_tokens(None, 512, 100, choices=3) == 33
    assert policy.clamp_max_tokens(20, 512, 100, choices=3) == 20
    assert policy.clamp_max_tokens(None, 512, 2, choices=3) == 0


def test_lease_sizes():
    assert policy.first_lease(prompt_tokens=20, max_tokens=500, block=32) == 52
    assert policy.first_lease(prompt_tokens=20, max_tokens=8, block=32) == 28
