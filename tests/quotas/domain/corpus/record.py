"""Record the corpus: `.venv/bin/python -m tests.quotas.domain.corpus.record` writes recorded.json beside it.

Counts and token boundaries come from quicktok's o200k_base (quicktok-v1, requirements.txt), not from tiktoken, which
the gateway's meter uses: the recording is an independent count of the same tokenizer, as a provider's is.
"""

import codecs
import json
from pathlib import Path

import quicktok

from . import RECORDING

HERE = Path(__file__).parent
TEXTS = (("english", "english", "english.txt"), ("python", "code", "python.txt"),
         ("chinese", "cjk", "chinese.txt"), ("japanese", "cjk", "japanese.txt"))


def stream_deltas(encoding, text):
    """One delta per token, holding back the bytes of a character split across tokens until it is whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    deltas = []
    for token in encoding.encode_ordinary(text):
        piece = decoder.decode(encoding.decode_single_token_bytes(token))
        if piece:
            deltas.append(piece)
    assert decoder.decode(b"", final=True) == "" and "".join(deltas) == text
    return deltas


def main():
    encoding = quicktok.get_encoding("o200k_base")
    count = lambda text: len(encoding.encode_ordinary(text))  # noqa: E731
    samples = []
    for name, category, filename in TEXTS:
        text = (HERE / filename).read_text("utf-8")
        samples.append({"name": name, "category": category, "count": count(text),
                        "deltas": stream_deltas(encoding, text)})
    calls = [{"name": call["name"], "count": count(call["name"]) + count(call["arguments"]),
              "deltas": stream_deltas(encoding, call["arguments"])}
             for call in json.loads((HERE / "tool_calls.json").read_text("utf-8"))]
    samples.append({"name": "tool_calls", "category": "tool_calls", "count": sum(c["count"] for c in calls),
                    "calls": calls})
    recording = {"encoding": "o200k_base", "recorded_with": f"quicktok {quicktok.__version__}",
                 "samples": samples}
    RECORDING.write_text(json.dumps(recording, ensure_ascii=False, indent=1) + "\n", "utf-8")
    for sample in samples:
        print(f"{sample['name']:<11} {sample['category']:<11} {sample['count']:>5} tokens")


if __name__ == "__main__":
    main()
