"""Activating examples at quantiles of the pretraining distribution: for every node of a model,
its activation at the top and bottom 0.1, 1 and 10 percent and at the median over 65,536 tokens
of its training corpus, and the tokens where it takes those values, to show in context.

Computed once per model (one forward pass over the tokens per layer, keeping that layer's
activations only, so that memory holds one layer's at a time) and cached in ``examples.safetensors``
beside the checkpoint's weights and node means, written atomically. The file records the
model's weight fingerprint, the corpus digest and the settings; a file for other weights,
another corpus or other settings is rebuilt.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..ablation import fingerprint, node_widths
from ..data import TokenData, build_shards
from ..files import atomic_path
from ..model import GPT
from .stats import as_node, model_encoding

EXAMPLES_FILE = "examples.safetensors"
# (label, quantile): the value below which that fraction of the node's activations lies
LEVELS = (("top 0.1%", 0.999), ("top 1%", 0.99), ("top 10%", 0.9), ("median", 0.5),
          ("bottom 10%", 0.1), ("bottom 1%", 0.01), ("bottom 0.1%", 0.001))


@dataclass
class QuantileExamples:
    """``tokens`` (windows, T): the corpus windows. Per location: ``values[loc]`` (levels, width),
    each node's activation at each quantile of LEVELS; ``positions[loc]`` (levels, n, width), flat
    positions (window * T + token) of the n tokens whose activation is nearest that value, and
    ``at[loc]`` their activations."""
    tokens: torch.Tensor
    values: dict[str, torch.Tensor]
    positions: dict[str, torch.Tensor]
    at: dict[str, torch.Tensor]
    meta: dict[str, str]

    def examples(self, node) -> list[tuple[str, float, list[tuple[int, int, float]]]]:
        """(level, quantile value, [(window, token, activation), ...]) for each level of LEVELS."""
        loc, i = as_node(node)
        T = self.tokens.shape[1]
        return [(label, float(self.values[loc][j, i]),
                 [(*divmod(int(p), T), float(a)) for p, a in zip(self.positions[loc][j, :, i], self.at[loc][j, :, i])])
                for j, (label, _) in enumerate(LEVELS)]


_CACHE: dict[tuple, QuantileExamples] = {}


def _corpus(model: GPT) -> tuple[TokenData, str]:
    train_cfg = (getattr(model, "checkpoint", None) or {}).get("train") or {}
    info = build_shards(train_cfg.get("corpus"), train_cfg.get("val_percent", 5.0))
    return TokenData(info, "train", train_cfg.get("corpus_weights")), str(info.get("digest"))


@torch.no_grad()
def compute_examples(model: GPT, n_tokens: int = 65536, n_examples: int = 2, seed: int = 0,
                     batch_size: int = 16) -> QuantileExamples:
    """QuantileExamples over ``n_tokens`` tokens of random training windows of the model's corpus."""
    data, digest = _corpus(model)
    T = model.config.block_size
    n_windows = -(-n_tokens // T)
    tokens = torch.cat([data.batch(min(batch_size, n_windows - s), T, seed, s // batch_size)[0]
                        for s in range(0, n_windows, batch_size)])                        # (windows, T)
    q = torch.tensor([level for _, level in LEVELS])
    values, positions, at = {}, {}, {}
    model.eval()
    widths = node_widths(model.config)
    for layer in range(model.config.n_layer):
        locs = [loc for loc in widths if loc.startswith(f"{layer}.")]
        acts = {loc: [] for loc in locs}
        for s in range(0, n_windows, batch_size):
            _, cache = model.run_with_cache(tokens[s:s + batch_size].to(model.device), names=locs)
            for loc in locs:
                acts[loc].append(cache[loc].flatten(0, 1).float().cpu())          # (batch * T, width)
        for loc in locs:
            a = torch.cat(acts.pop(loc))                                            # (tokens, width)
            srt = a.sort(0).values
            v = srt[(q * (a.shape[0] - 1)).round().long()]                          # (levels, width)
            near = torch.stack([(a - v[j]).abs().topk(n_examples, dim=0, largest=False).indices
                                for j in range(len(LEVELS))])                        # (levels, n, width)
            values[loc], positions[loc] = v, near.int()
            at[loc] = torch.gather(a.expand(len(LEVELS), -1, -1), 1, near)
    meta = {"fingerprint": fingerprint(model), "corpus": digest, "n_tokens": str(n_tokens),
            "n_examples": str(n_examples), "seed": str(seed)}
    return QuantileExamples(tokens.int(), values, positions, at, meta)


def quantile_examples(model: GPT, n_tokens: int = 65536, n_examples: int = 2, seed: int = 0) -> QuantileExamples:
    """QuantileExamples of a model, computed once: kept in memory and, for a model loaded from a
    checkpoint directory, in ``examples.safetensors`` beside its weights (rebuilt when it was
    made for other weights, another corpus or other settings)."""
    fp = fingerprint(model)
    key = (fp, n_tokens, n_examples, seed)
    if key in _CACHE:
        return _CACHE[key]
    path = Path(model.path) / EXAMPLES_FILE if getattr(model, "path", None) else None
    want = {"fingerprint": fp, "n_tokens": str(n_tokens), "n_examples": str(n_examples), "seed": str(seed)}
    found = None
    if path is not None and path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if all(meta.get(k) == v for k, v in want.items()) and meta.get("corpus") == _corpus(model)[1]:
                t = {k: f.get_tensor(k) for k in f.keys()}
                locs = [k[: -len(".values")] for k in t if k.endswith(".values")]
                found = QuantileExamples(t["tokens"], {loc: t[f"{loc}.values"] for loc in locs},
                                         {loc: t[f"{loc}.positions"] for loc in locs},
                                         {loc: t[f"{loc}.at"] for loc in locs}, meta)
    if found is None:
        found = compute_examples(model, n_tokens, n_examples, seed)
        if path is not None:
            tensors = {"tokens": found.tokens}
            for loc in found.values:
                tensors.update({f"{loc}.values": found.values[loc], f"{loc}.positions": found.positions[loc],
                                f"{loc}.at": found.at[loc].contiguous()})
            try:
                with atomic_path(path) as tmp:
                    save_file(tensors, str(tmp), metadata=found.meta)
            except OSError:
                pass  # a read-only checkpoint: keep them in memory only
    _CACHE[key] = found
    return found


def decode_window(model: GPT, ex: QuantileExamples, window: int, lo: int, hi: int) -> list[str]:
    enc = model_encoding(model)
    return [enc.decode([t]) for t in ex.tokens[window, lo:hi].tolist()]
