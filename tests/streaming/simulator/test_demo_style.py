"""The simulated provider's styles (streaming/simulator/app.py, demo.py): "plain" stays exactly what the tests and
benchmarks were written against; "demo" (`./dev demo`) answers like a model, at a person's pace."""

import asyncio
import json

import pytest

from streaming.simulator import demo
from streaming.simulator.app import DEMO_TOKENS_PER_SECOND, DEMO_TTFT_SECONDS, WORDS, Control, Simulator


async def call(app, method, path, body=None):
    """One request to the ASGI app in-process: (status, body bytes)."""
    incoming = [{"type": "http.request", "body": json.dumps(body).encode() if body is not None else b"",
                 "more_body": False}]
    sent = []

    async def receive():
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()  # the client never goes away

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "headers": []}, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def stream(app, **body):
    status, raw = await call(app, "POST", "/v1/chat/completions", {
        "model": "sim-small", "stream": True, "stream_options": {"include_usage": True}, **body})
    assert status == 200
    events = [json.loads(line[6:]) for line in raw.decode().split("\n") if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    finish = next(e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"])
    usage = next(e["usage"] for e in events if e.get("usage"))
    return [d for d in deltas if d], finish, usage


QUESTION = [{"role": "user", "content": "Show me some code"}]


def test_the_default_style_is_plain_with_the_defaults_tests_depend_on(monkeypatch):
    monkeypatch.delenv("SIMULATOR_STYLE", raising=False)
    simulator = Simulator()
    assert simulator.state.control == Control()
    assert (Control().style, Control().tokens_per_second, Control().ttft_seconds, Control().default_tokens) == \
        ("plain", 0.0, 0.0, 48)


async def test_plain_answers_are_the_fixed_words_as_fast_as_read(monkeypatch):
    monkeypatch.delenv("SIMULATOR_STYLE", raising=False)
    deltas, finish, usage = await stream(Simulator(), messages=QUESTION)
    assert deltas == [f" {WORDS[i % len(WORDS)]}" for i in range(48)]
    assert (finish, usage["completion_tokens"]) == ("stop", 48)


async def test_demo_answers_are_markdown_cut_at_max_tokens_like_a_models():
    simulator = Simulator(Control(style="demo", tokens_per_second=5000, ttft_seconds=0.001))
    deltas, finish, usage = await stream(simulator, messages=QUESTION)
    assert "".join(deltas) == demo.PYTHON and finish == "stop"
    assert usage["completion_tokens"] == len(deltas)
    deltas, finish, usage = await stream(simulator, messages=QUESTION, max_tokens=10)
    assert demo.PYTHON.startswith("".join(deltas)) and len(deltas) == 10
    assert (finish, usage["completion_tokens"]) == ("length", 10)


def test_demo_answers_come_at_a_readers_pace_after_a_first_token_wait():
    simulator = Simulator(style="demo")
    replies = [simulator._reply(QUESTION, simulator.state.control) for _ in range(200)]
    assert all(DEMO_TOKENS_PER_SECOND[0] <= r.tokens_per_second <= DEMO_TOKENS_PER_SECOND[1] for r in replies)
    assert all(DEMO_TTFT_SECONDS[0] <= r.ttft_seconds <= DEMO_TTFT_SECONDS[1] for r in replies)
    assert DEMO_TOKENS_PER_SECOND == (30.0, 60.0)


def test_demo_answers_vary_with_the_question_and_include_code_and_lists():
    questions = ["hello", "Write a function", "What are the steps?", "Compare streaming vs waiting",
                 "How does fetch work in the browser?", "Why does backpressure matter?", "Tell me a story"]
    answers = {demo.answer([{"role": "user", "content": q}]) for q in questions}
    assert len(answers) >= 5
    assert any("```python" in a for a in answers) and any("\n1. " in a for a in answers)
    assert any("\n- " in a for a in answers) and any("\n|" in a for a in answers)
    assert len({len(a) for a in answers}) == len(answers)  # different lengths


def test_continue_goes_on_where_the_answer_stopped():
    so_far = demo.STEPS[:120]
    messages = [{"role": "user", "content": "steps please"}, {"role": "assistant", "content": so_far},
                {"role": "user", "content": "Continue exactly where your previous answer stopped."}]
    assert demo.answer(messages) == demo.STEPS[120:]


async def test_the_style_is_a_switch_that_a_reset_restores_to_the_configured_one(monkeypatch):
    monkeypatch.setenv("SIMULATOR_STYLE", "demo")
    simulator = Simulator()
    assert simulator.state.control.style == "demo"
    assert (await call(simulator, "POST", "/control", {"style": "plain"}))[0] == 200
    assert simulator.state.control.style == "plain"
    status, body = await call(simulator, "POST", "/control", {"style": "shouty"})
    assert status == 400 and b"style must be one of plain, demo" in body
    await call(simulator, "POST", "/control/reset")
    assert simulator.state.control.style == "demo"
    monkeypatch.setenv("SIMULATOR_STYLE", "shouty")
    with pytest.raises(ValueError, match="SIMULATOR_STYLE must be one of plain, demo"):
        Simulator()
