"""Seeing circuits: graphs, token heatmaps, node statistics, figures and the explorer widget.

- ``circuit_graph(circuit)``: the circuit as a pyvis network whose page works offline
  (``graph``); ``annotated_graph`` is its networkx graph with per-node statistics.
- ``token_heatmap(model, text, node)``: a text coloured by one node's activation (``tokens``).
- ``ablation_effects(circuit)`` and ``corpus_stats(model)``: what a node does for its task and
  where in the corpus it fires (``stats``).
- ``explore(model, tasks)``: the interactive ipywidgets explorer (``explorer``).
- ``plot_*``: matplotlib figures that display in Jupyter; ``save_frontier`` writes one (``plots``).

>>> import cspkit
>>> from cspkit.viz import circuit_graph, explore, token_heatmap, plot_frontier
"""
from .examples import LEVELS, QuantileExamples, quantile_examples
from .explorer import Explorer, explore
from .graph import (
    BANDS,
    EDGE_COLORS,
    KIND_COLORS,
    KIND_NAMES,
    PLACES,
    VIS_JS,
    CircuitNetwork,
    annotated_graph,
    circuit_graph,
    node_label,
    node_place,
    write_graph,
)
from .panes import attention_pattern, embedding_tokens, node_pane
from .plots import (
    NotebookFigure,
    plot_bridge_quality,
    plot_bridge_training,
    plot_density,
    plot_frontier,
    plot_patching,
    plot_schedule,
    plot_steering,
    plot_task_curves,
    plot_task_scores,
    plot_training,
    save_frontier,
)
from .stats import CorpusStats, ablation_effects, corpus_stats
from .tokens import TokenHeatmap, heatmap_html, token_heatmap, token_html
from .widget import GraphWidget, graph_png

__all__ = [
    # graph
    "BANDS", "EDGE_COLORS", "KIND_COLORS", "KIND_NAMES", "PLACES", "VIS_JS", "CircuitNetwork", "annotated_graph",
    "circuit_graph", "node_label", "node_place", "write_graph", "GraphWidget", "graph_png",
    # token heatmaps
    "TokenHeatmap", "heatmap_html", "token_heatmap", "token_html",
    # node statistics
    "CorpusStats", "ablation_effects", "corpus_stats", "LEVELS", "QuantileExamples", "quantile_examples",
    # the explorer
    "Explorer", "explore", "attention_pattern", "embedding_tokens", "node_pane",
    # figures
    "NotebookFigure", "plot_bridge_quality", "plot_bridge_training", "plot_density", "plot_frontier", "plot_patching",
    "plot_schedule", "plot_steering",
    "plot_task_curves", "plot_task_scores", "plot_training", "save_frontier",
]
