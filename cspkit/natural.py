"""Natural task examples mined from the corpus's validation files (real code, not templates).

Each miner scans lines of held-out files for a place where one of a task's two candidates
is the real next token, and keeps the preceding code as context. The quote task swaps the
opening quote to make a true minimal pair; the others pair a real A-example with a real
B-example (the loss is a mean over prompts, so this is the same measure).
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np

from . import tasks as tasks_mod
from .checkpoint import load, read_config
from .data import Corpus, build_shards, load_corpus
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
TASKS = ("single_double_quote", *MINERS)  # the tasks with natural examples


def _valid(p: Pair) -> bool:
    try:
        check_pair(p)
        return True
    except ValueError:
        return False


def _check_miner(task: str) -> None:
    if task not in TASKS:
        raise KeyError(f"no natural-example miner for {task!r}; available: {', '.join(TASKS)}")


def _hits(task: str, lines: list[str]):
    """(line index, side, match) for every line showing a side of the mined ``task``; for
    single_double_quote, side a is a string closed by ``")`` and side b by ``')``."""
    for i, line in enumerate(lines):
        if task == "single_double_quote":
            m = _QUOTE.match(line)
            if m:
                yield i, "a" if m["q"] == '"' else "b", m
            continue
        _, pat_a, pat_b = MINERS[task]
        for side, pat in (("a", pat_a), ("b", pat_b)):
            m = pat.match(line)
            if m:
                yield i, side, m


def real_code_corpus(model) -> Corpus:
    """The corpus a model was trained on (``model``: its checkpoint directory, or the model
    loaded from it), less the entries made from templates (``tasks:train``): its validation
    files are real code the model never trained on, where natural examples are mined."""
    if isinstance(model, (str, os.PathLike)):
        meta = read_config(model)
    elif getattr(model, "checkpoint", None):
        meta = model.checkpoint
    else:
        raise ValueError("real_code_corpus needs a checkpoint directory or a model loaded from one "
                         "(cspkit.load), whose config names its training corpus")
    train = meta["train"]
    paths = [p for p in train.get("corpus") or ["stdlib"] if not p.startswith("tasks:")]
    return load_corpus(paths, train.get("val_percent", 5.0))


def mine(task: str, paths: list[str] | None = None, max_pairs: int = 200, seed: int = 0,
         corpus: Corpus | None = None) -> Task:
    """A fixed-pair Task named ``<task>_natural`` from the validation files under ``paths``
    (default: the stdlib), or of an already loaded ``corpus``. Tasks with a miner:
    single_double_quote and those in MINERS."""
    _check_miner(task)
    corpus = corpus or load_corpus(paths)
    files = [f.text.splitlines(keepends=True) for f in corpus.val]
    pairs: list[Pair] = []
    if task == "single_double_quote":
        # either quote makes a true minimal pair: the same string opened the other way
        for lines in files:
            for i, _, m in _hits(task, lines):
                ctx = _context(lines, i, m["head"])
                p = Pair(f'{ctx}"{m["body"]}', f"{ctx}'{m['body']}", '")\n', "')\n")
                if _valid(p):
                    pairs.append(p)
    else:
        found: dict[str, list[str]] = {"a": [], "b": []}
        for lines in files:
            for i, side, m in _hits(task, lines):
                found[side].append(_context(lines, i, m["head"]))
        rng = random.Random(seed)
        for side in found:
            rng.shuffle(found[side])
        ca, cb = MINERS[task][0]
        for a, b in zip(found["a"], found["b"]):
            p = Pair(a, b, ca, cb)
            if _valid(p):
                pairs.append(p)
    if not pairs:
        raise ValueError(f"no natural examples of {task} found in the validation files")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    pairs = pairs[:max_pairs]
    return Task.from_pairs(f"{task}_natural", {"train": pairs, "test": pairs},
                           description=f"{task} on real code from the validation files ({len(pairs)} pairs)")


def count_contexts(task: str, split: str = "train", corpus: Corpus | None = None,
                   paths: list[str] | None = None) -> dict[str, int]:
    """How many lines of the corpus split (default: the training files of the stdlib) show each
    side of a mined task, {"a": n, "b": n}: the evidence a model trained on that split saw.
    single_double_quote counts short string arguments closed by ``")`` (a) and ``')`` (b)."""
    _check_miner(task)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    corpus = corpus or load_corpus(paths)
    counts = {"a": 0, "b": 0}
    for f in getattr(corpus, split):
        for _, side, _ in _hits(task, f.text.splitlines(keepends=True)):
            counts[side] += 1
    return counts


def evidence(paths: list[str] | None = None) -> list[dict]:
    """For every registered task, how often the training split shows it: each candidate's count
    as a token in the training shard (tasks whose candidates vary per pair: summed over the
    distinct candidates of their train pairs), and for the mined tasks the lines that show each
    side (``count_contexts``). A task a model fails whose B side the corpus shows a few dozen
    times is data-starved, not beyond the architecture."""
    enc = get_encoding()
    corpus = load_corpus(paths)
    info = build_shards(paths, corpus=corpus)
    shard = np.memmap(Path(info["dir"]) / "train.bin", dtype=np.uint16, mode="r")
    freq = np.bincount(shard, minlength=enc.n_vocab)
    rows = []
    for name in tasks_mod.names():
        t = tasks_mod.get(name)
        pairs = t.pairs("train")
        sides = {side: sorted({getattr(p, f"cand_{side}") for p in pairs}) for side in "ab"}
        row = {"task": name, "candidates_a": sides["a"], "candidates_b": sides["b"],
               "train_tokens": int(shard.size)}
        for side, cands in sides.items():
            row[f"tokens_{side}"] = int(sum(freq[enc.encode_single_token(c)] for c in cands))
        mined = name == "single_double_quote" or name in MINERS
        row["contexts"] = count_contexts(name, "train", corpus) if mined else None
        rows.append(row)
    return rows


def format_evidence(rows: list[dict]) -> str:
    n = rows[0]["train_tokens"] if rows else 0
    lines = [f"training split: {n:,} tokens; token counts of each side's candidate(s); contexts: lines that "
             "show side A / side B (mined tasks only)",
             f"{'task':28s} {'A':>14s} {'B':>14s} {'tokens A':>10s} {'tokens B':>10s} {'contexts A':>11s} "
             f"{'contexts B':>11s}"]

    def show(cands: list[str]) -> str:
        return repr(cands[0]) if len(cands) == 1 else f"{len(cands)} tokens"

    for r in rows:
        ctx = r["contexts"] or {}
        lines.append(f"{r['task']:28s} {show(r['candidates_a']):>14s} {show(r['candidates_b']):>14s} "
                     f"{r['tokens_a']:>10,} {r['tokens_b']:>10,} {ctx.get('a', '-'):>11} {ctx.get('b', '-'):>11}")
    return "\n".join(lines)


def score_models(paths: list[str | os.PathLike], task: str = "all", split: str = "test", n: int | None = None,
                 device: str = "cpu", detail: bool = False, natural: bool = False) -> tuple[dict, str]:
    """What ``cspkit eval`` shows: each model's loss and accuracy on the tasks (``all``, a name, or
    names joined by commas), with ``natural`` the natural examples mined from the held-out files
    of the first model's training corpus too (scored, not counted as solved tasks again), and
    with ``detail`` how each model decides on one pair. Returns the JSON object and the text."""
    names = tasks_mod.names() if task == "all" else task.split(",")
    scored = {name: tasks_mod.get(name) for name in names}
    unmined: list[str] = []
    if natural:
        corpus = real_code_corpus(paths[0])
        for name in TASKS:
            try:
                scored[f"{name}_natural"] = mine(name, corpus=corpus)
            except ValueError as e:   # no example of it in these validation files
                unmined.append(str(e))
    out = []
    for path in paths:
        model = load(path, device=device)
        results = [tasks_mod.evaluate(model, t, split, n=n) for t in scored.values()]
        if detail:
            for r in results:
                p = scored[r["task"]].pairs(split, n=1)[0]
                r["example"] = [(prompt, want, tasks_mod.next_tokens(model, prompt))
                                for prompt, want in ((p.prompt_a, p.cand_a), (p.prompt_b, p.cand_b))]
        out.append({"model": str(path), "results": results})
    for m in out:
        m["solved"] = len(tasks_mod.solved([r for r in m["results"] if r["task"] in names]))
    res = {"split": split, "chance_loss": 0.6931, "chance_accuracy": 0.5, "models": out}
    if natural:
        res["natural_unmined"] = unmined
    human = "\n".join([tasks_mod.format_scores(res), *unmined]) + (
        "\n\n" + tasks_mod.format_detail(res) if detail else "")
    return res, human


def evidence_report(paths: list[str] | None = None) -> tuple[dict, str]:
    """What ``cspkit tasks --evidence`` shows: ``evidence`` as an object and as text."""
    rows = evidence(paths)
    return {"evidence": rows}, format_evidence(rows)
