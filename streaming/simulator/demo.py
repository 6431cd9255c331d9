"""What the simulated model says in the demo (`./dev demo` sets SIMULATOR_STYLE=demo; app.py, style "demo").

A handful of answers of different lengths and shapes — prose, a list, a table, code — so that a person trying the
chat page sees Markdown stream in as a model would write it. Tests and benchmarks never see these: their style is
"plain" (app.py's fixed words), on which many of them depend.
"""

import re
import zlib

GREETING = (
    "Hello! I'm Sluice's **simulated model**: no real model is behind me, but I answer at a model's pace, so you can "
    "watch an answer stream in, stop it halfway (*Stop*, or Escape) and see what it cost in the quota panel.\n\n"
    "Ask me for some code, a list of steps or a comparison, or set *Max tokens* low to see an answer cut short."
)

PYTHON = '''Here is a small Python function that retries an operation with exponential backoff and jitter:

```python
import random
import time


def retry(operation, attempts=5, base_seconds=0.2):
    """Call operation() until it succeeds, waiting longer each time."""
    for attempt in range(attempts):
        try:
            return operation()
        except ConnectionError:
            if attempt == attempts - 1:
                raise
            time.sleep(base_seconds * 2 ** attempt * random.uniform(0.5, 1.5))
```

The random factor keeps many clients from retrying at the same moment. Sluice retries a provider the same way, \
but only **before its first byte**: once an answer has started streaming, it cannot be replayed.'''

JAVASCRIPT = '''A browser can read a streamed answer as it arrives with `fetch` and a reader:

```javascript
const response = await fetch("/api/chat", { method: "POST", body, headers });
const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
for (;;) {
  const { value, done } = await reader.read();
  if (done) break;
  console.log(value);  // one or more "data: {...}" events
}
```

This page does exactly that. Each `data:` line is one chunk of the answer, and `data: [DONE]` ends it. If you \
press *Stop*, the page aborts the fetch and the server stops asking the provider for more.'''

STEPS = '''A sluice lock moves a boat between two water levels in four steps:

1. **Enter** the chamber while its level matches yours.
2. **Close** the gates behind you.
3. **Fill or drain** the chamber slowly, so that the boat rises or falls gently.
4. **Leave** through the far gates once the levels match.

An LLM gateway keeps calm the same way:

- it *leases* tokens from your quota before it sends them,
- it applies *backpressure* when a reader falls behind,
- it *queues* requests in front of a provider that is struggling.

Nothing overflows, because nothing moves faster than the next stage can take it.'''

COMPARISON = '''## Streaming or waiting

A streamed answer arrives token by token: the first words appear after a fraction of a second, not after the \
whole answer has been written.

| | streamed | all at once |
|---|---|---|
| first words | after ~0.5 s | after the whole answer |
| can be stopped | yes | no |
| tokens charged when stopped | only those sent | all of them |

Streaming holds one connection open per answer, which is why each plan limits how many answers a user may have \
streaming at the same time.'''

BACKPRESSURE = '''Backpressure is what keeps a slow reader from filling a server's memory.

When you read this answer, your browser takes each chunk as it comes. If it stopped reading (a frozen tab, a \
phone in a tunnel), a naive server would keep asking the model for tokens and keep them in memory until the \
reader came back, or forever.

Sluice does not. It keeps a small buffer per stream, and when that buffer is full it *stops reading from the \
provider* until the client catches up:

> The provider's stream waits on the client's socket, one chunk at a time.

If the client never catches up, the stream is cut after a while (`STREAM_STALL_TIMEOUT`) and only the tokens that \
were actually delivered are charged. The same rule holds for every stream at once: a global budget caps the \
memory that all buffers may use together.'''

ANSWERS = (GREETING, PYTHON, JAVASCRIPT, STEPS, COMPARISON, BACKPRESSURE)

# A question that names what it wants gets that shape of answer; anything else gets one chosen by its text.
WANTS = (
    (re.compile(r"\b(javascript|js|browser|fetch)\b"), JAVASCRIPT),
    (re.compile(r"\b(code|python|function|script|program|example)\b"), PYTHON),
    (re.compile(r"\b(list|steps?|how)\b"), STEPS),
    (re.compile(r"\b(table|compare|comparison|versus|vs|difference)\b"), COMPARISON),
    (re.compile(r"\b(backpressure|slow|memory)\b"), BACKPRESSURE),
    (re.compile(r"^\W*(hi|hello|hey|bonjour|hallo)\b"), GREETING),
)
CONTINUE = re.compile(r"^\W*continue\b", re.IGNORECASE)


def _text(message) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def answer(messages) -> str:
    """The answer to the last question in `messages` (a "Continue…" goes on with the answer it follows)."""
    messages = [m for m in messages if isinstance(m, dict)]
    question = next((_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
    if CONTINUE.match(question):
        # What was answered since the last real question: the start of one of the answers, to go on with.
        written = []
        for message in reversed(messages[:-1]):
            if message.get("role") == "assistant":
                written.insert(0, _text(message))
            elif message.get("role") == "user" and not CONTINUE.match(_text(message)):
                break
        so_far = "".join(written)
        for text in ANSWERS:
            if so_far and text.startswith(so_far) and len(text) > len(so_far):
                return text[len(so_far):]
    lowered = question.lower()
    for pattern, text in WANTS:
        if pattern.search(lowered):
            return text
    return ANSWERS[zlib.crc32(question.encode("utf-8", "replace")) % len(ANSWERS)]
