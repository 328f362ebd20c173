"""The interactive circuit explorer: an ipywidgets app over the graph, the node statistics and
live re-evaluation of a circuit (``explore(model, tasks)``).

Choose a task, a target loss (or a number of nodes k) and an ablation; a circuit is looked up
among the ones given (e.g. ``results/circuits/small-sparse``), the ones this explorer computed
and the on-disk cache, and drawn; "compute" finds it with ``cspkit.pruning.prune`` when there
is none. Filters narrow the graph to some location types and layers. Choosing a node shows its
edges and per-token activation heatmaps on the task's prompts and on the corpus contexts where
it is strongest; turning it off re-evaluates the task loss without it. Every callback works
without a browser, so tests drive the widgets from Python.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import ipywidgets as W
import torch
from IPython import get_ipython

from .. import pruning as prune_mod
from .. import tasks as tasks_mod
from ..ablation import ABLATIONS, fingerprint, node_widths
from ..circuit import Circuit, compute_edges, split_pairs
from ..config import PruneConfig, to_dict
from ..model import GPT, node_name, parse_node
from ..paths import cache_dir
from .graph import KIND_NAMES, PLACES, annotated_graph, circuit_graph
from .stats import corpus_stats
from .tokens import heatmap_html, token_html


def _weight(edge: dict) -> str:
    return f"{edge['weight']:+.4f}" if edge["kind"] == "weight" else ""  # residual and q-k links carry none


class Explorer:
    """The explorer's state and widgets; ``widget`` is the whole app (displaying the Explorer
    shows it). Circuits are kept per (task, "target" | "k", value, ablation)."""

    def __init__(self, model: GPT, tasks, circuits=(), target: float = 0.15, ablation: str = "mean",
                 n_pairs: int = 16, seed: int = 0, height: str = "480px", cache: bool = True):
        self.model, self.n_pairs, self.seed, self.height = model, n_pairs, seed, height
        self.tasks = {t.name: t for t in map(tasks_mod.get, [tasks] if isinstance(tasks, str) else tasks)}
        if not self.tasks:
            raise ValueError("explore needs at least one task, e.g. explore(model, ['single_double_quote'])")
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
        if not 1e-3 <= target <= 10.0:
            raise ValueError(f"target {target} is outside 0.001 to 10 (a task loss in nats; chance is 0.693)")
        self.fingerprint = fingerprint(model)
        self.cache_dir = self._default_cache() if cache else None
        # what each task is, for the cache's file names (a task redefined under a name is another)
        self.digests = {name: tasks_mod.pairs_digest(t.pairs("train", n=8)) for name, t in self.tasks.items()}
        self.circuits: dict[tuple, Circuit] = {}
        # (task, ablation) -> the pruning masks (final taus, taus averaged over training), for k circuits
        self.taus: dict[tuple[str, str], tuple[dict, dict]] = {}
        for c in circuits:
            if isinstance(c, Circuit):
                self.add(c)
            elif Path(c).is_dir():  # the circuits in it of the tasks shown
                found = [d for d in (json.loads(f.read_text()) for f in sorted(Path(c).glob("*.json")))
                         if d.get("task") in self.tasks]
                if not found:
                    raise ValueError(f"{c} holds no circuit files of {', '.join(self.tasks)}; pass the folder "
                                     "that holds them, e.g. results/circuits/small-sparse")
                for d in found:
                    self.add(Circuit.from_dict(d, model=model))
            else:
                self.add(Circuit.load(c, model=model))
        self.circuit: Circuit | None = None
        self.g = None                       # the shown circuit's annotated graph
        self.off: set[str] = set()          # nodes turned off on top of the circuit
        self.base_loss = self.current_loss = None
        self._busy = False                  # set while callbacks change widgets themselves

        names = list(self.tasks)
        self.task = W.Dropdown(options=names, value=names[0], description="task")
        self.mode = W.ToggleButtons(options=[("target loss", "target"), ("k nodes", "k")], value="target",
                                    description="size by")
        self.target = W.BoundedFloatText(value=target, min=1e-3, max=10.0, step=0.01, description="target")
        self.k = W.BoundedIntText(value=20, min=1, max=sum(node_widths(model.config).values()), description="k")
        self.ablation = W.Dropdown(options=list(ABLATIONS), value=ablation, description="ablation")
        self.compute = W.Button(description="compute circuit", icon="play",
                                tooltip="find the circuit with cspkit.prune (a minute or more on a CPU)")
        self.status = W.HTML()
        self.log = W.Output()
        self.kinds = {k: W.Checkbox(value=True, description=KIND_NAMES[k], indent=False,
                                    layout=W.Layout(width="auto")) for k in PLACES}
        self.layers = {l: W.Checkbox(value=True, description=f"layer {l}", indent=False, layout=W.Layout(width="auto"))
                       for l in range(model.config.n_layer)}
        self.graph = W.HTML()
        self.node = W.Dropdown(options=[("(choose a node)", None)], description="node")
        self.node_off = W.Checkbox(value=False, description="turn this node off (ablate it)", indent=False)
        self.loss = W.HTML()
        self.details = W.HTML()

        for w in (self.task, self.mode, self.target, self.k, self.ablation):
            w.observe(self._on_choice, names="value")
        for w in (*self.kinds.values(), *self.layers.values()):
            w.observe(lambda _: self.draw(), names="value")
        self.compute.on_click(lambda _: self._on_compute())
        self.node.observe(lambda _: self._on_node(), names="value")
        self.node_off.observe(lambda _: self._on_node_off(), names="value")
        self.widget = W.VBox([
            W.HBox([self.task, self.ablation]),
            W.HBox([self.mode, self.target, self.k, self.compute]),
            self.status, self.log,
            W.HBox([W.Label("show:"), *self.kinds.values()], layout=W.Layout(flex_flow="row wrap")),
            W.HBox([W.Label("layers:"), *self.layers.values()]),
            self.graph,
            W.HBox([self.node, self.node_off]), self.loss, self.details])
        # stable handles for the browser test and for styling
        self.widget.add_class("cspkit-explorer")
        self.task.add_class("cspkit-task")
        self.graph.add_class("cspkit-graph")
        self._on_choice()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ circuits
    def _default_cache(self) -> Path:
        return cache_dir() / "circuits" / self.fingerprint

    def key(self) -> tuple:
        value = round(self.target.value, 6) if self.mode.value == "target" else int(self.k.value)
        return (self.task.value, self.mode.value, value, self.ablation.value)

    def add(self, circuit: Circuit) -> Circuit:
        """Make a circuit of this model available; returns it attached to the model."""
        if circuit.task not in self.tasks:
            raise ValueError(f"circuit for task {circuit.task!r}, which this explorer does not show "
                             f"({', '.join(self.tasks)}); add the task to explore(model, tasks)")
        if circuit.model is None:
            circuit.attach(self.model)
        circuit.task_obj = self.tasks[circuit.task]
        k = circuit.config.get("k")
        value = ("k", int(k)) if k is not None else ("target", round(circuit.target, 6))
        self.circuits[(circuit.task, *value, circuit.ablation)] = circuit
        return circuit

    def _cache_file(self, key: tuple) -> Path | None:
        """The cached circuit of a key: named by the task's prompts too (a task redefined under
        the same name is another task) and the pruning seed."""
        if self.cache_dir is None:
            return None
        task, mode, value, ablation = key
        name = re.sub(r"[^\w.-]", "_", task)
        return self.cache_dir / f"{name}-{self.digests[task][:8]}-{ablation}-{mode}{value}-s{self.seed}.json"

    def lookup(self, key: tuple) -> Circuit | None:
        """The circuit for a key from memory or the on-disk cache, or None."""
        if key not in self.circuits:
            f = self._cache_file(key)
            if f is not None and f.is_file():
                self.add(Circuit.load(f, model=self.model))
        return self.circuits.get(key)

    def compute_circuit(self) -> Circuit:
        """Find the circuit for the current choices (prune, or the top k of the mask ranking),
        with progress bars in the log, cache it and show it."""
        key = self.key()
        task, mode, value, ablation = key
        self.status.value = (f"computing the {html.escape(task)} circuit "
                             f"({html.escape(mode)} {value}, {ablation} ablation)…")
        self._clear_log()
        try:
            with self.log:
                if mode == "target":
                    c = prune_mod.prune(self.model, self.tasks[task], target=value, ablation=ablation, seed=self.seed)
                    self.taus[(task, ablation)] = (c.taus, c.mean_taus)
                else:
                    c = self._top_k(task, value, ablation)
        except Exception as e:
            self._error(e)
            raise
        self.add(c)
        f = self._cache_file(key)
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            c.save(f)
        self._clear_log()
        self.show(c)
        return c

    def _clear_log(self) -> None:
        """Empty the log of progress bars. Outside a kernel the log captures nothing (the bars go
        to the terminal) and IPython's clear_output would print terminal escape codes instead."""
        if getattr(get_ipython(), "kernel", None) is not None:
            self.log.clear_output()

    def _error(self, e: Exception) -> None:
        self.status.value = f"<span style='color:#c53030'>{html.escape(str(e))}</span>"

    def _on_compute(self) -> None:
        try:
            self.compute_circuit()
        except ValueError:
            pass  # the status line already says what went wrong and what to change

    def _top_k(self, task: str, k: int, ablation: str) -> Circuit:
        """The k highest-ranked nodes of the pruning masks, calibrated and scored as prune does
        (on the held-out train pairs), so that its loss compares with a target circuit's."""
        cfg = PruneConfig()
        t = self.tasks[task]
        if (task, ablation) not in self.taus:
            self.taus[(task, ablation)] = prune_mod.train_masks(self.model, t, cfg, ablation, self.seed)
        order = prune_mod.ranking(*self.taus[(task, ablation)])
        fit, heldout = split_pairs(t, cfg)
        ranked = prune_mod.RankedLoss(self.model, order, fit[:cfg.calib_pairs], heldout, ablation, cfg.calib_steps)
        loss = ranked(k)
        nodes = prune_mod.top_nodes(order, k)
        return Circuit(task=task, nodes=nodes, edges=compute_edges(self.model, nodes), target=None, loss=loss,
                       ablation=ablation, calibration=ranked.seen[k][1], model_path=getattr(self.model, "path", None),
                       model_fingerprint=self.fingerprint, seed=self.seed, config={"k": k, **to_dict(cfg)},
                       model=self.model, task_obj=t)

    def _on_choice(self, change=None):
        if self._busy:
            return
        self.target.disabled = self.mode.value != "target"
        self.k.disabled = self.mode.value != "k"
        key = self.key()
        c = self.lookup(key)
        if c is None and (change is None or change["owner"] is self.task):
            c = self._nearest(key)
        if c is not None:
            if c is not self.circuit:
                self.show(c)
            return
        self.circuit = self.g = self.base_loss = self.current_loss = None
        self.off = set()
        self.graph.value = self.loss.value = self.details.value = ""
        self.node.options = [("(choose a node)", None)]
        self.status.value = (f"No {html.escape(key[0])} circuit at {key[1]} {key[2]} with {key[3]} ablation yet: "
                             "press <b>compute circuit</b> (a minute or more on a CPU).")

    def _nearest(self, key: tuple) -> Circuit | None:
        """On a task switch: a circuit of the new task in the same mode and ablation, the one
        closest to the current value (its value is then put in the widget)."""
        task, mode, value, ablation = key
        found = [(abs(k[2] - value), k) for k in self.circuits if (k[0], k[1], k[3]) == (task, mode, ablation)]
        if not found:
            return None
        k = min(found)[1]
        self._busy = True
        try:
            (self.target if mode == "target" else self.k).value = k[2]
        finally:
            self._busy = False
        return self.circuits[k]

    # ------------------------------------------------------------------ drawing
    def show(self, circuit: Circuit) -> None:
        """Draw a circuit and reset the node selection."""
        self.status.value = "computing node statistics (corpus activations, ablation effects)…"
        try:
            with self.log:
                corpus_stats(self.model)
                g = annotated_graph(circuit, self.n_pairs, progress=True)
            base = circuit.evaluate("test", n=self.n_pairs)["loss"]
        except Exception as e:  # the explorer keeps showing the previous circuit, whole
            self._error(e)
            raise
        self._clear_log()
        self.circuit, self.g, self.base_loss, self.off = circuit, g, base, set()
        self._busy = True
        try:
            self.node.options = [("(choose a node)", None)] + [(n, n) for n in circuit.node_names()]
            self.node.value = None
            self.node_off.value = False
        finally:
            self._busy = False
        self.status.value = (f"<b>{html.escape(circuit.task)}</b> ({html.escape(circuit.size_label())}, "
                             f"{html.escape(circuit.ablation)} ablation): "
                             f"{circuit.n_nodes} nodes, {circuit.n_edges} edges, held-out task loss {circuit.loss:.3f}")
        self.details.value = ""
        self.draw()
        self._update_loss()

    def draw(self) -> None:
        """Redraw the graph with the current filters and the nodes turned off greyed out."""
        if self.circuit is None:
            return
        kinds = [k for k, w in self.kinds.items() if w.value]
        layers = [l for l, w in self.layers.items() if w.value]
        net = circuit_graph(self.circuit, self.n_pairs, kinds=kinds, layers=layers, ablated=self.off,
                            height=self.height, graph=self.g)
        self.graph.value = net.iframe()

    def _update_loss(self) -> None:
        """``current_loss``: the circuit's task loss with the nodes turned off ablated too."""
        line = f"task loss on {self.n_pairs} test pairs: circuit {self.base_loss:.4f}"
        self.current_loss = self.base_loss
        if self.off:
            keep = {loc: [i for i in idx if node_name(loc, i) not in self.off]
                    for loc, idx in self.circuit.nodes.items()}
            self.current_loss = self.circuit.evaluate("test", n=self.n_pairs, nodes=keep)["loss"]
            line += (f"; with {len(self.off)} node{'s' * (len(self.off) > 1)} off "
                     f"({html.escape(', '.join(sorted(self.off)))}): {self.current_loss:.4f} "
                     f"({self.current_loss - self.base_loss:+.4f})")
        self.loss.value = line

    # ------------------------------------------------------------------ node details
    def _on_node(self) -> None:
        if self._busy:
            return
        name = self.node.value
        self._busy = True
        try:
            self.node_off.value = name in self.off
        finally:
            self._busy = False
        self.details.value = "" if name is None else self.node_details(name)

    def _on_node_off(self) -> None:
        if self._busy or self.node.value is None:
            return
        (self.off.add if self.node_off.value else self.off.discard)(self.node.value)
        self._update_loss()
        self.draw()

    def node_details(self, name: str) -> str:
        """HTML: the node's statistics, its incoming and outgoing edges, and heatmaps of its
        activation on the task's prompts and on its strongest corpus contexts."""
        d = self.g.nodes[name]
        parts = [f"<h4 style='margin:4px 0'>{html.escape(name)}</h4>"
                 f"{KIND_NAMES[d['kind']]}, layer {d['layer']} · mean activation {d['mean']:+.4f} · "
                 f"ablation effect {d['effect']:+.4f} nats<br>"]
        for title, edges in (("incoming", self.g.in_edges(name, data=True)),
                             ("outgoing", self.g.out_edges(name, data=True))):
            rows = "".join(f"<tr><td>{html.escape(s if title == 'incoming' else t)}</td><td>{e['kind']}</td>"
                           f"<td style='text-align:right'>{_weight(e)}</td></tr>" for s, t, e in edges)
            parts.append(f"<div style='display:inline-block;vertical-align:top;margin-right:24px'><b>{title} edges</b>"
                         f"<table>{rows or '<tr><td>none</td></tr>'}</table></div>")
        parts.append(self._prompt_heatmaps(name))
        parts.append(self._corpus_heatmaps(name))
        return "".join(parts)

    @torch.no_grad()
    def _activations(self, tokens: torch.Tensor, name: str) -> torch.Tensor:
        loc, i = parse_node(name)
        _, cache = self.model.run_with_cache(tokens.to(self.model.device), names=[loc])
        return cache[loc][..., i].float().cpu()

    def _prompt_heatmaps(self, name: str, n_pairs: int = 3, tail: int = 40) -> str:
        pairs = self.tasks[self.circuit.task].pairs("test", n=n_pairs)
        batch = tasks_mod.encode_pairs(pairs, self.model.config.block_size, self.model.encoding)
        acts = self._activations(batch["tokens"], name)
        enc = self.model.encoding
        shown = [(max(0, last + 1 - tail), last) for last in batch["last"].tolist()]   # not the padding
        scale = max(float(acts[r, lo:last + 1].abs().max()) for r, (lo, last) in enumerate(shown)) or 1.0
        rows = []
        for r, (lo, last) in enumerate(shown):
            toks = [enc.decode([t]) for t in batch["tokens"][r, lo:last + 1].tolist()]
            p = pairs[r % len(pairs)]
            cand = p.cand_a if r < len(pairs) else p.cand_b
            rows.append(f"<div style='font-size:11px;color:#555'>prompt {'AB'[r >= len(pairs)]} of pair "
                        f"{r % len(pairs) + 1}, right next token <code>{token_html(cand)}</code></div>"
                        + heatmap_html(toks, acts[r, lo:last + 1].tolist(), scale, mark=last - lo))
        return (f"<p><b>On the task's test prompts</b> (last {tail} tokens; red positive, blue negative, one "
                f"colour scale, ±{scale:.3f}; the last token outlined)</p>" + "".join(rows))

    def _corpus_heatmaps(self, name: str, n: int = 3, before: int = 24, after: int = 4) -> str:
        stats = corpus_stats(self.model)
        out = []
        for sign, title in ((1, "strongest positive"), (-1, "strongest negative")):
            ext = stats.extremes(name, sign, n)
            if not ext:
                out.append(f"<p><b>Corpus: {title} contexts</b>: none (never {'above' if sign > 0 else 'below'} zero "
                           "in the sampled windows)</p>")
                continue
            acts = self._activations(stats.tokens[[w for w, _, _ in ext]], name)
            blocks = []
            for r, (w, t, v) in enumerate(ext):
                lo, hi = max(0, t - before), t + after + 1
                blocks.append(heatmap_html(stats.strings[w][lo:hi], acts[r, lo:hi].tolist(), abs(v), mark=t - lo))
            out.append(f"<p><b>Corpus: {title} contexts</b> (validation windows; the token where it peaks "
                       "outlined)</p>" + "".join(blocks))
        return "".join(out)


def explore(model: GPT, tasks, circuits=(), **kwargs) -> Explorer:
    """The interactive explorer (an ipywidgets app; a notebook cell ending in it shows it) for a
    model on ``tasks`` (names or Task objects). ``circuits``: Circuit objects, circuit files or
    directories of them (e.g. ``results/circuits/small-sparse``), shown without recomputing.
    Keyword arguments: ``target``, ``ablation``, ``n_pairs`` (pairs for losses and ablation
    effects), ``seed``, ``height``, ``cache`` (keep computed circuits in the cspkit cache).

    >>> import cspkit
    >>> model = cspkit.load("small-sparse")
    >>> circuits = cspkit.paths.results_dir() / "circuits" / "small-sparse"
    >>> ex = cspkit.explore(model, ["single_double_quote"], circuits=[circuits], n_pairs=4, cache=False)
    >>> ex.circuit.task
    'single_double_quote'
    >>> ex.node.value = ex.circuit.node_names()[0]
    >>> ex.node_off.value = True            # turn the node off: the task loss is evaluated again
    >>> ex.current_loss != ex.base_loss
    True
    """
    return Explorer(model, tasks, circuits, **kwargs)
