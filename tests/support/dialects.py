"""An OpenAI-compatible provider that speaks the dialects Sluice's own simulator does not: the model name picks one.

Each reproduces a wire format seen from real servers (issue 14's findings), byte for byte where it matters:

    no-done             the answer, a finish_reason and the usage chunk, then the body ends without `data: [DONE]`
    truncated           some tokens, then the body ends: no finish_reason, no [DONE] (a provider that crashed)
    no-usage            a complete answer and [DONE] but never a usage chunk, even when asked (the `fakellm` server)
    over-reported       reports 500 hidden reasoning tokens on top of what it streamed (o-series, gpt-5)
    ignores-max-tokens  streams three times the max_tokens it was sent
    reasoning           streams `delta.reasoning` (vLLM >= 0.17, OpenRouter) before `delta.content`
    rejects             answers 400 with OpenAI's error JSON naming a field it refuses (and a URL and a key of its own)
    rejects-max-tokens  refuses `max_tokens` as OpenAI's reasoning models do (400 unsupported_parameter), answers
                        otherwise, within `max_completion_tokens`
    max-tokens-only     refuses `max_completion_tokens` as servers that know only `max_tokens` do
    echo                a plain answer (any other name that is none of these answers the same way)
    recorded-<sample>   a sample of the recorded corpus (tests/quotas/domain/corpus/: english, python, chinese,
                        japanese, tool_calls) in bursts of 2-8 tokens, as servers that flush several tokens at once send
                        them, whatever max_tokens says; usage is the sample's recorded count (none: `-no-usage`)
    replay-<name>       a stream recorded in a server's wire format (tests/support/dialects/<name>.sse: the body's bytes,
                        comments included, sent an event at a time) or, not streaming, its JSON (<name>.json); what
                        they hold is described in tests/support/dialects/README.md

With `n`, the plain dialects answer n choices (interleaved when streaming; `ignores-max-tokens` overruns each), their
usage summed. Every request body is kept (the last 500), by its X-Client-Request-Id: `GET /received/<id>` answers it
as it arrived, so that a test sees what the gateway forwarded.

Served in a process of its own: `python -m uvicorn tests.support.dialects:app --port N`. Every answer is made of
the word " tok" repeated (one token per chunk, as most servers stream), `max_tokens` of them (default 20).
"""

import asyncio
import json
import time
from collections import OrderedDict
from pathlib import Path

HIDDEN_REASONING_TOKENS = 500
CORPUS = Path(__file__).with_name("dialects")
RECEIVED = OrderedDict()  # X-Client-Request-Id -> the request body, as it arrived
KEEP_RECEIVED = 500


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"].endswith("/models"):
        await _json(send, 200, {"object": "list", "data": []})
        return
    if scope["path"].startswith("/received/"):
        received = RECEIVED.get(scope["path"].removeprefix("/received/"))
        await _raw(send, 200 if received is not None else 404, received or b"{}")
        return
    request_id = dict(scope.get("headers") or []).get(b"x-client-request-id", b"").decode("latin-1")
    if request_id:
        RECEIVED[request_id] = body
        while len(RECEIVED) > KEEP_RECEIVED:
            RECEIVED.popitem(last=False)
    request = json.loads(body or b"{}")
    dialect = request.get("model", "")
    if dialect == "rejects":
        await _json(send, 400, {"error": {
            "message": "Invalid value for 'temperature': must be at most 2 (see https://internal.provider.example/docs "
                       "for key sk-proj-abcdefghijkl)", "type": "invalid_request_error", "param": "temperature",
            "code": None}})
        return
    if refused := _refused_limit_field(dialect, request):
        await _json(send, 400, {"error": refused})
        return
    if dialect.startswith("recorded-"):
        await _recorded(send, request, dialect)
        return
    if dialect.startswith("replay-"):
        await _replay(send, request, dialect.removeprefix("replay-"))
        return
    wanted = request.get("max_completion_tokens") or request.get("max_tokens") or 20
    prompt_tokens = sum(len(str(m.get("content", "")).split()) + 4 for m in request.get("messages", []))
    streamed = wanted * 3 if dialect == "ignores-max-tokens" else wanted
    choices = request.get("n") or 1
    completion_tokens = streamed * choices + (HIDDEN_REASONING_TOKENS if dialect == "over-reported" else 0)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if dialect == "over-reported":
        usage["completion_tokens_details"] = {"reasoning_tokens": HIDDEN_REASONING_TOKENS}
    if not request.get("stream"):
        await _json(send, 200, {
            "id": "chatcmpl-dialect", "object": "chat.completion", "created": int(time.time()), "model": dialect,
            "choices": [{"index": c, "message": {"role": "assistant", "content": " tok" * streamed},
                         "finish_reason": "stop"} for c in range(choices)],
            **({} if dialect == "no-usage" else {"usage": usage})})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))

    async def event(payload):
        await send({"type": "http.response.body", "body": b"data: " + payload + b"\n\n", "more_body": True})

    def chunk(delta, finish_reason=None, index=0):
        return json.dumps({"id": "chatcmpl-dialect", "object": "chat.completion.chunk", "created": 1700000000,
                           "model": dialect,
                           "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}]}).encode()

    for c in range(choices):
        await event(chunk({"role": "assistant", "content": ""}, index=c))
    thinking = streamed // 2 if dialect == "reasoning" else 0  # reasoning counts within max_tokens, as in vLLM
    for _ in range(thinking):
        await event(chunk({"reasoning": " think"}))
    sent = (streamed if dialect != "truncated" else max(1, streamed // 2)) - thinking
    for _ in range(sent):
        for c in range(choices):
            await event(chunk({"content": " tok"}, index=c))
        await asyncio.sleep(0)
    if dialect != "truncated":
        for c in range(choices):
            await event(chunk({}, "stop", index=c))
        if include_usage and dialect != "no-usage":
            await event(json.dumps({"id": "chatcmpl-dialect", "object": "chat.completion.chunk",
                                    "created": 1700000000, "model": dialect, "choices": [], "usage": usage}).encode())
        if dialect not in ("no-done",):
            await event(b"[DONE]")
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _recorded(send, request, dialect):
    from tests.quotas.domain import corpus

    sample = corpus.samples()[dialect.removeprefix("recorded-").removesuffix("-no-usage")]
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})

    async def event(payload):
        await send({"type": "http.response.body", "body": b"data: " + payload + b"\n\n", "more_body": True})

    def chunk(**fields):
        return json.dumps({"id": "chatcmpl-corpus", "object": "chat.completion.chunk", "created": 1767225600,
                           "model": dialect, **fields}).encode()

    await event(chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
    for payload in corpus.chunks(sample, "burst", model=dialect):
        await event(payload)
        await asyncio.sleep(0)
    finish = "tool_calls" if "calls" in sample else "stop"
    await event(chunk(choices=[{"index": 0, "delta": {}, "finish_reason": finish}]))
    if (request.get("stream_options") or {}).get("include_usage") and not dialect.endswith("-no-usage"):
        prompt_tokens = sum(len(str(m.get("content", "")).split()) + 4 for m in request.get("messages", []))
        await event(chunk(choices=[], usage={"prompt_tokens": prompt_tokens, "completion_tokens": sample["count"],
                                             "total_tokens": prompt_tokens + sample["count"]}))
    await event(b"[DONE]")
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _refused_limit_field(dialect, request):
    """The error a server gives for a token-limit field it does not take, or None."""
    if dialect == "rejects-max-tokens" and "max_tokens" in request:
        # OpenAI's answer for its reasoning models (o-series, gpt-5).
        return {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                           "'max_completion_tokens' instead.", "type": "invalid_request_error", "param": "max_tokens",
                "code": "unsupported_parameter"}
    if dialect == "max-tokens-only" and "max_completion_tokens" in request:
        return {"message": "Unrecognized request argument supplied: max_completion_tokens",
                "type": "invalid_request_error", "param": None, "code": None}
    return None


async def _replay(send, request, name):
    """A recorded answer, as the server sent it: the stream's body an event at a time (comments included), or the
    JSON answer when not streaming."""
    if not request.get("stream"):
        await _raw(send, 200, (CORPUS / f"{name}.json").read_bytes())
        return
    recording = (CORPUS / f"{name}.sse").read_bytes()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    for event in recording.split(b"\n\n"):
        if event.strip():
            await send({"type": "http.response.body", "body": event + b"\n\n", "more_body": True})
            await asyncio.sleep(0)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _json(send, status, payload):
    await _raw(send, status, json.dumps(payload).encode())


async def _raw(send, status, body: bytes):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
