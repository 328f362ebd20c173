"""Binary next-token tasks on Python (METHOD.md section 3): registry, generators, pair loss, eval.

A datapoint is a Pair of prompts that differ in one place; the right next token is
``cand_a`` for ``prompt_a`` and ``cand_b`` for ``prompt_b``. Candidates are the tokens the
tinypython tokenizer really produces at that point: a string closing at the end of a line
is ``")\\n``, not ``")`` followed by a newline, so ``")\\n`` vs ``')\\n`` is the quote task.
Every prompt is checked to end on a token boundary: tokenizing prompt + candidate gives
the prompt's tokens followed by the candidate's single token.

Train and test splits use disjoint templates, names and surrounding code.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import tiktoken
import torch
import torch.nn.functional as F

from .tokenizer import get_encoding

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Pair:
    prompt_a: str
    prompt_b: str
    cand_a: str
    cand_b: str


# --------------------------------------------------------------------------- vocabulary pools
# Each pool is split by index parity into train and test halves, so the splits share nothing.

_NAMES = ["items", "elems", "values", "scores", "data", "payload", "result", "output", "names", "labels",
          "count", "index", "total", "amount", "line", "chunk", "text", "title", "path", "fname", "key",
          "field", "value", "element", "node", "cell", "row", "block", "word", "letter", "parts", "pieces",
          "entry", "option", "record", "sample", "token", "symbol", "buf", "item", "size", "width", "name",
          "base", "state", "flag", "user", "host", "port", "mode", "level", "rank", "limit", "offset",
          "start", "end", "delta", "step", "prefix", "suffix", "source", "target", "queue", "stack"]
# Names that are one token both alone and after a space, for tasks whose answer is a name.
_NAME_CANDIDATES = ("args data value name key path line text result obj item lines file start end size msg "
                    "prefix default state config module mode new root other out res attr base col url output "
                    "count index node items values keys names func parts buf fields target source level tree "
                    "parent left right first last tmp val elem entry token label stack queue attrs cls limit "
                    "offset width height num word words row rows host port query body head tail info flag").split()


def _token_names() -> list[str]:
    enc = get_encoding()
    return [n for n in _NAME_CANDIDATES
            if len(enc.encode_ordinary(n)) == 1 and len(enc.encode_ordinary(" " + n)) == 1]


_FUNCS = ["process", "handle", "build", "parse", "load", "compute", "update", "render", "collect",
          "convert", "check", "format_row", "run", "apply", "merge", "scan", "resolve", "emit", "prepare",
          "encode", "visit", "flush", "fetch", "split_line", "clean", "sort_items", "walk", "make", "read_all",
          "reset"]
_WORDS = ["hello", "world", "error", "done", "value", "missing", "name", "ready", "failed", "result",
          "start", "stop", "user", "admin", "default", "unknown", "empty", "invalid", "success", "warning",
          "config", "debug", "info", "total", "header", "footer", "saved", "loaded", "skipped", "closed"]
_CALLS = ["print", "log", "warn", "str", "repr", "len", "append", "format", "write", "join",
          "info", "send", "emit", "show", "echo"]
_PREAMBLES = [
    "import os\nimport sys\n\n\n",
    "from collections import defaultdict\n\n\n",
    "import json\n\n\nDEBUG = False\n\n\n",
    "import re\nimport math\n\n\n",
    "class Node:\n    pass\n\n\n",
    "from pathlib import Path\n\n\n",
    "def helper(x):\n    return x + 1\n\n\n",
    "import logging\n\nlog = logging.getLogger(__name__)\n\n\n",
    "CONSTANT = 10\nLIMIT = 3\n\n\n",
    "import itertools\n\n\n",
    "def identity(value):\n    return value\n\n\n",
    "from typing import Any\n\n\n",
    "",
    "import time\n\n\n",
]
_FILLERS = [
    "    {a} = {b}\n", "    {a} = len({b})\n", "    {a} = {b} + 1\n", "    {a} = []\n", "    {a} = None\n",
    "    {a} = {b}.copy()\n", "    {a} = {b} * 2\n", "    {a} = str({b})\n", "    {a} = list({b})\n",
    "    {a} = {b} - 1\n", "    {a} = {{}}\n", "    {a} = int({b})\n",
]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _half(pool: Sequence, split: str) -> list:
    """A task's own templates: alternate entries go to train and test."""
    _check_split(split)
    return list(pool[0::2] if split == "train" else pool[1::2])


def _side(s: str) -> str:
    return SPLITS[hashlib.sha256(s.encode()).digest()[0] % 2]


def _vocab(pool: Sequence[str], split: str) -> list[str]:
    """Shared vocabulary (names, words, functions, surrounding code): each string belongs to
    one split by its hash, so a name is never in train in one pool and in test in another."""
    _check_split(split)
    return [x for x in pool if _side(x) == split]


class Ctx:
    """Random choices for one pair, drawn from the split's half of every pool."""

    def __init__(self, rng: random.Random, split: str):
        self.rng, self.split = rng, split

    def _choose(self, half: list, k: int | None):
        return self.rng.choice(half) if k is None else self.rng.sample(half, k)

    def pick(self, pool: Sequence, k: int | None = None):
        """From a task's own list (templates, keyword choices): alternate entries per split."""
        return self._choose(_half(pool, self.split), k)

    def vocab(self, pool: Sequence[str], k: int | None = None):
        """From the shared vocabulary: the split's strings by hash."""
        return self._choose(_vocab(pool, self.split), k)

    def names(self, k: int) -> list[str]:
        return self.vocab(_NAMES, k)

    def token_names(self, k: int) -> list[str]:
        return self.vocab(_token_names(), k)

    def preamble(self) -> str:
        return self.vocab(_PREAMBLES)

    def fillers(self, n: int | None = None) -> str:
        n = self.rng.randint(0, 2) if n is None else n
        out = []
        for _ in range(n):
            a, b = self.names(2)
            out.append(self.pick(_FILLERS).format(a=a, b=b))
        return "".join(out)

    def header(self) -> str:
        fn, arg = self.vocab(_FUNCS), self.names(1)[0]
        return f"{self.preamble()}def {fn}({arg}):\n"

    def words(self, lo: int = 1, hi: int = 3) -> str:
        return " ".join(self.vocab(_WORDS, self.rng.randint(lo, hi)))

    def template(self, templates: Sequence[str]) -> str:
        return self.pick(templates)


# --------------------------------------------------------------------------- Task
@dataclass
class Task:
    name: str
    description: str
    generator: Callable[[random.Random, str], Pair]
    candidates: tuple[str, str] | None = None  # fixed candidates, or None when they vary per pair
    n_pairs: dict[str, int] = field(default_factory=lambda: {"train": 256, "test": 128})
    fixed_pairs: dict[str, list[Pair]] | None = None

    def pairs(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Pair]:
        """Deterministic list of pairs for a split; every pair checked for token boundaries."""
        _check_split(split)
        if self.fixed_pairs is not None:
            pairs = self.fixed_pairs[split]
            return pairs[:n] if n else list(pairs)
        n = n or self.n_pairs[split]
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out, seen, tries = [], set(), 0
        while len(out) < n:
            tries += 1
            if tries > 50 * n:
                raise RuntimeError(f"task {self.name}: could only generate {len(out)} distinct pairs of {n}")
            p = self.generator(rng, split)
            if (p.prompt_a, p.prompt_b) in seen:
                continue
            seen.add((p.prompt_a, p.prompt_b))
            check_pair(p, self.name)
            out.append(p)
        return out

    @classmethod
    def from_pairs(cls, name: str, pairs: Iterable[tuple[str, str, str, str]] | dict[str, list],
                   candidates: tuple[str, str] | None = None, description: str = "user task") -> "Task":
        """A user task from (prompt_a, cand_a, prompt_b, cand_b) tuples, or from
        (prompt_a, prompt_b) tuples with fixed ``candidates``; a dict {split: list} gives
        both splits, a plain list is used for both."""

        def convert(items) -> list[Pair]:
            out = []
            for it in items:
                if isinstance(it, Pair):
                    out.append(it)
                elif len(it) == 4:
                    out.append(Pair(it[0], it[2], it[1], it[3]))
                elif len(it) == 2 and candidates:
                    out.append(Pair(it[0], it[1], *candidates))
                else:
                    raise ValueError(f"task {name}: a pair is (prompt_a, cand_a, prompt_b, cand_b), or "
                                     f"(prompt_a, prompt_b) with candidates=(A, B); got {it!r}")
            for p in out:
                check_pair(p, name)
            return out

        by_split = {s: convert(pairs[s]) for s in SPLITS} if isinstance(pairs, dict) else \
            dict.fromkeys(SPLITS, convert(pairs))
        if not all(by_split.values()):
            raise ValueError(f"task {name}: no pairs given")
        return cls(name, description, generator=_no_generator, candidates=candidates, fixed_pairs=by_split)

    @classmethod
    def from_generator(cls, name: str, generator: Callable[[random.Random, str], tuple],
                       candidates: tuple[str, str] | None = None, description: str = "user task",
                       n_pairs: dict[str, int] | None = None) -> "Task":
        """A user task from ``generator(rng, split)`` returning (prompt_a, prompt_b) (with fixed
        ``candidates``) or (prompt_a, cand_a, prompt_b, cand_b)."""

        def gen(rng, split):
            it = generator(rng, split)
            if len(it) == 4:
                return Pair(it[0], it[2], it[1], it[3])
            if candidates is None:
                raise ValueError(f"task {name}: generator returned 2 prompts but no candidates were given")
            return Pair(it[0], it[1], *candidates)

        return cls(name, description, gen, candidates, n_pairs or {"train": 256, "test": 128})


def _no_generator(rng, split):
    raise RuntimeError("fixed-pair task has no generator")


def token_id(tok: str, task: str = "?", enc: tiktoken.Encoding | None = None) -> int:
    enc = enc or get_encoding()
    ids = enc.encode_ordinary(tok)
    if len(ids) != 1:
        pieces = [enc.decode([i]) for i in ids]
        raise ValueError(f"task {task}: candidate {tok!r} is not a single token (it encodes as {pieces}); "
                         "choose a candidate the tokenizer keeps whole")
    return ids[0]


def pairs_digest(pairs: Sequence[Pair]) -> str:
    """A short hash of the prompts and candidates: what a task is, whatever its name."""
    h = hashlib.sha256()
    for p in pairs:
        h.update("\0".join((p.prompt_a, p.cand_a, p.prompt_b, p.cand_b, "")).encode())
    return h.hexdigest()[:16]


def check_pair(p: Pair, task: str = "?") -> None:
    """Both candidates are single tokens, distinct, and follow each prompt on a token boundary."""
    enc = get_encoding()
    ia, ib = token_id(p.cand_a, task), token_id(p.cand_b, task)
    if ia == ib:
        raise ValueError(f"task {task}: both candidates are {p.cand_a!r}")
    for prompt, cand, cid in ((p.prompt_a, p.cand_a, ia), (p.prompt_b, p.cand_b, ib)):
        if not prompt:
            raise ValueError(f"task {task}: empty prompt")
        base = enc.encode_ordinary(prompt)
        if enc.encode_ordinary(prompt + cand)[: len(base) + 1] != base + [cid]:
            raise ValueError(f"task {task}: prompt {prompt[-40:]!r} followed by {cand!r} does not tokenize as "
                             "the prompt's tokens then the candidate; end the prompt where a token ends")


# --------------------------------------------------------------------------- the 20 tasks
_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.candidates:
        for c in task.candidates:
            token_id(c, task.name)
    _REGISTRY[task.name] = task
    return task


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str | Task) -> Task:
    if isinstance(name, Task):
        return name
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def task(name: str, candidates: tuple[str, str] | None, description: str):
    def wrap(fn):
        register(Task(name, description, fn, candidates))
        return fn
    return wrap


@task("single_double_quote", ('")\n', "')\n"), "string opened with \" or '; close it")
def _quote(rng, split):
    c = Ctx(rng, split)
    var, call = c.names(1)[0], c.vocab(_CALLS)
    words = c.words()
    t = c.template(["    {var} = {call}({q}{w}", "    {call}({q}{w}", "    return {call}({q}{w}",
                    "    {var}.{call}({q}{w}", "    {var} = {call}({var}, {q}{w}", "        {call}({q}{w}"])
    body = c.header() + c.fillers()
    if t.startswith("        "):
        body += f"    if {var}:\n"
    mk = lambda q: body + t.format(var=var, call=call, q=q, w=words)
    return Pair(mk('"'), mk("'"), '")\n', "')\n")


@task("bracket_counting", ("]\n", "]]"), "flat or nested list literal; close it")
def _brackets(rng, split):
    c = Ctx(rng, split)
    var = c.names(1)[0]
    nums = [str(rng.randint(0, 99)) for _ in range(rng.choice([4, 6]))]
    half = len(nums) // 2
    flat = "[" + ", ".join(nums)
    nested = "[[" + ", ".join(nums[:half]) + "], [" + ", ".join(nums[half:])
    t = c.template(["    {var} = {lit}", "    return {lit}", "    self.{var} = {lit}", "    yield {lit}"])
    body = c.header() + c.fillers()
    return Pair(body + t.format(var=var, lit=flat), body + t.format(var=var, lit=nested), "]\n", "]]")


def _set_or_string(rng, split, fixed: str | None):
    c = Ctx(rng, split)
    var = fixed or c.names(1)[0]
    x, src = [n for n in c.names(3) if n != var][:2]
    mid = c.fillers(rng.randint(1, 2))
    t = c.template(["    for {x} in {src}:\n        {var}", "    for {x} in {src}:\n        if {x}:\n            {var}",
                    "    while {src}:\n        {x} = {src}.pop()\n        {var}",
                    "    for {x} in sorted({src}):\n        {var}"])
    tail = t.format(x=x, src=src, var=var)
    head = c.header()
    return Pair(f"{head}    {var} = set()\n{mid}{tail}", f'{head}    {var} = ""\n{mid}{tail}', ".add", " +=")


@task("set_or_string", (".add", " +="), "variable initialized as set() or \"\", used later")
def _sos(rng, split):
    return _set_or_string(rng, split, None)


@task("set_or_string_fixedvarname", (".add", " +="), "same, variable always named current")
def _sosf(rng, split):
    return _set_or_string(rng, split, "current")


@task("final_kwarg", ("=None", "):\n"), "earlier parameters had defaults or not")
def _final_kwarg(rng, split):
    c = Ctx(rng, split)
    fn = c.vocab(_FUNCS)
    args = c.names(rng.randint(2, 4))
    pre = c.preamble()
    a = ", ".join(f"{n}=None" for n in args[:-1]) + ", " + args[-1]
    b = ", ".join(args)
    self_ = "self, " if rng.random() < 0.3 else ""
    return Pair(f"{pre}def {fn}({self_}{a}", f"{pre}def {fn}({self_}{b}", "=None", "):\n")


@task("class_init", None, "which attribute is being assigned in __init__; predict the matching name")
def _class_init(rng, split):
    c = Ctx(rng, split)
    cls = c.pick(["Config", "Node", "Record", "Parser", "Client", "Buffer", "Widget", "Tracker", "Item",
                  "Report"])
    a, b, d = c.token_names(3)
    head = f"{c.preamble()}class {cls}:\n    def __init__(self, {a}, {b}, {d}):\n"
    order = [a, b, d]
    rng.shuffle(order)
    done = "".join(f"        self.{n} = {n}\n" for n in order[:1])
    x, y = order[1:]
    return Pair(f"{head}{done}        self.{x} =", f"{head}{done}        self.{y} =", f" {x}", f" {y}")


@task("with_as", (")", ")\n"), "with open(...) (then ' as') or f = open(...) (then a newline)")
def _with_as(rng, split):
    c = Ctx(rng, split)
    path = c.names(1)[0]
    body = c.header() + c.fillers()
    fv = c.pick(["f", "fh", "fp", "handle", "stream", "fd"])
    return Pair(f"{body}    with open({path}", f"{body}    {fv} = open({path}", ")", ")\n")


@task("bracket_brace", (":", ","), "inside a dict literal or a list literal")
def _bracket_brace(rng, split):
    c = Ctx(rng, split)
    var = c.names(1)[0]
    keys = rng.sample(range(1, 60), rng.randint(2, 4))
    vals = c.names(len(keys))
    d = "{" + ", ".join(f"{k}: {v}" for k, v in zip(keys[:-1], vals)) + ", " + str(keys[-1])
    lst = "[" + ", ".join(str(k) for k in keys)
    body = c.header() + c.fillers()
    return Pair(f"{body}    {var} = {d}", f"{body}    {var} = {lst}", ":", ",")


@task("with_open", ("r", "w"), "file name / intent suggests reading or writing")
def _with_open(rng, split):
    c = Ctx(rng, split)
    thing = c.names(1)[0]
    rd, wr = c.pick([("read", "write"), ("load", "save"), ("parse", "dump"), ("get", "store"),
                     ("import", "export"), ("open", "create")])
    q = c.pick(["'", '"'])
    pre = c.preamble()
    mk = lambda verb: f"{pre}def {verb}_{thing}(path):\n    with open(path, {q}"
    return Pair(mk(rd), mk(wr), "r", "w")


@task("for_while", (" in", ":\n"), "a for header or a while header")
def _for_while(rng, split):
    c = Ctx(rng, split)
    x = c.names(1)[0]
    body = c.header() + c.fillers()
    return Pair(f"{body}    for {x}", f"{body}    while {x}", " in", ":\n")


@task("else_elif", None, "else or elif after an if block: ':' or the condition")
def _else_elif(rng, split):
    c = Ctx(rng, split)
    x, y = c.token_names(2)
    body = c.header() + c.fillers() + f"    if {x}:\n        {y} = {x}\n"
    return Pair(f"{body}    else", f"{body}    elif not", ":\n", f" {x}")


@task("fstring_brace", None, "f-string or plain string at '{': a variable name or a format index")
def _fstring(rng, split):
    c = Ctx(rng, split)
    x = c.token_names(1)[0]
    w = c.words(1, 2)
    body = c.header() + c.fillers() + f"    {x} = {c.names(1)[0]}\n"
    call = c.pick(["print", "log", "msg =", "text =", "return"])
    sep = "(" if call in ("print", "log") else " "
    return Pair(f'{body}    {call}{sep}f"{w}: {{', f'{body}    {call}{sep}"{w}: {{', x, "0")


@task("if_ternary", (":\n", " else"), "an if statement or a ternary expression")
def _if_ternary(rng, split):
    c = Ctx(rng, split)
    x, y, z = c.names(3)
    n = rng.randint(0, 9)
    op = c.pick([">", "<", "==", "!=", ">=", "<="])
    body = c.header() + c.fillers()
    return Pair(f"{body}    if {x} {op} {n}", f"{body}    {y} = {z} if {x} {op} {n}", ":\n", " else")


@task("var_swap", None, "tuple swap x, y = y, ...: the other name")
def _var_swap(rng, split):
    c = Ctx(rng, split)
    x, y = c.token_names(2)
    body = c.header() + c.fillers()
    return Pair(f"{body}    {x}, {y} = {y},", f"{body}    {y}, {x} = {x},", f" {x}", f" {y}")


@task("indent_for", ("       ", "   "), "indentation after a for header or after a plain statement")
def _indent_for(rng, split):
    c = Ctx(rng, split)
    x, y = c.names(2)
    body = c.header() + c.fillers()
    return Pair(f"{body}    for {x} in {y}:\n", f"{body}    {x} = list({y})\n", "       ", "   ")


@task("lambda_func", (":", "):\n"), "lambda or def with the same parameter")
def _lambda(rng, split):
    c = Ctx(rng, split)
    f, x = c.vocab(_FUNCS), c.names(1)[0]
    body = c.preamble()
    return Pair(f"{body}{f} = lambda {x}", f"{body}def {f}({x}", ":", "):\n")


@task("if_equals", (" ==", " ="), "a condition or an assignment")
def _if_equals(rng, split):
    c = Ctx(rng, split)
    x = c.names(1)[0]
    body = c.header() + c.fillers()
    kw = c.pick(["if", "elif", "while", "assert"])
    if kw == "elif":
        body += f"    if not {x}:\n        pass\n"
    return Pair(f"{body}    {kw} {x}", f"{body}    {x}", " ==", " =")


@task("enumerate_range", (" enumerate", " range"), "loop over one or two variables")
def _enum_range(rng, split):
    c = Ctx(rng, split)
    i = c.pick(["i", "j", "k", "n", "idx", "pos", "num", "ix"])
    x = c.names(1)[0]
    body = c.header() + c.fillers()
    return Pair(f"{body}    for {i}, {x} in", f"{body}    for {i} in", " enumerate", " range")


@task("var_if", (":\n", "\n"), "if x == True or x = True")
def _var_if(rng, split):
    c = Ctx(rng, split)
    x = c.names(1)[0]
    v = c.pick(["True", "False", "None", "True", "False", "0"])
    body = c.header() + c.fillers()
    return Pair(f"{body}    if {x} == {v}", f"{body}    {x} = {v}", ":\n", "\n")


@task("while_return_true", (":\n", "\n"), "while True or return True")
def _while_return(rng, split):
    c = Ctx(rng, split)
    body = c.header() + c.fillers(rng.randint(1, 3))
    return Pair(f"{body}    while True", f"{body}    return True", ":\n", "\n")


PAPER_TASKS = tuple(_REGISTRY)  # the 20 of METHOD.md; user tasks registered later are not among them


def corpus_files(split: str = "train", n_files: int = 200, pairs_per_file: int = 5) -> dict[str, str]:
    """Python text made of the paper tasks' own idioms, for a training corpus (``tasks:train``).

    The paper trains on code written to be full of simple idioms; this imitates it from the
    train split's templates and names, so the test split stays unseen. Each file holds, for
    every task in a shuffled order, ``pairs_per_file`` pairs, each prompt followed by its right
    candidate and one more line (``_completed``). Deterministic.
    """
    if split != "train":
        raise ValueError(f"corpus_files(split={split!r}): only the train split may be trained on; "
                         "the test split is what the tasks are scored on")
    enc, out = get_encoding(), {}
    for i in range(n_files):
        rng = random.Random(f"corpus/{split}/{i}")
        parts = []
        for name in rng.sample(PAPER_TASKS, len(PAPER_TASKS)):
            for _ in range(pairs_per_file):
                p = _REGISTRY[name].generator(rng, split)
                for prompt, cand in rng.sample([(p.prompt_a, p.cand_a), (p.prompt_b, p.cand_b)], 2):
                    parts.append(_completed(prompt, cand, name, enc))
        out[f"{i:04d}.py"] = "\n\n".join(parts)
    return out


def _completed(prompt: str, cand: str, task: str, enc: tiktoken.Encoding) -> str:
    """``prompt``, its right candidate and then one more line of code, so that the candidate is
    tokenized here as it is scored: a candidate that ends a line would otherwise merge with the
    blank line after it (``]\\n`` followed by ``\\n`` is the single token ``]\\n\\n``), and
    one that does not (``:``, ``)``) with the newline that ends its line."""
    last = prompt.rsplit("\n", 1)[-1]
    indent = last[:len(last) - len(last.lstrip())]
    head = enc.encode_ordinary(prompt) + [token_id(cand, task, enc)]
    for rest in ("",) if cand.endswith("\n") else ("\n", " x\n"):
        line = prompt + cand + rest
        text = f"{line}{indent}{'    ' if line.rstrip().endswith(':') else ''}pass\n"
        if enc.encode_ordinary(text)[:len(head)] == head:
            return text
    raise RuntimeError(f"{task}: the candidate {cand!r} merges with every ending tried after it; "
                       "add an ending that keeps it a token")


# --------------------------------------------------------------------------- evaluation
def _encode_batch(prompts: list[str], block_size: int, enc: tiktoken.Encoding) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (N, T) and the index of each prompt's last token (N,)."""
    ids = [enc.encode_ordinary(p)[-block_size:] for p in prompts]
    T = max(len(i) for i in ids)
    out = torch.full((len(ids), T), enc.eot_token, dtype=torch.long)
    for r, i in enumerate(ids):
        out[r, : len(i)] = torch.tensor(i)
    return out, torch.tensor([len(i) - 1 for i in ids])


def encode_pairs(pairs: list[Pair], block_size: int = 256,
                 enc: tiktoken.Encoding | None = None) -> dict[str, torch.Tensor]:
    """Tokens of all 2N prompts (the a-prompts, then the b-prompts), their last positions, the
    candidate ids (2N, 2) as (cand_a, cand_b), and the label (0: cand_a is right). ``enc``: the
    model's tokenizer (``model.encoding``; default the shipped one)."""
    enc = enc or get_encoding()
    prompts = [p.prompt_a for p in pairs] + [p.prompt_b for p in pairs]
    tokens, last = _encode_batch(prompts, block_size, enc)
    cands = torch.tensor([[token_id(p.cand_a, enc=enc), token_id(p.cand_b, enc=enc)] for p in pairs] * 2)
    label = torch.cat([torch.zeros(len(pairs), dtype=torch.long), torch.ones(len(pairs), dtype=torch.long)])
    return {"tokens": tokens, "last": last, "cands": cands, "label": label}


def last_logits(logits: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(N, T, vocab) logits -> (N, vocab) logits at each prompt's last token."""
    return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]


def pair_logits(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, T, vocab) logits -> (N, 2) logits of the two candidates at each prompt's last token."""
    return last_logits(logits, batch["last"]).gather(1, batch["cands"].to(logits.device))


def task_loss(two: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the right candidate under a softmax over the two, mean over prompts
    (equal to the mean over pairs of the mean over both prompts)."""
    return F.cross_entropy(two, label.to(two.device))


def _candidate_logits(model, pairs: list[Pair], batch_size: int = 64
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the A-prompts then the B-prompts of ``pairs``: the logits of both candidates at the
    last position (2N, 2), the log-sum-exp over the vocabulary (2N,) and the right one's index."""
    batch = encode_pairs(pairs, model.config.block_size, getattr(model, "encoding", None))
    two, lse = [], []
    model.eval()
    for s in range(0, batch["tokens"].shape[0], batch_size):
        sl = slice(s, s + batch_size)
        at_last = last_logits(model(batch["tokens"][sl].to(model.device)), batch["last"][sl]).float()
        two.append(at_last.gather(1, batch["cands"][sl].to(at_last.device)).cpu())
        lse.append(at_last.logsumexp(-1).cpu())
    return torch.cat(two), torch.cat(lse), batch["label"]


@torch.no_grad()
def margins(model, pairs: list[Pair], batch_size: int = 64) -> tuple[list[float], list[float]]:
    """Logit of the right candidate minus the wrong one, per prompt: (A-prompts, B-prompts)."""
    two, _, label = _candidate_logits(model, pairs, batch_size)
    m = _margin(two, label).tolist()
    return m[:len(pairs)], m[len(pairs):]


def _margin(two: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """(2N,) logit of the right candidate minus the wrong one, from the candidates' logits (2N, 2)."""
    rows = torch.arange(len(label))
    return two[rows, label] - two[rows, 1 - label]


@torch.no_grad()
def evaluate(model, task: str | Task, split: str = "test", n: int | None = None, batch_size: int = 64,
             seed: int = 0) -> dict:
    """Task loss, per-prompt accuracy and pair accuracy (both prompts right) of any GPT, and how
    it decides: the mean logit margin (right minus wrong candidate) on the A-prompts and on the
    B-prompts, and the mean probability of the right candidate over the whole vocabulary."""
    t = get(task)
    pairs = t.pairs(split, n=n, seed=seed)
    two, lse, label = _candidate_logits(model, pairs, batch_size)
    right = two.argmax(-1) == label
    margin = _margin(two, label)                                        # (2N,) a-prompts, then b-prompts
    half = len(pairs)
    return {"task": t.name, "split": split, "pairs": half, "loss": float(task_loss(two, label)),
            "accuracy": float(right.float().mean()),
            "pair_accuracy": float((right[:half] & right[half:]).float().mean()),
            "margin_a": float(margin[:half].mean()), "margin_b": float(margin[half:].mean()),
            "p_right": float((two.gather(1, label[:, None]).squeeze(1) - lse).exp().mean()),
            "chance_loss": float(torch.log(torch.tensor(2.0)))}


@torch.no_grad()
def next_tokens(model, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The model's ``k`` likeliest next tokens after ``prompt``, with their probabilities."""
    enc = getattr(model, "encoding", None) or get_encoding()
    ids = torch.tensor([enc.encode_ordinary(prompt)[-model.config.block_size:]], device=model.device)
    model.eval()
    p = model(ids)[0, -1].float().softmax(-1)
    top = p.topk(k)
    return [(enc.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices)]


SOLVED_ACCURACY = 0.9  # a task counts as solved at this test accuracy (issue 3's bar)


def solved(results: list[dict], accuracy: float = SOLVED_ACCURACY) -> list[str]:
    """The tasks among ``evaluate`` results (one model's) scored at ``accuracy`` or better."""
    return [r["task"] for r in results if r["accuracy"] >= accuracy]


def format_detail(res: dict) -> str:
    """How each model decides each task (``cspkit eval --detail``): margins per side, the right
    candidate's share of the whole vocabulary, and the top next tokens of one test pair."""
    lines = [f"{res['split']} split; margin: logit of the right candidate minus the wrong one, mean over the "
             "A-prompts and over the B-prompts; p(right): its probability over the whole vocabulary"]
    for m in res["models"]:
        lines.append(f"{m['model']}")
        for r in m["results"]:
            lines.append(f"  {r['task']:28s} margin A {r['margin_a']:+6.2f}  B {r['margin_b']:+6.2f}  "
                         f"p(right) {r['p_right']:.3f}")
            for side, (prompt, want, top) in zip("AB", r.get("example", [])):
                shown = ", ".join(f"{tok!r} {p:.2f}" for tok, p in top)
                lines.append(f"      {side}: ...{prompt[-40:]!r} wants {want!r}; top: {shown}")
    return "\n".join(lines)


def format_scores(res: dict) -> str:
    """The table of ``cspkit eval --json`` output: a row per task, a column per model."""
    names = [r["task"] for r in res["models"][0]["results"]]
    models = [Path(m["model"]).name for m in res["models"]]
    w = max(22, *map(len, models))  # names are not cut; a cell is the loss in w - 8, then " / 1.000"
    head = f"{'task':28s}" + "".join(f" {name:>{w}s}" for name in models)
    lines = [f"{res['split']} split; each cell: task loss / accuracy (chance: 0.693 / 0.5)", head]
    for i, n in enumerate(names):
        lines.append(f"{n:28s}" + "".join(f" {m['results'][i]['loss']:>{w - 8}.3f} / {m['results'][i]['accuracy']:.3f}"
                                          for m in res["models"]))
    solved = f"solved (accuracy >= {SOLVED_ACCURACY})"
    lines.append(f"{solved:28s}" + "".join(f" {m['solved']:>{w}d}" for m in res["models"]))
    return "\n".join(lines)
