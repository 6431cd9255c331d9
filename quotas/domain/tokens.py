"""Token counts with o200k_base, the tokenizer of OpenAI's current models (gpt-4o, gpt-4.1, o-series, gpt-5), through
tiktoken: loaded once per process, at import, from files installed with the packages. Nothing is ever downloaded.

tiktoken itself fetches its encodings from the network on first use (tiktoken.get_encoding → requests.get) and
ships none; Sluice never calls that path. The merge ranks come from the `quicktok-v1` wheel's data file
(quicktok/data/o200k.vocab, derived from tiktoken's, MIT), read here without importing quicktok: they are written
back in OpenAI's own .tiktoken format and checked against the SHA-256 that tiktoken pins for o200k_base, so a changed
or corrupt file stops the process at start-up instead of miscounting bills. See docs/quotas.md, "Counting tokens".
"""

import base64
import hashlib
import importlib.util
import os
import struct

import tiktoken

ENCODING_NAME = "o200k_base"
# tiktoken_ext/openai_public.py: the hash of https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken.
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# o200k_base's pre-tokenizer and special tokens, as in tiktoken_ext/openai_public.py (tiktoken 0.14.0).
O200K_BASE_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
O200K_BASE_SPECIAL_TOKENS = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}


def vocabulary_path() -> str:
    """The installed o200k_base data file. find_spec locates the package without importing (or loading) it."""
    spec = importlib.util.find_spec("quicktok")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("quicktok-v1 is not installed: it carries the o200k_base vocabulary (requirements.txt)")
    return os.path.join(spec.submodule_search_locations[0], "data", "o200k.vocab")


def read_ranks(path: str) -> dict[bytes, int]:
    """The merge ranks of a quicktok .vocab file (u32 count, then per token: u16 length, bytes, u32 rank, all
    little-endian), verified to be OpenAI's o200k_base byte for byte."""
    with open(path, "rb") as f:
        raw = f.read()
    ranks = {}
    try:
        (count,), offset = struct.unpack_from("<I", raw, 0), 4
        for _ in range(count):
            (length,) = struct.unpack_from("<H", raw, offset)
            token = raw[offset + 2:offset + 2 + length]
            (rank,) = struct.unpack_from("<I", raw, offset + 2 + length)
            ranks[token] = rank
            offset += 6 + length
    except struct.error:  # cut short
        offset = -1
    # The .tiktoken file is one "base64(token) rank" line per token, in rank order (so is this file: if it were
    # not, the hash would differ).
    canonical = b"".join(b"%s %d\n" % (base64.b64encode(token), rank) for token, rank in ranks.items())
    if offset != len(raw) or hashlib.sha256(canonical).hexdigest() != O200K_BASE_SHA256:
        raise RuntimeError(f"{path} is not OpenAI's {ENCODING_NAME} vocabulary (its SHA-256 differs from tiktoken's)")
    return ranks


def load() -> tiktoken.Encoding:
    ranks = read_ranks(vocabulary_path())
    encoding = tiktoken.Encoding(ENCODING_NAME, pat_str=O200K_BASE_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=O200K_BASE_SPECIAL_TOKENS)
    # The Rust core has copied the ranks; tiktoken keeps the dict only to pickle an Encoding. ~25 MB per process.
    ranks.clear()
    return encoding


ENCODING = load()
_encode = ENCODING.encode_ordinary  # no special-token checks: "<|endoftext|>" in a text is just text


def count(text: str) -> int:
    """The number of o200k_base tokens in `text` (~1 µs for a streamed delta)."""
    return len(_encode(text))
