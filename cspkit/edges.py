"""Edge ablation: gates on the weights between a circuit's nodes (docs/method.md, "Edge circuits").

An edge is one nonzero weight W[d, s] of a linear map from a source node s to a target node d
(compute_edges in cspkit.circuit lists them). Ablating it replaces what it carries into d's
pre-activation, W[d, s] * x_s, by W[d, s] * mean(x_s): the source keeps its own value on every
other edge. With a gate g per edge the map computes

    y_d = sum_s W[d, s] * x_s  +  sum_(edges e into d) (g_e - 1) * W[d, s_e] * (x_(s_e) - mean(x_(s_e)))

which a forward hook on the linear module adds to its output, before any activation or AbsTopK.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from .ablation import ablation_values
from .model import GPT, parse_node


@dataclass
class EdgeGroup:
    """The edges of one linear map, as index tensors; ``pos`` is each edge's place in the list
    the gates are given for."""
    module: nn.Linear
    src: torch.Tensor      # (E,) input columns
    dst: torch.Tensor      # (E,) output rows
    weight: torch.Tensor   # (E,)
    mean: torch.Tensor     # (E,) the source nodes' ablated values
    pos: torch.Tensor      # (E,)


def _target(model: GPT, src_loc: str, dst_loc: str) -> tuple[nn.Linear, int]:
    """The linear map from src_loc to dst_loc and the offset of dst_loc's rows in its output."""
    layer, src_kind, dst_kind = int(src_loc.split(".")[0]), src_loc.split(".", 1)[1], dst_loc.split(".", 1)[1]
    block, inner = model.h[layer], model.config.n_head * model.config.d_head
    if src_kind == "attn.in" and dst_kind in ("attn.q", "attn.k", "attn.v"):
        return block.attn.c_attn, "qkv".index(dst_kind[-1]) * inner
    maps = {("attn.v", "attn.out"): block.attn.c_proj, ("mlp.in", "mlp.neuron"): block.mlp.c_fc,
            ("mlp.neuron", "mlp.out"): block.mlp.c_proj}
    if (src_kind, dst_kind) not in maps:
        raise ValueError(f"no weight runs from {src_loc} to {dst_loc}; an edge goes read -> q/k/v, v -> write, "
                         "read -> neuron or neuron -> write within one layer")
    return maps[src_kind, dst_kind], 0


def edge_groups(model: GPT, edges: list[tuple[str, str, float]], ablation: str = "mean") -> list[EdgeGroup]:
    """Index the edges (source name, target name, weight) by the linear map they belong to."""
    if ablation not in ("mean", "zero"):
        raise ValueError(f"edge ablation needs one value per node (mean or zero ablation), not {ablation!r}")
    if model.config.sink:
        # an attention sink takes part of every head's weight, so what v -> write carries under
        # ablation is not the mean of v; only sink-free models are supported
        raise ValueError("edge pruning is not supported on models with an attention sink")
    values = ablation_values(model, ablation)
    by_module: dict[nn.Linear, list] = {}
    for pos, (s, d, w) in enumerate(edges):
        (src_loc, si), (dst_loc, di) = parse_node(s), parse_node(d)
        module, offset = _target(model, src_loc, dst_loc)
        by_module.setdefault(module, []).append((si, offset + di, w, float(values[src_loc][si]), pos))
    dev = model.device
    out = []
    for module, rows in by_module.items():
        si, di, w, m, pos = zip(*rows)
        out.append(EdgeGroup(module, torch.tensor(si, device=dev), torch.tensor(di, device=dev),
                             torch.tensor(w, device=dev), torch.tensor(m, device=dev), torch.tensor(pos, device=dev)))
    return out


@contextlib.contextmanager
def edge_gates(groups: list[EdgeGroup], gates: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's edges carry ``x * g + mean * (1 - g)`` with ``gates`` (one per
    edge, in the order the groups were built from; 0/1, or a Heaviside gate with a gradient)."""
    handles, owner = [], threading.get_ident()
    for grp in groups:
        def hook(module, inputs, out, grp=grp):
            if threading.get_ident() != owner:  # another thread's forward (cspkit.hooks: per thread)
                return None
            x = inputs[0]                                               # (B, T, in)
            scale = grp.weight * (gates[grp.pos] - 1)                   # (E,)
            carried = (x[..., grp.src] - grp.mean) * scale              # (B, T, E)
            return out.index_add(-1, grp.dst, carried.to(out.dtype))    # (B, T, out)
        handles.append(grp.module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def keep_edges(n_edges: int, keep, device=None) -> torch.Tensor:
    """0/1 gates over ``n_edges`` edges: 1 at the positions in ``keep``."""
    g = torch.zeros(n_edges, device=device)
    g[torch.as_tensor(list(keep), dtype=torch.long, device=device)] = 1.0
    return g
