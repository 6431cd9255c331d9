"""An OpenAI-compatible provider that speaks the dialects Sluice's own simulator does not: the model name picks one.

Each reproduces a wire format seen from real servers (issue 14's findings), byte for byte where it matters:

    no-done             the answer, a finish_reason and the usage chunk, then the body ends without `data: [DONE]`
    truncated           some tokens, then the body ends: no finish_reason, no [DONE] (a provider that crashed)
    no-usage            a complete answer and [DONE] but never a usage chunk, even when asked (the `fakellm` server)
    over-reported       reports 500 hidden reasoning tokens on top of what it streamed (o-series, gpt-5)
    ignores-max-tokens  streams three times the max_tokens it was sent
    reasoning           streams `delta.reasoning` (vLLM >= 0.17, OpenRouter) before `delta.content`
    rejects             answers 400 with OpenAI's error JSON naming a field it refuses (and a URL and a key of its own)
    recorded-<sample>   a sample of the recorded corpus (tests/quotas/domain/corpus/: english, python, chinese,
                        japanese, tool_calls) in bursts of 2-8 tokens, as servers that flush several tokens at once send
                        them, whatever max_tokens says; usage is the sample's recorded count (none: `-no-usage`)

Served in a process of its own: `python -m uvicorn tests.support.dialects:app --port N`. Every answer is made of
the word " tok" repeated (one token per chunk, as most servers stream), `max_tokens` of them (default 20).
"""

import asyncio
import json
import time

HIDDEN_REASONING_TOKENS = 500


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
    request = json.loads(body or b"{}")
    dialect = request.get("model", "")
    if dialect == "rejects":
        await _json(send, 400, {"error": {
            "message": "Invalid value for 'temperature': must be at most 2 (see https://internal.provider.example/docs "
                       "for key sk-proj-abcdefghijkl)", "type": "invalid_request_error", "param": "temperature",
            "code": None}})
        return
    if dialect.startswith("recorded-"):
        await _recorded(send, request, dialect)
        return
    wanted = request.get("max_completion_tokens") or request.get("max_tokens") or 20
    prompt_tokens = sum(len(str(m.get("content", "")).split()) + 4 for m in request.get("messages", []))
    streamed = wanted * 3 if dialect == "ignores-max-tokens" else wanted
    completion_tokens = streamed + (HIDDEN_REASONING_TOKENS if dialect == "over-reported" else 0)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if dialect == "over-reported":
        usage["completion_tokens_details"] = {"reasoning_tokens": HIDDEN_REASONING_TOKENS}
    if not request.get("stream"):
        await _json(send, 200, {
            "id": "chatcmpl-dialect", "object": "chat.completion", "created": int(time.time()), "model": dialect,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " tok" * streamed},
                         "finish_reason": "stop"}],
            **({} if dialect == "no-usage" else {"usage": usage})})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))

    async def event(payload):
        await send({"type": "http.response.body", "body": b"data: " + payload + b"\n\n", "more_body": True})

    def chunk(delta, finish_reason=None, **extra):
        return json.dumps({"id": "chatcmpl-dialect", "object": "chat.completion.chunk", "created": 1700000000,
                           "model": dialect, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                           **extra}).encode()

    await event(chunk({"role": "assistant", "content": ""}))
    thinking = streamed // 2 if dialect == "reasoning" else 0  # reasoning counts within max_tokens, as in vLLM
    for _ in range(thinking):
        await event(chunk({"reasoning": " think"}))
    sent = (streamed if dialect != "truncated" else max(1, streamed // 2)) - thinking
    for _ in range(sent):
        await event(chunk({"content": " tok"}))
        await asyncio.sleep(0)
    if dialect != "truncated":
        await event(chunk({}, "stop"))
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


async def _json(send, status, payload):
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
