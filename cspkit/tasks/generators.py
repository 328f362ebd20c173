"""The twenty binary next-token tasks of the paper, generated from templates (docs/method.md,
"Tasks"), and ``corpus_files``: training text made of their train split's idioms.

Train and test splits use disjoint templates, names and surrounding code: a task's own lists
alternate between the splits, and the shared vocabulary is split by hash.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import tiktoken

from ..tokenizer import get_encoding
from .core import REGISTRY, SPLITS, Pair, check_split, task, token_id

# --------------------------------------------------------------------------- vocabulary pools
# Each pool is split by index parity into train and test halves, so the splits share nothing.

NAMES = ["items", "elems", "values", "scores", "data", "payload", "result", "output", "names", "labels",
          "count", "index", "total", "amount", "line", "chunk", "text", "title", "path", "fname", "key",
          "field", "value", "element", "node", "cell", "row", "block", "word", "letter", "parts", "pieces",
          "entry", "option", "record", "sample", "token", "symbol", "buf", "item", "size", "width", "name",
          "base", "state", "flag", "user", "host", "port", "mode", "level", "rank", "limit", "offset",
          "start", "end", "delta", "step", "prefix", "suffix", "source", "target", "queue", "stack"]
# Names that are one token both alone and after a space, for tasks whose answer is a name.
NAME_CANDIDATES = ("args data value name key path line text result obj item lines file start end size msg "
                    "prefix default state config module mode new root other out res attr base col url output "
                    "count index node items values keys names func parts buf fields target source level tree "
                    "parent left right first last tmp val elem entry token label stack queue attrs cls limit "
                    "offset width height num word words row rows host port query body head tail info flag").split()


def token_names() -> list[str]:
    enc = get_encoding()
    return [n for n in NAME_CANDIDATES
            if len(enc.encode_ordinary(n)) == 1 and len(enc.encode_ordinary(" " + n)) == 1]


FUNCS = ["process", "handle", "build", "parse", "load", "compute", "update", "render", "collect",
          "convert", "check", "format_row", "run", "apply", "merge", "scan", "resolve", "emit", "prepare",
          "encode", "visit", "flush", "fetch", "split_line", "clean", "sort_items", "walk", "make", "read_all",
          "reset"]
WORDS = ["hello", "world", "error", "done", "value", "missing", "name", "ready", "failed", "result",
          "start", "stop", "user", "admin", "default", "unknown", "empty", "invalid", "success", "warning",
          "config", "debug", "info", "total", "header", "footer", "saved", "loaded", "skipped", "closed"]
CALLS = ["print", "log", "warn", "str", "repr", "len", "append", "format", "write", "join",
          "info", "send", "emit", "show", "echo"]
PREAMBLES = [
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
FILLERS = [
    "    {a} = {b}\n", "    {a} = len({b})\n", "    {a} = {b} + 1\n", "    {a} = []\n", "    {a} = None\n",
    "    {a} = {b}.copy()\n", "    {a} = {b} * 2\n", "    {a} = str({b})\n", "    {a} = list({b})\n",
    "    {a} = {b} - 1\n", "    {a} = {{}}\n", "    {a} = int({b})\n",
]


def _half(pool: Sequence, split: str) -> list:
    """A task's own templates: alternate entries go to train and test."""
    check_split(split)
    return list(pool[0::2] if split == "train" else pool[1::2])


def _side(s: str) -> str:
    return SPLITS[hashlib.sha256(s.encode()).digest()[0] % 2]


def vocab(pool: Sequence[str], split: str) -> list[str]:
    """Shared vocabulary (names, words, functions, surrounding code): each string belongs to
    one split by its hash, so a name is never in train in one pool and in test in another."""
    check_split(split)
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
        return self._choose(vocab(pool, self.split), k)

    def names(self, k: int) -> list[str]:
        return self.vocab(NAMES, k)

    def token_names(self, k: int) -> list[str]:
        return self.vocab(token_names(), k)

    def preamble(self) -> str:
        return self.vocab(PREAMBLES)

    def fillers(self, n: int | None = None) -> str:
        n = self.rng.randint(0, 2) if n is None else n
        out = []
        for _ in range(n):
            a, b = self.names(2)
            out.append(self.pick(FILLERS).format(a=a, b=b))
        return "".join(out)

    def header(self) -> str:
        fn, arg = self.vocab(FUNCS), self.names(1)[0]
        return f"{self.preamble()}def {fn}({arg}):\n"

    def words(self, lo: int = 1, hi: int = 3) -> str:
        return " ".join(self.vocab(WORDS, self.rng.randint(lo, hi)))

    def template(self, templates: Sequence[str]) -> str:
        return self.pick(templates)



@task("single_double_quote", ('")\n', "')\n"), "string opened with \" or '; close it")
def _quote(rng, split):
    c = Ctx(rng, split)
    var, call = c.names(1)[0], c.vocab(CALLS)
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
    fn = c.vocab(FUNCS)
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
    f, x = c.vocab(FUNCS), c.names(1)[0]
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


# the paper's 20 (docs/method.md, "Tasks"); user tasks registered later are not among them
PAPER_TASKS = tuple(REGISTRY)


def corpus_files(split: str = "train", n_files: int = 200, pairs_per_file: int = 5) -> dict[str, str]:
    """Python text made of the paper tasks' own idioms, for a training corpus (``tasks:train``).

    The paper trains on code written to be full of simple idioms; this imitates it from the
    train split's templates and names, so the test split stays unseen. Each file holds, for
    every task in a shuffled order, ``pairs_per_file`` pairs, each prompt followed by its right
    candidate and one more line (``completed``). Deterministic.
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
                p = REGISTRY[name].generator(rng, split)
                for prompt, cand in rng.sample([(p.prompt_a, p.cand_a), (p.prompt_b, p.cand_b)], 2):
                    parts.append(completed(prompt, cand, name, enc))
        out[f"{i:04d}.py"] = "\n\n".join(parts)
    return out


def completed(prompt: str, cand: str, task: str, enc: tiktoken.Encoding) -> str:
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


