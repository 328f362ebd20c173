"""The Circuit: kept nodes, the edges the model's nonzero weights draw between them, and
re-evaluating it on the model (docs/method.md, "Pruning").

Counted edges (the circuit size) are nonzero weights whose two end nodes are both kept:
``L.attn.in -> L.attn.q/k/v`` (c_attn), ``L.attn.v -> L.attn.out`` (the attention output
projection: v channel h * d_head + i reaches the residual through that column),
``L.mlp.in -> L.mlp.neuron`` (c_fc) and ``L.mlp.neuron -> L.mlp.out`` (c_proj).
Drawn but not counted: the residual stream (a write channel feeds the same channel's reads
in later sublayers) and the pairing of a head's kept q and k channels (they meet in the
attention score, q_i * k_i, not through a weight).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from . import tasks as tasks_mod
from .ablation import ABLATIONS, ablation_values, fingerprint, gate_hooks, keep_gates, node_widths
from .checkpoint import load as load_checkpoint
from .config import PruneConfig
from .edges import EdgeGroup, edge_gates, edge_groups, keep_edges
from .files import atomic_write
from .model import GPT, node_name, parse_node

FORMAT = "cspkit.circuit/1"
UNSAVED = ("taus", "mean_taus", "mask_seconds", "source")  # fields a circuit file does not hold
RANKING_KEPT = 256  # at least this many ranked node names go into a circuit file
Edge = tuple[str, str, float]


def _layer(loc: str) -> int:
    return int(loc.split(".", 1)[0])


def _kind(loc: str) -> str:
    return loc.split(".", 1)[1]


def compute_edges(model: GPT, nodes: dict[str, list[int]]) -> list[Edge]:
    """Every nonzero weight between two kept nodes, as (source, target, weight), in a fixed order."""
    cfg = model.config
    inner = cfg.n_head * cfg.d_head
    edges: list[Edge] = []

    def add(src_loc, dst_loc, W):  # W: (dst width, src width), as nn.Linear stores it
        src, dst = nodes.get(src_loc, []), nodes.get(dst_loc, [])
        if not src or not dst:
            return
        sub = W.detach()[torch.tensor(dst)][:, torch.tensor(src)].cpu()     # (n_dst, n_src)
        for d, s in (sub != 0).nonzero().tolist():
            edges.append((node_name(src_loc, src[s]), node_name(dst_loc, dst[d]), float(sub[d, s])))

    for L, block in enumerate(model.h):
        W = block.attn.c_attn.weight                                         # (3 * inner, d_model)
        for j, t in enumerate("qkv"):
            add(f"{L}.attn.in", f"{L}.attn.{t}", W[j * inner:(j + 1) * inner])
        add(f"{L}.attn.v", f"{L}.attn.out", block.attn.c_proj.weight)
        add(f"{L}.mlp.in", f"{L}.mlp.neuron", block.mlp.c_fc.weight)
        add(f"{L}.mlp.neuron", f"{L}.mlp.out", block.mlp.c_proj.weight)
    return edges


def extra_edges(nodes: dict[str, list[int]]) -> list[tuple[str, str, str]]:
    """Edges drawn but not counted: (source, target, "residual" | "qk")."""
    out = []
    writes = [(loc, i) for loc in nodes if _kind(loc) in ("attn.out", "mlp.out") for i in nodes[loc]]
    for wloc, c in writes:
        wl, w_mlp = _layer(wloc), _kind(wloc) == "mlp.out"
        for rloc in nodes:
            if _kind(rloc) not in ("attn.in", "mlp.in") or c not in nodes[rloc]:
                continue
            rl, r_mlp = _layer(rloc), _kind(rloc) == "mlp.in"
            # a read sees a write if it comes later in the forward order
            if rl > wl or (rl == wl and r_mlp and not w_mlp):
                out.append((node_name(wloc, c), node_name(rloc, c), "residual"))
    for loc in nodes:
        if _kind(loc) == "attn.q":
            kloc = f"{_layer(loc)}.attn.k"
            ks = set(nodes.get(kloc, []))
            out += [(node_name(loc, i), node_name(kloc, i), "qk") for i in nodes[loc] if i in ks]
    return out


@dataclass
class Circuit:
    """A task's circuit in one model. ``loss`` is the held-out task loss the pruning reached
    (calibrated); ``calibration`` is the (scale, shift) applied to the candidates' logit
    difference; ``trace`` the (k, loss) points the bisection evaluated.

    >>> import cspkit
    >>> path = cspkit.paths.results_dir() / "circuits" / "small-sparse" / "single_double_quote.json"
    >>> circuit = cspkit.Circuit.load(path)      # with the model it was found in
    >>> (circuit.n_nodes, circuit.n_edges)
    (24, 38)
    >>> circuit.evaluate()["accuracy"] > 0.9
    True
    >>> circuit.to_networkx().number_of_nodes() == circuit.n_nodes
    True
    """
    task: str
    nodes: dict[str, list[int]]
    edges: list[Edge]
    target: float
    loss: float
    ablation: str = "mean"
    calibration: tuple[float, float] = (1.0, 0.0)
    model_path: str | None = None
    model_fingerprint: str | None = None
    full_loss: float | None = None
    n_nodes_total: int | None = None
    seed: int = 0
    seconds: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    trace: list[tuple[int, float]] = field(default_factory=list)
    # The trained masks' own node set (every open gate): its size, its held-out loss, whether
    # that loss missed the target by more than cspkit.pruning.MASK_SLACK (the masks collapsed),
    # and whether the masks came from the fixed-penalty retry after an overshoot
    # (PruneConfig.retry_penalty). None in files written before they were recorded, and for
    # circuits built by hand.
    mask_nodes: int | None = None
    mask_loss: float | None = None
    collapsed: bool | None = None
    mask_retry: bool | None = None
    # Edge circuits (prune(..., edges=True)): ``edges`` holds only the kept edges, every other
    # weight between the nodes carries its source's mean (cspkit.edges); node_edges is the node
    # circuit's edge count before, edge_trace the (k edges, loss) points that bisection evaluated.
    edge_level: bool = False
    node_edges: int | None = None
    edge_trace: list[tuple[int, float]] = field(default_factory=list)
    # The masks' node ranking, best first, cut after max(RANKING_KEPT, 4 x the circuit's nodes)
    # names: a circuit of any k up to there is its first k (the explorer's k slider). Empty in
    # files written before it was recorded and for circuits built by hand.
    ranking: list[str] = field(default_factory=list)
    model: GPT | None = field(default=None, repr=False, compare=False)
    task_obj: Any = field(default=None, repr=False, compare=False)
    # Not saved: what pruning learned (the masks' final and step-averaged taus, which rank the
    # nodes; cspkit.pruning.loss_curve and the explorer's k slider reuse them), the seconds the
    # masks took, and where a loaded circuit came from (a file path, or "pruned").
    taus: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    mean_taus: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    mask_seconds: float | None = field(default=None, repr=False, compare=False)
    source: str | None = field(default=None, repr=False, compare=False)

    @property
    def n_nodes(self) -> int:
        return sum(len(v) for v in self.nodes.values())

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def size_label(self) -> str:
        """How the circuit was sized: ``target 0.15`` or ``k = 20``."""
        return f"target {self.target}" if self.target is not None else f"k = {self.config.get('k')}"

    def node_names(self) -> list[str]:
        return [node_name(loc, i) for loc, idx in self.nodes.items() for i in idx]

    def __repr__(self) -> str:
        return (f"Circuit(task={self.task!r}, nodes={self.n_nodes}, edges={self.n_edges}, "
                f"loss={self.loss:.4f}, target={self.target}, ablation={self.ablation!r}"
                + (f", edges pruned from {self.node_edges}" if self.edge_level else "")
                + (f", masks collapsed: {self.mask_nodes} nodes at loss {self.mask_loss:.3f}" if self.collapsed else "")
                + ")")

    # ------------------------------------------------------------------ graph
    def to_networkx(self, extra: bool = True) -> nx.DiGraph:
        """Nodes carry location, layer, kind and index; edges carry weight and kind
        ("weight": counted; "residual" and "qk": drawn only, with ``extra``)."""
        g = nx.DiGraph(task=self.task, target=self.target, loss=self.loss, ablation=self.ablation)
        for loc, idx in self.nodes.items():
            for i in idx:
                g.add_node(node_name(loc, i), location=loc, layer=_layer(loc), kind=_kind(loc), index=i)
        for s, d, w in self.edges:
            g.add_edge(s, d, weight=w, kind="weight")
        if extra:
            for s, d, kind in extra_edges(self.nodes):
                g.add_edge(s, d, weight=0.0, kind=kind)
        return g

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        # not asdict: it would deep-copy the attached model and the masks
        d = copy.deepcopy({f.name: getattr(self, f.name) for f in fields(self)
                           if f.name not in ("model", "task_obj", *UNSAVED)})
        d["calibration"] = list(self.calibration)
        d["edges"] = [list(e) for e in self.edges]
        d["trace"] = [list(t) for t in self.trace]
        d["edge_trace"] = [list(t) for t in self.edge_trace]
        return {"format": FORMAT, "n_nodes": self.n_nodes, "n_edges": self.n_edges, **d}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], model: GPT | None = None, task=None) -> Circuit:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a cspkit circuit file (format {d.get('format')!r}, expected {FORMAT!r})")
        d = {k: v for k, v in d.items() if k not in ("format", "n_nodes", "n_edges")}
        d["calibration"] = tuple(d["calibration"])
        d["edges"] = [(s, t, w) for s, t, w in d["edges"]]
        d["trace"] = [(int(k), v) for k, v in d["trace"]]
        d["edge_trace"] = [(int(k), v) for k, v in d.get("edge_trace", [])]
        k = (d.get("config") or {}).get("k")
        if not (d.get("target") is None or isinstance(d["target"], (int, float))) or \
                not (k is None or isinstance(k, int)) or d.get("ablation") not in ABLATIONS:
            raise ValueError(f"circuit file has a malformed target {d.get('target')!r}, k {k!r} or ablation "
                             f"{d.get('ablation')!r}; write it again with `cspkit prune --out`")
        c = cls(**d)
        if model is not None:
            c.attach(model)
        c.task_obj = task
        return c

    @classmethod
    def load(cls, path: str | os.PathLike, model: GPT | str | os.PathLike | None = None, task=None,
             need_model: bool = False) -> Circuit:
        """A circuit file; ``model`` (a GPT, or its checkpoint directory or shipped name; default:
        loaded from the file's model_path) must be the model it was found in, checked by a
        fingerprint of the weights. ``need_model``: refuse a file that names no model when none
        is given, rather than return the circuit without one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"circuit file {path} does not exist; write one with `cspkit prune --out`")
        c = cls.from_dict(json.loads(path.read_text()), task=task)
        if model is None and c.model_path:
            model = load_checkpoint(c.model_path)
        elif isinstance(model, (str, os.PathLike)):
            model = load_checkpoint(model)
        if model is None and need_model:
            raise ValueError(f"{path} does not name its model (no model_path); pass --model DIR (or model=)")
        if model is not None:
            c.attach(model)
        return c

    def attach(self, model: GPT) -> Circuit:
        fp = fingerprint(model)
        if self.model_fingerprint and fp != self.model_fingerprint:
            raise ValueError(f"this circuit was found in model {self.model_fingerprint} "
                             f"({self.model_path}), not in the model given ({fp}, "
                             f"{getattr(model, 'path', None)}); load it with its own model")
        widths = node_widths(model.config)
        bad = [n for loc, idx in self.nodes.items() for n in idx if loc not in widths or not 0 <= n < widths[loc]]
        if bad:
            raise ValueError(f"circuit nodes {bad[:5]} do not exist in this model")
        self.model = model
        return self

    # ------------------------------------------------------------------ evaluation
    def get_task(self):
        """The circuit's task: the one it was given, else the registered one of its name."""
        return self.task_obj if self.task_obj is not None else tasks_mod.get(self.task)

    def require_model(self, purpose: str = "evaluating it") -> GPT:
        """The attached model, or an error that says what needs it and how to attach one."""
        if self.model is None:
            raise ValueError(f"this circuit has no model attached, and {purpose} needs the model; "
                             "Circuit.load(path, model) or circuit.attach(model)")
        return self.model

    def evaluate(self, split: str = "test", n: int | None = None, invert: bool = False,
                 nodes: dict[str, list[int]] | None = None) -> dict[str, float]:
        """Task loss (calibrated and raw) and accuracy of the model with only the circuit kept,
        the rest ablated. ``nodes`` evaluates another node set under the same ablation and the
        circuit's calibration (what removing a node does to this circuit). ``invert`` ablates only
        the circuit and fits that model its own calibration, as ``validate`` does for necessity:
        the circuit's scale and shift were fit to the circuit alone and mean nothing for the rest."""
        model = self.require_model()
        pairs = self.get_task().pairs(split, n=n)
        gates, edges = self.ablation_gates(nodes, invert)
        two, label = masked_pair_logits(model, pairs, gates, self.ablation, edges=edges)
        return score(two, label, self.calibration_for(gates, edges) if invert else self.calibration)

    def ablation_gates(self, nodes: dict[str, list[int]] | None = None, invert: bool = False
                       ) -> tuple[dict[str, torch.Tensor], tuple[list[EdgeGroup], torch.Tensor] | None]:
        """The node gates that keep the circuit (or ``nodes``), and for an edge circuit the edge
        gates that keep only its edges among them. ``invert``: only the circuit ablated (for an
        edge circuit: every node kept, only its edges ablated)."""
        model = self.require_model()
        keep = self.nodes if nodes is None else nodes
        if not self.edge_level:
            return keep_gates(model.config, keep, model.device, invert=invert), None
        if invert:
            everything = {loc: list(range(w)) for loc, w in node_widths(model.config).items()}
            groups = edge_groups(model, self.edges, self.ablation)
            return keep_gates(model.config, everything, model.device), (groups, torch.zeros(len(self.edges),
                                                                                            device=model.device))
        between = compute_edges(model, keep)
        kept = {(s, d) for s, d, _ in self.edges}
        on = [i for i, (s, d, _) in enumerate(between) if (s, d) in kept]
        return (keep_gates(model.config, keep, model.device),
                (edge_groups(model, between, self.ablation), keep_edges(len(between), on, model.device)))

    def prune_config(self) -> PruneConfig:
        """The PruneConfig the circuit was found with (the defaults for a circuit built by hand)."""
        return PruneConfig.from_dict(self.config) if self.config else PruneConfig()

    def calibration_for(self, gates: dict[str, torch.Tensor], edges=None) -> tuple[float, float]:
        """The scale and shift that pruning fits, fit for the model under ``gates`` (and edge gates)
        on the circuit's own calibration pairs (its pruning config's first ``calib_pairs`` train pairs)."""
        cfg = self.prune_config()
        calib = split_pairs(self.get_task(), cfg)[0][:cfg.calib_pairs]
        return fit_calibration(*masked_pair_logits(self.require_model(), calib, gates, self.ablation, edges=edges),
                               cfg.calib_steps)


# ---------------------------------------------------------------------- shared by pruning / validation
def split_pairs(task, cfg: PruneConfig):
    """The task's train pairs as pruning uses them: (pairs the masks train on, whose first
    ``calib_pairs`` fit the calibration; the last ``heldout_pairs``, which every loss is measured on)."""
    pairs = task.pairs("train")
    if len(pairs) < cfg.heldout_pairs + 2:
        raise ValueError(f"task {task.name} has {len(pairs)} train pairs; pruning needs more than "
                         f"heldout_pairs={cfg.heldout_pairs} + 2")
    return pairs[:-cfg.heldout_pairs], pairs[-cfg.heldout_pairs:]


def fit_calibration(two: torch.Tensor, label: torch.Tensor, steps: int = 16) -> tuple[float, float]:
    """Scale and shift of the candidates' logit difference, fit by LBFGS on task loss against
    Platt's targets: (n_A + 1) / (n_A + 2) for a prompt whose answer is A, 1 / (n_B + 2) for B,
    instead of 1 and 0. On calibration prompts that the circuit separates perfectly, hard targets
    have no finite optimum and the fit runs the scale and shift up (to 56 and -36 on the quote
    circuit's 32 pairs), which held-out prompts near the boundary then pay for
    (docs/method.md, "Calibration")."""
    diff = (two[:, 0] - two[:, 1]).double()
    is_a = (label == 0).double()
    n_a, n_b = float(is_a.sum()), float((1 - is_a).sum())
    is_a = is_a * (n_a + 1) / (n_a + 2) + (1 - is_a) / (n_b + 2)
    p = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([p], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(p[0] * diff + p[1], is_a)
        loss.backward()
        return loss

    opt.step(closure)
    scale, shift = p.detach().tolist()
    if not (math.isfinite(scale) and math.isfinite(shift)):
        return 1.0, 0.0
    return scale, shift


def masked_pair_logits(model: GPT, pairs, gates: dict[str, torch.Tensor], ablation: str,
                       batch_size: int = 128, shift: int = 1,
                       edges: tuple[list[EdgeGroup], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(2N, 2) candidate logits of every prompt with ``gates`` applied, and the labels; ``edges``
    (groups, one 0/1 gate per edge) ablates edges as well (cspkit.edges)."""
    batch = tasks_mod.encode_pairs(pairs, model.config.block_size, model.encoding)
    tokens = batch["tokens"].to(model.device)
    values = ablation_values(model, ablation, tokens, shift) if ablation == "resample" else \
        ablation_values(model, ablation)
    out = []
    with torch.no_grad(), edge_gates(*edges) if edges else contextlib.nullcontext():
        for s in range(0, tokens.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            sub = {"last": batch["last"][sl], "cands": batch["cands"][sl]}
            rows = tasks_mod.trim(tokens[sl], sub["last"])
            vals = {k: v[sl, : rows.shape[1]] for k, v in values.items()} if ablation == "resample" else values
            logits = model.run_with_hooks(rows, gate_hooks(gates, vals), last=sub["last"],
                                          last_block_at_last=ablation != "resample")
            out.append(tasks_mod.pair_logits(logits, sub))
    return torch.cat(out).float().cpu(), batch["label"]


def heldout_loss(model, calib, heldout, gates, ablation: str, calib_steps: int, edges=None
                 ) -> tuple[float, tuple[float, float]]:
    """The calibrated held-out task loss with ``gates`` (and ``edges``: groups and 0/1 edge gates)
    applied, the calibration fitted on the ``calib`` pairs; and that calibration."""
    two_c, lab_c = masked_pair_logits(model, calib, gates, ablation, edges=edges)
    cal = fit_calibration(two_c, lab_c, calib_steps)
    two_h, lab_h = masked_pair_logits(model, heldout, gates, ablation, edges=edges)
    return score(two_h, lab_h, cal)["loss"], cal


def calibrated(two: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """The logit of candidate A against B after the scale-and-shift calibration, (N,)."""
    return scale * (two[:, 0] - two[:, 1]) + shift


def score(two: torch.Tensor, label: torch.Tensor, calibration: tuple[float, float] = (1.0, 0.0)) -> dict[str, float]:
    z = calibrated(two, *calibration)
    is_a = (label == 0).float()
    right = (z > 0).float() == is_a
    return {"loss": float(torch.nn.functional.binary_cross_entropy_with_logits(z, is_a)),
            "raw_loss": float(tasks_mod.task_loss(two, label)), "accuracy": float(right.float().mean())}


def geometric_mean(xs: list[float], floor: float = 1.0) -> float:
    """Geometric mean of ``xs``, each counted as at least ``floor`` (a circuit with no edges counts
    as 1 edge, so that one empty circuit does not make the mean zero)."""
    if not xs:
        raise ValueError("no values to average")
    return math.exp(sum(math.log(max(x, floor)) for x in xs) / len(xs))


def geometric_mean_edges(circuits: list[Circuit]) -> float:
    """Geometric mean of edge counts over tasks (a circuit with no edges counts as 1 edge)."""
    if not circuits:
        raise ValueError("no circuits")
    return geometric_mean([c.n_edges for c in circuits])


def node_list(names: list[str]) -> dict[str, list[int]]:
    """Node names -> {location: sorted indices}."""
    out: dict[str, list[int]] = {}
    for n in names:
        loc, i = parse_node(n)
        out.setdefault(loc, []).append(i)
    return {k: sorted(v) for k, v in out.items()}
