"""The bridge itself: the maps between a dense and a sparse model's residuals at every site, the
passes that run through them, the training loss, and bridge files (docs/method.md, "Bridges").

Sites. A site is the residual stream entering a sublayer: ``L.attn`` (pre-norm, the residual
the read ``L.attn.in`` normalizes; ``0.attn`` is the embedding) and ``L.mlp``. The dense and
the sparse model must have the same number of layers, so the sites pair up; their widths may
differ. At every site the bridge holds an encoder, dense residual -> sparse residual (linear,
then AbsTopK), and a decoder, sparse residual -> dense residual (linear).

Hybrid passes switch model once: the dense model up to a site, the encoder, the sparse model
from there (``d2s``); or the sparse model up to a site, the decoder, the dense model from there
(``s2d``).
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .. import checkpoint as ckpt
from ..config import BridgeConfig, from_dict
from ..files import atomic_path
from ..model import GPT, abs_topk

KINDS = ("attn", "mlp")  # a layer's two sites, in forward order


def sites(n_layer: int) -> list[str]:
    """The site names in forward order: ``0.attn``, ``0.mlp``, ``1.attn``, ..."""
    return [f"{l}.{k}" for l in range(n_layer) for k in KINDS]


# --------------------------------------------------------------------------- the maps
class Bridge(nn.Module):
    """An encoder (dense -> sparse, linear then AbsTopK) and a decoder (sparse -> dense, linear)
    per site; ``enc[i]`` and ``dec[i]`` belong to ``sites[i]``. ``config``: the BridgeConfig it
    was trained with (None for a bridge built by hand).

    Each map works in each model's own units at the site: its input is centred and divided by
    that residual's RMS spread, its output multiplied back. The two models' residuals can differ
    in scale by orders of magnitude (the first shipped pair: about 5 vs 0.1 after the first MLP), and
    Adam moves every weight by about the same step whatever its size, so in raw units one
    learning rate would wreck the small encoder weights. The means and scales are set once from
    data (``init_maps_``) and then fixed."""

    def __init__(self, d_dense: int, d_sparse: int, n_layer: int, enc_afrac: float | None = 0.25,
                 config: BridgeConfig | None = None):
        super().__init__()
        self.sites = sites(n_layer)
        self.enc_afrac = enc_afrac
        self.config = config
        self.enc = nn.ModuleList(nn.Linear(d_dense, d_sparse) for _ in self.sites)
        self.dec = nn.ModuleList(nn.Linear(d_sparse, d_dense) for _ in self.sites)
        n = len(self.sites)
        self.register_buffer("mean_dense", torch.zeros(n, d_dense))
        self.register_buffer("scale_dense", torch.ones(n))
        self.register_buffer("mean_sparse", torch.zeros(n, d_sparse))
        self.register_buffer("scale_sparse", torch.ones(n))

    def encode(self, i: int, x: torch.Tensor) -> torch.Tensor:
        y = self.mean_sparse[i] + self.scale_sparse[i] * self.enc[i]((x - self.mean_dense[i]) / self.scale_dense[i])
        return abs_topk(y, max(1, int(self.enc_afrac * y.shape[-1]))) if self.enc_afrac else y

    def decode(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.mean_dense[i] + self.scale_dense[i] * self.dec[i]((x - self.mean_sparse[i]) / self.scale_sparse[i])

    def decode_change(self, i: int, dx: torch.Tensor) -> torch.Tensor:
        """The decoder's linear part: how a change ``dx`` of the sparse residual moves the decoded one."""
        return self.scale_dense[i] / self.scale_sparse[i] * F.linear(dx, self.dec[i].weight)

    def site_index(self, site: str) -> int:
        if site not in self.sites:
            raise KeyError(f"unknown site {site!r}; sites: {', '.join(self.sites)}")
        return self.sites.index(site)


def check_pair(dense: GPT, sparse: GPT) -> None:
    """The two models must read the same tokens and have sites that pair up."""
    d, s = dense.config, sparse.config
    problems = []
    if d.n_layer != s.n_layer:
        problems.append(f"n_layer {d.n_layer} vs {s.n_layer} (the sites pair layer by layer)")
    if d.vocab_size != s.vocab_size:
        problems.append(f"vocab_size {d.vocab_size} vs {s.vocab_size}")
    names = [getattr(m.encoding, "name", None) for m in (dense, sparse)]
    if None not in names and names[0] != names[1]:
        problems.append(f"tokenizer {names[0]} vs {names[1]}")
    if problems:
        raise ValueError("the dense and the sparse model cannot be bridged: " + "; ".join(problems) +
                         ". Bridge two models trained on the same data with the same tokenizer and depth")


# --------------------------------------------------------------------------- passes
def run_sublayers(model: GPT, idx: torch.Tensor, x: torch.Tensor | None = None, start: int = 0,
                  stop: int | None = None) -> torch.Tensor:
    """Run ``model`` from site ``start`` (its residual ``x``; default the embedding of idx) up to
    site ``stop``, and return that residual (B, T, d_model); with stop None, to the end: logits."""
    if x is None:
        x = model.embed(idx)
    for _, fn in model.sublayers()[start:stop]:
        x = fn(x)
    return x if stop is not None else model.unembed(x, idx)


def residuals(model: GPT, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward pass: the logits and the residual at every site."""
    x, out = model.embed(idx), []
    for _, fn in model.sublayers():
        out.append(x)
        x = fn(x)
    return model.unembed(x, idx), out


def nmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Normalized MSE over all tokens: squared error / the target's squared deviation from its
    mean over tokens. 0 is a perfect map, 1 the map that predicts the mean; 1 - nmse is the
    fraction of variance explained. The normalizer carries no gradient, so a model cannot lower
    the loss by inflating its own variance."""
    flat = target.flatten(0, -2)                                          # (tokens, d)
    var = (flat - flat.mean(0)).pow(2).sum().detach()
    return (pred - target).pow(2).sum() / var.clamp_min(1e-12)


def kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(dense || other) of the next-token distributions, nats per token, mean over tokens."""
    p = F.log_softmax(dense_logits.flatten(0, -2).float(), -1)           # (tokens, vocab)
    q = F.log_softmax(logits.flatten(0, -2).float(), -1)
    return F.kl_div(q, p, log_target=True, reduction="batchmean")


def hybrid(dense: GPT, sparse: GPT, bridge: Bridge, idx: torch.Tensor, site: str, direction: str) -> torch.Tensor:
    """Logits of a hybrid pass that switches at ``site``: ``d2s`` (dense prefix, encoder, sparse
    suffix) or ``s2d`` (sparse prefix, decoder, dense suffix)."""
    i = bridge.site_index(site)
    if direction == "d2s":
        return run_sublayers(sparse, idx, bridge.encode(i, run_sublayers(dense, idx, stop=i)), start=i)
    if direction == "s2d":
        return run_sublayers(dense, idx, bridge.decode(i, run_sublayers(sparse, idx, stop=i)), start=i)
    raise ValueError(f"direction must be 'd2s' or 's2d', got {direction!r}")


def bridge_loss(dense: GPT, sparse: GPT, bridge: Bridge, x: torch.Tensor, y: torch.Tensor, bcfg: BridgeConfig,
                kl_sites: list[int]) -> dict[str, torch.Tensor]:
    """The loss and its terms on one batch: ``lm`` (the sparse model's), ``nmse_enc``,
    ``nmse_dec`` (mean over all sites), ``kl_d2s``, ``kl_s2d`` (mean over ``kl_sites``).

    loss = lm + nmse_coef * (nmse_enc + nmse_dec) + kl_coef * (kl_d2s + kl_s2d), each KL that of
    the dense output from the hybrid pass's. The dense model runs without gradients."""
    with torch.no_grad():
        dense_logits, rd = residuals(dense, x)
    sparse_logits, rs = residuals(sparse, x)
    lm = F.cross_entropy(sparse_logits.flatten(0, 1), y.flatten())
    enc = [bridge.encode(i, r) for i, r in enumerate(rd)]
    dec = [bridge.decode(i, r) for i, r in enumerate(rs)]
    t = {"lm": lm,
         "nmse_enc": torch.stack([nmse(e, r) for e, r in zip(enc, rs)]).mean(),
         "nmse_dec": torch.stack([nmse(d, r) for d, r in zip(dec, rd)]).mean()}
    zero, n = lm.new_zeros(()), max(1, len(kl_sites))
    t["kl_d2s"] = sum((kl(dense_logits, run_sublayers(sparse, x, enc[i], i)) for i in kl_sites), zero) / n
    t["kl_s2d"] = sum((kl(dense_logits, run_sublayers(dense, x, dec[i], i)) for i in kl_sites), zero) / n
    t["loss"] = lm + bcfg.nmse_coef * (t["nmse_enc"] + t["nmse_dec"]) + bcfg.kl_coef * (t["kl_d2s"] + t["kl_s2d"])
    return t


def step_sites(n_sites: int, bcfg: BridgeConfig, seed: int, step: int) -> list[int]:
    """The sites that run the hybrid passes at ``step``: all, or kl_sites of them drawn from
    (seed, step), so a resumed run draws the same ones."""
    if bcfg.kl_coef == 0:
        return []
    if bcfg.kl_sites is None or bcfg.kl_sites >= n_sites:
        return list(range(n_sites))
    return sorted(random.Random(f"{seed}/{step}").sample(range(n_sites), bcfg.kl_sites))


@torch.no_grad()
def init_maps_(bridge: Bridge, rd: list[torch.Tensor], rs: list[torch.Tensor], ridge: float = 1e-4) -> None:
    """Set every site's means and scales from one batch of residuals (dense ``rd``, sparse ``rs``,
    one (B, T, d) per site) and start each map at the ridge least-squares fit on that batch, so
    that training starts from the best linear map rather than from noise."""
    for i in range(len(bridge.sites)):
        for r, mean, scale in ((rd[i], bridge.mean_dense, bridge.scale_dense),
                               (rs[i], bridge.mean_sparse, bridge.scale_sparse)):
            flat = r.flatten(0, -2)                                       # (tokens, d)
            mean[i] = flat.mean(0)
            scale[i] = (flat - mean[i]).pow(2).mean().sqrt().clamp_min(1e-6)
        xd = ((rd[i] - bridge.mean_dense[i]) / bridge.scale_dense[i]).flatten(0, -2)
        xs = ((rs[i] - bridge.mean_sparse[i]) / bridge.scale_sparse[i]).flatten(0, -2)
        for lin, a, b in ((bridge.enc[i], xd, xs), (bridge.dec[i], xs, xd)):
            X = F.pad(a.double(), (0, 1), value=1.0)                      # (tokens, d_in + 1): a bias column
            gram = X.T @ X
            gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            sol = torch.linalg.solve(gram, X.T @ b.double())              # (d_in + 1, d_out)
            lin.weight.copy_(sol[:-1].T)
            lin.bias.copy_(sol[-1])


# --------------------------------------------------------------------------- files
def file_digest(path: str | os.PathLike) -> str:
    """A short digest of a file's bytes: how a bridge names the very weights it was trained with."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def save_bridge(bridge: Bridge, path: Path) -> None:
    """The maps' weights and buffers to a safetensors file (atomically)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in bridge.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def _named_model(bridge_dir: Path, ref: dict, what: str, given: str | os.PathLike | None) -> Path:
    """The checkpoint directory a bridge names for its dense model (or its frozen sparse model),
    relative to the bridge directory unless ``given``: it must hold the very weights the bridge
    was trained with."""
    d = Path(given) if given is not None else Path(os.path.normpath(bridge_dir / ref["path"]))
    if not (d / "model.safetensors").is_file():
        raise FileNotFoundError(f"the bridge's {what} model {d} is missing; pass its directory ({what}=...)")
    if file_digest(d / "model.safetensors") != ref["fingerprint"]:
        raise ValueError(f"{d} is not the {what} model {bridge_dir} was trained against (its weights differ); "
                         f"pass that model's directory ({what}=...)")
    return d


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dense: str | os.PathLike | None = None,
         sparse: str | os.PathLike | None = None) -> tuple[GPT, GPT, Bridge]:
    """(dense, sparse, bridge) from a bridge directory written by ``train``. The dense model, and a
    sparse model that stayed frozen, are found where the bridge recorded them (relative to the
    bridge directory) unless ``dense`` / ``sparse`` say where; either way each must be the very
    model the bridge was trained with. A sparse model that learned is the bridge's own ``sparse/``.

    >>> from cspkit import bridges, paths
    >>> dense, sparse, bridge = bridges.load(paths.models_dir() / "small-bridge")
    >>> bridge.sites[:3], len(bridge.sites) == 2 * dense.config.n_layer
    (['0.attn', '0.mlp', '1.attn'], True)
    >>> bridge.config.train_sparse    # the shipped bridge left small-sparse as it was
    False
    """
    path = Path(path)
    cfg = ckpt.read_config(path)
    if "bridge" not in cfg:
        raise ValueError(f"{path} is not a bridge directory (its config.json has no 'bridge'); "
                         "pass a directory written by `cspkit bridge`")
    dense_dir = _named_model(path, cfg["dense_model"], "dense", dense)
    sparse_dir = _named_model(path, cfg["sparse_model"], "sparse", sparse) if "sparse_model" in cfg else path / "sparse"
    dense_model, sparse_model = ckpt.load(dense_dir, device), ckpt.load(sparse_dir, device)
    bcfg = from_dict(BridgeConfig, cfg["bridge"], "bridge config")
    bridge = Bridge(dense_model.config.d_model, sparse_model.config.d_model, sparse_model.config.n_layer,
                    bcfg.enc_afrac, config=bcfg)
    state = load_file(str(path / "bridge.safetensors"))
    ckpt.load_state_into(bridge, state, str(path / "bridge.safetensors"))
    return dense_model, sparse_model, bridge.to(device).eval()
