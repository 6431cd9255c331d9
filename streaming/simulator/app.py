"""A simulated OpenAI-compatible upstream, as a plain ASGI app.

Sluice's default run, its tests and its benchmarks talk to this through the official `openai`
client over real loopback HTTP: mounted at ``/_sim`` in the gateway's own process when no
provider is configured, or run alone with ``python -m streaming.simulator --port 8100`` (__main__.py).

Besides chat completions it serves the Responses API, the legacy text completions, embeddings and each model
(formats.py writes them), with the same switches.

It writes deterministic text at a configurable rate and can be told (``POST /control``) to answer
429 with ``Retry-After``, 5xx, fail mid-stream, or admit only N concurrent requests. ``GET /stats``
reports what it produced, how long its writes were blocked by a reader that stopped reading
(backpressure), and which requests saw their connection closed by the gateway. Alone, these are open (a
developer tool on 127.0.0.1); mounted in a gateway they need its SIMULATOR_CONTROL_TOKEN (``control_token``).

Like a real provider, it reports usage counted with its model's tokenizer: o200k_base (OpenAI's current models), in
quicktok's implementation, which is not the gateway's (tiktoken, quotas/domain/tokens.py), so the gateway's meter is
checked against a count it did not make. Each streamed delta is one token, as OpenAI streams. With `n`, it
answers n choices (interleaved when streamed), their usage summed, as OpenAI does.

Its style (``SIMULATOR_STYLE``, or the ``style`` switch) is "plain" by default: the fixed words below, at the pace the
switches set, which tests and benchmarks depend on. "demo" (what ``./dev demo`` runs) answers like a model for a person
trying the chat page: varied Markdown answers (demo.py) at 30–60 tokens a second after a short first-token wait.
"""

import asyncio
import hmac
import itertools
import json
import os
import random
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from . import demo, formats

# Each " word" is one o200k_base token (tests/quotas/domain/test_tokens.py checks it): a delta per token.
WORDS = (
    "the quick brown fox jumps over a lazy dog while the gateway keeps every stream "
    "within its budget and every reader gets each token in order"
).split()
# A write that waits longer than this counts as blocked by backpressure.
BLOCKED_WRITE_SECONDS = 0.05
STYLES = ("plain", "demo")
# The demo style's pace, drawn for each answer unless the switches set one: a person sees it being written.
DEMO_TOKENS_PER_SECOND = (30.0, 60.0)
DEMO_TTFT_SECONDS = (0.3, 0.8)


@dataclass
class Control:
    """Behaviour switches; `POST /control` replaces any subset, `POST /control/reset` restores these."""

    tokens_per_second: float = 0.0  # 0: as fast as the reader takes them
    ttft_seconds: float = 0.0
    default_tokens: int = 48  # completion length when the request sets no max_tokens
    # Characters added to each token's chunk, to make large streams cheaply: in its `obfuscation` field, where OpenAI
    # pads its chunks (stream_options.include_obfuscation), so they cost bytes and no tokens.
    token_padding: int = 0
    fail_429_rate: float = 0.0
    retry_after_seconds: float = 1.0
    fail_500_rate: float = 0.0
    fail_midstream_after: int = 0  # >0: drop the connection after this many tokens
    stall_midstream_after: int = 0  # >0: go silent after this many tokens (the connection stays open)
    max_concurrent: int = 0  # >0: answer 429 beyond this many requests in flight
    seed: int = 0
    style: str = "plain"  # STYLES: "plain" (the fixed words) or "demo" (demo.py's answers, at a person's pace)
    # The Responses API's usage details (formats.py): hidden reasoning tokens on top of the answer's (as OpenAI's
    # reasoning models report them), prompt tokens reported as read from the provider's cache, and prompt tokens
    # reported as written to it (`cache_write_tokens`, OpenRouter's name, only when set: OpenAI reports none).
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(frozen=True)
class Reply:
    """What one request is answered with: its tokens (None: the plain style's words, made as they are sent) and its
    pace."""

    pieces: tuple | None
    tokens_per_second: float
    ttft_seconds: float

    def token(self, i, control, choice=0):
        """Token `i` of the answer; with n > 1, each choice (after the first) starts further along the words."""
        return self.pieces[i] if self.pieces is not None else f" {WORDS[(i + control.seed + choice) % len(WORDS)]}"

    def length(self, control):
        """The whole answer's length in tokens: a shorter max_tokens ends it with finish_reason "length"."""
        return len(self.pieces) if self.pieces is not None else control.default_tokens


@dataclass
class RequestRecord:
    id: str
    client_request_id: str
    stream: bool
    started: float
    tokens_sent: int = 0
    bytes_sent: int = 0
    blocked_seconds: float = 0.0
    blocked_writes: int = 0
    write_started: float = 0.0  # monotonic time of the send() in progress, 0 when none
    disconnected: bool = False  # the gateway closed the connection before the end
    finished: bool = False
    model: str = ""  # as the request named it (a gateway's deployment sends the provider's own name)


@dataclass
class State:
    control: Control = field(default_factory=Control)
    counter: itertools.count = field(default_factory=itertools.count)
    in_flight: int = 0
    attempts: int = 0
    rejected_429: int = 0
    rejected_5xx: int = 0
    records: deque = field(default_factory=lambda: deque(maxlen=2000))

    def snapshot(self):
        return {
            "in_flight": self.in_flight,
            "attempts": self.attempts,
            "rejected_429": self.rejected_429,
            "rejected_5xx": self.rejected_5xx,
            "tokens_sent": sum(r.tokens_sent for r in self.records),
            "bytes_sent": sum(r.bytes_sent for r in self.records),
            "requests": [self._describe(r) for r in self.records],
            "control": asdict(self.control),
        }


    @staticmethod
    def _describe(record):
        described = asdict(record)
        # A write still waiting is blocked now (the reader of this stream is not reading).
        described["blocked_now"] = bool(record.write_started) and (
            time.perf_counter() - record.write_started > BLOCKED_WRITE_SECONDS)
        return described


_tokenizer = None
_tokenizer_lock = threading.Lock()


def tokenizer():
    """The simulated model's tokenizer, loaded when the simulator is first used (~0.4 s, ~65 MB; quicktok holds the GIL
    meanwhile): not at import, since a gateway's process imports this module even when a real provider is
    configured, and then never needs it."""
    global _tokenizer
    with _tokenizer_lock:
        if _tokenizer is None:
            import quicktok

            _tokenizer = quicktok.get_encoding("o200k_base")
        return _tokenizer


def count_tokens(text: str) -> int:
    return len(tokenizer().encode_ordinary(text))


def count_prompt_tokens(messages):
    """The prompt as OpenAI counts it: 3 tokens per message, its string fields' tokens (+1 for a name), the text of
    its content parts, and 3 to prime the reply."""
    total = 3
    for message in messages:
        total += 3
        for key, value in (message.items() if isinstance(message, dict) else ()):
            if isinstance(value, str):
                total += count_tokens(value) + (key == "name")
            elif key == "content" and isinstance(value, list):
                total += sum(count_tokens(str(p.get("text", ""))) for p in value if isinstance(p, dict))
    return total


# What changes the simulator's behaviour or reports on every request it served.
CONTROL_PATHS = frozenset({"/control", "/control/reset", "/stats"})


class Simulator:
    def __init__(self, control=None, control_token=None, style=None):
        """`control_token`: None leaves CONTROL_PATHS open; else a callable giving, at each request, the token they
        require as `Authorization: Bearer <token>` ("" turns them off: 404). `style`: the default style, which a reset
        restores (None: SIMULATOR_STYLE from the environment, else "plain")."""
        self.style = style or os.environ.get("SIMULATOR_STYLE") or "plain"
        if self.style not in STYLES:
            raise ValueError(f"SIMULATOR_STYLE must be one of {', '.join(STYLES)}, not {self.style!r}")
        self.state = State(control=control or Control(style=self.style))
        self.random = random.Random(self.state.control.seed)
        self.control_token = control_token

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return
        if _tokenizer is None:
            # Mounted in a gateway (no lifespan): loaded by the first request of any kind, answered once it is — a
            # test's first reset or switch, usually, rather than its first completion.
            await asyncio.to_thread(tokenizer)
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        method = scope["method"]
        if path in CONTROL_PATHS and (refusal := self._refuse_control(scope)):
            return await _json(send, *refusal)
        if path.endswith("/chat/completions") and method == "POST":
            body = await _read_body(receive)
            return await self._chat(scope, receive, send, body)
        if path.endswith("/models") and method == "GET":
            models = [{"id": m, "object": "model", "created": 0, "owned_by": "sluice-sim"} for m in ("sim-small", "sim-large")]
            return await _json(send, 200, {"object": "list", "data": models})
        if path == "/stats" and method == "GET":
            return await _json(send, 200, self.state.snapshot())
        if path == "/control" and method == "POST":
            changes = json.loads(await _read_body(receive) or b"{}")
            for name, value in changes.items():
                if not hasattr(self.state.control, name):
                    return await _json(send, 400, {"error": f"unknown switch {name}"})
                if name == "style" and value not in STYLES:
                    return await _json(send, 400, {"error": f"style must be one of {', '.join(STYLES)}"})
                setattr(self.state.control, name, type(getattr(self.state.control, name))(value))
            return await _json(send, 200, asdict(self.state.control))
        if path == "/control/reset" and method == "POST":
            await _read_body(receive)
            self.state = State(control=Control(style=self.style))
            self.random = random.Random(0)
            return await _json(send, 200, asdict(self.state.control))
        if method == "POST" and path.endswith(("/responses", "/completions", "/embeddings")):
            return await self._other(scope, receive, send, path.rsplit("/", 1)[1], await _read_body(receive))
        if method == "GET" and "/models/" in path:
            model = path.split("/models/", 1)[1]
            if model in formats.MODELS:
                return await _json(send, 200, formats.model_object(model))
            return await _json(send, 404, _error(f"The model '{model}' does not exist", "invalid_request_error",
                                                 "model_not_found"))
        return await _json(send, 404, _error("Not found", "invalid_request_error", "not_found"))

    def _refuse_control(self, scope):
        """(status, error) unless the request may use the switches and stats."""
        if self.control_token is None:
            return None
        token = self.control_token()
        if not token:
            return 404, _error("Not found", "invalid_request_error", "not_found")
        scheme, _, given = dict(scope.get("headers") or []).get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), token.encode()):
            return 401, _error("The simulator's switches need 'Authorization: Bearer <SIMULATOR_CONTROL_TOKEN>'.",
                               "invalid_request_error", "invalid_api_key")
        return None

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.to_thread(tokenizer)  # standalone: ready before the first request
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _chat(self, scope, receive, send, body):
        state, control = self.state, self.state.control
        state.attempts += 1
        try:
            request = json.loads(body)
            messages = request["messages"]
            # n: that many choices, streamed interleaved, their usage summed (as OpenAI does).
            choices = 1 if request.get("n") is None else request["n"]
            if not isinstance(choices, int) or isinstance(choices, bool) or not 1 <= choices <= 128:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return await _json(send, 400, _error("Invalid body", "invalid_request_error", None))
        if control.max_concurrent and state.in_flight >= control.max_concurrent:
            return await self._reject_429(send, "Concurrency limit reached")
        if control.fail_429_rate and self.random.random() < control.fail_429_rate:
            return await self._reject_429(send, "Rate limit reached")
        if control.fail_500_rate and self.random.random() < control.fail_500_rate:
            state.rejected_5xx += 1
            return await _json(send, 500, _error("The server had an error", "server_error", None))

        headers = dict(scope.get("headers") or [])
        record = RequestRecord(
            id=f"chatcmpl-sim-{next(state.counter)}",
            client_request_id=headers.get(b"x-client-request-id", b"").decode("latin-1"),
            stream=bool(request.get("stream")),
            started=time.time(),
            model=str(request.get("model", ""))[:200],
        )
        state.records.append(record)
        state.in_flight += 1
        try:
            reply = self._reply(messages, control)
            n_tokens = reply.length(control)
            if isinstance(request.get("max_completion_tokens") or request.get("max_tokens"), int):
                n_tokens = min(n_tokens, request.get("max_completion_tokens") or request["max_tokens"])
            prompt_tokens = count_prompt_tokens(messages)
            model = request.get("model", "sim-small")
            if not record.stream:
                disconnected, watcher = _watch_disconnect(receive)
                try:
                    if reply.ttft_seconds and await disconnected.sleep(reply.ttft_seconds):
                        record.disconnected = True
                        return
                finally:
                    watcher.cancel()
                texts = ["".join(reply.token(i, control, c) for i in range(n_tokens)) for c in range(choices)]
                record.tokens_sent = n_tokens * choices
                record.finished = True
                finish = "length" if n_tokens < reply.length(control) else "stop"
                return await _json(send, 200, _completion(record.id, model, texts, prompt_tokens,
                                                          sum(count_tokens(text) for text in texts), finish))
            await self._stream(receive, send, record, request, model, n_tokens, prompt_tokens, reply, choices)
        finally:
            state.in_flight -= 1

    def _reply(self, messages, control) -> Reply:
        if control.style != "demo":
            return Reply(None, control.tokens_per_second, control.ttft_seconds)
        return Reply(_pieces(demo.answer(messages)),
                     control.tokens_per_second or self.random.uniform(*DEMO_TOKENS_PER_SECOND),
                     control.ttft_seconds or self.random.uniform(*DEMO_TTFT_SECONDS))

    async def _reject_429(self, send, message):
        self.state.rejected_429 += 1
        retry = self.state.control.retry_after_seconds
        await _json(
            send, 429, _error(message, "rate_limit_error", "rate_limit_exceeded"),
            extra_headers=[(b"retry-after", f"{retry:g}".encode())],
        )

    async def _stream(self, receive, send, record, request, model, n_tokens, prompt_tokens, reply, choices=1):
        control = self.state.control
        disconnected, watcher = _watch_disconnect(receive)

        async def write(payload: bytes):
            started = record.write_started = time.perf_counter()
            await send({"type": "http.response.body", "body": payload, "more_body": True})
            record.write_started = 0.0
            waited = time.perf_counter() - started
            if waited > BLOCKED_WRITE_SECONDS:
                record.blocked_writes += 1
                record.blocked_seconds += waited
            record.bytes_sent += len(payload)

        try:
            await send({
                "type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            })
            # A comment first, as providers flush their headers at once (some servers hold them back
            # until the first body bytes).
            await write(b": ok\n\n")
            if reply.ttft_seconds and await disconnected.sleep(reply.ttft_seconds):
                record.disconnected = True
                return
            created = int(time.time())
            head = f'{{"id":"{record.id}","object":"chat.completion.chunk","created":{created},"model":"{model}","choices":['
            for c in range(choices):
                await write(_sse(head + f'{{"index":{c},"delta":{{"role":"assistant","content":""}},"finish_reason":null}}]}}'))
            interval = 1.0 / reply.tokens_per_second if reply.tokens_per_second else 0.0
            next_at = time.perf_counter()
            padding = ',"obfuscation":"' + "." * control.token_padding + '"' if control.token_padding else ""
            encode = tokenizer().encode_ordinary
            completion_tokens = 0
            for i in range(n_tokens):
                if disconnected.is_set():
                    record.disconnected = True
                    return
                if control.stall_midstream_after and i >= control.stall_midstream_after:
                    await disconnected.wait()  # a provider that hangs mid-answer: silent until the reader leaves
                    record.disconnected = True
                    return
                if control.fail_midstream_after and i >= control.fail_midstream_after:
                    # What OpenAI sends when generation fails after the first bytes: an error event.
                    await write(_sse(json.dumps(_error("The model failed mid-answer", "server_error", "server_error"))))
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    record.finished = True
                    return
                if interval:
                    next_at += interval
                    delay = next_at - time.perf_counter()
                    if delay > 0 and await disconnected.sleep(delay):
                        record.disconnected = True
                        return
                else:
                    # A send() that does not block does not yield either: let the disconnect watcher run.
                    await asyncio.sleep(0)
                for c in range(choices):
                    token = reply.token(i, control, c)
                    await write(_sse(f'{head}{{"index":{c},"delta":{{"content":{json.dumps(token)}}},'
                                     f'"finish_reason":null}}]{padding}}}'))
                    record.tokens_sent += 1
                    completion_tokens += len(encode(token))
            finish = "length" if n_tokens < reply.length(control) else "stop"
            for c in range(choices):
                await write(_sse(f'{head}{{"index":{c},"delta":{{}},"finish_reason":"{finish}"}}]}}'))
            if (request.get("stream_options") or {}).get("include_usage"):
                usage_chunk = {"id": record.id, "object": "chat.completion.chunk", "created": created,
                               "model": model, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}
                await write(_sse(json.dumps(usage_chunk)))
            await write(b"data: [DONE]\n\n")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            record.finished = True
        except OSError:
            # Servers raise on send() after the peer went away.
            record.disconnected = disconnected.is_set()
            if not record.disconnected:
                raise
        finally:
            watcher.cancel()

    # The other endpoints (formats.py writes their wire formats) ------------------------------------------------------

    async def _other(self, scope, receive, send, endpoint, body):
        """/responses, /completions (legacy) or /embeddings: chat's switches, records, pace and style."""
        state, control = self.state, self.state.control
        state.attempts += 1
        record_id = f"sim{next(state.counter)}"
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise ValueError("the body must be a JSON object")
            if endpoint == "embeddings":
                answer = formats.embeddings(request, count_tokens)
            else:
                kind = formats.Responses if endpoint == "responses" else formats.TextCompletions
                answer = kind(request, record_id, count_tokens, control)
        except (ValueError, TypeError, RecursionError) as error:
            return await _json(send, 400, _error(f"Invalid body: {error}", "invalid_request_error", None))
        if control.max_concurrent and state.in_flight >= control.max_concurrent:
            return await self._reject_429(send, "Concurrency limit reached")
        if control.fail_429_rate and self.random.random() < control.fail_429_rate:
            return await self._reject_429(send, "Rate limit reached")
        if control.fail_500_rate and self.random.random() < control.fail_500_rate:
            state.rejected_5xx += 1
            return await _json(send, 500, _error("The server had an error", "server_error", None))
        headers = dict(scope.get("headers") or [])
        record = RequestRecord(id=f"{endpoint}-{record_id}",
                               client_request_id=headers.get(b"x-client-request-id", b"").decode("latin-1"),
                               stream=getattr(answer, "stream", False), started=time.time(),
                               model=str(request.get("model", ""))[:200])
        state.records.append(record)
        if endpoint == "embeddings":
            record.finished = True
            return await _json(send, 200, answer)
        state.in_flight += 1
        try:
            if answer.prompt_tokens is None:
                answer.prompt_tokens = count_prompt_tokens(answer.messages)
            reply = self._reply(answer.messages, control)
            n_tokens = reply.length(control)
            if answer.max_tokens is not None:
                n_tokens = min(n_tokens, answer.max_tokens)
            finish = "length" if n_tokens < reply.length(control) else "stop"
            if record.stream:
                return await self._stream_other(receive, send, record, answer, reply, n_tokens, finish)
            disconnected, watcher = _watch_disconnect(receive)
            try:
                if reply.ttft_seconds and await disconnected.sleep(reply.ttft_seconds):
                    record.disconnected = True
                    return
            finally:
                watcher.cancel()
            texts = ["".join(reply.token(i, control, c) for i in range(n_tokens)) for c in range(answer.copies)]
            record.tokens_sent = n_tokens * answer.copies
            record.finished = True
            return await _json(send, 200, answer.answer(texts, finish, sum(count_tokens(text) for text in texts)))
        finally:
            state.in_flight -= 1

    async def _stream_other(self, receive, send, record, answer, reply, n_tokens, finish):
        """`answer`'s stream (a formats.py format): its opening events, one event per token at the pace and with the
        failures the switches set, its closing events."""
        control = self.state.control
        disconnected, watcher = _watch_disconnect(receive)

        async def write(payload: bytes):
            started = record.write_started = time.perf_counter()
            await send({"type": "http.response.body", "body": payload, "more_body": True})
            record.write_started = 0.0
            waited = time.perf_counter() - started
            if waited > BLOCKED_WRITE_SECONDS:
                record.blocked_writes += 1
                record.blocked_seconds += waited
            record.bytes_sent += len(payload)

        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
            await write(b": ok\n\n")
            if reply.ttft_seconds and await disconnected.sleep(reply.ttft_seconds):
                record.disconnected = True
                return
            for event in answer.opening():
                await write(event)
            interval = 1.0 / reply.tokens_per_second if reply.tokens_per_second else 0.0
            next_at = time.perf_counter()
            padding = "." * control.token_padding
            encode = tokenizer().encode_ordinary
            texts = [[] for _ in range(answer.copies)]
            completion_tokens = 0
            for i in range(n_tokens):
                if disconnected.is_set():
                    record.disconnected = True
                    return
                if control.stall_midstream_after and i >= control.stall_midstream_after:
                    await disconnected.wait()  # a provider that hangs mid-answer: silent until the reader leaves
                    record.disconnected = True
                    return
                if control.fail_midstream_after and i >= control.fail_midstream_after:
                    await write(answer.failure())
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    record.finished = True
                    return
                if interval:
                    next_at += interval
                    delay = next_at - time.perf_counter()
                    if delay > 0 and await disconnected.sleep(delay):
                        record.disconnected = True
                        return
                else:
                    await asyncio.sleep(0)  # a send() that does not block does not yield: let the watcher run
                for c in range(answer.copies):
                    token = reply.token(i, control, c)
                    await write(answer.delta(c, token, padding))
                    texts[c].append(token)
                    record.tokens_sent += 1
                    completion_tokens += len(encode(token))
            for event in answer.closing(["".join(text) for text in texts], finish, completion_tokens):
                await write(event)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            record.finished = True
        except OSError:
            record.disconnected = disconnected.is_set()  # servers raise on send() after the peer went away
            if not record.disconnected:
                raise
        finally:
            watcher.cancel()


def _pieces(text) -> tuple:
    """`text` as the deltas a provider streams: one token each (a character split across tokens waits for the rest)."""
    encoding, pieces, pending = tokenizer(), [], b""
    for token in encoding.encode_ordinary(text):
        pending += encoding.decode_single_token_bytes(token)
        try:
            pieces.append(pending.decode())
        except UnicodeDecodeError:
            continue
        pending = b""
    return tuple(pieces)


def _watch_disconnect(receive):
    """The gateway closing its connection arrives as http.disconnect: a Disconnect set when it does."""
    disconnected = Disconnect()

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected.set()

    return disconnected, asyncio.create_task(watch())


class Disconnect:
    """Whether the gateway has gone, and a sleep that ends when it goes.

    What a paced stream waits on between two tokens. `asyncio.wait_for(event.wait(), seconds)`, the way before, cost a
    timeout scope, a cancellation and a TimeoutError raised and caught for every token: ~11 % of the simulator's
    CPU at 1,000 streams of 20 tokens/s (py-spy), CPU the gateway under test then waits for on a shared machine
    (docs/performance.md, "Session 16"). Here a token's wait is one future and one timer.
    """

    __slots__ = ("_set", "_sleeper")

    def __init__(self):
        self._set = False
        self._sleeper = None

    def is_set(self) -> bool:
        return self._set

    def set(self):
        self._set = True
        sleeper = self._sleeper
        if sleeper is not None and not sleeper.done():
            sleeper.set_result(True)

    async def sleep(self, seconds) -> bool:
        """Sleep `seconds` unless the gateway goes first; return whether it did."""
        if self._set:
            return True
        loop = asyncio.get_running_loop()
        sleeper = self._sleeper = loop.create_future()
        timer = loop.call_later(seconds, _wake, sleeper)
        try:
            return await sleeper
        finally:
            timer.cancel()
            self._sleeper = None

    async def wait(self):
        while not await self.sleep(3600.0):
            pass


def _wake(sleeper):
    if not sleeper.done():
        sleeper.set_result(False)


async def _read_body(receive):
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _json(send, status, payload, extra_headers=()):
    body = json.dumps(payload).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers],
    })
    await send({"type": "http.response.body", "body": body})


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def _error(message, type_, code):
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _completion(id_, model, texts, prompt_tokens, completion_tokens, finish="stop"):
    return {
        "id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": c, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                    for c, text in enumerate(texts)],
        "usage": _usage(prompt_tokens, completion_tokens),
    }


application = Simulator()
