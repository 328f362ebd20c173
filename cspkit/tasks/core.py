"""Tasks: the Pair, the Task, the registry, the pair loss and evaluation (docs/method.md,
"Tasks"). The twenty paper tasks are generated in cspkit.tasks.generators.

A datapoint is a Pair of prompts that differ in one place; the right next token is
``cand_a`` for ``prompt_a`` and ``cand_b`` for ``prompt_b``. Candidates are the tokens the
tinypython tokenizer really produces at that point: a string closing at the end of a line
is ``")\\n``, not ``")`` followed by a newline, so ``")\\n`` vs ``')\\n`` is the quote task.
Every prompt is checked to end on a token boundary: tokenizing prompt + candidate gives
the prompt's tokens followed by the candidate's single token.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken
import torch
import torch.nn.functional as F

from ..tokenizer import get_encoding

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Pair:
    prompt_a: str
    prompt_b: str
    cand_a: str
    cand_b: str


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")



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
        check_split(split)
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
                   candidates: tuple[str, str] | None = None, description: str = "user task") -> Task:
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
                       n_pairs: dict[str, int] | None = None) -> Task:
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


# --------------------------------------------------------------------------- the registry
REGISTRY: dict[str, Task] = {}  # name -> Task, in registration order


def register(task: Task) -> Task:
    if task.candidates:
        for c in task.candidates:
            token_id(c, task.name)
    REGISTRY[task.name] = task
    return task


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str | Task) -> Task:
    if isinstance(name, Task):
        return name
    if name not in REGISTRY:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def task(name: str, candidates: tuple[str, str] | None, description: str):
    def wrap(fn):
        register(Task(name, description, fn, candidates))
        return fn
    return wrap


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
    """(N, T, vocab) logits, or (N, vocab) already at the last tokens (``model(tokens,
    last=batch["last"])``) -> (N, 2) logits of the two candidates at each prompt's last token."""
    at_last = last_logits(logits, batch["last"]) if logits.dim() == 3 else logits
    return at_last.gather(1, batch["cands"].to(logits.device))


def trim(tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Right-padded (N, T) tokens cut after the longest prompt among these rows: padding after
    every row's last token changes no logit that the pair loss reads (attention is causal)."""
    return tokens[:, : int(last.max()) + 1]


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
        # only the last positions' logits, and no padding past this batch's longest prompt
        last = batch["last"][sl]
        at_last = model(trim(batch["tokens"][sl], last).to(model.device), last=last).float()
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
    B-prompts, and the mean probability of the right candidate over the whole vocabulary.

    >>> import cspkit
    >>> scores = cspkit.evaluate(cspkit.load("small-sparse"), "single_double_quote")
    >>> scores["accuracy"] > 0.9 and scores["loss"] < scores["chance_loss"]
    True
    """
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


SOLVED_ACCURACY = 0.9  # a task counts as solved at this test accuracy


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


@torch.no_grad()
def complete(model, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0, top_k: int | None = None,
             seed: int = 0) -> str:
    """The model's continuation of ``prompt`` (greedy at temperature 0, else sampled under ``seed``)."""
    enc = model.encoding
    idx = torch.tensor([enc.encode_ordinary(prompt) or [enc.eot_token]])
    g = torch.Generator().manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=g)
    return enc.decode(out[0, idx.shape[1]:].tolist())


def catalog(seed: int = 0) -> tuple[list[dict], str]:
    """Every registered task: its name, description, candidates and one train pair; as rows and
    as text (the end of each prompt, then its right candidate)."""
    rows = []
    for name in names():
        t = get(name)
        p = t.pairs("train", n=1, seed=seed)[0]
        rows.append({"task": name, "description": t.description, "candidates": [p.cand_a, p.cand_b],
                     "example": {"prompt_a": p.prompt_a, "prompt_b": p.prompt_b}})
    human = []
    for r in rows:
        tail_a = r["example"]["prompt_a"].rsplit("\n", 1)[-1]
        tail_b = r["example"]["prompt_b"].rsplit("\n", 1)[-1]
        human.append(f"{r['task']:28s} {r['description']}\n{'':28s} A: ...{tail_a!r} -> {r['candidates'][0]!r}\n"
                     f"{'':28s} B: ...{tail_b!r} -> {r['candidates'][1]!r}")
    return rows, "\n".join(human)
