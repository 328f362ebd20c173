"""Token heatmaps: any text coloured by one node's activation at every token (red positive,
blue negative), as HTML that notebooks display. Every token string is HTML-escaped."""
from __future__ import annotations

import html
from dataclasses import dataclass

import torch

from ..ablation import node_widths
from ..model import GPT, node_name
from .stats import as_node, model_encoding


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
    of ``text`` (its last block_size tokens), as a TokenHeatmap; a notebook cell ending in one
    shows the text coloured by the activation.

    >>> import cspkit
    >>> model = cspkit.load("small-sparse")
    >>> hm = cspkit.token_heatmap(model, 'print("hi")\\n', "0.mlp.neuron[0]")
    >>> hm.tokens
    ['print', '("', 'h', 'i', '")\\n']
    >>> len(hm.values) == len(hm.tokens)
    True
    """
    loc, i = as_node(node)
    width = node_widths(model.config).get(loc)
    if width is None or not 0 <= i < width:
        raise ValueError(f"{node_name(loc, i)} is not a node of this model; locations: "
                         f"{', '.join(node_widths(model.config))}")
    enc = model_encoding(model)
    ids = enc.encode_ordinary(text)[-model.config.block_size:]
    if not ids:
        raise ValueError("token_heatmap needs a non-empty text")
    _, cache = model.run_with_cache(torch.tensor([ids], device=model.device), names=[loc])
    return TokenHeatmap(node_name(loc, i), [enc.decode([t]) for t in ids], cache[loc][0, :, i].tolist())
