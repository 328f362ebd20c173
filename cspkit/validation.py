"""Faithfulness controls for a circuit, in one call and one table (docs/method.md, "Validation controls").

Every node set below is scored the same way: the scale-and-shift calibration is fit on the
train pairs the masks were trained on, the loss is measured on the task's test split (other
templates and names), with the circuit's ablation kind. Chance is ln 2 = 0.693.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import statistics
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from . import tasks as tasks_mod
from .ablation import ablation_values, gate_hooks, keep_gates, node_widths
from .circuit import Circuit, compute_edges, masked_pair_logits, score
from .files import atomic_write
from .model import GPT, frozen
from .pruning import RankedLoss, TargetNotReached, bisect, prune, ranking, split_pairs, top_nodes

CHANCE = math.log(2)
# the controls that prune again (re-initialized weights, random labels): a faithful circuit's
# pruning should fail on both, and their rows say whether it did (Row.reached_target)
REINIT, NONSENSE = "re-initialized weights, same sparsity: prune", "random labels: prune"
PRUNE_CONTROLS = (REINIT, NONSENSE)


@dataclass
class Row:
    control: str
    nodes: int | None
    edges: int | None
    loss: float | None            # calibrated test loss (mean over draws where there are draws)
    accuracy: float | None = None
    raw_loss: float | None = None  # the same without the calibration
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def reached_target(self) -> bool | None:
        """For a control that prunes again: whether its pruning reached the target (a row that
        did not has no loss); None for the other rows."""
        return self.loss is not None if self.control in PRUNE_CONTROLS else None


def reinit_like(model: GPT, seed: int = 0) -> GPT:
    """A copy whose sparsified weights are redrawn N(0, std of each tensor's nonzeros) at the same
    nonzero positions; norm gains and everything never sparsified are kept."""
    g = torch.Generator().manual_seed(seed)
    new = copy.deepcopy(model)
    new.path = None                     # its means must not be cached over the real model's
    with torch.no_grad():
        for p, _ in new.sparse_parameters().values():
            nz = p != 0
            if nz.sum() < 2:
                continue
            std = float(p[nz].std())
            p.copy_(torch.randn(p.shape, generator=g).to(p.device) * std * nz)
    return new


def nonsense_task(task, seed: int = 0) -> tasks_mod.Task:
    """The same prompts with random labels: each pair's two answers are swapped with probability 1/2."""
    rng = random.Random(f"nonsense/{seed}")

    def shuffled(split):
        out = []
        for p in task.pairs(split):
            a, b = (p.cand_b, p.cand_a) if rng.random() < 0.5 else (p.cand_a, p.cand_b)
            out.append((p.prompt_a, a, p.prompt_b, b))
        return out

    return tasks_mod.Task.from_pairs(f"{task.name}_random_labels", {s: shuffled(s) for s in tasks_mod.SPLITS},
                                     description=f"{task.name} with random labels")


def attribution_scores(model: GPT, task, ablation: str, pairs) -> dict[str, torch.Tensor]:
    """|gradient x (activation - ablated value)| summed over the prompts: the first-order
    estimate of each node's ablation effect on the task loss (attribution patching)."""
    batch = tasks_mod.encode_pairs(pairs, model.config.block_size, model.encoding)
    tokens = batch["tokens"].to(model.device)
    values = ablation_values(model, ablation, tokens) if ablation == "resample" else ablation_values(model, ablation)
    gates = {loc: torch.ones(w, device=model.device, requires_grad=True)
             for loc, w in node_widths(model.config).items()}
    with frozen(model):      # only the gates take a gradient
        logits = model.run_with_hooks(tokens, gate_hooks(gates, values))
        tasks_mod.task_loss(tasks_mod.pair_logits(logits, batch).float(), batch["label"]).backward()
    # d loss / d gate at gate 1 = sum over tokens of grad * (x - ablated)
    return {loc: g.grad.abs().detach() for loc, g in gates.items()}


class _Scorer:
    """Each node set gets its own calibration (on the circuit's calibration pairs) and its loss on
    the test split."""

    def __init__(self, circuit: Circuit, n_test: int | None):
        self.c, self.model = circuit, circuit.require_model("validating it")
        self.test = circuit.get_task().pairs("test", n=n_test)

    def __call__(self, nodes, invert: bool = False, own_edges: bool = False) -> dict[str, float]:
        """``own_edges``: ``nodes`` are the circuit's, and an edge circuit keeps (or with ``invert``,
        ablates) only its edges, as Circuit.evaluate does."""
        if own_edges:
            gates, edges = self.c.ablation_gates(nodes, invert)
        else:
            gates, edges = keep_gates(self.model.config, nodes, self.model.device, invert=invert), None
        return score(*masked_pair_logits(self.model, self.test, gates, self.c.ablation, edges=edges),
                     self.c.calibration_for(gates, edges))


def _random_nodes(sizes: dict[str, int], widths: dict[str, int], rng: random.Random) -> dict[str, list[int]]:
    return {loc: sorted(rng.sample(range(widths[loc]), n)) for loc, n in sizes.items() if n}


def _prune_control(name: str, model: GPT, task, circuit: Circuit, progress: bool) -> Row:
    cfg = circuit.prune_config()
    try:
        c = prune(model, task, circuit.target, circuit.ablation, circuit.seed, cfg, progress, require_full=False)
    except TargetNotReached as e:
        return Row(name, e.k, None, None, note=f"did not reach the target: the masks' {e.k} nodes give "
                                              f"held-out loss {e.loss:.3f}")
    test = c.evaluate()
    return Row(name, c.n_nodes, c.n_edges, test["loss"], test["accuracy"], test["raw_loss"],
               note=f"held-out loss {c.loss:.3f}; the full model's {c.full_loss:.3f}")


def validate(circuit: Circuit, n_test: int | None = None, draws: int = 4, seed: int = 0,
             stochastic: tuple[float, ...] = (0.25, 0.5, 0.75), prune_controls: bool = True,
             progress: bool = True, attribution: bool = True) -> list[Row]:
    """The table of controls for a circuit, in the order they are best read: the circuit, then
    what it must beat, then what must not work. ``prune_controls=False`` leaves out the two
    controls that prune again (re-initialized weights, random labels), ``attribution=False`` the
    attribution baseline (whose search for its own size evaluates the model dozens of times),
    ``stochastic=()`` the partial ablations.

    >>> import cspkit
    >>> c = cspkit.Circuit.load(cspkit.paths.results_dir() / "small_hour" / "circuit_single_double_quote.json")
    >>> rows = cspkit.validate(c, n_test=32, draws=1, stochastic=(0.5,), prune_controls=False, progress=False,
    ...                        attribution=False)
    >>> [row.control for row in rows[:2]]
    ['full model', 'circuit alone (sufficiency)']
    >>> rows[1].loss < 0.2 < rows[2].loss
    True
    """
    model = circuit.require_model("validating it")
    task = circuit.get_task()
    widths = node_widths(model.config)
    everything = {loc: list(range(w)) for loc, w in widths.items()}
    sc = _Scorer(circuit, n_test)
    rng = random.Random(seed)
    steps = ["full", "circuit", "necessity", "random"] + (["attribution"] if attribution else []) + \
        ["stochastic"] + (["reinit", "nonsense"] if prune_controls else [])
    bar = tqdm(steps, desc=f"validate {task.name}", disable=not progress, leave=False)
    rows: list[Row] = []
    for step in bar:
        bar.set_postfix_str(step)
        if step == "full":
            r = sc(everything)
            rows.append(Row("full model", sum(widths.values()), None, r["loss"], r["accuracy"], r["raw_loss"]))
        elif step == "circuit":
            r = sc(circuit.nodes, own_edges=True)
            rows.append(Row("circuit alone (sufficiency)", circuit.n_nodes, circuit.n_edges, r["loss"], r["accuracy"],
                            r["raw_loss"], note=f"target {circuit.target}; held-out loss {circuit.loss:.3f}"))
        elif step == "necessity":
            r = sc(circuit.nodes, invert=True, own_edges=True)
            kept = sum(widths.values()) - (0 if circuit.edge_level else circuit.n_nodes)
            rows.append(Row("circuit ablated (necessity)", kept, None, r["loss"], r["accuracy"], r["raw_loss"],
                            note=f"{r['loss'] / CHANCE:.1f} x chance loss"
                            + (f"; only its {circuit.n_edges} edges ablated" if circuit.edge_level else "")))
        elif step == "random":
            sizes = {loc: len(v) for loc, v in circuit.nodes.items()}
            rs = [sc(_random_nodes(sizes, widths, rng)) for _ in range(draws)]
            losses = [r["loss"] for r in rs]
            rows.append(Row("random nodes, same count per location", circuit.n_nodes, None, statistics.mean(losses),
                            statistics.mean(r["accuracy"] for r in rs), statistics.mean(r["raw_loss"] for r in rs),
                            note=f"{draws} draws, loss {min(losses):.3f} to {max(losses):.3f}"))
        elif step == "attribution":
            cfg = circuit.prune_config()
            fit, heldout = split_pairs(task, cfg)
            calib = fit[:cfg.calib_pairs]
            order = ranking(attribution_scores(model, task, circuit.ablation, calib))
            same = top_nodes(order, circuit.n_nodes)
            r = sc(same)
            rows.append(Row("attribution top-k, same size", circuit.n_nodes, len(compute_edges(model, same)),
                            r["loss"], r["accuracy"], r["raw_loss"], note="|grad x (activation - ablated)|"))
            ev = RankedLoss(model, order, calib, heldout, circuit.ablation, cfg.calib_steps)
            n_total = sum(widths.values())
            if ev(n_total) <= circuit.target:
                k = bisect(ev, n_total, circuit.target, start=circuit.n_nodes)
                need = top_nodes(order, k)
                r = sc(need)
                rows.append(Row("attribution top-k, size to reach the target", k, len(compute_edges(model, need)),
                                r["loss"], r["accuracy"], r["raw_loss"], note=f"held-out loss {ev(k):.3f}; "
                                f"{k / max(circuit.n_nodes, 1):.1f} x the circuit's nodes"))
        elif step == "stochastic":
            kept = {loc: set(v) for loc, v in circuit.nodes.items()}
            outside = [(loc, i) for loc, w in widths.items() for i in range(w) if i not in kept.get(loc, ())]
            for frac in stochastic:
                rs = []
                for _ in range(draws):
                    # ablate a random fraction of the non-circuit nodes; keep the circuit and the rest
                    ablated = set(rng.sample(range(len(outside)), int(frac * len(outside))))
                    keep: dict[str, list[int]] = {loc: list(v) for loc, v in circuit.nodes.items()}
                    for j, (loc, i) in enumerate(outside):
                        if j not in ablated:
                            keep.setdefault(loc, []).append(i)
                    rs.append(sc(keep))
                losses = [r["loss"] for r in rs]
                rows.append(Row(f"stochastic: ablate {frac:.0%} of the other nodes", None, None,
                                statistics.mean(losses), statistics.mean(r["accuracy"] for r in rs),
                                statistics.mean(r["raw_loss"] for r in rs),
                                note=f"{draws} draws, max loss {max(losses):.3f}"))
        elif step == "reinit":
            rows.append(_prune_control(REINIT, reinit_like(model, seed), task, circuit, progress))
        elif step == "nonsense":
            rows.append(_prune_control(NONSENSE, model, nonsense_task(task, seed), circuit, progress))
    return rows


def format_table(rows: list[Row]) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)
    lines = [f"{'control':<48} {'nodes':>7} {'edges':>7} {'loss':>7} {'raw':>7} {'acc':>6}  note"]
    for r in rows:
        lines.append(f"{r.control:<48} {f(r.nodes, 'd'):>7} {f(r.edges, 'd'):>7} {f(r.loss, '.3f'):>7} "
                     f"{f(r.raw_loss, '.3f'):>7} {f(r.accuracy, '.3f'):>6}  {r.note}")
    return "\n".join(lines)


def validate_file(circuit_path: str | os.PathLike, model: str | os.PathLike | None = None, n_test: int | None = None,
                  draws: int = 4, seed: int = 0, prune_controls: bool = True, out: str | os.PathLike | None = None,
                  progress: bool = True) -> tuple[dict, str]:
    """What ``cspkit validate`` does: the controls of a circuit file (in ``model``, default the
    model the file names), optionally written to ``out`` as JSON. Returns the object and the text."""
    circuit = Circuit.load(circuit_path, model=model, need_model=True)
    rows = validate(circuit, n_test=n_test, draws=draws, seed=seed, prune_controls=prune_controls, progress=progress)
    obj = {"circuit": str(circuit_path), "task": circuit.task, "model": circuit.model_path,
           "rows": [asdict(r) for r in rows]}
    if out:
        atomic_write(out, json.dumps(obj, indent=1) + "\n")
    return obj, (f"{circuit.task} circuit in {circuit.model_path} ({circuit.ablation} ablation); "
                 "loss: calibrated task loss on the test split (raw: uncalibrated), chance 0.693\n"
                 + format_table(rows))
