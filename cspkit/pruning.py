"""Circuit discovery by node pruning (docs/method.md, "Pruning").

Every node has a mask parameter tau. The gate is the Heaviside step of tau in the forward pass
and a sigmoid derivative in the backward pass; tau is clamped to [-1, 1] after each step.
Masks are trained on task loss + multiplier * penalty * (kept nodes) with the model frozen (the
penalty per node is k_coef, scaled by the model's node count: ``PruneConfig.node_penalty``; the
multiplier starts tiny and follows the target, so the masks end near the smallest node set that
still meets it). Training goes on past ``steps`` while the masks are loose, and ``settle`` goes
back to an earlier step when they overshot (docs/method.md, "Settling the masks"); then the nodes
are ranked by tau and a bisection over k, the number kept, finds the smallest circuit whose
calibrated task loss on held-out pairs is at most the target.

The train split of a task is divided: the last ``heldout_pairs`` pairs decide the bisection,
the rest train the masks and fit the calibration. The test split (other templates and names)
is never seen; ``Circuit.evaluate()`` reports it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import tasks as tasks_mod
from .ablation import ablation_values, check_ablation, fingerprint, gate_hooks, keep_gates, node_widths, resample_shift
from .checkpoint import load
from .circuit import RANKING_KEPT, Circuit, compute_edges, heldout_loss, split_pairs
from .config import PruneConfig, to_dict
from .edges import EdgeGroup, edge_gates, edge_groups, keep_edges
from .model import GPT, frozen, node_name
from .sparsity import sparse_matmuls

# how far above the target the masks' own node set may be before their training counts as collapsed
MASK_SLACK = 0.05
# extra mask steps (PruneConfig.extra_steps) are taken in chunks of EXTRA_CHECK while the masks'
# own node set scores under LOOSE x the target
EXTRA_CHECK = 10
LOOSE = 0.8


class _Heaviside(torch.autograd.Function):
    """H(tau) forward; d/dtau sigmoid(tau / T) backward (straight-through style)."""

    @staticmethod
    def forward(ctx, tau, temperature: float):
        ctx.save_for_backward(tau)
        ctx.temperature = temperature
        return (tau > 0).to(tau.dtype)

    @staticmethod
    def backward(ctx, grad):
        (tau,) = ctx.saved_tensors
        s = torch.sigmoid(tau / ctx.temperature)
        return grad * s * (1 - s) / ctx.temperature, None


def gate(tau: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return _Heaviside.apply(tau, temperature)


def train_masks(model: GPT, task, cfg: PruneConfig, ablation: str = "mean", seed: int = 0,
                progress: bool = True, pairs=None, target: float = 0.15, full_loss: float | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train one mask parameter per node, the penalty's multiplier following ``target`` (see
    PruneConfig), with ``prune``'s retry after an overshoot unless ``full_loss`` (the full model's
    held-out loss, when known) is above the target; returns {location: tau} and {location: tau
    averaged over the steps}, which ranks nodes that the clamp left tied at -1 or 1, both of the
    step ``settle`` keeps."""
    steps, kept, _ = _node_masks(model, task, cfg, ablation, seed, progress, pairs, target, full_loss)
    return steps.at(kept)


class MaskSteps:
    """The taus after every step of one mask training, with the held-out loss and calibration of
    each step's open gates (``loss_of(taus)`` gives both): what ``settle`` chooses from. Measured
    losses are kept by the set of open gates (``measured``), not by step: steps often share a set,
    and a search over a step's ranking (RankedLoss, given the same ``measured``) visits its open
    set too, since the ranking puts exactly those gates first."""

    def __init__(self, loss_of, target: float):
        self.snaps: list[dict[str, torch.Tensor]] = []
        self.loss_of, self.target = loss_of, target
        self.seen: dict[int, tuple[float, tuple[float, float]]] = {}    # step -> (loss, calibration)
        self.measured: dict[frozenset, tuple[float, tuple[float, float]]] = {}

    def train(self, steps: Iterator[dict[str, torch.Tensor]], cfg: PruneConfig) -> MaskSteps:
        """Take ``cfg.steps`` steps, then up to ``cfg.extra_steps`` (None: ``cfg.steps``) more, checking every
        EXTRA_CHECK steps, while the last step's masks score under LOOSE x the target on the
        held-out pairs: the multiplier was still growing, and the masks keep far more than the
        circuit needs (docs/method.md, "Settling the masks")."""
        most = cfg.steps if cfg.extra_steps is None else cfg.extra_steps
        with contextlib.closing(steps):
            for snap in steps:
                self.snaps.append(snap)
                extra = len(self.snaps) - cfg.steps
                if extra >= 0 and extra % EXTRA_CHECK == 0 and (
                        extra + EXTRA_CHECK > most or self.loss(self.last) >= LOOSE * self.target):
                    return self
        return self

    @classmethod
    def nodes(cls, model: GPT, task, cfg: PruneConfig, ablation: str, seed: int, progress: bool, pairs,
              target: float) -> MaskSteps:
        widths = node_widths(model.config)
        g = torch.Generator().manual_seed(seed)
        taus = {loc: cfg.init_bias + cfg.init_noise * torch.randn(w, generator=g) for loc, w in widths.items()}
        values = None if ablation == "resample" else ablation_values(model, ablation)
        fit, heldout = split_pairs(task, cfg)
        fit = fit if pairs is None else pairs

        def run(gates, tokens, last):
            vals = ablation_values(model, "resample", tokens, resample_shift(len(tokens), g)) \
                if ablation == "resample" else values
            # resample values are (B, T, width): every position must be computed
            return model.run_with_hooks(tokens, gate_hooks(gates, vals), last=last,
                                        last_block_at_last=ablation != "resample")

        def loss_of(snap):
            gates = {loc: (t > 0).float() for loc, t in snap.items()}
            return heldout_loss(model, fit[:cfg.calib_pairs], heldout, gates, ablation, cfg.calib_steps)

        return cls(loss_of, target).train(_gate_steps(model, task, cfg, taus, run, g,
                                                      cfg.node_penalty(sum(widths.values())), cfg.penalty_start,
                                                      progress, fit, target, f"masks {task.name}"), cfg)

    @classmethod
    def edges(cls, model: GPT, task, nodes: dict[str, list[int]], groups: list[EdgeGroup], n_edges: int,
              cfg: PruneConfig, ablation: str, seed: int, progress: bool, pairs, target: float) -> MaskSteps:
        g = torch.Generator().manual_seed(seed)
        node_gates = keep_gates(model.config, nodes, model.device)
        values = ablation_values(model, ablation)
        fit, heldout = split_pairs(task, cfg)
        fit = fit if pairs is None else pairs

        def run(gates, tokens, last):
            with edge_gates(groups, gates["edges"]):
                return model.run_with_hooks(tokens, gate_hooks(node_gates, values), last=last,
                                            last_block_at_last=True)

        def loss_of(snap):
            return edge_set_loss(model, nodes, groups, n_edges, (snap["edges"] > 0).nonzero().flatten().tolist(),
                                 fit[:cfg.calib_pairs], heldout, ablation, cfg.calib_steps)

        taus = {"edges": cfg.init_bias + cfg.init_noise * torch.randn(n_edges, generator=g)}
        penalty = cfg.node_penalty(sum(node_widths(model.config).values()))   # per edge, as per node
        return cls(loss_of, target).train(_gate_steps(model, task, cfg, taus, run, g, penalty, cfg.edge_penalty_start,
                                                      progress, fit, target, f"edges {task.name}"), cfg)

    @property
    def last(self) -> int:
        return len(self.snaps) - 1

    def loss(self, i: int) -> float:
        if i not in self.seen:
            key = open_set(self.snaps[i])
            if key not in self.measured:
                self.measured[key] = self.loss_of(self.snaps[i])
            self.seen[i] = self.measured[key]
        return self.seen[i][0]

    def n_open(self, i: int) -> int:
        return sum(int((t > 0).sum()) for t in self.snaps[i].values())

    def at(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Step i's taus and the taus averaged over steps 0..i."""
        return self.snaps[i], {k: torch.stack([s[k] for s in self.snaps[:i + 1]]).mean(0) for k in self.snaps[i]}

    def settle(self) -> int:
        """The step whose masks to keep: the last, if its open gates alone meet the target on the
        held-out pairs. Otherwise the multiplier overshot at the end (it grows while the loss is
        under the target and needs steps to come back, and gates closed by then reopen slowly):
        the step with the fewest open gates whose set meets the target, found by bisection over
        the steps' open counts (the loss falls as gates open). The first step's set, nearly every
        gate open, meets it when the full model does (docs/method.md, "Settling the masks")."""
        if self.loss(self.last) <= self.target:
            return self.last
        latest = {self.n_open(i): i for i in range(len(self.snaps))}   # open count -> its latest step
        steps = [latest[c] for c in sorted(latest)]
        lo, hi = -1, len(steps) - 1        # steps[hi], the most open set, is taken to meet the target
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.loss(steps[mid]) <= self.target:
                hi = mid
            else:
                lo = mid
        return steps[hi]


def open_set(taus: dict[str, torch.Tensor]) -> frozenset:
    """The open gates of ``taus``, as RankedLoss names its sets: (location, index) pairs."""
    return frozenset((loc, i) for loc, t in taus.items() for i in (t > 0).nonzero().flatten().tolist())


def calibrated_pair(two: torch.Tensor, cal: torch.Tensor) -> torch.Tensor:
    """(N, 2) candidate logits -> (N, 2) logits whose difference is scale * (a - b) + shift, the
    calibration's form, so that task_loss of the result is the calibrated loss."""
    return torch.stack([cal[0] * (two[:, 0] - two[:, 1]) + cal[1], torch.zeros_like(two[:, 0])], dim=1)


def _gate_steps(model, task, cfg: PruneConfig, init: dict[str, torch.Tensor], run, g: torch.Generator,
                penalty: float, start: float, progress: bool, fit, target: float, desc: str
                ) -> Iterator[dict[str, torch.Tensor]]:
    """The mask training loop shared by nodes and edges: ``run(gates, tokens, last)`` gives the
    logits at the last tokens with those gates applied. Yields the taus after every step, for as
    many steps as the caller takes (MaskSteps.train)."""
    batch = tasks_mod.encode_pairs(fit, model.config.block_size, model.encoding)
    n = len(fit)
    taus = {k: t.to(model.device).requires_grad_() for k, t in init.items()}
    # the multiplier starts at ``start`` (nodes: penalty_start; edges: edge_penalty_start), never
    # above the ceiling; recent: moving average of the batch task loss
    mult, recent = min(start, cfg.penalty_max), None
    # the scale and shift of the candidates' logit difference, learned with the masks: the target
    # is met by the calibrated loss (docs/method.md, "Calibration"), so the masks train on it too
    cal = torch.tensor([1.0, 0.0], device=model.device, requires_grad=cfg.calibrate_masks)
    opt = torch.optim.AdamW([{"params": list(taus.values())}, {"params": [cal], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup_frac * cfg.steps))
    with frozen(model), sparse_matmuls(model):    # only the masks learn
        for step in tqdm(itertools.count(), total=cfg.steps, desc=desc, disable=not progress, leave=False):
            for grp in opt.param_groups:
                grp["lr"] = cfg.lr * min(1.0, (step + 1) / warm)
            idx = torch.randperm(n, generator=g)[:cfg.batch_pairs]
            rows = torch.cat([idx, idx + n])                    # both prompts of every chosen pair
            sub = {"last": batch["last"][rows], "cands": batch["cands"][rows]}
            tokens = tasks_mod.trim(batch["tokens"][rows], sub["last"]).to(model.device)
            gates = {k: gate(t, cfg.temperature) for k, t in taus.items()}
            two = tasks_mod.pair_logits(run(gates, tokens, sub["last"]), sub)
            kept = sum(gt.sum() for gt in gates.values())
            task_loss = tasks_mod.task_loss(calibrated_pair(two.float(), cal), batch["label"][rows])
            opt.zero_grad(set_to_none=True)
            (task_loss + penalty * mult * kept).backward()
            opt.step()
            recent = task_loss.item() if recent is None else 0.7 * recent + 0.3 * task_loss.item()
            mult = min(max(mult * math.exp(cfg.penalty_rate * max(-3.0, (target - recent) / target)), 1e-6),
                       cfg.penalty_max)
            with torch.no_grad():
                for t in taus.values():
                    t.clamp_(-1, 1)
            yield {k: t.detach().clone() for k, t in taus.items()}


def ranking(taus: dict[str, torch.Tensor], tiebreak: dict[str, torch.Tensor] | None = None) -> list[tuple[str, int]]:
    """All nodes, highest tau first; ties broken by ``tiebreak`` (higher first), then by forward
    order, so the order is deterministic."""
    locs = list(taus)
    owner = [(l, i) for l in locs for i in range(len(taus[l]))]
    order = torch.arange(len(owner))
    for key in ([tiebreak] if tiebreak else []) + [taus]:   # the last sort decides, earlier ones break its ties
        flat = torch.cat([key[l].float().cpu() for l in locs])[order]
        order = order[torch.sort(-flat, stable=True).indices]
    return [owner[j] for j in order.tolist()]


def top_nodes(order: list[tuple[str, int]], k: int) -> dict[str, list[int]]:
    nodes: dict[str, list[int]] = {}
    for loc, i in order[:k]:
        nodes.setdefault(loc, []).append(i)
    return {loc: sorted(v) for loc, v in nodes.items()}


class RankedLoss:
    """``RankedLoss(...)(k)``: the calibrated held-out task loss with only the first k nodes of
    ``order`` kept (the rest ablated), memoized over k; what bisection and the sweeps evaluate.
    With ``edges`` (a node set and the groups of its n edges), ``order`` ranks edge positions
    instead: the nodes stay kept and only the first k edges carry their sources' values.
    ``measured`` (MaskSteps.measured) holds losses already measured, by set."""

    def __init__(self, model, order, calib, heldout, ablation, calib_steps,
                 edges: tuple[dict[str, list[int]], list[EdgeGroup], int] | None = None,
                 measured: dict[frozenset, tuple[float, tuple[float, float]]] | None = None):
        self.model, self.order, self.calib, self.heldout = model, order, calib, heldout
        self.ablation, self.calib_steps, self.edges = ablation, calib_steps, edges
        self.seen: dict[int, tuple[float, tuple[float, float]]] = {}
        self.measured = {} if measured is None else measured

    def __call__(self, k: int) -> float:
        if k not in self.seen:
            key = frozenset(self.order[:k]) if self.edges is None else frozenset(("edges", i) for i in self.order[:k])
            if key not in self.measured:
                self.measured[key] = self._measure(k)
            self.seen[k] = self.measured[key]
        return self.seen[k][0]

    def _measure(self, k: int) -> tuple[float, tuple[float, float]]:
        if self.edges is not None:
            return edge_set_loss(self.model, *self.edges, self.order[:k], self.calib, self.heldout, self.ablation,
                                 self.calib_steps)
        gates = keep_gates(self.model.config, top_nodes(self.order, k), self.model.device)
        return heldout_loss(self.model, self.calib, self.heldout, gates, self.ablation, self.calib_steps)


def edge_set_loss(model: GPT, nodes: dict[str, list[int]], groups: list[EdgeGroup], n_edges: int, keep: list[int],
                  calib, heldout, ablation: str, calib_steps: int) -> tuple[float, tuple[float, float]]:
    """The calibrated held-out task loss, and its calibration, with ``nodes`` kept and of their
    ``n_edges`` edges (indexed by ``groups``) only those at the positions in ``keep``."""
    gates = keep_gates(model.config, nodes, model.device)
    return heldout_loss(model, calib, heldout, gates, ablation, calib_steps,
                        edges=(groups, keep_edges(n_edges, keep, model.device)))


def bisect(evaluate, n_total: int, target: float, start: int | None = None) -> int:
    """Smallest k with evaluate(k) <= target, assuming the loss falls as k grows; evaluate(n_total)
    must already meet the target. k = 0 is a real answer: with every node ablated, the token
    embedding still reaches the unembedding, and when the last token alone decides the task,
    no node is needed.

    ``start`` (the masks' own count) is where the search begins: it steps away from it by 1, 2,
    4, ... (down while the target is met, up while it is not) and then bisects the last step.
    The masks leave the circuit near their own count, and the loss along the ranking is only
    monotone near it: a bisection over all of [0, n_total] can land in a rise far above the
    circuit (docs/method.md, "Ranking and bisection")."""
    if evaluate(0) <= target:         # the direct path (embedding -> unembedding) alone suffices
        return 0
    lo, hi = 0, n_total               # evaluate(hi) <= target; evaluate(lo) > target
    if start and 0 < start < n_total:
        step = 1
        if evaluate(start) <= target:
            hi = start
            while hi - step > lo and evaluate(hi - step) <= target:
                hi, step = hi - step, 2 * step
            lo = max(lo, hi - step)
        else:
            lo = start
            while lo + step < hi and evaluate(lo + step) > target:
                lo, step = lo + step, 2 * step
            hi = min(hi, lo + step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if evaluate(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def rise_after_target(trace: list[tuple[int, float]], target: float) -> float:
    """How far the loss along the ranking rises above ``target`` at a size larger than the first
    one under it, over the (k, loss) points a search visited (0 if it never does; inf if no
    point is under the target). The search assumes it is 0; docs/method.md allows 0.05."""
    under = [k for k, loss in sorted(trace) if loss <= target]
    if not under:
        return float("inf")
    return max([loss - target for k, loss in trace if k > under[0]] + [0.0])


class TargetNotReached(ValueError):
    """Pruning found no node set that meets the target (only raised with require_full=False)."""

    def __init__(self, task: str, target: float, loss: float, k: int):
        super().__init__(f"task {task}: pruning did not reach the target {target}; the masks' own "
                         f"{k} nodes give held-out loss {loss:.4f}")
        self.task, self.target, self.loss, self.k = task, target, loss, k


def _circuit_size(ev: RankedLoss, n_total: int, target: float, full_loss: float, k_mask: int, task: str) -> int:
    if full_loss <= target:
        return bisect(ev, n_total, target, start=k_mask)
    if k_mask and ev(k_mask) <= target:    # only for require_full=False: the masks' set must do
        return bisect(ev, k_mask, target)
    raise TargetNotReached(task, target, ev(k_mask) if k_mask else full_loss, k_mask)


def prune(model: GPT, task, target: float = 0.15, ablation: str = "mean", seed: int = 0,
          config: PruneConfig | None = None, progress: bool = True, require_full: bool = True,
          edges: bool = False) -> Circuit:
    """The smallest circuit (by the learned node ranking) whose calibrated task loss on
    held-out pairs is at most ``target``. The full model must meet the target itself, unless
    ``require_full`` is False (the controls of cspkit.validate): then the masks' own node set
    must, or TargetNotReached is raised. ``edges``: then prune the node circuit's edges the
    same way (a mask per edge, bisection to the same target) and return the edge circuit.

    >>> import cspkit
    >>> from cspkit.config import PruneConfig
    >>> model = cspkit.load("small-hour")
    >>> circuit = cspkit.prune(model, "single_double_quote", config=PruneConfig(steps=20), progress=False)
    >>> circuit.loss <= 0.15 and circuit.n_nodes < circuit.n_nodes_total
    True
    """
    check_ablation(ablation)
    if edges:
        edge_groups(model, [], ablation)    # refuses an ablation or a model that edges cannot use, before any work
    with frozen(model), sparse_matmuls(model):    # thousands of forward passes through fixed weights
        c = _prune(model, tasks_mod.get(task), target, ablation, seed, config or PruneConfig(), progress,
                   require_full)
        return _prune_edges(model, c, progress) if edges else c


def prune_edges(circuit: Circuit, progress: bool = True) -> Circuit:
    """A node circuit (from ``prune``) cut down to the edges it needs, to the same target, with the
    same config and seed: what ``prune(..., edges=True)`` returns (docs/method.md, "Edge circuits")."""
    if circuit.edge_level:
        raise ValueError("this circuit's edges are already pruned")
    if circuit.target is None:
        raise ValueError("edge pruning needs a circuit pruned to a target (this one was sized by k)")
    model = circuit.require_model("pruning its edges")
    with frozen(model), sparse_matmuls(model):
        return _prune_edges(model, circuit, progress)


def _prune_edges(model: GPT, c: Circuit, progress: bool) -> Circuit:
    t0 = time.time()
    cfg, task = c.prune_config(), c.get_task()
    fit, heldout = split_pairs(task, cfg)
    n = len(c.edges)
    groups = edge_groups(model, c.edges, c.ablation)    # first: it refuses what edges cannot do, even with none
    if not n:       # no edge to prune: the node circuit is its own edge circuit
        return dataclasses.replace(c, edge_level=True, node_edges=0, edge_trace=[(0, c.loss)],
                                   seconds=round(c.seconds + time.time() - t0, 2))
    steps = MaskSteps.edges(model, task, c.nodes, groups, n, cfg, c.ablation, c.seed, progress, fit, c.target)
    kept = steps.settle()
    order = [i for _, i in ranking(*steps.at(kept))]
    ev = RankedLoss(model, order, fit[:cfg.calib_pairs], heldout, c.ablation, cfg.calib_steps,
                    edges=(c.nodes, groups, n), measured=steps.measured)
    ev.seen[n] = (c.loss, c.calibration)     # every edge kept: the node circuit itself
    k = bisect(ev, n, c.target, start=steps.n_open(kept)) if c.loss <= c.target else n
    loss, cal = ev.seen[k]
    return dataclasses.replace(c, edges=[c.edges[i] for i in sorted(order[:k])], loss=loss, calibration=cal,
                               edge_level=True, node_edges=n, seconds=round(c.seconds + time.time() - t0, 2),
                               edge_trace=sorted((kk, v[0]) for kk, v in ev.seen.items()))


def _prune(model: GPT, task_obj, target: float, ablation: str, seed: int, cfg: PruneConfig, progress: bool,
           require_full: bool) -> Circuit:
    t0 = time.time()
    fit, heldout = split_pairs(task_obj, cfg)
    torch.manual_seed(seed)
    widths = node_widths(model.config)
    n_total = sum(widths.values())

    full = RankedLoss(model, [(l, i) for l, w in widths.items() for i in range(w)], fit[:cfg.calib_pairs],
                      heldout, ablation, cfg.calib_steps)
    full_loss = full(n_total)
    if full_loss > target and require_full:
        raise ValueError(f"task {task_obj.name}: the full model's own held-out task loss is {full_loss:.4f}, "
                         f"above the target {target}; no circuit can reach it. Use a target of at least "
                         f"{full_loss:.3f}, or a model that solves the task")

    t_masks = time.time()
    if full(0) <= target:   # the direct path alone meets the target: no node, no masks to train
        taus = mean_taus = None
        order, ev, k, k_mask, t_masks, retried = [], full, 0, 0, 0.0, False
    else:
        steps, kept, retried = _node_masks(model, task_obj, cfg, ablation, seed, progress, fit, target, full_loss)
        t_masks = time.time() - t_masks
        k_mask = steps.n_open(kept)
        # When settle went back to an earlier step, the last step's ranking is tried too and the
        # smaller circuit kept: the later ranking was shaped by more steps of the penalty.
        best = None
        for i in dict.fromkeys([kept, steps.last] if full_loss <= target else [kept]):
            taus, mean_taus = steps.at(i)
            order = ranking(taus, mean_taus)
            ev = RankedLoss(model, order, fit[:cfg.calib_pairs], heldout, ablation, cfg.calib_steps,
                            measured=steps.measured)
            ev.seen[0], ev.seen[n_total] = full.seen[0], full.seen[n_total]
            k = _circuit_size(ev, n_total, target, full_loss, steps.n_open(i), task_obj.name)
            if best is None or k < best[0]:
                best = (k, taus, mean_taus, order, ev)
        k, taus, mean_taus, order, ev = best
    # The masks' own node set (every open gate of the kept step): when it misses the target by
    # more than MASK_SLACK the masks collapsed (settle found no step that meets it), recorded, not
    # hidden (docs/method.md, "Ranking and bisection").
    mask_loss = ev(0) if taus is None else steps.loss(kept)
    loss, cal = ev.seen[k]
    nodes = top_nodes(order, k)
    return Circuit(task=task_obj.name, nodes=nodes, edges=compute_edges(model, nodes), target=target, loss=loss,
                ablation=ablation, calibration=cal, model_path=getattr(model, "path", None),
                model_fingerprint=fingerprint(model), full_loss=full_loss, n_nodes_total=n_total, seed=seed,
                seconds=round(time.time() - t0, 2), config=to_dict(cfg),
                trace=sorted((kk, v[0]) for kk, v in ev.seen.items()), model=model, task_obj=task_obj,
                mask_nodes=k_mask, mask_loss=mask_loss, collapsed=mask_loss > target + MASK_SLACK, mask_retry=retried,
                taus=taus, mean_taus=mean_taus, mask_seconds=t_masks,
                ranking=[node_name(loc, i) for loc, i in order[:max(RANKING_KEPT, 4 * k)]])


def _node_masks(model: GPT, task_obj, cfg: PruneConfig, ablation: str, seed: int, progress: bool, fit, target: float,
                full_loss: float | None) -> tuple[MaskSteps, int, bool]:
    """The node masks' training, the step ``settle`` keeps, and whether they came from the retry.
    When settle went back (the multiplier overshot at the end), ``cfg.retry_penalty`` is set and
    the full model meets the target (or its loss is not known), the masks are trained again with
    that fixed penalty, and the run whose kept masks are fewer and meet the target is returned
    (docs/method.md, "Penalty")."""
    steps = MaskSteps.nodes(model, task_obj, cfg, ablation, seed, progress, fit, target)
    kept = steps.settle()
    if cfg.retry_penalty is None or kept == steps.last or (full_loss is not None and full_loss > target):
        return steps, kept, False
    # the ceiling holds for the retry too, as for the edge masks' start
    fixed = dataclasses.replace(cfg, penalty_start=min(cfg.retry_penalty, cfg.penalty_max), penalty_rate=0.0)
    again = MaskSteps.nodes(model, task_obj, fixed, ablation, seed, progress, fit, target)
    kept_again = again.settle()
    if again.loss(kept_again) <= target and again.n_open(kept_again) < steps.n_open(kept):
        return again, kept_again, True
    return steps, kept, False


def loss_curve(circuit: Circuit, ks: list[int]) -> list[tuple[int, float]]:
    """Calibrated held-out loss when keeping the top k nodes of the circuit's ranking, for each k
    (needs the ``taus`` of a circuit returned by ``prune`` in this Python process: they are not saved)."""
    taus = getattr(circuit, "taus", None)
    if taus is None:
        raise ValueError("loss_curve needs a circuit fresh from prune() (the ranking is not saved in files)")
    cfg = PruneConfig.from_dict(circuit.config)
    fit, heldout = split_pairs(circuit.get_task(), cfg)
    ev = RankedLoss(circuit.require_model("its loss curve"), ranking(taus, circuit.mean_taus), fit[:cfg.calib_pairs],
                    heldout, circuit.ablation, cfg.calib_steps)
    with frozen(ev.model), sparse_matmuls(ev.model):
        return [(k, ev(k)) for k in ks]


def prune_to_files(model_path: str | os.PathLike, task: str, out: str | os.PathLike, target: float = 0.15,
                   ablation: str = "mean", seed: int = 0, config: PruneConfig | None = None,
                   progress: bool = True, edges: bool = False) -> tuple[dict, str]:
    """What ``cspkit prune`` does: prune ``task`` (a name, or ``all``: then ``out`` is a directory
    and a task the model cannot do is reported, not raised) in the model at ``model_path`` and
    save each circuit. Returns the JSON object and the text."""
    names = tasks_mod.names() if task == "all" else [task]
    for name in names:
        tasks_mod.get(name)   # an unknown name fails before any work
    model = load(model_path)
    rows, lines = [], []
    for name in names:
        dest = Path(out) / f"{name}.json" if task == "all" else Path(out)
        try:
            c = prune(model, name, target, ablation, seed, config, progress=progress, edges=edges)
        except ValueError as e:
            if task != "all":
                raise
            rows.append({"task": name, "error": str(e)})
            lines.append(f"{name:28s} not pruned: {e}")
            continue
        c.save(dest)
        rows.append({"task": name, "nodes": c.n_nodes, "edges": c.n_edges, "loss": c.loss, "full_loss": c.full_loss,
                     "seconds": c.seconds, "mask_nodes": c.mask_nodes, "mask_loss": c.mask_loss,
                     "collapsed": c.collapsed, "node_edges": c.node_edges, "out": str(dest)})
        cut = f" (of the node circuit's {c.node_edges})" if c.edge_level else ""
        lines.append(f"{name:28s} {c.n_nodes:6d} nodes {c.n_edges:6d} edges{cut}  held-out loss {c.loss:.4f} "
                     f"(target {target}, full model {c.full_loss:.4f})  {c.seconds:.0f} s -> {dest}"
                     + (f"  masks collapsed: their own {c.mask_nodes} nodes reach held-out loss {c.mask_loss:.3f}"
                        if c.collapsed else ""))
    obj = {"model": str(model_path), "ablation": ablation, "seed": seed, "target": target, "results": rows}
    return obj, "\n".join(lines)
