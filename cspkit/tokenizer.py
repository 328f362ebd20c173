"""The tinypython-style 2048-token byte-level BPE, trained on local Python and loaded as tiktoken.

The file format is tiktoken's: one line per token, ``base64(bytes) rank``; ranks 0..255 are the
single bytes, 256..2046 the merges in training order, and 2047 is ``<|endoftext|>``.
"""
from __future__ import annotations

import base64
import collections
import functools
import hashlib
import heapq
import os
from collections.abc import Iterable
from pathlib import Path

import regex
import tiktoken

from .files import atomic_write
from .paths import TOKENIZER_PATH

PAT_STR = (
    r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
EOT = "<|endoftext|>"
VOCAB_SIZE = 2048
EOT_ID = VOCAB_SIZE - 1

# Task candidates (docs/method.md, "Tasks") that must each be one token. Each is a whole
# pre-token chunk, and tiktoken returns a chunk found in the vocabulary as one token.
REQUIRED_TOKENS = [
    '")', "')", "]", "]]", ".add", "+=", " +=", " as", " in", " ==", " =", " enumerate",
    " range", ":", ",", "=None", "):", "):\n", ":\n", " else", "(", " if", "'r", "'w", '"r',
    '"w', "\n", ")", "))", " True", " return", " while", " for", " lambda", " def", " elif",
    " with", " open", " set", " self", "=", " not", " and", " or", " is",
]


def pretokenize(text: str) -> list[str]:
    return regex.findall(PAT_STR, text)


def train_bpe(texts: Iterable[str], vocab_size: int = VOCAB_SIZE,
              required: Iterable[str] = REQUIRED_TOKENS) -> dict[bytes, int]:
    """Byte-level BPE over pre-token chunks; returns tiktoken mergeable ranks (no special token).

    Required tokens are added as chunks with a count above any real pair count, so BPE
    builds them (and their prefixes) first; the rest of the vocabulary comes from the data.
    """
    n_merges = vocab_size - 1 - 256
    chunk_counts: collections.Counter[bytes] = collections.Counter()
    for text in texts:
        chunk_counts.update(c.encode("utf-8") for c in pretokenize(text))
    if not chunk_counts:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    boost = sum(chunk_counts.values()) + 1
    for tok in required:
        chunk_counts[tok.encode("utf-8")] += boost

    words = [[bytes([b]) for b in w] for w in chunk_counts]  # each chunk as a list of tokens
    counts = list(chunk_counts.values())
    pair_counts: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
    where: dict[tuple[bytes, bytes], set[int]] = collections.defaultdict(set)
    for i, (w, c) in enumerate(zip(words, counts)):
        for a, b in zip(w, w[1:]):
            pair_counts[(a, b)] += c
            where[(a, b)].add(i)

    # Max-heap with lazy deletion; ties broken by the pair's bytes so training is deterministic.
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < 256 + n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or -neg <= 0:
            continue
        merged = pair[0] + pair[1]
        # The same bytes may be reached by another split; tiktoken merges by the bytes'
        # rank, so the merge is applied to the words either way but ranked only once.
        ranks.setdefault(merged, len(ranks))
        changed: set[tuple[bytes, bytes]] = set()
        for i in sorted(where.pop(pair, ())):
            w, c = words[i], counts[i]
            for a, b in zip(w, w[1:]):
                pair_counts[(a, b)] -= c
                changed.add((a, b))
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == pair[0] and w[j + 1] == pair[1]:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for a, b in zip(out, out[1:]):
                pair_counts[(a, b)] += c
                where[(a, b)].add(i)
                changed.add((a, b))
        pair_counts[pair] = 0
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return ranks


def save_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(tok).decode()} {r}" for tok, r in sorted(ranks.items(), key=lambda x: x[1])]
    atomic_write(path, "\n".join(lines) + "\n")


def load_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} not found; the shipped one is {TOKENIZER_PATH}")
    ranks = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: expected 'base64token rank', got {line!r}") from e
    return ranks


def tokenizer_id(path: str | os.PathLike = TOKENIZER_PATH) -> str:
    """Name plus content hash: checkpoints record it, loading compares it."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    return f"tinypython_2k-{digest}"


def encoding_from_ranks(ranks: dict[bytes, int], name: str = "tinypython_2k") -> tiktoken.Encoding:
    eot_id = max(ranks.values()) + 1
    return tiktoken.Encoding(name=name, pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={EOT: eot_id})


@functools.lru_cache(maxsize=4)
def _load(path: str) -> tiktoken.Encoding:
    return encoding_from_ranks(load_ranks(path), name=tokenizer_id(path))


def get_encoding(path: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """The shipped tokenizer (or the one at ``path``) as a tiktoken Encoding; no network.

    >>> import cspkit
    >>> enc = cspkit.get_encoding()
    >>> enc.n_vocab
    2048
    >>> enc.decode(enc.encode("print('hi')"))
    "print('hi')"
    """
    return _load(str(Path(path or TOKENIZER_PATH).resolve()))


def is_single_token(enc: tiktoken.Encoding, s: str) -> bool:
    return len(enc.encode_ordinary(s)) == 1
