"""The explorer's k slider: a circuit's node ranking (what the pruning masks learned), the task
loss of its top k nodes for any k, and the loss-against-k curve drawn as inline SVG."""
from __future__ import annotations

import threading

from .. import pruning as prune_mod
from ..circuit import Circuit, compute_edges, split_pairs
from ..config import PruneConfig
from ..model import GPT, parse_node


def circuit_ranking(model: GPT, circuit: Circuit, task, progress: bool = True) -> list[tuple[str, int]]:
    """The circuit's node ranking, best first: saved with it (``Circuit.ranking``), or from the
    masks a live pruning kept; a circuit that has neither gets its masks trained (once: they are
    kept on the circuit). An empty circuit that meets its target has none: the direct path alone
    does the task, pruning trained no masks, and masks trained to a target met with every node
    ablated would only rank nodes by their initial noise."""
    if circuit.ranking:
        return [parse_node(n) for n in circuit.ranking]
    if circuit.taus is None:
        if not trains_masks(circuit):
            return []
        target = 0.15 if circuit.target is None else circuit.target
        circuit.taus, circuit.mean_taus = prune_mod.train_masks(model, task, PruneConfig(), circuit.ablation,
                                                                circuit.seed, progress, target=target,
                                                                full_loss=circuit.full_loss)
    return prune_mod.ranking(circuit.taus, circuit.mean_taus)[:max(256, 4 * circuit.n_nodes)]


def trains_masks(circuit: Circuit) -> bool:
    """Whether ``circuit_ranking`` trains masks for ``circuit``: it has no saved ranking and no live
    masks, and it is not an empty circuit that meets its target (which has no ranking)."""
    empty_and_met = circuit.n_nodes == 0 and circuit.target is not None and circuit.loss <= circuit.target
    return not circuit.ranking and circuit.taus is None and not empty_and_met


def layer_deltas(circuit: Circuit, n_pairs: int, base_loss: float) -> dict[int, tuple[int, float | None]]:
    """Per layer: the circuit's nodes there, and the task loss change (on the first ``n_pairs``
    test pairs, the circuit's calibration) when they are all ablated; None for a layer without
    nodes."""
    out = {}
    for l in range(circuit.require_model().config.n_layer):
        locs = [loc for loc in circuit.nodes if loc.startswith(f"{l}.") and circuit.nodes[loc]]
        count = sum(len(circuit.nodes[loc]) for loc in locs)
        rest = {loc: idx for loc, idx in circuit.nodes.items() if loc not in locs}
        out[l] = (count, circuit.evaluate("test", n=n_pairs, nodes=rest)["loss"] - base_loss if count else None)
    return out


class RankSlider:
    """The top k of a circuit's ranking for any k: ``loss(k)`` (calibrated on the train pairs the
    pruner calibrates on, scored on the first ``n_pairs`` test pairs), ``circuit(k)`` and
    ``layers(k)`` (its per-layer ablation deltas), all memoized. ``kmax``: the slider's range,
    twice the circuit or 16 nodes; ``start()`` evaluates about 12 points up to there (each new
    k the slider visits adds its point to the curve).

    One new k costs three or four small evaluations, about 1.5 s on 2 CPU cores: more than a
    slider step may take. ``prefetch(k)`` computes k - 1 and k + 1 in a background thread while
    the user looks at k (torch releases the GIL, so the kernel keeps answering), so that a step
    of one finds its k ready (``bench/explorer_speed.py`` times it)."""

    def __init__(self, model: GPT, circuit: Circuit, task, order: list[tuple[str, int]], n_pairs: int):
        self.model, self.base, self.task, self.order, self.n_pairs = model, circuit, task, order, n_pairs
        cfg = PruneConfig()
        fit, _ = split_pairs(task, cfg)
        self.ranked = prune_mod.RankedLoss(model, order, fit[:cfg.calib_pairs], task.pairs("test", n=n_pairs),
                                           circuit.ablation, cfg.calib_steps)
        self.kmax = min(len(order), max(2 * circuit.n_nodes, 16))
        self.circuits: dict[int, Circuit] = {}
        self.deltas: dict[int, dict[int, tuple[int, float | None]]] = {}
        self.lock = threading.Lock()     # one computation at a time: the memo dicts are shared
        self.worker: threading.Thread | None = None

    def start(self) -> None:
        n = self.base.n_nodes
        step = max(1, -(-self.kmax // 12))
        for k in sorted({*range(0, self.kmax + 1, step), n}):
            self.loss(k)

    def loss(self, k: int) -> float:
        with self.lock:
            return self.ranked(k)

    def circuit(self, k: int) -> Circuit:
        """The first k nodes of the ranking as a circuit, scored as ``loss(k)``."""
        with self.lock:
            if k not in self.circuits:
                c, loss = self.base, self.ranked(k)
                nodes = prune_mod.top_nodes(self.order, k)
                self.circuits[k] = Circuit(
                    task=c.task, nodes=nodes, edges=compute_edges(self.model, nodes), target=None, loss=loss,
                    ablation=c.ablation, calibration=self.ranked.seen[k][1], model_path=c.model_path,
                    model_fingerprint=c.model_fingerprint, seed=c.seed, config={**c.config, "k": k},
                    model=self.model, task_obj=c.task_obj)
            return self.circuits[k]

    def layers(self, k: int) -> dict[int, tuple[int, float | None]]:
        """``layer_deltas`` of the top k, against ``loss(k)``."""
        c = self.circuit(k)
        with self.lock:
            if k not in self.deltas:
                self.deltas[k] = layer_deltas(c, self.n_pairs, self.ranked(k))
            return self.deltas[k]

    def prefetch(self, k: int) -> None:
        """Compute the slider's neighbours of k in the background (unless a prefetch still runs)."""
        if self.worker is not None and self.worker.is_alive():
            return
        todo = [j for j in (k + 1, k - 1) if 0 <= j <= self.kmax and j not in self.deltas]
        if todo:
            # not a daemon: a script that ends while it runs waits for it (a daemon thread still
            # inside torch when the interpreter shuts down aborts the process)
            self.worker = threading.Thread(target=lambda: [self.layers(j) for j in todo])
            self.worker.start()

    def wait(self) -> None:
        """Until the background prefetch (if any) is done."""
        if self.worker is not None:
            self.worker.join()

    def curve_svg(self, k: int, width: int = 360, height: int = 120) -> str:
        """The loss against k (the points evaluated so far), the target as a dashed line and a
        marker at ``k``, as inline SVG."""
        pts = sorted((kk, v[0]) for kk, v in self.ranked.seen.items())
        kmax, target = max(self.kmax, 1), self.base.target
        lmax = max(max(v for _, v in pts), target or 0.0, 1e-3) * 1.05
        x = lambda kk: 36 + (width - 46) * kk / kmax
        y = lambda v: 8 + (height - 30) * (1 - min(v, lmax) / lmax)
        line = " ".join(f"{x(kk):.1f},{y(v):.1f}" for kk, v in pts)
        parts = [f'<polyline points="{line}" fill="none" stroke="#4e79a7" stroke-width="1.5"/>']
        if target is not None:
            t = y(target)
            parts.append(f'<line x1="36" x2="{width - 10}" y1="{t:.1f}" y2="{t:.1f}" stroke="#c53030" '
                         f'stroke-dasharray="4 3"/><text x="{width - 12}" y="{t - 3:.1f}" font-size="9" '
                         f'text-anchor="end" fill="#c53030">target {target}</text>')
        if k in self.ranked.seen:
            parts.append(f'<circle class="marker" cx="{x(k):.1f}" cy="{y(self.ranked.seen[k][0]):.1f}" r="4" '
                         'fill="#e15759"/>')
        parts.append(f'<text x="36" y="{height - 4}" font-size="9">0</text><text x="{width - 10}" y="{height - 4}" '
                     f'font-size="9" text-anchor="end">k = {kmax}</text><text x="2" y="14" font-size="9">'
                     f'{lmax:.2f}</text><text x="2" y="{height - 22}" font-size="9">0</text>')
        return (f'<svg width="{width}" height="{height}" role="img" aria-label="task loss against k">'
                + "".join(parts) + "</svg>")
