"""What the explorer shows about one node, as HTML: where it sits, its edges, the attention
pattern of its head (query, key and value channels), the embedding's top and bottom tokens
(residual channels), its activation on the task's prompts (class A, class B and their
difference side by side), and corpus examples at quantiles of its activation.
Every token string is escaped (``tokens.token_html``, ``tokens.heatmap_html``).
"""
from __future__ import annotations

import html
import math

import networkx as nx
import torch

from .. import tasks as tasks_mod
from ..model import GPT, parse_node
from .examples import decode_window, quantile_examples
from .graph import node_place
from .tokens import heatmap_html, token_html

HEAD_KINDS = ("attn.q", "attn.k", "attn.v")   # node kinds that belong to one head


def _weight(edge: dict) -> str:
    return f"{edge['weight']:+.4f}" if edge["kind"] == "weight" else ""  # residual and q-k links carry none


@torch.no_grad()
def activations(model: GPT, tokens: torch.Tensor, name: str) -> torch.Tensor:
    """One node's activation at every token, (N, T)."""
    loc, i = parse_node(name)
    _, cache = model.run_with_cache(tokens.to(model.device), names=[loc], stop=True)
    return cache[loc][..., i].float().cpu()


def window_activations(model: GPT, tokens: torch.Tensor, spots: list[tuple[int, int]], name: str,
                       groups: int = 3) -> list[torch.Tensor]:
    """The node's activation on row w of ``tokens`` up to position hi, for each (w, hi) of
    ``spots``: in a few passes over rows of similar length, each cut at its longest hi (what comes
    after a position cannot change it), rather than one pass over whole rows."""
    order = sorted(range(len(spots)), key=lambda j: spots[j][1])
    out: list[torch.Tensor] = [torch.empty(0)] * len(spots)
    size = -(-len(order) // groups) if order else 1
    for g in range(0, len(order), size):
        part = order[g:g + size]
        hi = max(spots[j][1] for j in part)
        acts = activations(model, tokens[[spots[j][0] for j in part], :hi].long(), name)   # (len(part), hi)
        for row, j in enumerate(part):
            out[j] = acts[row, :spots[j][1]]
    return out


@torch.no_grad()
def attention_pattern(model: GPT, tokens: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """Head ``head`` of layer ``layer``: the attention weights (N, T, T), query position by key
    position, computed from the cached (AbsTopK-ed) queries and keys as the model computes them,
    sink included (a sink's share is left out of the row, which then sums to less than 1)."""
    c = model.config
    _, cache = model.run_with_cache(tokens.to(model.device), names=[f"{layer}.attn.q", f"{layer}.attn.k"], stop=True)
    sl = slice(head * c.d_head, (head + 1) * c.d_head)
    q, k = cache[f"{layer}.attn.q"][..., sl].float(), cache[f"{layer}.attn.k"][..., sl].float()   # (N, T, D)
    scale = c.attn_scale if c.attn_scale is not None else 1 / math.sqrt(c.d_head)
    scores = q @ k.transpose(1, 2) * scale                                        # (N, T, T)
    T = scores.shape[-1]
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=scores.device).tril(), float("-inf"))
    sink = model.h[layer].attn.sink_logit
    if sink is not None:
        s = sink[head].float().expand(*scores.shape[:2], 1)
        return torch.cat([scores, s], -1).softmax(-1)[..., :T].cpu()
    return scores.softmax(-1).cpu()


def node_header(g: nx.DiGraph, name: str, d_head: int) -> str:
    d = g.nodes[name]
    effect = (f"ablation effect {d['effect']:+.4f} nats" if g.graph.get("effect_pairs")
              else "ablation effect not measured")
    return (f"<h4 style='margin:4px 0'>{html.escape(name)}</h4>"
            f"{node_place(d['kind'], d['layer'], d['index'], d_head)} · mean activation {d['mean']:+.4f} · "
            f"{effect}<br>")


def edge_tables(g: nx.DiGraph, name: str) -> str:
    parts = []
    for title, edges in (("incoming", g.in_edges(name, data=True)), ("outgoing", g.out_edges(name, data=True))):
        rows = "".join(f"<tr><td>{html.escape(s if title == 'incoming' else t)}</td><td>{e['kind']}</td>"
                       f"<td style='text-align:right'>{_weight(e)}</td></tr>" for s, t, e in edges)
        parts.append(f"<div style='display:inline-block;vertical-align:top;margin-right:24px'><b>{title} edges</b>"
                     f"<table>{rows or '<tr><td>none</td></tr>'}</table></div>")
    return "".join(parts)


def _tail(batch: dict, r: int, tail: int) -> tuple[int, int]:
    last = int(batch["last"][r])
    return max(0, last + 1 - tail), last


def task_view(model: GPT, task, name: str, n_pairs: int = 3, tail: int = 24) -> str:
    """The node on the task's first ``n_pairs`` test pairs: the class-A prompt, the class-B prompt
    and A minus B token by token (aligned at the last token), one row per pair. A and B share one
    colour scale centred on zero; the difference has its own."""
    pairs = task.pairs("test", n=n_pairs)
    batch = tasks_mod.encode_pairs(pairs, model.config.block_size, model.encoding)
    acts = activations(model, batch["tokens"], name)
    enc, n = model.encoding, len(pairs)
    spans = [_tail(batch, r, tail) for r in range(2 * n)]
    scale = max(float(acts[r, lo:hi + 1].abs().max()) for r, (lo, hi) in enumerate(spans)) or 1.0
    rows = []
    for p in range(n):
        cells, vals = [], []
        for r in (p, p + n):
            lo, hi = spans[r]
            toks = [enc.decode([t]) for t in batch["tokens"][r, lo:hi + 1].tolist()]
            vals.append(acts[r, lo:hi + 1])
            cand = pairs[p].cand_a if r < n else pairs[p].cand_b
            cells.append(f"<div style='font-size:11px;color:#555'>right next token <code>{token_html(cand)}</code>"
                         "</div>" + heatmap_html(toks, vals[-1].tolist(), scale, mark=hi - lo))
        m = min(len(vals[0]), len(vals[1]))
        diff = (vals[0][-m:] - vals[1][-m:]).tolist()
        lo, hi = spans[p]
        toks = [enc.decode([t]) for t in batch["tokens"][p, hi + 1 - m:hi + 1].tolist()]
        cells.append("<div style='font-size:11px;color:#555'>A − B (on A's tokens)</div>"
                     + heatmap_html(toks, diff, None, mark=m - 1))
        rows.append("<tr>" + "".join(f"<td style='vertical-align:top;width:33%'>{c}</td>" for c in cells) + "</tr>")
    return (f"<p><b>On the task's test prompts</b> (last {tail} tokens; red positive, blue negative, white 0; A and "
            f"B on one scale, ±{scale:.3f}; the last token outlined)</p><table style='width:100%'>"
            "<tr><th>class A</th><th>class B</th><th>difference</th></tr>" + "".join(rows) + "</table>")


def attention_view(model: GPT, task, name: str, tail: int = 24) -> str:
    """For a query, key or value channel: where its head attends from the last token of the
    first test pair's two prompts (the weights as a heatmap over the attended tokens)."""
    loc, i = parse_node(name)
    layer, kind = int(loc.split(".")[0]), loc.split(".", 1)[1]
    if kind not in HEAD_KINDS:
        return ""
    head = i // model.config.d_head
    pairs = task.pairs("test", n=1)
    batch = tasks_mod.encode_pairs(pairs, model.config.block_size, model.encoding)
    pattern = attention_pattern(model, batch["tokens"], layer, head)
    blocks = []
    for r, label in ((0, "A"), (1, "B")):
        lo, hi = _tail(batch, r, tail)
        toks = [model.encoding.decode([t]) for t in batch["tokens"][r, lo:hi + 1].tolist()]
        row = pattern[r, hi, lo:hi + 1]
        blocks.append(f"<div style='font-size:11px;color:#555'>prompt {label}: from its last token "
                      f"(max {float(row.max()):.2f})</div>" + heatmap_html(toks, row.tolist(), 1.0, mark=hi - lo))
    return (f"<p><b>Attention of layer {layer}, head {head}</b> (weights 0 to 1, red)</p>" + "".join(blocks))


def quantile_view(model: GPT, name: str, before: int = 40, after: int = 10) -> str:
    """The node's activation at the top and bottom 0.1, 1 and 10 percent and the median of its
    training corpus (``examples.quantile_examples``, 65,536 tokens), each with the contexts
    (``before`` tokens before, ``after`` after) of the tokens where it takes about that value."""
    ex = quantile_examples(model)
    levels = ex.examples(name)
    scale = max(abs(v) for _, v, _ in levels) or 1.0
    spots = [(w, min(ex.tokens.shape[1], t + after + 1)) for _, _, found in levels for w, t, _ in found]
    acts = window_activations(model, ex.tokens, spots, name)
    rows, j = [], 0
    for label, value, found in levels:
        blocks = []
        for w, t, _ in found:
            lo, hi = max(0, t - before), spots[j][1]
            blocks.append(heatmap_html(decode_window(model, ex, w, lo, hi), acts[j][lo:hi].tolist(), scale,
                                       mark=t - lo))
            j += 1
        rows.append(f"<tr><td style='vertical-align:top;white-space:nowrap;padding-right:8px'><b>{label}</b><br>"
                    f"{value:+.3f}</td><td>{''.join(blocks)}</td></tr>")
    return (f"<p><b>Corpus examples at quantiles</b> of its activation over {ex.meta['n_tokens']} training "
            f"tokens (the token outlined takes about that value; one colour scale, ±{scale:.3f})</p>"
            "<table>" + "".join(rows) + "</table>")


RESIDUAL_KINDS = ("attn.in", "mlp.in", "attn.out", "mlp.out")   # nodes that are channels of the residual stream


@torch.no_grad()
def embedding_tokens(model: GPT, channel: int, n: int = 8) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The tokens whose embedding is largest and smallest in residual channel ``channel``
    (``wte[:, channel]``), n each with their values, largest and most negative first."""
    col = model.wte.weight[:, channel].float().cpu()
    dec = lambda ids: [(model.encoding.decode([int(i)]), float(col[i])) for i in ids]
    return dec(col.topk(n).indices), dec((-col).topk(n).indices)


def embedding_view(model: GPT, name: str, n: int = 8) -> str:
    """For a residual channel (a read or a write): the tokens the embedding puts highest and
    lowest in that channel, what the channel carries at layer 0 before any sublayer writes."""
    loc, i = parse_node(name)
    if loc.split(".", 1)[1] not in RESIDUAL_KINDS:
        return ""
    top, bottom = embedding_tokens(model, i, n)
    line = lambda items: ", ".join(f"<code>{token_html(t)}</code>&nbsp;{v:+.3f}" for t, v in items)
    return (f"<p><b>Embedding, residual channel {i}</b>: highest {line(top)}<br>lowest {line(bottom)}</p>")


def node_pane(model: GPT, g: nx.DiGraph, task, name: str) -> str:
    """Everything the explorer shows about the chosen node."""
    return (node_header(g, name, model.config.d_head) + edge_tables(g, name) + attention_view(model, task, name)
            + embedding_view(model, name) + task_view(model, task, name) + quantile_view(model, name))
