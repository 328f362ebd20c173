"""Circuit graphs: a circuit drawn as a pyvis network with a layered layout.

Layers run left to right (attention, then MLP); node locations sit in fixed bands (reads,
q/k/v, neurons, writes). Node colour is the location type, node size the node's ablation
effect; edge width is |weight|, edge colour its sign. The HTML is self-contained and offline:
vis-network is inlined from the pyvis package instead of pyvis's template (which links CSS and
JS from CDNs), and a Content-Security-Policy forbids every request to any host and every script
but its own. Every string from the vocabulary is HTML-escaped. Notebooks show the page in a
sandboxed ``<iframe srcdoc>``, which JupyterLab 4 draws with no network access.
"""
from __future__ import annotations

import html
import json
import math
import secrets
from collections import defaultdict
from pathlib import Path

import jinja2
import networkx as nx
import pyvis
from markupsafe import Markup
from pyvis.network import Network

from ..ablation import node_means
from ..circuit import Circuit
from ..files import atomic_path, atomic_write
from ..model import node_name
from .stats import ablation_effects, as_node, corpus_stats
from .tokens import token_html

# Location type -> (band, sublayer, stage, lane): the band is the row of the drawing; the
# sublayer (attention 0, MLP 1) and the stage (read 0, inside 1, write 2) place the column; q, k
# and v share their band in three lanes side by side, other cells wrap into sub-columns.
PLACES = {"attn.in": ("reads", 0, 0, None), "attn.q": ("q/k/v", 0, 1, -1), "attn.k": ("q/k/v", 0, 1, 0),
          "attn.v": ("q/k/v", 0, 1, 1), "attn.out": ("writes", 0, 2, None), "mlp.in": ("reads", 1, 0, None),
          "mlp.neuron": ("neurons", 1, 1, None), "mlp.out": ("writes", 1, 2, None)}
BANDS = ("reads", "q/k/v", "neurons", "writes")
KIND_COLORS = {"attn.in": "#4e79a7", "attn.q": "#f28e2b", "attn.k": "#edc948", "attn.v": "#59a14f",
               "attn.out": "#e15759", "mlp.in": "#76b7b2", "mlp.neuron": "#b07aa1", "mlp.out": "#ff9da7"}
KIND_NAMES = {"attn.in": "attention read", "attn.q": "query", "attn.k": "key", "attn.v": "value",
              "attn.out": "attention write", "mlp.in": "MLP read", "mlp.neuron": "MLP neuron",
              "mlp.out": "MLP write"}
_SHORT = {"attn.in": "in", "attn.q": "q", "attn.k": "k", "attn.v": "v", "attn.out": "out", "mlp.in": "in",
          "mlp.neuron": "n", "mlp.out": "out"}
EDGE_COLORS = {"positive": "#2b6cb0", "negative": "#c53030", "residual": "#b8b8b8", "qk": "#805ad5"}
# layout in canvas pixels: sublayer columns, stages within one, lanes / sub-columns, rows, gap between bands
_COL, _STAGE, _LANE, _ROW, _GAP = 400, 130, 32, 34, 50
_WRAP, _MAX_SUB = 6, 4     # a cell of more than _WRAP nodes wraps into up to _MAX_SUB sub-columns
VIS_JS = Path(pyvis.__file__).parent / "templates" / "lib" / "vis-9.1.2" / "vis-network.min.js"


# --------------------------------------------------------------------------- the graph
def annotated_graph(circuit: Circuit, n_pairs: int = 16, progress: bool = False) -> nx.DiGraph:
    """``circuit.to_networkx()`` with, per node, its mean activation (``mean``), its ablation
    effect (``effect``, measured on ``n_pairs`` test pairs, kept as the graph's ``effect_pairs``;
    n_pairs 0: not measured, every effect 0) and the corpus tokens where it is most positive and
    most negative (``top_tokens`` and ``bottom_tokens``, JSON lists of [token, activation])."""
    model = circuit.require_model("drawing it")
    g = circuit.to_networkx()
    means = node_means(model)
    effects = ablation_effects(circuit, n_pairs, progress=progress) if n_pairs else dict.fromkeys(g.nodes, 0.0)
    stats = corpus_stats(model)
    for name, d in g.nodes(data=True):
        d["mean"] = float(means[d["location"]][d["index"]])
        d["effect"] = effects[name]
        d["top_tokens"] = json.dumps([[t, round(v, 4)] for t, v in stats.top_tokens(name)])
        d["bottom_tokens"] = json.dumps([[t, round(v, 4)] for t, v in stats.top_tokens(name, sign=-1)])
    g.graph["effect_pairs"] = n_pairs
    return g


def node_label(kind: str, index: int, d_head: int) -> str:
    """A node's short label: ``q h3.ch5`` for query, key and value channels (head 3, its channel
    5), else the location type's letter and the index (``n37``, ``in112``)."""
    if kind in ("attn.q", "attn.k", "attn.v"):
        return f"{_SHORT[kind]} h{index // d_head}.ch{index % d_head}"
    return f"{_SHORT[kind]}{index}"


def _tokens_line(items: list[list]) -> str:
    return ", ".join(f"<code>{token_html(t)}</code>&nbsp;{v:+.2f}" for t, v in items) or "none"


def node_place(kind: str, layer: int, index: int, d_head: int) -> str:
    """Where a node sits, in words: ``query, layer 3, head 6, channel 2``."""
    where = f"{KIND_NAMES[kind]}, layer {layer}"
    if kind in ("attn.q", "attn.k", "attn.v"):
        where += f", head {index // d_head}, channel {index % d_head}"
    return where


def _node_title(name: str, d: dict, n_pairs: int, d_head: int) -> str:
    return (f"<b>{html.escape(name)}</b><br>{node_place(d['kind'], d['layer'], d['index'], d_head)}<br>"
            f"mean activation {d['mean']:+.4f}<br>"
            + (f"ablation effect {d['effect']:+.4f} nats (task loss change when it is ablated too, {n_pairs} pairs)<br>"
               if n_pairs else "ablation effect not measured (node sizes equal)<br>")
            + f"top tokens: {_tokens_line(json.loads(d['top_tokens']))}<br>"
            f"most negative at: {_tokens_line(json.loads(d['bottom_tokens']))}")


def _edge_title(s: str, t: str, d: dict) -> str:
    head = f"{html.escape(s)} → {html.escape(t)}<br>"
    if d["kind"] == "weight":
        return head + f"weight {d['weight']:+.4f}"
    return head + ("residual stream (same channel, later read)" if d["kind"] == "residual"
                   else "query-key pairing (meet in the attention score)")


def _layout(g: nx.DiGraph):
    """Node positions, and the column labels, band labels and bounding box, in canvas pixels.
    Only (layer, sublayer) pairs that hold nodes get a column."""
    cells = defaultdict(list)
    for n, d in g.nodes(data=True):
        band, sub, stage, lane = PLACES[d["kind"]]
        cells[(band, d["layer"], sub, stage, lane)].append((d["index"], n))
    shape = {}  # cell -> (sub-columns, rows)
    for cell, members in cells.items():
        subs = 1 if cell[4] is not None else min(_MAX_SUB, math.ceil(len(members) / _WRAP))
        shape[cell] = (subs, math.ceil(len(members) / subs))
    rows = {b: max((r for c, (_, r) in shape.items() if c[0] == b), default=0) for b in BANDS}
    top, y = {}, 0
    for b in BANDS:
        if rows[b]:
            top[b] = y
            y += (rows[b] - 1) * _ROW + _GAP
    column = {ls: j for j, ls in enumerate(sorted({(c[1], c[2]) for c in cells}))}
    pos = {}
    for cell, members in cells.items():
        band, layer, sub, stage, lane = cell
        subs, _ = shape[cell]
        x0 = column[(layer, sub)] * _COL + stage * _STAGE + (lane or 0) * _LANE
        for j, (_, n) in enumerate(sorted(members)):
            r, c = divmod(j, subs)
            pos[n] = (x0 + (c - (subs - 1) / 2) * _LANE, top[band] + r * _ROW)
    columns = [{"x": j * _COL + _STAGE, "y": -50, "label": f"L{l} {'mlp' if s else 'attn'}"}
               for (l, s), j in column.items()]
    bands = [{"x": -_MAX_SUB * _LANE / 2 - 20, "y": top[b] + (rows[b] - 1) * _ROW / 2, "label": b}
             for b in BANDS if rows[b]]
    box = {"x0": -_MAX_SUB * _LANE / 2 - 90,
           "x1": max(len(column) - 1, 0) * _COL + 2 * _STAGE + _MAX_SUB * _LANE / 2 + 20,
           "y0": -80, "y1": max(y - _GAP, 0) + 40}
    return pos, (columns, bands, box)


class CircuitNetwork(Network):
    """A pyvis Network of a circuit whose HTML is self-contained and works offline.

    ``generate_html()`` / ``write_html(path)``: the standalone page; ``iframe()``: the page in a
    sandboxed ``<iframe srcdoc>`` (what notebooks display); ``graph``: the annotated networkx
    graph of the drawn nodes; ``write_graphml(path)``."""

    def __init__(self, graph: nx.DiGraph, title: str, layout, height: str = "640px"):
        super().__init__(height=height, width="100%", directed=True, cdn_resources="in_line")
        self.graph, self.title = graph, title
        self.columns, self.bands, self.box = layout

    def generate_html(self, name: str = "index.html", local: bool = True, notebook: bool = False) -> str:
        nodes, edges, _, height, _, _ = self.get_network_data()
        n_weight = sum(1 for e in edges if e["kind"] == "weight")
        nonce = secrets.token_urlsafe(16)
        self.html = _TEMPLATE.render(
            nonce=nonce, title=self.title, height=height, nodes=nodes, edges=edges, options=self.options,
            columns=self.columns, bands=self.bands, box=self.box, legend=Markup(legend_html(self.title)),
            vis_js=Markup(VIS_JS.read_text(encoding="utf-8")), n_nodes=len(nodes), n_edges=n_weight,
            task=self.graph.graph.get("task", ""))
        return self.html

    def write_html(self, name, local: bool = True, notebook: bool = False, open_browser: bool = False) -> Path:
        """The standalone page, written as UTF-8 (pyvis writes in the locale's encoding)."""
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(name, self.generate_html())
        return Path(name)

    def iframe(self) -> str:
        """The page inside a sandboxed iframe (scripts run, but in an opaque origin: the page can
        reach neither the notebook nor the server)."""
        return (f'<iframe sandbox="allow-scripts" title="{html.escape(self.title)}" '
                f'style="width:100%;height:calc({self.height} + 70px);border:0" '
                f'srcdoc="{html.escape(self.generate_html())}"></iframe>')

    def _repr_html_(self) -> str:
        return self.iframe()

    def show(self, name: str | None = None, local: bool = True, notebook: bool = True):
        """Display in a notebook through the sandboxed iframe (pyvis's own show() points an
        IFrame at a file); with ``name``, also write the standalone page there."""
        from IPython.display import HTML
        if name:
            self.write_html(name)
        return HTML(self.iframe())

    def write_graphml(self, path) -> Path:
        g = self.graph.copy()
        g.graph = {k: v for k, v in g.graph.items() if v is not None}  # GraphML has no null (a k circuit's target)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            nx.write_graphml(g, str(tmp))
        return path


def circuit_graph(circuit: Circuit, n_pairs: int = 16, kinds=None, layers=None, ablated=(),
                  height: str = "640px", progress: bool = False, graph: nx.DiGraph | None = None,
                  min_weight: float = 0.0) -> CircuitNetwork:
    """A circuit as a CircuitNetwork (a pyvis Network). ``kinds`` (location types such as
    ``"mlp.neuron"``) and ``layers`` keep only those nodes; ``ablated`` node names are drawn
    greyed out; ``min_weight`` leaves out weight edges with a smaller |weight| (the edge-strength
    threshold); ``n_pairs`` test pairs measure the ablation effects (node sizes). ``graph``: the
    circuit's ``annotated_graph`` already computed (the explorer redraws from it). A notebook
    cell ending in the network draws it; ``write_html(path)`` writes the standalone page.

    >>> import cspkit
    >>> model = cspkit.load("small-sparse")
    >>> path = cspkit.paths.results_dir() / "circuits" / "small-sparse" / "single_double_quote.json"
    >>> circuit = cspkit.Circuit.load(path, model=model)
    >>> net = cspkit.circuit_graph(circuit, n_pairs=4, kinds="mlp.neuron")
    >>> {n["kind"] for n in net.nodes}
    {'mlp.neuron'}
    >>> "vis.Network" in net.generate_html()
    True
    """
    kinds = [kinds] if isinstance(kinds, str) else kinds
    layers = [layers] if isinstance(layers, int) else layers
    bad = set(kinds or ()) - set(PLACES)
    if bad:
        raise ValueError(f"unknown location types {sorted(bad)}; choose from {', '.join(PLACES)}")
    n_layer = circuit.require_model("drawing it").config.n_layer
    bad = [l for l in layers or () if not (isinstance(l, int) and 0 <= l < n_layer)]
    if bad:
        raise ValueError(f"layers {bad} are not layers of this model; choose from 0 to {n_layer - 1}")
    off = {node_name(*as_node(a)) for a in ablated}
    unknown = sorted(off - set(circuit.node_names()))
    if unknown:
        raise ValueError(f"ablated nodes {unknown} are not in the circuit; name nodes of circuit.node_names()")
    g = graph if graph is not None else annotated_graph(circuit, n_pairs, progress)
    keep = [n for n, d in g.nodes(data=True)
            if (kinds is None or d["kind"] in kinds) and (layers is None or d["layer"] in layers)]
    shown = g.subgraph(keep).copy()
    shown.remove_edges_from([(s, t) for s, t, d in shown.edges(data=True)
                             if d["kind"] == "weight" and abs(d["weight"]) < min_weight])
    d_head, pairs = circuit.model.config.d_head, g.graph.get("effect_pairs", n_pairs)
    pos, layout = _layout(shown)
    title = (f"{circuit.task}: {circuit.n_nodes} nodes, {circuit.n_edges} edges, task loss {circuit.loss:.3f} "
             f"({circuit.size_label()}), {circuit.ablation} ablation"
             + (f"; showing {shown.number_of_nodes()} nodes" if len(keep) < g.number_of_nodes() else ""))
    net = CircuitNetwork(shown, title, layout, height)
    peak = max((abs(d["effect"]) for _, d in g.nodes(data=True)), default=0.0) or 1.0
    for n, d in shown.nodes(data=True):
        x, y = pos[n]
        color = "#d9d9d9" if n in off else KIND_COLORS[d["kind"]]
        net.add_node(n, label=node_label(d["kind"], d["index"], d_head), title=_node_title(n, d, pairs, d_head),
                     x=x, y=y,
                     size=7 + 18 * math.sqrt(abs(d["effect"]) / peak), color={"background": color, "border": "#333333"},
                     shapeProperties={"borderDashes": [3, 3] if n in off else False}, kind=d["kind"], layer=d["layer"])
    wpeak = max((abs(d["weight"]) for *_, d in shown.edges(data=True) if d["kind"] == "weight"), default=0.0) or 1.0
    for s, t, d in shown.edges(data=True):
        style = {"title": _edge_title(s, t, d), "kind": d["kind"]}
        if d["kind"] == "weight":
            style.update(width=1 + 5 * abs(d["weight"]) / wpeak,
                         color=EDGE_COLORS["positive" if d["weight"] > 0 else "negative"])
        else:
            style.update(width=1, color=EDGE_COLORS[d["kind"]], dashes=True,
                         smooth={"enabled": True, "type": "curvedCW", "roundness": 0.15})
        net.add_edge(s, t, **style)
    net.options = {"physics": {"enabled": False},
                   "interaction": {"hover": True, "tooltipDelay": 80},
                   "nodes": {"shape": "dot", "borderWidth": 1, "font": {"size": 10, "face": "monospace"}},
                   "edges": {"smooth": False, "arrows": {"to": {"enabled": True, "scaleFactor": 0.4}}}}
    return net


def legend_html(title: str) -> str:
    """The graph's title and legend (location colours, edge colours, what sizes mean), styled
    inline so that it reads the same in the graph page and beside the explorer's widget."""
    sw = "display:inline-block;width:10px;height:10px;border-radius:5px;margin:0 3px 0 10px"
    ln = "display:inline-block;width:18px;height:3px;margin:0 3px 3px 10px"
    kinds = "".join(f'<span style="{sw};background:{c}"></span>{KIND_NAMES[k]}' for k, c in KIND_COLORS.items())
    edges = "".join(f'<span style="{ln};background:{EDGE_COLORS[key]}"></span>{label}' for key, label in
                    (("positive", "positive weight"), ("negative", "negative weight"),
                     ("residual", "residual stream"), ("qk", "query-key pairing")))
    return (f"<div style='font:12px sans-serif;line-height:1.6'><b>{html.escape(title)}</b><br>{kinds}<br>{edges}; "
            "node size: ablation effect, edge width: |weight|; hover for details</div>")


_TEMPLATE = jinja2.Environment(autoescape=True).from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; script-src 'nonce-{{ nonce }}'; style-src 'unsafe-inline'">
<title>{{ title }}</title>
<style>
body { margin: 0; font: 12px sans-serif; background: #fff; }
#legend { padding: 4px 8px; line-height: 1.6; }
#mynetwork { width: 100%; height: {{ height }}; border-top: 1px solid #ddd; }
div.vis-tooltip { position: absolute; visibility: hidden; padding: 5px; white-space: nowrap; font-size: 12px;
  background: #f5f4ed; border: 1px solid #808074; border-radius: 3px; box-shadow: 3px 3px 10px rgba(0,0,0,.2);
  pointer-events: none; z-index: 5; }
div.vis-tooltip code { background: #e8e8e8; white-space: pre; padding: 0 2px; }
</style></head>
<body data-task="{{ task }}" data-nodes="{{ n_nodes }}" data-edges="{{ n_edges }}">
<div id="legend">{{ legend }}</div>
<div id="mynetwork"></div>
<script nonce="{{ nonce }}">{{ vis_js }}</script>
<script nonce="{{ nonce }}">
const nodes = {{ nodes|tojson }};
const edges = {{ edges|tojson }};
const columns = {{ columns|tojson }}, bands = {{ bands|tojson }}, box = {{ box|tojson }};
// vis-network shows a string title as plain text; these titles are HTML built from escaped parts
function element(markup) { const d = document.createElement("div"); d.innerHTML = markup; return d; }
for (const item of nodes.concat(edges)) item.title = element(item.title);
const container = document.getElementById("mynetwork");
const network = new vis.Network(container, {nodes: new vis.DataSet(nodes), edges: new vis.DataSet(edges)},
                                {{ options|tojson }});
// fit the layer and band labels too, not only the nodes (vis-network's fit())
function view() {
  const scale = Math.min(container.clientWidth / (box.x1 - box.x0), container.clientHeight / (box.y1 - box.y0), 1.5);
  network.moveTo({position: {x: (box.x0 + box.x1) / 2, y: (box.y0 + box.y1) / 2}, scale: scale});
}
network.once("afterDrawing", view);
window.addEventListener("resize", view);
network.on("afterDrawing", function (ctx) {
  ctx.save();
  ctx.font = "13px sans-serif";
  ctx.fillStyle = "#555";
  ctx.textAlign = "center";
  for (const c of columns) ctx.fillText(c.label, c.x, c.y);
  ctx.textAlign = "right";
  for (const b of bands) ctx.fillText(b.label, b.x, b.y + 4);
  ctx.restore();
  document.body.dataset.drawn = "1";
});
</script></body></html>
""")


def write_graph(circuit_path: str | Path, out: str | Path, graphml: str | Path | None = None,
                model: str | Path | None = None, n_pairs: int = 16) -> tuple[dict, str]:
    """What ``cspkit viz`` does: draw a circuit file (in ``model``, default the model the file
    names) as a standalone offline page ``out``, and optionally its annotated graph as GraphML."""
    circuit = Circuit.load(circuit_path, model=model, need_model=True)
    net = circuit_graph(circuit, n_pairs=n_pairs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    net.write_html(out)
    if graphml:
        Path(graphml).parent.mkdir(parents=True, exist_ok=True)
        net.write_graphml(graphml)
    obj = {"circuit": str(circuit_path), "task": circuit.task, "nodes": circuit.n_nodes, "edges": circuit.n_edges,
           "html": str(out), "html_bytes": out.stat().st_size, "graphml": str(graphml) if graphml else None}
    return obj, (f"{circuit.task} circuit, {circuit.n_nodes} nodes and {circuit.n_edges} edges -> {out} "
                 f"({obj['html_bytes'] / 1e3:.0f} kB, self-contained, works offline)"
                 + (f" and {graphml}" if graphml else ""))
