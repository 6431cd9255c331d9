"""The meter against the recorded corpus: `.venv/bin/python -m tests.quotas.domain.corpus.measure [--provider NAME]`.

Streams each sample through the gateway's own parser and meter (streaming/provider/events.py: SSEParser, classify)
and prints what was metered against the provider's count, per sample and mode (a delta per token, bursts). With
`--provider llama3` (or qwen3, cl100k_base: the tokenizers quicktok bundles), the corpus is streamed and counted as a
provider with that tokenizer would, for the meter's error on models that are not OpenAI's.
"""

import argparse

from streaming.provider.events import CHUNK, SSEParser, classify

from . import MODES, chunks, samples


def metered(payloads, read_size=4096) -> int:
    """The completion tokens the gateway meters for an SSE body made of `payloads`, read `read_size` bytes at a
    time."""
    body = b"".join(b"data: " + payload + b"\n\n" for payload in payloads) + b"data: [DONE]\n\n"
    parser, total = SSEParser(), 0
    for start in range(0, len(body), read_size):
        for data in parser.feed(body[start:start + read_size]):
            event = classify(data)
            if event.kind == CHUNK:
                total += event.tokens
    return total


def recorded_as(tokenizer):
    """The corpus as a provider whose model uses `tokenizer` would stream and count it."""
    import json

    import quicktok

    from .record import HERE, TEXTS, stream_deltas

    encoding = quicktok.get_encoding(tokenizer)
    count = lambda text: len(encoding.encode_ordinary(text))  # noqa: E731
    recorded = {name: {"count": count(text), "deltas": stream_deltas(encoding, text)}
                for name, _, filename in TEXTS for text in [(HERE / filename).read_text("utf-8")]}
    calls = [{"name": call["name"], "count": count(call["name"]) + count(call["arguments"]),
              "deltas": stream_deltas(encoding, call["arguments"])}
             for call in json.loads((HERE / "tool_calls.json").read_text("utf-8"))]
    recorded["tool_calls"] = {"count": sum(c["count"] for c in calls), "calls": calls}
    return recorded


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--provider", help="the provider's tokenizer (default: the recorded corpus, o200k_base)")
    args = parser.parse_args()
    print(f"{'sample':<11} {'mode':<6} {'deltas':>6} {'provider':>8} {'metered':>8} {'deviation':>9}")
    for name, sample in (recorded_as(args.provider) if args.provider else samples()).items():
        for mode in MODES:
            payloads = chunks(sample, mode)
            tokens = metered(payloads)
            deviation = (tokens - sample["count"]) / sample["count"]
            print(f"{name:<11} {mode:<6} {len(payloads):>6} {sample['count']:>8} {tokens:>8} {deviation:>+9.1%}")


if __name__ == "__main__":
    main()
