"""Nodes, their means over pretraining tokens, and forward passes with nodes ablated.

A node is one element of one node location: ``("1.mlp.neuron", 37)``, written
``1.mlp.neuron[37]``. A gate per node (1 keeps it, 0 ablates it; values in between are only
seen by the surrogate gradient) turns a location's activation x into
``x * gate + (1 - gate) * ablated``, where ``ablated`` is the node's mean over pretraining
tokens (``mean``), zero (``zero``), or its activation on another task prompt (``resample``).
"""
from __future__ import annotations

import hashlib
import weakref
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .data import TokenData, build_shards
from .files import atomic_path
from .model import GPT, location_names

ABLATIONS = ("mean", "zero", "resample")
MEANS_FILE = "means.safetensors"
# each live model's node means, with the metadata they were computed under; dropped with the model
_MEANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def node_widths(cfg: ModelConfig) -> dict[str, int]:
    """Node location -> number of nodes, in forward order."""
    inner = cfg.n_head * cfg.d_head
    per = {"attn.in": cfg.d_model, "attn.q": inner, "attn.k": inner, "attn.v": inner,
           "attn.out": cfg.d_model, "mlp.in": cfg.d_model, "mlp.neuron": cfg.d_mlp, "mlp.out": cfg.d_model}
    return {loc: per[loc.split(".", 1)[1]] for loc in location_names(cfg.n_layer)}


def check_ablation(kind: str) -> None:
    if kind not in ABLATIONS:
        raise ValueError(f"unknown ablation {kind!r}; choose one of {', '.join(ABLATIONS)}")


def fingerprint(model: GPT) -> str:
    """A short hash of the weights: circuit and means files name the model they belong to."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_means(model: GPT, n_tokens: int = 65536, seed: int = 0, corpus: list[str] | None = None,
                  batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Mean of every node over ``n_tokens`` tokens of random training windows of ``corpus``
    (default: the corpus the checkpoint was trained on, mixed by its corpus_weights, else the
    standard library)."""
    ckpt = getattr(model, "checkpoint", None) or {}
    train_cfg = ckpt.get("train") or {}
    weights = train_cfg.get("corpus_weights") if corpus is None else None
    corpus = corpus if corpus is not None else train_cfg.get("corpus")
    data = TokenData(build_shards(corpus, train_cfg.get("val_percent", 5.0)), "train", weights)
    T = model.config.block_size
    sums = {loc: torch.zeros(w, dtype=torch.float64) for loc, w in node_widths(model.config).items()}
    seen, step = 0, 0
    model.eval()
    while seen < n_tokens:
        x, _ = data.batch(batch_size, T, seed, step)
        _, cache = model.run_with_cache(x.to(model.device), names=list(sums))
        for loc, act in cache.items():
            sums[loc] += act.double().sum((0, 1)).cpu()
        seen += x.numel()
        step += 1
    return {loc: (s / seen).float() for loc, s in sums.items()}


def node_means(model: GPT, n_tokens: int = 65536, seed: int = 0) -> dict[str, torch.Tensor]:
    """Node means, computed once per model: kept in memory while the model lives and, for a model
    loaded from a checkpoint directory, in ``means.safetensors`` beside its weights."""
    fp = fingerprint(model)
    meta = {"fingerprint": fp, "n_tokens": str(n_tokens), "seed": str(seed)}
    cached = _MEANS.get(model)
    if cached is not None and cached[0] == meta:
        return cached[1]
    path = Path(model.path) / MEANS_FILE if getattr(model, "path", None) else None
    means = None
    if path is not None and path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if f.metadata() == meta:
                means = {k: f.get_tensor(k) for k in f.keys()}
    if means is None:
        means = compute_means(model, n_tokens, seed)
        if path is not None:
            try:
                with atomic_path(path) as tmp:
                    save_file({k: v.contiguous() for k, v in means.items()}, str(tmp), metadata=meta)
            except OSError:
                pass  # a read-only checkpoint: keep the means in memory only
    means = {k: v.to(model.device) for k, v in means.items()}
    _MEANS[model] = (meta, means)
    return means


def ablation_values(model: GPT, kind: str, tokens: torch.Tensor | None = None,
                    shift: int = 1) -> dict[str, torch.Tensor]:
    """What an ablated node becomes, per location: (width,) for mean and zero ablation;
    for resample, (N, T, width) activations of the prompts rolled by ``shift`` along the
    batch, so every prompt takes its values from another prompt."""
    check_ablation(kind)
    if kind == "mean":
        return node_means(model)
    if kind == "zero":
        return {loc: torch.zeros(w, device=model.device) for loc, w in node_widths(model.config).items()}
    if tokens is None:
        raise ValueError("resample ablation needs the prompts' tokens")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.roll(shift, 0).to(model.device),
                                        names=list(node_widths(model.config)))
    return cache


def resample_shift(n_prompts: int, rng: torch.Generator) -> int:
    """A roll that never maps a prompt onto itself or onto its pair partner (the other half)."""
    if n_prompts < 4:
        raise ValueError("resample ablation needs at least 2 pairs")
    half = n_prompts // 2
    choices = [s for s in range(1, n_prompts) if s != half]
    return choices[int(torch.randint(len(choices), (1,), generator=rng))]


def gate_hooks(gates: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> dict:
    """Hooks that apply ``x * g + (1 - g) * v`` at every location in ``gates``."""
    def fn(x, name):
        g, v = gates[name], values[name]
        return x * g + (1 - g) * v
    return {name: fn for name in gates}


def keep_gates(cfg: ModelConfig, nodes: dict[str, list[int]] | None, device=None,
               invert: bool = False) -> dict[str, torch.Tensor]:
    """0/1 gates that keep exactly ``nodes`` ({location: indices}); ``invert`` ablates them instead."""
    gates = {}
    for loc, w in node_widths(cfg).items():
        g = torch.zeros(w, device=device)
        idx = (nodes or {}).get(loc, [])
        if len(idx):
            g[torch.as_tensor(idx, dtype=torch.long, device=device)] = 1.0
        gates[loc] = 1 - g if invert else g
    return gates
