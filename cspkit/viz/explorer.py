"""The interactive circuit explorer: an ipywidgets app over the circuit graph, the node
statistics and live re-evaluation of a circuit (``explore(model, tasks)``).

Choose a task, a target loss and an ablation; a circuit is looked up among the ones given (e.g.
``results/circuits/small-sparse``), the ones this explorer computed and the on-disk cache, and
drawn; "compute" finds it with ``cspkit.pruning.prune`` when there is none. The k slider moves
along the circuit's mask ranking (saved with the circuit, no retraining): the graph, the loss
readout and the marker on the loss-against-k curve follow it. Filters narrow the graph to some
location types and layers (each layer with its node count and what ablating its nodes costs) and
to edges above a weight threshold. Clicking a node in the graph (or choosing it in the list)
shows where it sits (head and channel for q/k/v), its edges, its head's attention pattern, its
activation on the task's class-A and class-B prompts and their difference, and corpus
examples at quantiles of its activation; turning it off re-evaluates the task loss without it.
Given several models (``explore({"small-sparse": sparse, "small-dense": dense}, ...)``), "model"
switches between them and "beside it" draws another model's circuit for the same task, target and
ablation next to the chosen one. Every callback works without a browser, so tests drive the
widgets from Python.
"""
from __future__ import annotations

import base64
import html
import json
import re
import time
from pathlib import Path

import ipywidgets as W
from IPython import get_ipython

from .. import pruning as prune_mod
from .. import tasks as tasks_mod
from ..ablation import ABLATIONS, fingerprint
from ..circuit import Circuit
from ..model import GPT, node_name
from ..paths import cache_dir
from .examples import quantile_examples
from .graph import KIND_NAMES, PLACES, annotated_graph, circuit_graph, legend_html
from .panes import node_pane
from .ranking import RankSlider, circuit_ranking, layer_deltas, trains_masks
from .stats import corpus_stats
from .widget import GraphWidget, graph_png


def model_name(model: GPT) -> str:
    """A model's name in the explorer: its checkpoint directory's name."""
    return Path(model.path).name if getattr(model, "path", None) else "model"


class Explorer:
    """The explorer's state and widgets; ``widget`` is the whole app (displaying the Explorer
    shows it). Circuits are kept per (task, target, ablation); ``shown`` is the circuit drawn: the
    chosen one, or the top k of its ranking while the k slider is elsewhere."""

    def __init__(self, model: GPT | dict[str, GPT], tasks, circuits=(), target: float = 0.15, ablation: str = "mean",
                 n_pairs: int = 16, seed: int = 0, height: str = "480px", cache: bool = True):
        t0 = time.perf_counter()
        self.models = dict(model) if isinstance(model, dict) else {model_name(model): model}
        if not self.models:
            raise ValueError("explore needs a model, or a dict {name: model} of models to switch between")
        self.model = next(iter(self.models.values()))
        self.n_pairs, self.seed, self.height, self.cache = n_pairs, seed, height, cache
        self.tasks = {t.name: t for t in map(tasks_mod.get, [tasks] if isinstance(tasks, str) else tasks)}
        if not self.tasks:
            raise ValueError("explore needs at least one task, e.g. explore(model, ['single_double_quote'])")
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
        if not 1e-3 <= target <= 10.0:
            raise ValueError(f"target {target} is outside 0.001 to 10 (a task loss in nats; chance is 0.693)")
        self.fingerprints = {name: fingerprint(m) for name, m in self.models.items()}
        # what each task is, for the cache's file names (a task redefined under a name is another)
        self.digests = {name: tasks_mod.pairs_digest(t.pairs("train", n=8)) for name, t in self.tasks.items()}
        self.by_model: dict[str, dict[tuple, Circuit]] = {name: {} for name in self.models}
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
                    self.add(Circuit.from_dict(d, model=self._model_of(d.get("model_fingerprint"))))
            else:
                d = json.loads(Path(c).read_text()) if Path(c).is_file() else {}
                self.add(Circuit.load(c, model=self._model_of(d.get("model_fingerprint"))))
        self.circuit: Circuit | None = None      # the chosen circuit
        self.shown: Circuit | None = None        # the circuit drawn (the chosen one or its top k)
        self.g = None                            # the shown circuit's annotated graph
        self.off: set[str] = set()               # nodes turned off on top of the shown circuit
        self.base_loss = self.current_loss = None
        self.order: list[tuple[str, int]] = []   # the chosen circuit's node ranking
        self.ranked: RankSlider | None = None    # the top k of the ranking, for the k slider
        self.layer_deltas: dict[int, float] = {}
        self._busy = False                       # set while callbacks change widgets themselves

        names = list(self.tasks)
        self.model_choice = W.Dropdown(options=list(self.models), description="model")
        self.compare = W.Dropdown(options=[("(none)", None)] + [(m, m) for m in self.models], description="beside it")
        self.task = W.Dropdown(options=names, value=names[0], description="task")
        self.target = W.BoundedFloatText(value=target, min=1e-3, max=10.0, step=0.01, description="target")
        self.ablation = W.Dropdown(options=list(ABLATIONS), value=ablation, description="ablation")
        self.compute = W.Button(description="compute circuit", icon="play",
                                tooltip="find the circuit with cspkit.prune (a minute or more on a CPU)")
        self.status = W.HTML()
        self.log = W.Output()
        self.k = W.IntSlider(value=0, min=0, max=1, description="k nodes", continuous_update=False, disabled=True,
                             layout=W.Layout(width="420px"))
        self.curve = W.HTML()
        self.kinds = {k: W.Checkbox(value=True, description=KIND_NAMES[k], indent=False,
                                    layout=W.Layout(width="auto")) for k in PLACES}
        self.layers = {l: W.Checkbox(value=True, description=f"layer {l}", indent=False, layout=W.Layout(width="auto"))
                       for l in range(max(m.config.n_layer for m in self.models.values()))}
        self.threshold = W.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.01, description="|weight| ≥",
                                       continuous_update=False, readout_format=".3f")
        self.legend = W.HTML()
        self.graph = GraphWidget()
        self.graph.height = height
        self.other_status = W.HTML()
        self.other_graph = GraphWidget()
        self.other_graph.height = height
        self.other = W.VBox([self.other_status, self.other_graph], layout=W.Layout(display="none", width="50%"))
        self.node = W.Dropdown(options=[("(choose a node)", None)], description="node")
        self.node_off = W.Checkbox(value=False, description="turn this node off (ablate it)", indent=False)
        self.loss = W.HTML()
        self.details = W.HTML()

        for w in (self.task, self.target, self.ablation):
            w.observe(self._on_choice, names="value")
        self.model_choice.observe(lambda _: self._on_model(), names="value")
        self.compare.observe(lambda _: self.draw_other(), names="value")
        for w in (*self.kinds.values(), *self.layers.values(), self.threshold):
            w.observe(lambda _: self.draw(), names="value")
        self.k.observe(lambda _: self._on_k(), names="value")
        self.compute.on_click(lambda _: self._on_compute())
        self.graph.observe(lambda _: self._on_click(), names="selected")
        self.node.observe(lambda _: self._on_node(), names="value")
        self.node_off.observe(lambda _: self._on_node_off(), names="value")
        self.widget = W.VBox([
            W.HBox([self.model_choice, self.compare]) if len(self.models) > 1 else W.HBox([]),
            W.HBox([self.task, self.ablation]),
            W.HBox([self.target, self.compute]),
            self.status, self.log,
            W.HBox([self.k, self.curve]),
            W.HBox([W.Label("show:"), *self.kinds.values()], layout=W.Layout(flex_flow="row wrap")),
            W.HBox([W.Label("layers:"), *self.layers.values()], layout=W.Layout(flex_flow="row wrap")),
            self.threshold,
            self.legend, W.HBox([W.VBox([self.graph], layout=W.Layout(flex="1")), self.other]),
            W.HBox([self.node, self.node_off]), self.loss, self.details])
        # stable handles for the browser test and for styling
        self.widget.add_class("cspkit-explorer")
        self.task.add_class("cspkit-task")
        self.model_choice.add_class("cspkit-model")
        self.compare.add_class("cspkit-compare")
        self.other_graph.add_class("cspkit-other-graph")
        self.k.add_class("cspkit-k")
        self.graph.add_class("cspkit-graph")
        self.details.add_class("cspkit-details")
        self.loss.add_class("cspkit-loss")
        self._on_choice()
        # the node pane's corpus examples, loaded and checked against the corpus now rather than at
        # the first click (finding the corpus's files alone takes about a second)
        quantile_examples(self.model)
        self.load_seconds = time.perf_counter() - t0

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        if self.graph.net is not None:   # where widgets cannot run: the graph as a picture
            data["image/png"] = base64.b64encode(graph_png(self.graph.net)).decode()
        return bundle

    # ------------------------------------------------------------------ models and circuits
    @property
    def circuits(self) -> dict[tuple, Circuit]:
        """The circuits of the chosen model, by (task, "target", target, ablation)."""
        return self.by_model[self.model_choice.value]

    def _model_of(self, fp: str | None) -> GPT:
        """The model a circuit was found in (by its weights' fingerprint); with one model, that one."""
        for name, f in self.fingerprints.items():
            if f == fp:
                return self.models[name]
        if len(self.models) == 1:
            return self.model        # Circuit.attach then says what does not match
        raise ValueError(f"a circuit was found in model {fp}, none of {', '.join(self.models)}; give its model too")

    def _cache_dir(self, name: str) -> Path | None:
        return cache_dir() / "circuits" / self.fingerprints[name] if self.cache else None

    def _on_model(self) -> None:
        """Another model: its circuit for the current task, target and ablation (or the nearest)."""
        self.model = self.models[self.model_choice.value]
        self.circuit = None
        self._on_choice({"owner": self.task})
        self.draw_other()

    def key(self) -> tuple:
        return (self.task.value, "target", round(self.target.value, 6), self.ablation.value)

    def add(self, circuit: Circuit) -> Circuit:
        """Make a circuit of this model available; returns it attached to the model."""
        if circuit.task not in self.tasks:
            raise ValueError(f"circuit for task {circuit.task!r}, which this explorer does not show "
                             f"({', '.join(self.tasks)}); add the task to explore(model, tasks)")
        if circuit.model is None:
            circuit.attach(self._model_of(circuit.model_fingerprint))
        name = next((n for n, m in self.models.items() if m is circuit.model), None)
        if name is None:
            raise ValueError("the circuit's model is not one of the explorer's; pass the model to explore()")
        circuit.task_obj = self.tasks[circuit.task]
        k = circuit.config.get("k")
        value = ("k", int(k)) if k is not None else ("target", round(circuit.target, 6))
        self.by_model[name][(circuit.task, *value, circuit.ablation)] = circuit
        return circuit

    def _cache_file(self, key: tuple, model: str | None = None) -> Path | None:
        """The cached circuit of a key in a model (default the chosen one): named by the task's
        prompts too (a task redefined under the same name is another task) and the pruning seed."""
        d = self._cache_dir(model or self.model_choice.value)
        if d is None:
            return None
        task, mode, value, ablation = key
        name = re.sub(r"[^\w.-]", "_", task)
        return d / f"{name}-{self.digests[task][:8]}-{ablation}-{mode}{value}-s{self.seed}.json"

    def lookup(self, key: tuple, model: str | None = None) -> Circuit | None:
        """The circuit for a key in a model (default the chosen one) from memory or the on-disk
        cache, or None."""
        model = model or self.model_choice.value
        if key not in self.by_model[model]:
            f = self._cache_file(key, model)
            if f is not None and f.is_file():
                self.add(Circuit.load(f, model=self.models[model]))
        return self.by_model[model].get(key)

    def compute_circuit(self) -> Circuit:
        """Find the circuit for the current choices with cspkit.prune (progress bars in the
        log), cache it and show it."""
        key = self.key()
        task, _, value, ablation = key
        self.status.value = f"computing the {html.escape(task)} circuit (target {value}, {ablation} ablation)…"
        self._clear_log()
        try:
            with self.log:
                c = prune_mod.prune(self.model, self.tasks[task], target=value, ablation=ablation, seed=self.seed)
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

    def _on_choice(self, change=None):
        if self._busy:
            return
        key = self.key()
        c = self.lookup(key)
        if c is None and (change is None or change["owner"] is self.task):
            c = self._nearest(key)
        if c is not None:
            if c is not self.circuit:
                self.show(c)
            return
        self.circuit = self.shown = self.g = self.base_loss = self.current_loss = self.ranked = None
        self.off, self.order = set(), []
        self.curve.value = self.loss.value = self.details.value = self.legend.value = ""
        self.graph.nodes, self.graph.edges, self.graph.net = [], [], None
        self.node.options = [("(choose a node)", None)]
        self.k.disabled = True
        self.status.value = (f"No {html.escape(key[0])} circuit at target {key[2]} with {key[3]} ablation yet: "
                             "press <b>compute circuit</b> (a minute or more on a CPU).")
        self.draw_other()

    def _nearest(self, key: tuple) -> Circuit | None:
        """On a task switch: a circuit of the new task with the same ablation, the one whose
        target is closest to the current one (its target is then put in the widget)."""
        task, mode, value, ablation = key
        found = [(abs(k[2] - value), k) for k in self.circuits if (k[0], k[1], k[3]) == (task, mode, ablation)]
        if not found:
            return None
        k = min(found)[1]
        self._busy = True
        try:
            self.target.value = k[2]
        finally:
            self._busy = False
        return self.circuits[k]

    # ------------------------------------------------------------------ the k slider
    def _start_ranking(self, circuit: Circuit) -> None:
        """Set the k slider and the loss-against-k curve up for a newly chosen circuit."""
        task = self.tasks[circuit.task]
        if trains_masks(circuit):
            self.status.value = f"training the masks of {html.escape(circuit.task)} for the k slider (once)…"
        with self.log:
            self.order = circuit_ranking(self.model, circuit, task)
        if self.ranked is not None:
            self.ranked.wait()           # its background prefetch would compete for the cores
        self.ranked = RankSlider(self.model, circuit, task, self.order, self.n_pairs)
        self.ranked.start()
        self._busy = True
        try:
            # an empty circuit that meets its target has no ranking: nothing to slide along
            self.k.max, self.k.value, self.k.disabled = self.ranked.kmax, circuit.n_nodes, self.ranked.kmax == 0
        finally:
            self._busy = False

    def _on_k(self) -> None:
        if self._busy or self.circuit is None:
            return
        k = self.k.value
        self.display(self.circuit if k == self.circuit.n_nodes else self.ranked.circuit(k))

    # ------------------------------------------------------------------ drawing
    def show(self, circuit: Circuit) -> None:
        """Choose a circuit: set the k slider up on its ranking and draw it."""
        self.status.value = "computing node statistics (corpus activations, ablation effects)…"
        try:
            with self.log:
                corpus_stats(self.model)
            self.circuit = circuit
            self._start_ranking(circuit)
        except Exception as e:  # the explorer keeps showing the previous circuit, whole
            self._error(e)
            raise
        self._clear_log()
        self.display(circuit)

    def display(self, circuit: Circuit) -> None:
        """Draw ``circuit`` (the chosen one, with ablation effects as node sizes, or a top-k one,
        without) and reset the node selection."""
        measured = self.n_pairs if circuit is self.circuit else 0
        with self.log:
            g = annotated_graph(circuit, measured, progress=measured > 0)
        self._clear_log()
        base = self.ranked.loss(self.k.value) if circuit is not self.circuit else \
            circuit.evaluate("test", n=self.n_pairs)["loss"]
        self.shown, self.g, self.base_loss, self.off = circuit, g, base, set()
        weights = [abs(w) for *_, w in circuit.edges]
        self._busy = True
        try:
            self.node.options = [("(choose a node)", None)] + [(n, n) for n in circuit.node_names()]
            self.node.value = None
            self.node_off.value = False
            self.graph.selected = ""
            top = max(weights, default=1.0) or 1.0
            self.threshold.max = top
            self.threshold.step = top / 100
            self.threshold.value = min(self.threshold.value, top)
        finally:
            self._busy = False
        size = circuit.size_label() if circuit is self.circuit else f"top {self.k.value} of its ranking"
        self.status.value = (f"<b>{html.escape(circuit.task)}</b> ({html.escape(size)}, "
                             f"{html.escape(circuit.ablation)} ablation): {circuit.n_nodes} nodes, "
                             f"{circuit.n_edges} edges, held-out task loss {circuit.loss:.3f}")
        self.details.value = ""
        self._layer_stats()
        self.draw()
        self._update_loss()
        self.curve.value = self.ranked.curve_svg(self.k.value)
        self.ranked.prefetch(self.k.value)

    def _layer_stats(self) -> None:
        """Per layer: the shown circuit's nodes there, and the task loss change when they are all
        ablated (on n_pairs test pairs), next to the layer filters."""
        c = self.shown
        stats = layer_deltas(c, self.n_pairs, self.base_loss) if c is self.circuit else self.ranked.layers(self.k.value)
        self.layer_deltas = {l: d for l, (_, d) in stats.items() if d is not None}
        for l, box in self.layers.items():
            count, delta = stats.get(l, (0, None))
            box.description = f"layer {l}: {count} nodes" + ("" if delta is None else f", ablated {delta:+.3f}")

    def draw(self) -> None:
        """Redraw the graph with the current filters and the nodes turned off greyed out."""
        if self.shown is None or self._busy:
            return
        kinds = [k for k, w in self.kinds.items() if w.value]
        layers = [l for l, w in self.layers.items() if w.value]
        net = circuit_graph(self.shown, self.n_pairs, kinds=kinds, layers=layers, ablated=self.off,
                            height=self.height, graph=self.g, min_weight=self.threshold.value)
        self.graph.show(net)
        self.legend.value = legend_html(net.title)
        self.draw_other()

    def draw_other(self) -> None:
        """Beside the graph: the circuit of the model chosen under "beside it" for the same task,
        target and ablation, with the same filters (or why there is none)."""
        other = self.compare.value
        self.other.layout.display = "none" if other is None else "flex"
        if other is None:
            return
        key = self.key()
        c = self.lookup(key, other)
        if c is None:
            self.other_graph.nodes, self.other_graph.edges, self.other_graph.net = [], [], None
            self.other_status.value = (f"<b>{html.escape(other)}</b>: no {html.escape(key[0])} circuit at target "
                                       f"{key[2]} with {key[3]} ablation yet (choose it as the model and compute it)")
            return
        kinds = [k for k, w in self.kinds.items() if w.value]
        layers = [l for l, w in self.layers.items() if w.value and l < c.model.config.n_layer]
        net = circuit_graph(c, self.n_pairs, kinds=kinds, layers=layers, height=self.height,
                            min_weight=self.threshold.value)
        self.other_graph.show(net)
        self.other_status.value = (f"<b>{html.escape(other)}</b>: {c.n_nodes} nodes, {c.n_edges} edges, "
                                   f"held-out task loss {c.loss:.3f}")

    def _update_loss(self) -> None:
        """``current_loss``: the shown circuit's task loss with the nodes turned off ablated too."""
        line = f"task loss on {self.n_pairs} test pairs: circuit {self.base_loss:.4f}"
        self.current_loss = self.base_loss
        if self.off:
            keep = {loc: [i for i in idx if node_name(loc, i) not in self.off]
                    for loc, idx in self.shown.nodes.items()}
            self.current_loss = self.shown.evaluate("test", n=self.n_pairs, nodes=keep)["loss"]
            line += (f"; with {len(self.off)} node{'s' * (len(self.off) > 1)} off "
                     f"({html.escape(', '.join(sorted(self.off)))}): {self.current_loss:.4f} "
                     f"({self.current_loss - self.base_loss:+.4f})")
        self.loss.value = line

    # ------------------------------------------------------------------ node details
    def _on_click(self) -> None:
        """A node clicked in the graph becomes the chosen node."""
        if not self._busy and self.graph.selected in {v for _, v in self.node.options if v}:
            self.node.value = self.graph.selected

    def _on_node(self) -> None:
        if self._busy:
            return
        name = self.node.value
        self._busy = True
        try:
            self.node_off.value = name in self.off
            self.graph.selected = name or ""
        finally:
            self._busy = False
        self.details.value = "" if name is None else node_pane(self.model, self.g, self.tasks[self.shown.task], name)

    def _on_node_off(self) -> None:
        if self._busy or self.node.value is None:
            return
        (self.off.add if self.node_off.value else self.off.discard)(self.node.value)
        self._update_loss()
        self.draw()


def explore(model: GPT, tasks, circuits=(), **kwargs) -> Explorer:
    """The interactive explorer (an ipywidgets app; a notebook cell ending in it shows it) for a
    model, or a dict {name: model} of models to switch between and compare, on ``tasks`` (names or
    Task objects). ``circuits``: Circuit objects, circuit files or directories of them (e.g.
    ``results/circuits/small-sparse``), shown without recomputing; each goes to the model it was
    found in (by the weights' fingerprint).
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
