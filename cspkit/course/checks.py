"""The exercises' self-checks. Each takes what the student wrote (a function, or a task), runs it
on inputs of its own, compares the result with what the library computes, and on a mismatch
raises ``CheckFailed`` with one sentence a student can act on: the likely mistake (wrong sign,
off by a factor, zeros counted, the future not masked, ...), not only that the numbers differ.

The inputs are small and seeded (random tensors, a tiny random model), so a check takes well
under a second and needs no shipped model."""
from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable

import torch

from .. import paths
from ..ablation import gate_hooks, node_widths
from ..bridges.maps import nmse as lib_nmse
from ..bridges.steering import flip_rate as lib_flip_rate
from ..checkpoint import load
from ..circuit import Circuit, compute_edges, geometric_mean
from ..config import ModelConfig
from ..data import is_val
from ..model import GPT, abs_topk, parse_node
from ..pruning import bisect as lib_bisect
from ..pruning import gate as lib_gate
from ..sparsity import project_
from ..tasks import Task, encode_pairs, task_loss, trim
from ..viz.panes import attention_pattern


class CheckFailed(AssertionError):
    """What is wrong with an exercise's answer, in a sentence."""


def _close(a, b, tol: float = 1e-5) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=tol)


def _tensor(out, fn: str, shape: tuple) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise CheckFailed(f"{fn} returned {type(out).__name__}, not a tensor")
    if tuple(out.shape) != tuple(shape):
        raise CheckFailed(f"{fn} returned shape {tuple(out.shape)}; it must be {tuple(shape)}")
    return out


def _number(out, fn: str) -> float:
    if isinstance(out, torch.Tensor):
        if out.numel() != 1:
            raise CheckFailed(f"{fn} returned a tensor of shape {tuple(out.shape)}; it must return one number "
                              "(average over the prompts)")
        return float(out.detach())
    if not isinstance(out, (int, float)):
        raise CheckFailed(f"{fn} returned {type(out).__name__}, not a number")
    return float(out)


def tiny_model(seed: int = 0, density: float = 0.25) -> GPT:
    """A small random GPT whose weight matrices keep ``density`` of their entries: what the checks
    that need a model run on."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=2, d_model=32, n_head=2, d_head=16, d_mlp=64, block_size=16, vocab_size=64,
                            sink=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                project_(p, max(1, int(density * p.numel())))
    return model.eval()


# ------------------------------------------------------------------ 01: data
def split_files(fn: Callable[[list[str], float], tuple[list[str], list[str]]]) -> str:
    names = [f"pkg{i % 17}/module_{i}.py" for i in range(2000)]
    train, val = fn(list(names), 5.0)
    if set(train) & set(val):
        raise CheckFailed(f"{sorted(set(train) & set(val))[0]} is in both splits; every file goes to exactly one")
    if set(train) | set(val) != set(names):
        raise CheckFailed(f"{len(set(names) - set(train) - set(val))} files are in neither split; every file "
                          "goes to one of them")
    shuffled = names[::-1]
    train2, val2 = fn(shuffled, 5.0)
    if set(val2) != set(val):
        moved = sorted(set(val) ^ set(val2))[0]
        raise CheckFailed(f"{moved} changed split when the list was reversed: decide from the file's own path "
                          "(hash it), not from its position, or adding one file would reshuffle the corpus")
    share = len(val) / len(names)
    if not 0.035 <= share <= 0.065:
        raise CheckFailed(f"{share:.1%} of the files went to validation; val_percent=5 asks for about 5%")
    agree = sum((n in set(val)) == is_val(n, 5.0) for n in names) / len(names)
    return (f"split by file, stable under reordering, {share:.1%} to validation "
            f"(the library's own hash agrees on {agree:.0%} of the files)")


# ------------------------------------------------------------------ 02: sparsity
def _kept_message(fn: str, w: torch.Tensor, got: torch.Tensor, want: torch.Tensor, k: int) -> str:
    kept = got != 0
    by_value = torch.zeros_like(kept).flatten()
    by_value[w.flatten().topk(k).indices] = True
    smallest = torch.zeros_like(kept).flatten()
    smallest[w.abs().flatten().topk(k, largest=False).indices] = True
    if torch.equal(kept.flatten(), by_value):
        return (f"{fn} kept the k largest values, not the k largest magnitudes: a large negative weight "
                "matters as much as a large positive one (rank by .abs())")
    if torch.equal(kept.flatten(), smallest):
        return f"{fn} kept the k smallest magnitudes; keep the k largest"
    return f"{fn} kept other entries than the {k} of largest magnitude"


def project_topk(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> str:
    g = torch.Generator().manual_seed(0)
    for shape, k in (((6, 5), 1), ((6, 5), 7), ((32, 16), 100), ((3, 4, 5), 20)):
        w = torch.randn(shape, generator=g)
        before = w.clone()
        got = _tensor(fn(w, k), "project_topk", shape)
        if not torch.equal(w, before):
            raise CheckFailed("project_topk changed w in place; return a new tensor and leave w as it was")
        want = w.clone()
        project_(want, k)
        nnz = int((got != 0).sum())
        if nnz != k:
            raise CheckFailed(f"project_topk kept {nnz} nonzero entries of {w.numel()} for k={k}; keep exactly k")
        if not torch.equal(got[got != 0], w[got != 0]):
            raise CheckFailed("project_topk changed the values it kept; keep them as they are and zero the rest")
        if not torch.equal(got, want):
            raise CheckFailed(_kept_message("project_topk", w, got, want, k))
    return "keeps exactly the k entries of largest magnitude, unchanged, on 4 shapes"


def abs_topk_rows(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> str:
    g = torch.Generator().manual_seed(1)
    for shape, k in (((4, 10), 3), ((2, 5, 16), 4)):
        x = torch.randn(shape, generator=g)
        got = _tensor(fn(x, k), "abs_topk", shape)
        want = abs_topk(x, k)
        if int((got != 0).sum()) == k:
            raise CheckFailed("abs_topk kept k entries in the whole tensor; keep k in every row (along the last "
                              "dimension: one token's activations)")
        per_row = (got != 0).sum(-1)
        if not bool((per_row == k).all()):
            raise CheckFailed(f"abs_topk kept {int(per_row.flatten()[0])} entries in a row for k={k}; keep exactly "
                              "k per row")
        if not torch.equal(got, want):
            rows = x.reshape(-1, shape[-1])
            signed = torch.zeros_like(rows, dtype=torch.bool).scatter_(-1, rows.topk(k, -1).indices, True)
            if torch.equal((got != 0).reshape(-1, shape[-1]), signed):
                raise CheckFailed("abs_topk kept the k largest values, not magnitudes: a strongly negative "
                                  "activation is kept too (rank by .abs())")
            raise CheckFailed("abs_topk kept other entries than the k of largest magnitude in each row, or "
                              "changed their values")
    return "keeps the k largest magnitudes of every row"


# ------------------------------------------------------------------ 03: tasks
def pair_loss(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> str:
    g = torch.Generator().manual_seed(2)
    two = torch.randn(12, 2, generator=g) * 3
    label = torch.tensor([0, 1] * 6)
    got = _number(fn(two, label), "pair_loss")
    want = float(task_loss(two, label))
    if math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6):
        return f"binary cross-entropy of the right candidate, mean over prompts ({want:.4f} on 12 prompts)"
    if math.isclose(got, float(task_loss(two, 1 - label)), rel_tol=1e-5):
        raise CheckFailed("that is the loss of the wrong candidate: label 0 means candidate A (column 0) is right")
    if math.isclose(got, want * len(label), rel_tol=1e-5):
        raise CheckFailed("off by a factor of 12, the number of prompts: take the mean over prompts, not the sum")
    if math.isclose(got, -want, rel_tol=1e-5):
        raise CheckFailed("wrong sign: the loss is minus the log-probability of the right candidate, so it is "
                          "positive")
    raise CheckFailed(f"pair_loss gave {got:.4f}; the pair loss of these logits is {want:.4f} "
                      "(a softmax over the two candidates' logits, then cross-entropy with the label)")


def user_task(make_task: Callable[[], Task]) -> str:
    task = make_task()
    if not isinstance(task, Task):
        raise CheckFailed(f"make_task returned {type(task).__name__}; build a cspkit.tasks.Task "
                          "(Task.from_generator)")
    try:
        train, test = task.pairs("train", n=48), task.pairs("test", n=24)
    except ValueError as e:  # the library's own check of a pair, which names the problem
        raise CheckFailed(f"a generated pair is not usable: {e}") from None
    if [p.prompt_a for p in task.pairs("train", n=48)] != [p.prompt_a for p in train]:
        raise CheckFailed("two calls gave different pairs: draw every random choice from rng, so that a seed "
                          "gives the same pairs")
    shared = {p.prompt_a for p in train} & {p.prompt_a for p in test} | \
        {p.prompt_b for p in train} & {p.prompt_b for p in test}
    if shared:
        raise CheckFailed(f"the prompt {sorted(shared)[0]!r} is in both train and test: draw test prompts from a "
                          "pool the train prompts never use (choose the pool by split)")
    if any(p.prompt_a == p.prompt_b and p.cand_a == p.cand_b for p in train):
        raise CheckFailed("a pair's two prompts are the same with the same answer: A and B must differ")
    return f"{len(train)} train and {len(test)} test pairs, valid, reproducible, no prompt in both splits"


# ------------------------------------------------------------------ 04: pruning
def heaviside_gate(fn: Callable[[torch.Tensor, float], torch.Tensor]) -> str:
    tau0 = torch.linspace(-3, 3, 14)
    weights = torch.linspace(0.5, 2.0, 14)
    for temperature in (1.0, 0.5):
        tau, ref = tau0.clone().requires_grad_(True), tau0.clone().requires_grad_(True)
        out = _tensor(fn(tau, temperature), "gate", tau0.shape)
        want = lib_gate(ref, temperature)
        if not torch.isin(out.detach(), torch.tensor([0.0, 1.0])).all():
            raise CheckFailed("the forward pass must be exactly 0 or 1 (the gate is closed or open); the sigmoid "
                              "belongs in the backward pass only")
        if not torch.equal(out.detach(), want.detach()):
            raise CheckFailed("the gate must be open (1) where tau > 0 and closed (0) elsewhere")
        if not out.requires_grad:
            raise CheckFailed("gate's output carries no gradient: build it with a torch.autograd.Function whose "
                              "backward returns the surrogate")
        (out * weights).sum().backward()
        (want * weights).sum().backward()
        if tau.grad is not None and _close(tau.grad, ref.grad):
            continue
        if tau.grad is None or not bool(tau.grad.abs().sum() > 0):
            raise CheckFailed("the gradient is zero: that is the step function's true derivative; the point is "
                              "the surrogate, the derivative of sigmoid(tau / T)")
        if _close(tau.grad, ref.grad * temperature):
            raise CheckFailed("off by a factor of the temperature: d/dtau sigmoid(tau / T) = s (1 - s) / T")
        raise CheckFailed("the backward pass is not the derivative of sigmoid(tau / T) times the incoming gradient")
    return "0/1 forward, sigmoid-derivative backward, at temperatures 1 and 0.5"


def mean_ablation_hook(fn: Callable[[torch.Tensor, torch.Tensor], Callable]) -> str:
    model = tiny_model()
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    loc, width = "0.mlp.neuron", node_widths(model.config)["0.mlp.neuron"]
    keep = (torch.arange(width) % 3 == 0).float()
    mean = torch.linspace(-1, 1, width)
    with torch.no_grad():
        want = model.run_with_hooks(x, gate_hooks({loc: keep}, {loc: mean}))
        try:
            got = model.run_with_hooks(x, {loc: fn(keep, mean)})
        except ValueError as e:                                      # the hook point's shape check
            raise CheckFailed(f"the hook's output has the wrong shape: {e}") from None
        zero = model.run_with_hooks(x, gate_hooks({loc: keep}, {loc: torch.zeros(width)}))
        flipped = model.run_with_hooks(x, gate_hooks({loc: 1 - keep}, {loc: mean}))
        plain = model(x)
    if _close(got, want, 1e-4):
        return "kept nodes pass unchanged, the others take their mean, at every token"
    if _close(got, plain, 1e-4):
        raise CheckFailed("the hook changed nothing: return the edited activation (a hook that returns None "
                          "keeps the original)")
    if _close(got, zero, 1e-4):
        raise CheckFailed("the ablated nodes became 0: mean ablation sets them to their mean")
    if _close(got, flipped, 1e-4):
        raise CheckFailed("the kept nodes were ablated and the others kept: keep == 1 means keep the activation")
    raise CheckFailed("the model's output differs from mean ablation: x * keep + (1 - keep) * mean")


def smallest_k(fn: Callable[[Callable[[int], float], int, float], int]) -> str:
    rng = random.Random(4)
    for n, answer in ((5000, 1234), (300, 1), (64, 64), (1000, 0), (7, 3)):
        losses = [1.0 - 0.5 * (k >= answer) - 0.4 * k / n for k in range(n + 1)]
        target = losses[answer] + 0.01 * rng.random()
        calls: list[int] = []

        def loss_at(k: int, losses=losses, calls=calls) -> float:
            calls.append(k)
            return losses[k]

        got = fn(loss_at, n, target)
        want = lib_bisect(lambda k, losses=losses: losses[k], n, target)
        if not isinstance(got, int):
            raise CheckFailed(f"smallest_k returned {type(got).__name__}; return the number of nodes k (an int)")
        if got != want:
            if got == want - 1:
                raise CheckFailed(f"returned {got}, one too few: loss_at({got}) = {losses[got]:.3f} is above the "
                                  f"target {target:.3f}")
            if got == want + 1:
                raise CheckFailed(f"returned {got}, one too many: loss_at({want}) already meets the target")
            raise CheckFailed(f"returned {got} for n={n}; the smallest k that meets the target is {want}")
        budget = 2 * math.ceil(math.log2(n + 1)) + 2
        if len(calls) > budget:
            raise CheckFailed(f"called loss_at {len(calls)} times for n={n}; a bisection needs about "
                              f"log2(n) = {math.log2(n):.0f}: halve the interval at every call")
    return "the smallest k meeting the target on 5 curves, in about log2(n) evaluations"


# ------------------------------------------------------------------ 05: the graph
def count_edges(fn: Callable[[GPT, dict[str, list[int]]], int]) -> str:
    model = tiny_model(density=0.2)
    g = random.Random(5)
    widths = node_widths(model.config)
    for _ in range(3):
        nodes = {loc: sorted(g.sample(range(w), max(1, w // 3))) for loc, w in widths.items()}
        got = fn(model, nodes)
        want = len(compute_edges(model, nodes))
        if got == want:
            continue
        cfg = model.config
        dense = sum(len(nodes.get(a, [])) * len(nodes.get(b, [])) for L in range(cfg.n_layer) for a, b in
                    [(f"{L}.attn.in", f"{L}.attn.{t}") for t in "qkv"] + [(f"{L}.attn.v", f"{L}.attn.out"),
                     (f"{L}.mlp.in", f"{L}.mlp.neuron"), (f"{L}.mlp.neuron", f"{L}.mlp.out")])
        if got == dense:
            raise CheckFailed(f"counted {got}: every pair of kept nodes, zeros too; an edge is a nonzero weight "
                              "between two kept nodes")
        raise CheckFailed(f"counted {got} edges; the circuit has {want} (nonzero weights from attn.in to q, k and "
                          "v, v to attn.out, mlp.in to neuron, neuron to mlp.out, between kept nodes)")
    return "the nonzero weights between kept nodes, on 3 random node sets"


def head_attention(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> str:
    model = tiny_model(6)
    x = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(6))
    d = model.config.d_head
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names=["1.attn.q", "1.attn.k"])
    q, k = cache["1.attn.q"][..., d:2 * d], cache["1.attn.k"][..., d:2 * d]          # head 1: (N, T, d_head)
    got = _tensor(fn(q, k), "head_attention", (2, 10, 10))
    want = attention_pattern(model, x, 1, 1)
    if _close(got, want, 1e-5):
        return "causal, scaled, row-normalized attention of one head"
    if bool((got.triu(1).abs() > 1e-6).any()):
        raise CheckFailed("a query attends to later positions: mask the scores above the diagonal with -inf "
                          "before the softmax")
    if not _close(got.sum(-1), torch.ones(2, 10), 1e-4):
        raise CheckFailed("the rows do not sum to 1: take the softmax over the key positions (the last dimension)")
    scores = (q @ k.transpose(1, 2)).masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
    if _close(got, scores.softmax(-1), 1e-5):
        raise CheckFailed("the scores are not scaled: divide q @ k.T by sqrt(d_head) before the softmax")
    raise CheckFailed("the pattern differs from softmax(q @ k.T / sqrt(d_head)) with the future masked")


# ------------------------------------------------------------------ 06: validation
def random_like(fn: Callable[[dict[str, list[int]], dict[str, int], random.Random], dict[str, list[int]]]) -> str:
    widths = {"0.attn.in": 32, "0.mlp.neuron": 64, "1.attn.v": 32, "1.mlp.out": 32}
    circuit = {"0.attn.in": [1, 5, 9], "0.mlp.neuron": [7], "1.mlp.out": [0, 2, 4, 6, 8]}
    draws = []
    for seed in (0, 1, 2):
        got = fn(circuit, widths, random.Random(seed))
        if not isinstance(got, dict):
            raise CheckFailed(f"random_like returned {type(got).__name__}; return {{location: [indices]}}")
        for loc in set(widths):
            idx = list(got.get(loc, []))
            if len(idx) != len(circuit.get(loc, [])):
                raise CheckFailed(f"{loc} has {len(idx)} random nodes but the circuit {len(circuit.get(loc, []))}: "
                                  "draw as many as the circuit keeps at every location, so that only which "
                                  "nodes differs, not where")
            if len(set(idx)) != len(idx):
                raise CheckFailed(f"{loc} has the same node twice: draw without replacement (rng.sample)")
            if any(not 0 <= i < widths[loc] for i in idx):
                raise CheckFailed(f"{loc} has an index outside 0..{widths[loc] - 1}")
        draws.append({loc: sorted(v) for loc, v in got.items() if v})
    if draws[0] == draws[1] == draws[2]:
        raise CheckFailed("three seeds drew the same nodes: draw from the rng you are given")
    return "as many random nodes as the circuit at every location, without repeats, different per seed"


# ------------------------------------------------------------------ 07: sparse against dense
def edge_ratio(fn: Callable[[list[int], list[int]], float]) -> str:
    dense, sparse = [400, 90, 2500, 30], [12, 0, 40, 3]
    got = _number(fn(dense, sparse), "edge_ratio")
    want = geometric_mean(dense) / geometric_mean(sparse)
    if math.isclose(got, want, rel_tol=1e-6):
        return f"geometric mean of dense edges over sparse ({want:.1f}x here), an empty circuit counted as 1 edge"
    if not math.isfinite(got) or got == 0:
        raise CheckFailed("a circuit with 0 edges made the mean 0 (or the ratio infinite): count it as 1 edge")
    if math.isclose(got, 1 / want, rel_tol=1e-6):
        raise CheckFailed("the ratio is upside down: dense over sparse")
    if math.isclose(got, (sum(dense) / len(dense)) / (sum(max(s, 1) for s in sparse) / len(sparse)), rel_tol=1e-6):
        raise CheckFailed("that is the ratio of arithmetic means: the largest circuit dominates it; take "
                          "geometric means (the exp of the mean log)")
    raise CheckFailed(f"edge_ratio gave {got:.3f}; the ratio of geometric means is {want:.3f}")


# ------------------------------------------------------------------ 08: bridges
def bridge_nmse(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> str:
    g = torch.Generator().manual_seed(8)
    target = torch.randn(3, 7, 5, generator=g) * 4 + 10
    pred = target + torch.randn(3, 7, 5, generator=g)
    t1, p1 = target.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    t2, p2 = target.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    got_t = fn(p1, t1)
    got = _number(got_t, "nmse")
    want_t = lib_nmse(p2, t2)
    want = float(want_t.detach())
    if not math.isclose(got, want, rel_tol=1e-5):
        flat = target.flatten(0, -2)
        if math.isclose(got, float((pred - target).pow(2).sum() / target.pow(2).sum()), rel_tol=1e-5):
            raise CheckFailed("normalized by the target's squared size, not its variance: subtract the target's "
                              "mean over tokens first (a map that predicts the mean must score 1)")
        if math.isclose(got, want / flat.shape[0], rel_tol=1e-4) or math.isclose(got, want / target.numel(),
                                                                                   rel_tol=1e-4):
            raise CheckFailed("off by a factor of the number of tokens: divide the summed squared error by the "
                              "summed squared deviation, both over all tokens")
        raise CheckFailed(f"nmse gave {got:.4f}; squared error over the target's variance is {want:.4f}")
    if not isinstance(got_t, torch.Tensor) or not got_t.requires_grad:
        raise CheckFailed("nmse must stay a tensor with a gradient: it is a training loss")
    got_t.backward()
    want_t.backward()
    if not _close(t1.grad, t2.grad, 1e-5):
        raise CheckFailed("the normalizer carries a gradient: detach the target's variance, or a model lowers the "
                          "loss by inflating its own spread")
    return "squared error over the target's variance (1 - nmse is the variance explained), normalizer detached"


# ------------------------------------------------------------------ 09: steering
def flip_rate(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]) -> str:
    label = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    before = torch.tensor([[2., 0], [0, 2], [2, 0], [2, 0], [0, 2], [0, 2], [2, 0], [0, 2]])   # 6 of 8 right
    after = torch.tensor([[0., 2], [2, 0], [2, 0], [0, 2], [2, 0], [0, 2], [2, 0], [0, 2]])
    got = _number(fn(before, after, label), "flip_rate")
    want = lib_flip_rate(before, after, label)
    if math.isclose(got, want, abs_tol=1e-9):
        return f"among the prompts right before, the share that prefer the other candidate after ({want:.3f} here)"
    if math.isclose(got, float((after.argmax(-1) != label).float().mean()), abs_tol=1e-9):
        raise CheckFailed("counted every prompt wrong after steering, including those wrong before: count only "
                          "among the prompts the model got right unsteered")
    if math.isclose(got, float((after.argmax(-1) != before.argmax(-1)).float().mean()), abs_tol=1e-9):
        raise CheckFailed("counted every changed answer, including wrong ones that became right: a flip turns "
                          "a right answer into the other candidate")
    raise CheckFailed(f"flip_rate gave {got:.3f}; among the 6 prompts right before, {want:.3f} flip")


# ------------------------------------------------------------------ 06: the capstone
@functools.lru_cache(maxsize=1)
def _bracket_circuit() -> Circuit:
    model = load(paths.models_dir() / "small-sparse")
    return Circuit.load(paths.results_dir() / "circuits" / "small-sparse" / "bracket_counting.json", model=model)


@torch.no_grad()
def class_separation(circuit: Circuit, names: list[str], n: int = 64) -> dict[str, float]:
    """Per node, at each test prompt's last token: class B's mean activation minus class A's, in
    pooled standard deviations (the full model's activations)."""
    model = circuit.require_model()
    b = encode_pairs(circuit.get_task().pairs("test", n=n), model.config.block_size, model.encoding)
    locs = sorted({parse_node(name)[0] for name in names})
    _, cache = model.run_with_cache(trim(b["tokens"], b["last"]).to(model.device), names=locs)
    rows = torch.arange(len(b["last"]))
    out = {}
    for name in names:
        loc, i = parse_node(name)
        act = cache[loc][rows, b["last"], i].float().cpu()
        a, bb = act[b["label"] == 0], act[b["label"] == 1]
        pooled = torch.cat([a - a.mean(), bb - bb.mean()]).std()
        out[name] = float((bb.mean() - a.mean()) / pooled.clamp_min(1e-6))
    return out


def bracket_depth(fn: Callable[[], list[str]]) -> str:
    claim = fn()
    if not isinstance(claim, (list, tuple, set)) or not claim or not all(isinstance(n, str) for n in claim):
        raise CheckFailed("return a list of node names, e.g. ['3.attn.in[12]', '2.mlp.neuron[40]']")
    circuit = _bracket_circuit()
    names = circuit.node_names()
    outside = [n for n in claim if n not in names]
    if outside:
        raise CheckFailed(f"{outside[0]} is not a node of the bracket counting circuit (circuit.node_names() "
                          f"lists its {len(names)} nodes)")
    if len(set(claim)) > 8:
        raise CheckFailed(f"{len(set(claim))} nodes is not a claim about where the depth is: name at most 8")
    sep = class_separation(circuit, list(claim))
    weak = min(claim, key=lambda n: abs(sep[n]))
    if abs(sep[weak]) < 1.0:
        raise CheckFailed(f"{weak} barely tells flat lists from nested ones at the last token (its class means "
                          f"are {abs(sep[weak]):.1f} standard deviations apart): it is in the circuit for "
                          "another reason")
    base = circuit.evaluate("test", n=64)["loss"]
    rest = {loc: [i for i in idx if f"{loc}[{i}]" not in set(claim)] for loc, idx in circuit.nodes.items()}
    rise = circuit.evaluate("test", n=64, nodes=rest)["loss"] - base
    if rise < 0.2:
        raise CheckFailed(f"removing your nodes from the circuit raises its test loss by only {rise:.2f} nats: "
                          "they tell the depths apart, but the circuit gets the depth through other nodes too")
    return (f"{len(set(claim))} nodes that tell the depths apart ({min(abs(v) for v in sep.values()):.1f} to "
            f"{max(abs(v) for v in sep.values()):.1f} sd) and carry them: removing them raises the circuit's "
            f"loss by {rise:.2f} nats")
