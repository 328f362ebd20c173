"""The circuit graph as a two-way Jupyter widget: pyvis builds the network (``circuit_graph``),
this widget draws it with the same vis-network script in the notebook's own page, and a click on
a node comes back to Python as ``selected``.

Why anywidget: a widget is the one channel JupyterLab offers from the page back to the kernel,
and anywidget makes one from a single ES module with no JupyterLab extension to build or
install (its front end ships in the wheel). The graph's HTML page (``CircuitNetwork.iframe``)
sits in a sandboxed iframe, from which nothing can come back.

Offline: the module carries vis-network from the pyvis package; nothing is fetched. Every string
shown is escaped in Python before it gets here (node and edge titles are HTML built from
escaped parts). Where JavaScript does not run (a notebook opened untrusted, a static viewer),
the display falls back to a PNG of the same drawing (``graph_png``).
"""
from __future__ import annotations

import base64
import io

import anywidget
import traitlets

from .graph import EDGE_COLORS, KIND_COLORS, VIS_JS, CircuitNetwork

_MODULE = """
const vis = globalThis.vis;
function element(markup) { const d = document.createElement("div"); d.innerHTML = markup; return d; }
function data(model) {
  const nodes = model.get("nodes").map(n => ({...n, title: element(n.title)}));
  const edges = model.get("edges").map(e => ({...e, title: element(e.title)}));
  return {nodes: new vis.DataSet(nodes), edges: new vis.DataSet(edges)};
}
function render({ model, el }) {
  const box = document.createElement("div");
  box.className = "cspkit-graph-canvas";
  box.style.height = model.get("height");
  el.appendChild(box);
  const network = new vis.Network(box, data(model), model.get("options"));
  el.cspkitNetwork = network;   // for scripted clicks at a node's position (the browser test)
  // fit the layer and band labels too, not only the nodes
  function view() {
    const b = model.get("box");
    if (b.x1 === undefined || !box.clientWidth) return;     // nothing drawn yet, or hidden
    const scale = Math.min(box.clientWidth / (b.x1 - b.x0), box.clientHeight / (b.y1 - b.y0), 1.5);
    network.moveTo({position: {x: (b.x0 + b.x1) / 2, y: (b.y0 + b.y1) / 2}, scale: scale});
  }
  network.on("afterDrawing", function (ctx) {
    ctx.save();
    ctx.font = "13px sans-serif";
    ctx.fillStyle = "#555";
    ctx.textAlign = "center";
    for (const c of model.get("columns")) ctx.fillText(c.label, c.x, c.y);
    ctx.textAlign = "right";
    for (const b of model.get("bands")) ctx.fillText(b.label, b.x, b.y + 4);
    ctx.restore();
    el.dataset.nodes = String(model.get("nodes").length);
    el.dataset.drawn = String(Number(el.dataset.drawn || 0) + 1);
  });
  network.once("afterDrawing", view);
  network.on("click", function (params) {
    const id = params.nodes.length ? params.nodes[0] : "";
    if (id && id !== model.get("selected")) { model.set("selected", id); model.save_changes(); }
  });
  function select() {
    const id = model.get("selected");
    if (id && network.body.data.nodes.get(id)) network.selectNodes([id]); else network.unselectAll();
    el.dataset.selected = id;
  }
  // a tooltip open when the data change would stay over the new drawing
  function hideTips() { for (const t of box.querySelectorAll("div.vis-tooltip")) t.style.visibility = "hidden"; }
  model.on("change:options", () => { network.setOptions(model.get("options")); view(); });
  // the options first: a message that changes them and the data may deliver the data first
  function redraw() { hideTips(); network.setOptions(model.get("options")); network.setData(data(model)); }
  model.on("change:nodes", () => { redraw(); view(); select(); });
  model.on("change:edges", () => { redraw(); select(); });
  model.on("change:selected", select);
  // drawn while hidden (zero size), the view is fitted again once the box gets its size
  const resized = new ResizeObserver(() => { if (box.clientWidth) view(); });
  resized.observe(box);
  select();
  return () => { resized.disconnect(); network.destroy(); };
}
export default { render };
"""

_CSS = """
.cspkit-graph-canvas { width: 100%; border-top: 1px solid #ddd; background: #fff; }
.cspkit-graph-canvas div.vis-tooltip { position: absolute; visibility: hidden; padding: 5px; white-space: nowrap;
  font: 12px sans-serif; background: #f5f4ed; border: 1px solid #808074; border-radius: 3px;
  box-shadow: 3px 3px 10px rgba(0,0,0,.2); pointer-events: none; z-index: 5; }
.cspkit-graph-canvas div.vis-tooltip code { background: #e8e8e8; white-space: pre; padding: 0 2px; }
"""


class GraphWidget(anywidget.AnyWidget):
    """A circuit network drawn in the notebook; ``selected`` is the clicked node's name (set it
    from Python to select a node in the drawing). ``show(net)`` replaces what is drawn."""
    _esm = traitlets.Unicode(VIS_JS.read_text(encoding="utf-8") + _MODULE).tag(sync=True)
    _css = traitlets.Unicode(_CSS).tag(sync=True)
    nodes = traitlets.List().tag(sync=True)
    edges = traitlets.List().tag(sync=True)
    columns = traitlets.List().tag(sync=True)
    bands = traitlets.List().tag(sync=True)
    box = traitlets.Dict().tag(sync=True)
    options = traitlets.Dict().tag(sync=True)
    height = traitlets.Unicode("480px").tag(sync=True)
    selected = traitlets.Unicode("").tag(sync=True)

    def __init__(self, net: CircuitNetwork | None = None, **kwargs):
        super().__init__(**kwargs)
        self.net: CircuitNetwork | None = None
        if net is not None:
            self.show(net)

    def show(self, net: CircuitNetwork) -> None:
        """Draw ``net`` (nodes, edges, layout labels and options, in one message)."""
        nodes, edges, *_ = net.get_network_data()
        keep = ("id", "label", "title", "x", "y", "size", "color", "shapeProperties", "kind", "layer")
        with self.hold_sync():
            self.nodes = [{k: n[k] for k in keep if k in n} for n in nodes]
            self.edges = [{k: v for k, v in e.items() if k != "arrows"} for e in edges]
            self.columns, self.bands, self.box, self.options = net.columns, net.bands, net.box, net.options
            self.height = net.height
        self.net = net

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        if self.net is not None:   # what a notebook shows where the widget cannot run
            data["image/png"] = base64.b64encode(graph_png(self.net)).decode()
        return bundle


def graph_png(net: CircuitNetwork, dpi: int = 80) -> bytes:
    """The drawing as a PNG (matplotlib, same layout, colours and labels; no tooltips)."""
    from matplotlib.figure import Figure  # only where a picture is asked for

    nodes, edges, *_ = net.get_network_data()
    pos = {n["id"]: (n["x"], -n["y"]) for n in nodes}
    b = net.box
    width = max(4.0, min(14.0, (b["x1"] - b["x0"]) / 110))
    fig = Figure(figsize=(width, max(2.5, min(9.0, (b["y1"] - b["y0"]) / 90))), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 0.94))
    ax.set_axis_off()
    for e in edges:
        (x0, y0), (x1, y1) = pos[e["from"]], pos[e["to"]]
        ax.annotate("", (x1, y1), (x0, y0), arrowprops={
            "arrowstyle": "-|>", "lw": e.get("width", 1) * 0.6, "color": e.get("color", EDGE_COLORS["residual"]),
            "ls": "--" if e.get("dashes") else "-", "shrinkA": 4, "shrinkB": 4, "mutation_scale": 7})
    for n in nodes:
        x, y = pos[n["id"]]
        color = n["color"]["background"] if isinstance(n.get("color"), dict) else KIND_COLORS.get(n.get("kind"), "#888")
        ax.scatter([x], [y], s=(2 * n.get("size", 8)) ** 2 / 3, c=color, edgecolors="#333", linewidths=0.6, zorder=3)
        ax.text(x, y - n.get("size", 8) - 9, n["label"], ha="center", va="top", fontsize=6, family="monospace")
    for c in net.columns:
        ax.text(c["x"], -c["y"], c["label"], ha="center", fontsize=8, color="#555")
    for band in net.bands:
        ax.text(band["x"], -band["y"], band["label"], ha="right", va="center", fontsize=8, color="#555")
    ax.set_xlim(b["x0"], b["x1"])
    ax.set_ylim(-b["y1"], -b["y0"] + 10)
    fig.suptitle(net.title, fontsize=8, y=0.99)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

