"""Natural task examples mined from the corpus's validation files (real code, not templates).

Each miner scans lines of held-out files for a place where one of a task's two candidates
is the real next token, and keeps the preceding code as context. The quote task swaps the
opening quote to make a true minimal pair; the others pair a real A-example with a real
B-example (the loss is a mean over prompts, so this is the same measure).
"""
from __future__ import annotations

import random
import re

from .data import Corpus, load_corpus
from .tasks import Pair, Task, check_pair
from .tokenizer import get_encoding

CONTEXT_TOKENS = 160  # room for the prompt inside a 256-token context



def _context(lines: list[str], i: int, head: str) -> str:
    """Lines before i plus ``head``, trimmed at line starts to fit CONTEXT_TOKENS."""
    enc = get_encoding()
    start = i
    while start > 0 and len(enc.encode_ordinary("".join(lines[start - 1:i]) + head)) < CONTEXT_TOKENS:
        start -= 1
    return "".join(lines[start:i]) + head


_QUOTE = re.compile(r"""^(?P<head>.*\()(?P<q>["'])(?P<body>[A-Za-z][A-Za-z ]{0,30}[A-Za-z])(?P=q)\)\n$""")
_FLAT = re.compile(r"^(?P<head>.*[=(] ?\[[^\[\]\n]*[A-Za-z0-9_])\]\n$")
_NESTED = re.compile(r"^(?P<head>.*\[\[[^\n]*\], ?\[[^\[\]\n]*[A-Za-z0-9_])\]\]")
_FOR = re.compile(r"^(?P<head>\s*for [A-Za-z_]\w*) in ")
_WHILE = re.compile(r"^(?P<head>\s*while [A-Za-z_]\w*):\n$")
_ENUM = re.compile(r"^(?P<head>\s*for \w+, \w+ in) enumerate\(")
_RANGE = re.compile(r"^(?P<head>\s*for \w+ in) range\(")

# natural task name -> (task it tests, candidates, pattern for A, pattern for B)
MINERS = {
    "bracket_counting": (("]\n", "]]"), _FLAT, _NESTED),
    "for_while": ((" in", ":\n"), _FOR, _WHILE),
    "enumerate_range": ((" enumerate", " range"), _ENUM, _RANGE),
}


def _valid(p: Pair) -> bool:
    try:
        check_pair(p)
        return True
    except ValueError:
        return False


def mine(task: str, paths: list[str] | None = None, max_pairs: int = 200, seed: int = 0,
         corpus: Corpus | None = None) -> Task:
    """A fixed-pair Task named ``<task>_natural`` from the validation files under ``paths``
    (default: the stdlib), or of an already loaded ``corpus``. Tasks with a miner:
    single_double_quote and those in MINERS."""
    corpus = corpus or load_corpus(paths)
    files = [f.text.splitlines(keepends=True) for f in corpus.val]
    pairs: list[Pair] = []
    if task == "single_double_quote":
        for lines in files:
            for i, line in enumerate(lines):
                m = _QUOTE.match(line)
                if not m:
                    continue
                ctx = _context(lines, i, m["head"])
                p = Pair(f'{ctx}"{m["body"]}', f"{ctx}'{m['body']}", '")\n', "')\n")
                if _valid(p):
                    pairs.append(p)
    elif task in MINERS:
        (ca, cb), pat_a, pat_b = MINERS[task]
        found: dict[str, list[str]] = {"a": [], "b": []}
        for lines in files:
            for i, line in enumerate(lines):
                for side, pat in (("a", pat_a), ("b", pat_b)):
                    m = pat.match(line)
                    if m:
                        found[side].append(_context(lines, i, m["head"]))
        rng = random.Random(seed)
        for side in found:
            rng.shuffle(found[side])
        for a, b in zip(found["a"], found["b"]):
            p = Pair(a, b, ca, cb)
            if _valid(p):
                pairs.append(p)
    else:
        raise KeyError(f"no natural-example miner for {task!r}; available: "
                       f"{', '.join(['single_double_quote', *MINERS])}")
    if not pairs:
        raise ValueError(f"no natural examples of {task} found in the validation files")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    pairs = pairs[:max_pairs]
    return Task.from_pairs(f"{task}_natural", {"train": pairs, "test": pairs},
                           description=f"{task} on real code from the validation files ({len(pairs)} pairs)")
