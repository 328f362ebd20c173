"""Circuit graphs, per-token activation previews, and the node statistics they show.

``circuit_graph(circuit)`` draws a circuit as a pyvis network with a layered layout: layers
left to right (attention, then MLP), node locations in fixed bands (reads, q/k/v, neurons,
writes). Node colour is the location type, node size the node's ablation effect; edge width
is |weight|, edge colour its sign. The HTML is self-contained and offline: vis-network is
inlined from the pyvis package instead of pyvis's template (which links CSS and JS from CDNs),
and a Content-Security-Policy forbids every request to any host and every script but its own.
Every string from the vocabulary is HTML-escaped. Notebooks show it in a sandboxed
``<iframe srcdoc>``, which JupyterLab 4 draws with no network (DESIGN.md, "Graphs in notebooks").

``token_heatmap(model, text, node)`` colours any text by one node's activation.
``explore(model, tasks)`` is the interactive explorer (cspkit/explorer.py).
"""
from __future__ import annotations

import html
import json
import math
import secrets
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import jinja2
import networkx as nx
import pyvis
import torch
from markupsafe import Markup
from pyvis.network import Network
from tqdm.auto import tqdm

from . import tasks as tasks_mod
from .ablation import ablation_values, fingerprint, gate_hooks, keep_gates, node_means, node_widths
from .circuit import Circuit, score
from .files import atomic_path, atomic_write
from .model import GPT, node_name, parse_node

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


# --------------------------------------------------------------------------- node statistics
def _node(node) -> tuple[str, int]:
    """A node given as ``"1.mlp.neuron[37]"`` or ``("1.mlp.neuron", 37)``."""
    if isinstance(node, str):
        return parse_node(node)
    loc, i = node
    return loc, int(i)


_EFFECTS: dict[tuple, dict[str, float]] = {}


@torch.no_grad()
def ablation_effects(circuit: Circuit, n_pairs: int = 16, split: str = "test", chunk: int = 4,
                     progress: bool = False) -> dict[str, float]:
    """Per circuit node, the change in the circuit's task loss when that node is ablated too:
    ``circuit.evaluate(nodes=circuit minus node) - circuit.evaluate()`` on the first ``n_pairs``
    pairs of ``split``, with the circuit's ablation and calibration. Positive: the circuit needs
    the node. ``chunk`` nodes share one forward pass (the prompts repeated once per node);
    results are cached per circuit."""
    model = circuit.require_model("drawing it")
    task = circuit.task_obj if circuit.task_obj is not None else tasks_mod.get(circuit.task)
    pairs = task.pairs(split, n=n_pairs)
    # keyed by the prompts and candidates themselves: a task redefined under the same name differs
    key = (circuit.model_fingerprint or fingerprint(model), tasks_mod.pairs_digest(pairs), circuit.ablation,
           tuple(circuit.calibration), json.dumps(circuit.nodes, sort_keys=True))
    if key in _EFFECTS:
        return _EFFECTS[key]
    batch = tasks_mod.encode_pairs(pairs, model.config.block_size, model.encoding)
    tokens, P = batch["tokens"].to(model.device), batch["tokens"].shape[0]
    values = ablation_values(model, circuit.ablation, tokens)
    keep = keep_gates(model.config, circuit.nodes, model.device)
    names = circuit.node_names()
    base = score(*_pair_logits(model, tokens, batch, {k: g.expand(P, 1, -1) for k, g in keep.items()}, values, 1),
                 circuit.calibration)["loss"]
    out = {}
    for s in tqdm(range(0, len(names), chunk), desc=f"ablation effects {circuit.task}", disable=not progress,
                  leave=False):
        group = names[s:s + chunk]
        gates = {loc: g.repeat(len(group), 1) for loc, g in keep.items()}        # (len(group), width)
        for row, name in enumerate(group):
            loc, i = parse_node(name)
            gates[loc][row, i] = 0.0
        gates = {loc: g.repeat_interleave(P, 0).unsqueeze(1) for loc, g in gates.items()}  # (len(group) * P, 1, width)
        two, label = _pair_logits(model, tokens, batch, gates, values, len(group))
        for row, name in enumerate(group):
            rows = slice(row * P, (row + 1) * P)
            out[name] = score(two[rows], label[rows], circuit.calibration)["loss"] - base
    _EFFECTS[key] = out
    return out


def _pair_logits(model, tokens, batch, gates, values, copies: int):
    """Candidate logits of the prompts repeated ``copies`` times, each copy with its own gates."""
    if values[next(iter(values))].dim() == 3:  # resample ablation: per-prompt values, repeated like the prompts
        values = {k: v.repeat(copies, 1, 1) for k, v in values.items()}
    logits = model.run_with_hooks(tokens.repeat(copies, 1), gate_hooks(gates, values))
    sel = {"last": batch["last"].repeat(copies), "cands": batch["cands"].repeat(copies, 1)}
    return tasks_mod.pair_logits(logits, sel).float().cpu(), batch["label"].repeat(copies)


@dataclass
class CorpusStats:
    """The strongest activations of every node over a few corpus windows (validation split).
    ``top[loc]`` and ``bottom[loc]`` hold (values, flat positions), each (k, width): the k
    largest and the k most negative activations, strongest first; a flat position is
    window * window_length + token."""
    tokens: torch.Tensor                               # (windows, window_length)
    strings: list[list[str]]                           # the decoded tokens
    top: dict[str, tuple[torch.Tensor, torch.Tensor]]
    bottom: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def extremes(self, node, sign: int = 1, n: int = 3) -> list[tuple[int, int, float]]:
        """(window, token, activation) of the node's n strongest positive (sign 1) or negative
        (sign -1) activations, zeros left out."""
        loc, i = _node(node)
        vals, pos = (self.top if sign > 0 else self.bottom)[loc]
        T = self.tokens.shape[1]
        out = [(*divmod(int(p), T), float(v)) for v, p in zip(vals[:, i], pos[:, i]) if v * sign > 0]
        return out[:n]

    def top_tokens(self, node, sign: int = 1, n: int = 4) -> list[tuple[str, float]]:
        """The distinct tokens at the node's strongest activations of that sign, with the strongest value."""
        seen: dict[str, float] = {}
        for w, t, v in self.extremes(node, sign, n=len(self.top[_node(node)[0]][0])):
            seen.setdefault(self.strings[w][t], v)
        return list(seen.items())[:n]


_STATS: dict[tuple, CorpusStats] = {}


@torch.no_grad()
def corpus_stats(model: GPT, n_windows: int = 32, window: int = 64, k: int = 16, seed: int = 0) -> CorpusStats:
    """Strongest activations of every node on ``n_windows`` random windows of the validation
    split of the model's training corpus (one forward pass; cached per model)."""
    key = (fingerprint(model), n_windows, window, k, seed)
    if key in _STATS:
        return _STATS[key]
    from .data import TokenData, build_shards
    train_cfg = (getattr(model, "checkpoint", None) or {}).get("train") or {}
    info = build_shards(train_cfg.get("corpus"), train_cfg.get("val_percent", 5.0))
    x, _ = TokenData(info, "val").batch(n_windows, min(window, model.config.block_size), seed, 0)
    top, bottom = {}, {}

    def record(act, name):
        flat = act.flatten(0, 1).float()                                   # (windows * window_length, width)
        kk = min(k, flat.shape[0])
        v, p = flat.topk(kk, dim=0)
        top[name] = (v.cpu(), p.cpu())
        v, p = (-flat).topk(kk, dim=0)
        bottom[name] = (-v.cpu(), p.cpu())

    model.run_with_hooks(x.to(model.device), {loc: record for loc in node_widths(model.config)})
    enc = _encoding(model)
    stats = CorpusStats(x, [[enc.decode([t]) for t in row] for row in x.tolist()], top, bottom)
    _STATS[key] = stats
    return stats


def _encoding(model: GPT):
    from .tokenizer import get_encoding
    return model.encoding if getattr(model, "encoding", None) is not None else get_encoding()


# --------------------------------------------------------------------------- token heatmaps
def token_html(tok: str) -> str:
    """One token as escaped HTML with its newlines and tabs made visible."""
    return html.escape(tok).replace("\n", "↵").replace("\t", "⇥")


def _shade(v: float, scale: float) -> str:
    a = min(1.0, abs(v) / scale) if scale > 0 else 0.0
    return f"rgba(214,39,40,{a:.2f})" if v > 0 else f"rgba(31,119,180,{a:.2f})"


def heatmap_html(tokens: list[str], values: list[float], scale: float | None = None,
                 mark: int | None = None) -> str:
    """Tokens on a background coloured by value (red positive, blue negative, full colour at
    ``scale``, default the largest |value|), line breaks kept; ``mark`` outlines one token."""
    scale = scale or max((abs(v) for v in values), default=0.0) or 1.0
    spans = []
    for j, (tok, v) in enumerate(zip(tokens, values)):
        style = f"background:{_shade(v, scale)}" + (";outline:2px solid #222" if j == mark else "")
        text = html.escape(tok).replace("\t", "⇥").replace("\n", "↵\n")
        spans.append(f'<span style="{style}" title="{html.escape(repr(tok))}: {v:+.3f}">{text}</span>')
    return ('<div style="font-family:monospace;font-size:12px;white-space:pre-wrap;line-height:1.5;'
            'border:1px solid #ddd;padding:4px;margin:2px 0">' + "".join(spans) + "</div>")


@dataclass
class TokenHeatmap:
    """Per-token activations of one node on a text; shows itself as coloured HTML in notebooks."""
    node: str
    tokens: list[str]
    values: list[float]

    def html(self, scale: float | None = None) -> str:
        peak = max(self.values, key=abs, default=0.0)
        head = (f"<div style='font:12px sans-serif'><b>{html.escape(self.node)}</b>: {len(self.tokens)} tokens, "
                f"strongest activation {peak:+.3f} (red positive, blue negative)</div>")
        return head + heatmap_html(self.tokens, self.values, scale)

    def _repr_html_(self) -> str:
        return self.html()


@torch.no_grad()
def token_heatmap(model: GPT, text: str, node) -> TokenHeatmap:
    """The activation of ``node`` (``"1.mlp.neuron[37]"`` or ``(location, index)``) at every token
    of ``text`` (its last block_size tokens), as a TokenHeatmap."""
    loc, i = _node(node)
    width = node_widths(model.config).get(loc)
    if width is None or not 0 <= i < width:
        raise ValueError(f"{node_name(loc, i)} is not a node of this model; locations: "
                         f"{', '.join(node_widths(model.config))}")
    enc = _encoding(model)
    ids = enc.encode_ordinary(text)[-model.config.block_size:]
    if not ids:
        raise ValueError("token_heatmap needs a non-empty text")
    _, cache = model.run_with_cache(torch.tensor([ids], device=model.device), names=[loc])
    return TokenHeatmap(node_name(loc, i), [enc.decode([t]) for t in ids], cache[loc][0, :, i].tolist())


# --------------------------------------------------------------------------- the graph
def annotated_graph(circuit: Circuit, n_pairs: int = 16, progress: bool = False) -> nx.DiGraph:
    """``circuit.to_networkx()`` with, per node, its mean activation (``mean``), its ablation
    effect (``effect``, measured on ``n_pairs`` test pairs, kept as the graph's ``effect_pairs``)
    and the corpus tokens where it is most positive and most negative (``top_tokens`` and
    ``bottom_tokens``, JSON lists of [token, activation])."""
    model = circuit.require_model("drawing it")
    g = circuit.to_networkx()
    means = node_means(model)
    effects = ablation_effects(circuit, n_pairs, progress=progress)
    stats = corpus_stats(model)
    for name, d in g.nodes(data=True):
        d["mean"] = float(means[d["location"]][d["index"]])
        d["effect"] = effects[name]
        d["top_tokens"] = json.dumps([[t, round(v, 4)] for t, v in stats.top_tokens(name)])
        d["bottom_tokens"] = json.dumps([[t, round(v, 4)] for t, v in stats.top_tokens(name, sign=-1)])
    g.graph["effect_pairs"] = n_pairs
    return g


def _tokens_line(items: list[list]) -> str:
    return ", ".join(f"<code>{token_html(t)}</code>&nbsp;{v:+.2f}" for t, v in items) or "none"


def _node_title(name: str, d: dict, n_pairs: int) -> str:
    return (f"<b>{html.escape(name)}</b><br>{KIND_NAMES[d['kind']]}, layer {d['layer']}<br>"
            f"mean activation {d['mean']:+.4f}<br>"
            f"ablation effect {d['effect']:+.4f} nats (task loss change when it is ablated too, {n_pairs} pairs)<br>"
            f"top tokens: {_tokens_line(json.loads(d['top_tokens']))}<br>"
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
            columns=self.columns, bands=self.bands, box=self.box, legend=Markup(_legend(self.title)),
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
                  height: str = "640px", progress: bool = False, graph: nx.DiGraph | None = None) -> CircuitNetwork:
    """A circuit as a CircuitNetwork (a pyvis Network). ``kinds`` (location types such as
    ``"mlp.neuron"``) and ``layers`` keep only those nodes; ``ablated`` node names are drawn
    greyed out; ``n_pairs`` test pairs measure the ablation effects (node sizes). ``graph``: the
    circuit's ``annotated_graph`` already computed (the explorer redraws from it)."""
    kinds = [kinds] if isinstance(kinds, str) else kinds
    layers = [layers] if isinstance(layers, int) else layers
    bad = set(kinds or ()) - set(PLACES)
    if bad:
        raise ValueError(f"unknown location types {sorted(bad)}; choose from {', '.join(PLACES)}")
    n_layer = circuit.require_model("drawing it").config.n_layer
    bad = [l for l in layers or () if not (isinstance(l, int) and 0 <= l < n_layer)]
    if bad:
        raise ValueError(f"layers {bad} are not layers of this model; choose from 0 to {n_layer - 1}")
    off = {node_name(*_node(a)) for a in ablated}
    unknown = sorted(off - set(circuit.node_names()))
    if unknown:
        raise ValueError(f"ablated nodes {unknown} are not in the circuit; name nodes of circuit.node_names()")
    g = graph if graph is not None else annotated_graph(circuit, n_pairs, progress)
    keep = [n for n, d in g.nodes(data=True)
            if (kinds is None or d["kind"] in kinds) and (layers is None or d["layer"] in layers)]
    shown = g.subgraph(keep).copy()
    pos, layout = _layout(shown)
    title = (f"{circuit.task}: {circuit.n_nodes} nodes, {circuit.n_edges} edges, task loss {circuit.loss:.3f} "
             f"({circuit.size_label()}), {circuit.ablation} ablation"
             + (f"; showing {shown.number_of_nodes()} nodes" if len(keep) < g.number_of_nodes() else ""))
    net = CircuitNetwork(shown, title, layout, height)
    peak = max((abs(d["effect"]) for _, d in g.nodes(data=True)), default=0.0) or 1.0
    for n, d in shown.nodes(data=True):
        x, y = pos[n]
        color = "#d9d9d9" if n in off else KIND_COLORS[d["kind"]]
        net.add_node(n, label=f"{_SHORT[d['kind']]}{d['index']}", title=_node_title(n, d, n_pairs), x=x, y=y,
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


def explore(model: GPT, tasks, circuits=(), **kwargs):
    """The interactive explorer (an ipywidgets app; display the result in a notebook) for a
    model on ``tasks`` (names or Task objects). ``circuits``: Circuit objects, circuit files or
    directories of them (e.g. ``results/circuits/small-sparse``), shown without recomputing.
    Keyword arguments: ``target``, ``ablation``, ``n_pairs`` (pairs for losses and ablation
    effects), ``seed``, ``height``, ``cache`` (keep computed circuits in the cspkit cache)."""
    from .explorer import Explorer  # the widget app lives in its own module, which imports this one
    return Explorer(model, tasks, circuits, **kwargs)


def _legend(title: str) -> str:
    kinds = "".join(f'<span class="sw" style="background:{c}"></span>{KIND_NAMES[k]}' for k, c in KIND_COLORS.items())
    edges = (f'<span class="ln" style="background:{EDGE_COLORS["positive"]}"></span>positive weight'
             f'<span class="ln" style="background:{EDGE_COLORS["negative"]}"></span>negative weight'
             f'<span class="ln" style="background:{EDGE_COLORS["residual"]}"></span>residual stream'
             f'<span class="ln" style="background:{EDGE_COLORS["qk"]}"></span>query-key pairing')
    return (f"<b>{html.escape(title)}</b><br>{kinds}<br>{edges}; node size: ablation effect, "
            "edge width: |weight|; hover for details")


_TEMPLATE = jinja2.Environment(autoescape=True).from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; script-src 'nonce-{{ nonce }}'; style-src 'unsafe-inline'">
<title>{{ title }}</title>
<style>
body { margin: 0; font: 12px sans-serif; background: #fff; }
#legend { padding: 4px 8px; line-height: 1.6; }
#legend .sw { display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin: 0 3px 0 10px; }
#legend .ln { display: inline-block; width: 18px; height: 3px; margin: 0 3px 3px 10px; }
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
