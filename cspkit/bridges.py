"""Bridges between a dense and a sparse model, and steering the dense model through sparse
channels (METHOD.md section 5).

Sites. A site is the residual stream entering a sublayer: ``L.attn`` (pre-norm, the residual
the read ``L.attn.in`` normalizes; ``0.attn`` is the embedding) and ``L.mlp``. The dense and
the sparse model must have the same number of layers, so the sites pair up; their widths may
differ. At every site the bridge holds an encoder, dense residual -> sparse residual (linear,
then AbsTopK), and a decoder, sparse residual -> dense residual (linear).

Hybrid passes switch model once: the dense model up to a site, the encoder, the sparse model
from there (``d2s``); or the sparse model up to a site, the decoder, the dense model from there
(``s2d``).

Loss (BridgeConfig): the sparse model's language-model loss, plus nmse_coef times both maps'
normalized MSE, plus kl_coef times both hybrid passes' KL(dense output || hybrid output); the
bridge terms are averaged over sites. The dense model is frozen; gradients flow into the maps
and the sparse model (unless ``train_sparse`` is off).

Steering (``intervene``): change one sparse read channel by delta at every token, map that
change through the decoder into the dense residual at the channel's site, add it, and run the
dense model on. See ``steering_vector`` for the exact map and its rescaling.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import checkpoint as ckpt
from . import tasks as tasks_mod
from .config import BridgeConfig, ModelConfig, TrainConfig, bridge_profile, from_dict, override_configs, to_dict
from .data import TokenData, build_shards
from .files import atomic_path, atomic_write
from .model import GPT, abs_topk, node_name, parse_node
from .sparsity import project_model_
from .train import (check_resumable, check_same_corpus, corpus_record, decayed, fit, optimizer_step, pick_device,
                    provenance, save_resume, schedule, start_log)

if TYPE_CHECKING:
    from .circuit import Circuit

KINDS = ("attn", "mlp")  # a layer's two sites, in forward order


def sites(n_layer: int) -> list[str]:
    """The site names in forward order: ``0.attn``, ``0.mlp``, ``1.attn``, ..."""
    return [f"{l}.{k}" for l in range(n_layer) for k in KINDS]


# --------------------------------------------------------------------------- the maps
class Bridge(nn.Module):
    """An encoder (dense -> sparse, linear then AbsTopK) and a decoder (sparse -> dense, linear)
    per site; ``enc[i]`` and ``dec[i]`` belong to ``sites[i]``.

    Each map works in each model's own units at the site: its input is centred and divided by
    that residual's RMS spread, its output multiplied back. The two models' residuals can differ
    in scale by orders of magnitude (the first shipped pair: about 5 vs 0.1 after the first MLP), and
    Adam moves every weight by about the same step whatever its size, so in raw units one
    learning rate would wreck the small encoder weights. The means and scales are set once from
    data (``init_maps_``) and then fixed."""

    def __init__(self, d_dense: int, d_sparse: int, n_layer: int, enc_afrac: float | None = 0.25):
        super().__init__()
        self.sites = sites(n_layer)
        self.enc_afrac = enc_afrac
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
    ``nmse_dec`` (mean over all sites), ``kl_d2s``, ``kl_s2d`` (mean over ``kl_sites``)."""
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
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def save_bridge(bridge: Bridge, path: Path) -> None:
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
    model the bridge was trained with. A sparse model that learned is the bridge's own ``sparse/``."""
    path = Path(path)
    cfg = ckpt.read_config(path)
    if "bridge" not in cfg:
        raise ValueError(f"{path} is not a bridge directory (its config.json has no 'bridge'); "
                         "pass a directory written by `cspkit bridge`")
    dense_dir = _named_model(path, cfg["dense_model"], "dense", dense)
    sparse_dir = _named_model(path, cfg["sparse_model"], "sparse", sparse) if "sparse_model" in cfg else path / "sparse"
    dense_model, sparse_model = ckpt.load(dense_dir, device), ckpt.load(sparse_dir, device)
    bcfg = from_dict(BridgeConfig, cfg["bridge"], "bridge config")
    bridge = Bridge(dense_model.config.d_model, sparse_model.config.d_model, sparse_model.config.n_layer, bcfg.enc_afrac)
    state = load_file(str(path / "bridge.safetensors"))
    ckpt.load_state_into(bridge, state, str(path / "bridge.safetensors"))
    bridge.config = bcfg
    return dense_model, sparse_model, bridge.to(device).eval()


# --------------------------------------------------------------------------- training
def configs_for(profile_name: str, dense: str | os.PathLike, sparse: str | os.PathLike | None = None,
                seed: int | None = None, max_steps: int | None = None, overrides: list[str] | None = None
                ) -> tuple[ModelConfig, BridgeConfig, TrainConfig]:
    """The configs of a bridge run: a bridge profile, then ``overrides`` (``bridge.X``, ``train.X``,
    and for a sparse model trained from scratch ``model.X``); returns (sparse model, bridge, train).
    A profile that names no corpus takes the dense checkpoint's.

    With ``sparse`` (a checkpoint directory) the sparse model is fine-tuned: it starts from those
    weights (train.init_from) and keeps their sparsity from the first step (the checkpoint's L0
    fractions, no annealing). Without it, the sparse model is trained from scratch jointly with
    the bridge (the paper's way), in the dense model's shape and annealed like ``cspkit train``."""
    bcfg, tcfg = bridge_profile(profile_name)
    dense_cfg = ckpt.read_config(dense)
    if tcfg.corpus is None:
        # the maps learn on the text the dense model learned on, not the profile's default
        t = dense_cfg.get("train", {})
        tcfg = replace(tcfg, corpus=t.get("corpus"), corpus_weights=t.get("corpus_weights"),
                       val_percent=t.get("val_percent", tcfg.val_percent))
    keys = {o.split("=", 1)[0].removeprefix("train.") for o in overrides or []}
    if "corpus" in keys and "corpus_weights" not in keys:
        tcfg = replace(tcfg, corpus_weights=None)  # the dense model's mixture is of its own corpus
    if sparse is not None:
        src = ckpt.read_config(sparse)
        t = src.get("train", {})
        tcfg = replace(tcfg, init_from=str(sparse), anneal_start=0.0, anneal_end=0.0, dense=bool(src.get("dense")),
                       **{k: t[k] for k in ("l0_frac", "l0_frac_embed", "min_per_neuron") if k in t})
        model_keys = [o for o in overrides or [] if o.startswith("model.")]
        if model_keys:
            raise ValueError(f"{model_keys}: model overrides apply only to a sparse model trained from scratch; "
                             "a fine-tuned one keeps the shape of its checkpoint")
    mcfg = from_dict(ModelConfig, (src if sparse is not None else dense_cfg)["model"], "model config")
    if seed is not None:
        tcfg = replace(tcfg, seed=seed)
    if max_steps is not None:
        tcfg = replace(tcfg, max_steps=max_steps)
    out = override_configs({"bridge": bcfg, "train": tcfg, "model": mcfg}, overrides or [])
    return out["model"], out["bridge"], out["train"]


def train(dense_dir: str | os.PathLike, out: str | os.PathLike, bcfg: BridgeConfig, tcfg: TrainConfig,
          mcfg: ModelConfig | None = None, progress: bool = True, command: str | None = None
          ) -> tuple[GPT, GPT, Bridge]:
    """Train (or resume) a bridge to the frozen dense model in ``dense_dir`` into ``out``; returns
    (dense, sparse, bridge). The sparse model starts from the checkpoint ``tcfg.init_from``
    (fine-tuning; its shape) or from scratch with ``mcfg`` (default: the dense model's shape).
    One process.

    ``out`` holds ``config.json``, ``bridge.safetensors``, ``log.jsonl`` and ``resume.pt``, written
    as ``cspkit train`` writes them: a killed run resumes from its last checkpoint with the same
    result. A sparse model that learns is saved in ``sparse/`` (a checkpoint that ``cspkit.load``
    reads); a frozen one is the checkpoint it started from, weight for weight, and the config
    names that checkpoint (path and fingerprint) as it names the dense model."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("bridge training runs in one process; start it without torchrun")
    out, dense_dir = Path(out), Path(dense_dir)
    device = pick_device(tcfg.device)
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    dense = ckpt.load(dense_dir, device).requires_grad_(False)
    src = ckpt.load(tcfg.init_from, device) if tcfg.init_from else None
    if src is not None and mcfg is not None and mcfg != src.config:
        raise ValueError(f"train.init_from={tcfg.init_from} has another model config than the one given; "
                         "leave the model config out when fine-tuning")
    mcfg = src.config if src is not None else mcfg or dense.config
    if dense.config.block_size < mcfg.block_size:
        raise ValueError(f"the dense model's block_size {dense.config.block_size} is shorter than the sparse "
                         f"model's {mcfg.block_size}, the length bridge training uses")
    info = build_shards(tcfg.corpus, tcfg.val_percent)
    train_data = TokenData(info, "train", tcfg.corpus_weights)
    val_data = TokenData(info, "val", tcfg.corpus_weights)

    torch.manual_seed(tcfg.seed)
    sparse = GPT(mcfg).to(device)
    sparse.encoding = src.encoding if src is not None else dense.encoding
    check_pair(dense, sparse)
    bridge = Bridge(dense.config.d_model, mcfg.d_model, mcfg.n_layer, bcfg.enc_afrac).to(device)
    bridge.config = bcfg
    sparse.requires_grad_(bcfg.train_sparse)
    groups = [list(bridge.parameters())] + ([list(sparse.parameters())] if bcfg.train_sparse else [])
    # each group's gradient is rescaled to RMS 1 on its own (optimizer_step), so the maps'
    # gradients cannot drown the sparse model's
    opt = torch.optim.Adam([{"params": g} for g in groups], lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps,
                           weight_decay=0.0)
    # weight decay on the sparse model's matrices only: the maps must span residual scales that
    # differ by orders of magnitude, and decay would pull them off
    decay = decayed(sparse) if bcfg.train_sparse else []
    project = bcfg.train_sparse and not tcfg.dense

    fingerprint = file_digest(dense_dir / "model.safetensors")
    sections = {"model": to_dict(mcfg), "train": to_dict(tcfg), "bridge": to_dict(bcfg),
                "dense_model": {"fingerprint": fingerprint}}
    start, resume = 0, out / "resume.pt"
    corpus = corpus_record(info, tcfg)
    if resume.is_file():
        check_resumable(out, sections)
        check_same_corpus(out, corpus)
        state = torch.load(resume, map_location=device, weights_only=True)
        sparse.load_state_dict(state["model"])
        bridge.load_state_dict(state["bridge"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    else:
        if src is not None:
            sparse.load_state_dict(src.state_dict())
        if project:
            s = schedule(0, tcfg)
            project_model_(sparse, s["frac_matrix"], s["frac_embed"], tcfg.min_per_neuron)
        # four batches' worth: on one, d_model + 1 weights per output overfit (first shipped pair, held-out
        # FVE at the start: 0.17-0.45 from one batch, 0.30-0.56 from four)
        x, _ = train_data.batch(4 * tcfg.batch_size, mcfg.block_size, tcfg.seed, 0)
        with torch.no_grad():
            init_maps_(bridge, residuals(dense, x.to(device))[1], residuals(sparse, x.to(device))[1])

    extra = {**sections, "dense_model": {"path": os.path.relpath(dense_dir.resolve(), out.resolve()),
                                         "fingerprint": fingerprint}, "corpus": corpus, "seed": tcfg.seed,
             **provenance(out, start, command)}
    frozen_src = Path(tcfg.init_from) if src is not None and not bcfg.train_sparse else None
    if frozen_src is not None:
        extra["sparse_model"] = {"path": os.path.relpath(frozen_src.resolve(), out.resolve()),
                                 "fingerprint": file_digest(frozen_src / "model.safetensors")}
    out.mkdir(parents=True, exist_ok=True)
    start_log(out, start)

    def save_all(step: int, val_loss: float | None):
        if step:
            save_resume(resume, {"model": sparse.state_dict(), "bridge": bridge.state_dict(),
                                 "optimizer": opt.state_dict(), "step": step})
        meta = {"step": step, "val_loss": val_loss}
        if frozen_src is None:
            ckpt.save(sparse, out / "sparse", {"train": to_dict(tcfg), "seed": tcfg.seed, "dense": tcfg.dense, **meta})
        save_bridge(bridge, out / "bridge.safetensors")
        cfg = {"tokenizer": dense.encoding.name, **extra, **meta}  # extra holds the start commit
        atomic_write(out / "config.json", json.dumps(cfg, indent=1) + "\n")

    if not start:
        save_all(0, None)

    def step_fn(step: int, s: dict[str, float]):
        x, y = train_data.batch(tcfg.batch_size, mcfg.block_size, tcfg.seed, step)
        t = bridge_loss(dense, sparse, bridge, x.to(device), y.to(device), bcfg,
                        step_sites(len(bridge.sites), bcfg, tcfg.seed, step))
        opt.zero_grad(set_to_none=True)
        t["loss"].backward()
        optimizer_step(opt, s, tcfg, groups, decay)
        if project:
            project_model_(sparse, s["frac_matrix"], s["frac_embed"], tcfg.min_per_neuron)
        return t["loss"].detach(), {k: v.detach() for k, v in t.items() if k != "loss"}

    @torch.no_grad()
    def eval_fn():
        every = list(range(len(bridge.sites)))
        terms = [bridge_loss(dense, sparse, bridge, x.to(device), y.to(device), bcfg, every)
                 for x, y in (val_data.batch(tcfg.batch_size, mcfg.block_size, seed=-1, step=i)
                              for i in range(tcfg.eval_batches))]
        mean = {k: float(sum(t[k] for t in terms) / len(terms)) for k in terms[0] if k != "loss"}
        return {"val_loss": mean.pop("lm"), **{f"val_{k}": v for k, v in mean.items()}}

    sparse.train()
    fit(tcfg, start, step_fn, eval_fn, save_all, out, tcfg.batch_size * mcfg.block_size, progress, desc="bridge")
    return dense, sparse.eval(), bridge.eval()


# --------------------------------------------------------------------------- quality
@torch.no_grad()
def quality(dense: GPT, sparse: GPT, bridge: Bridge, tokens: torch.Tensor, batch_size: int = 8) -> dict:
    """How good the bridge is on ``tokens`` (N, T), averaged over batches of ``batch_size``.

    ``sites``: per site, each map's fraction of variance explained (``fve_enc``, ``fve_dec``; the
    map that predicts the mean scores 0) and each hybrid pass's KL from the dense output
    (``kl_d2s``, ``kl_s2d``), beside two trivial baselines on the dense model: ``kl_skip`` (the
    sublayer entered at the site skipped) and ``kl_mean`` (the residual at the site replaced by
    its mean over tokens). ``kl_sparse``: the KL of the sparse model's own output."""
    keys = ("fve_enc", "fve_dec", "kl_d2s", "kl_s2d", "kl_skip", "kl_mean")
    acc = [dict.fromkeys(keys, 0.0) for _ in bridge.sites]
    kl_sparse, batches = 0.0, 0
    for b in range(0, tokens.shape[0], batch_size):
        x = tokens[b:b + batch_size].to(dense.device)
        dl, rd = residuals(dense, x)
        sl, rs = residuals(sparse, x)
        kl_sparse += float(kl(dl, sl))
        for i, row in enumerate(acc):
            e, d = bridge.encode(i, rd[i]), bridge.decode(i, rs[i])
            mean = rd[i].flatten(0, 1).mean(0).expand_as(rd[i])
            row["fve_enc"] += 1 - float(nmse(e, rs[i]))
            row["fve_dec"] += 1 - float(nmse(d, rd[i]))
            row["kl_d2s"] += float(kl(dl, run_sublayers(sparse, x, e, i)))
            row["kl_s2d"] += float(kl(dl, run_sublayers(dense, x, d, i)))
            row["kl_skip"] += float(kl(dl, run_sublayers(dense, x, rd[i], i + 1)))
            row["kl_mean"] += float(kl(dl, run_sublayers(dense, x, mean, i)))
        batches += 1
    return {"sites": [{"site": s, **{k: v / batches for k, v in a.items()}} for s, a in zip(bridge.sites, acc)],
            "kl_sparse": kl_sparse / batches, "tokens": int(tokens.numel())}


def val_tokens(tcfg: TrainConfig, block_size: int, batches: int | None = None) -> torch.Tensor:
    """``batches`` (default eval_batches) validation batches of the run's corpus, stacked (N, T)."""
    data = TokenData(build_shards(tcfg.corpus, tcfg.val_percent), "val", tcfg.corpus_weights)
    return torch.cat([data.batch(tcfg.batch_size, block_size, seed=-1, step=i)[0]
                      for i in range(batches or tcfg.eval_batches)])


def format_quality(q: dict) -> str:
    lines = [f"{'site':8s} {'FVE enc':>8s} {'FVE dec':>8s} {'KL d2s':>8s} {'KL s2d':>8s}   "
             f"{'KL skip':>8s} {'KL mean':>8s}"]
    for r in q["sites"]:
        lines.append(f"{r['site']:8s} {r['fve_enc']:>8.3f} {r['fve_dec']:>8.3f} {r['kl_d2s']:>8.3f} "
                     f"{r['kl_s2d']:>8.3f}   {r['kl_skip']:>8.3f} {r['kl_mean']:>8.3f}")
    lines.append(f"on {q['tokens']:,} validation tokens. FVE: fraction of variance explained (the map that "
                 "predicts the mean: 0). KL from the dense output, nats/token: the hybrid passes, then the dense "
                 f"model with the site's sublayer skipped or its residual mean-ablated. The sparse model "
                 f"itself: {q['kl_sparse']:.3f}")
    return "\n".join(lines)


def report(path: str | os.PathLike, dense: str | os.PathLike | None = None, batches: int | None = None,
           device: str | torch.device = "cpu") -> dict:
    """``quality`` of the bridge in directory ``path`` on its own run's validation tokens
    (``batches`` batches, default the run's eval_batches), with the step it was saved at."""
    cfg = ckpt.read_config(path)
    dense_model, sparse, bridge = load(path, device, dense)
    tcfg = from_dict(TrainConfig, cfg["train"], "train config")
    q = quality(dense_model, sparse, bridge, val_tokens(tcfg, sparse.config.block_size, batches), tcfg.batch_size)
    return {"bridge": str(path), "step": cfg.get("step"), "max_steps": tcfg.max_steps, **q}


# --------------------------------------------------------------------------- steering
READS = {"attn.in": "ln_1", "mlp.in": "ln_2"}  # read location -> the norm that produces it


def read_channel(model: GPT, node: str) -> tuple[int, int, nn.Module]:
    """A read channel ``L.attn.in[c]`` / ``L.mlp.in[c]`` -> (site index, c, the norm it reads through)."""
    loc, c = parse_node(node)
    layer, _, kind = loc.partition(".")
    if kind not in READS or not layer.isdigit() or int(layer) >= model.config.n_layer:
        raise ValueError(f"node {node!r} is not a read channel; steer an L.attn.in[c] or L.mlp.in[c] "
                         f"node with L < {model.config.n_layer}")
    if c >= model.config.d_model:
        raise ValueError(f"node {node!r}: channel {c} is out of range (d_model {model.config.d_model})")
    return 2 * int(layer) + KINDS.index(kind.split(".")[0]), c, getattr(model.h[int(layer)], READS[kind])


def read_channels(model: GPT, nodes: str | list[str]) -> tuple[int, list[int], nn.Module]:
    """One read channel or several at one site -> (site index, channels, the norm they read through)."""
    nodes = [nodes] if isinstance(nodes, str) else list(nodes)
    if not nodes:
        raise ValueError("no channel to steer")
    got = [read_channel(model, x) for x in nodes]
    if len({i for i, _, _ in got}) > 1:
        raise ValueError(f"the channels {nodes} read different sites; steer channels of one site at a time")
    return got[0][0], [c for _, c, _ in got], got[0][2]


@torch.no_grad()
def steering_vector(dense: GPT, sparse: GPT, bridge: Bridge, node: str | list[str], delta: float | torch.Tensor,
                    strength: float, tokens: torch.Tensor, control_seed: int | None = None) -> torch.Tensor:
    """What ``intervene`` adds to the dense residual at the node's site, (N, T, d_dense).

    The node is a normalized read of the sparse model, n_c = g_c * r_c / s(r) with s the RMS of
    the residual r (for LayerNorm models, its standard deviation); the AbsTopK after the norm is
    ignored. Raising n_c by delta at a token is, to first order (s moves a little too), raising
    the residual channel r_c by delta * s(r) / g_c. The decoder's
    linear part maps that change into the dense residual, and the result is rescaled by the
    ratio of residual norms ||r_dense|| / ||decoder(r_sparse)|| at each token: the change then
    has the same size relative to the dense residual as to the decoded one, which corrects a
    decoder that shrinks or inflates its output.

    ``node``: one read channel, or a list of k read channels of one site, all changed at once.
    ``delta``: for one node a number or one per sequence (N,); for k nodes one per node (k,) or
    per sequence and node (N, k). ``strength`` multiplies it. With ``control_seed`` the vector is
    replaced by a random direction per sequence (drawn from that seed) with the same norm at
    every token: the control.
    """
    i, cs, norm = read_channels(sparse, node)
    rs, rd = run_sublayers(sparse, tokens, stop=i), run_sublayers(dense, tokens, stop=i)
    var = rs.var(-1, unbiased=False, keepdim=True) if norm.kind == "layer" else rs.pow(2).mean(-1, keepdim=True)
    gain = norm.weight[cs].to(rs)                                         # (k,)
    if bool((gain == 0).any()):
        raise ValueError(f"node {node!r}: norm gain 0, the sparse model never reads it")
    d = torch.as_tensor(delta, dtype=rs.dtype, device=rs.device)
    d = d.reshape(-1, 1) if isinstance(node, str) else d.reshape(-1, len(cs))
    d = d[:, None, :] * strength                                          # (N or 1, 1, k)
    dx = torch.zeros_like(rs)
    dx[..., cs] = d * torch.sqrt(var + norm.eps) / gain                   # the change of the residual channels
    v = bridge.decode_change(i, dx)                                       # (N, T, d_dense)
    v = v * rd.norm(dim=-1, keepdim=True) / bridge.decode(i, rs).norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if control_seed is not None:
        g = torch.Generator().manual_seed(control_seed)
        u = torch.randn(v.shape[0], 1, v.shape[-1], generator=g).to(v)   # (N, 1, d): one direction per sequence
        v = u / u.norm(dim=-1, keepdim=True) * v.norm(dim=-1, keepdim=True)
    return v


@torch.no_grad()
def intervene(dense: GPT, sparse: GPT, bridge: Bridge, node: str | list[str], delta: float | torch.Tensor,
              strength: float = 1.0, *, tokens: torch.Tensor, control_seed: int | None = None) -> torch.Tensor:
    """The dense model's logits (N, T, vocab) on ``tokens`` with the sparse read channel ``node``
    (or several of one site) changed by ``strength * delta`` at every token, carried into the
    dense residual at the node's site through the bridge's decoder (``steering_vector``).
    Strength 0 gives the dense model's own logits exactly. ``control_seed``: the random-direction
    control of the same norm."""
    tokens = tokens.to(dense.device)
    i = read_channels(sparse, node)[0]
    v = steering_vector(dense, sparse, bridge, node, delta, strength, tokens, control_seed)
    return run_sublayers(dense, tokens, run_sublayers(dense, tokens, stop=i) + v, start=i)


@dataclass
class Channel:
    """A sparse read channel's values at one token of a task's prompts (``at``, see ``channel_stats``)."""
    node: str
    mean_a: float        # mean over the prompts whose answer is cand_a
    mean_b: float
    score: float         # (mean_b - mean_a) / pooled standard deviation
    at: str = "last"

    @property
    def delta(self) -> float:
        """The default steering delta: strength 1 moves class A's mean value to class B's."""
        return self.mean_b - self.mean_a


@torch.no_grad()
def diff_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2N,) for ``tasks.encode_pairs`` output: the first token where each pair's two prompts differ
    (the same index for both), or the prompt's last token where they do not differ before it."""
    tok, last = batch["tokens"], batch["last"]
    n = tok.shape[0] // 2
    stop = torch.minimum(last[:n], last[n:])                              # (N,)
    pos = torch.arange(tok.shape[1])
    differ = (tok[:n] != tok[n:]) & (pos[None] <= stop[:, None])
    first = torch.where(differ.any(1), differ.float().argmax(1), stop)
    out = first.repeat(2)
    return torch.minimum(out, last)


AT = ("last", "diff")  # where channel_stats reads a channel


@torch.no_grad()
def channel_stats(sparse: GPT, task, nodes: list[str] | None = None, split: str = "train", n: int | None = None,
                  seed: int = 0, batch_size: int = 64, at: str = "last") -> list[Channel]:
    """Class means and standardized mean difference of read channels at one token of the task's
    prompts: ``at="last"`` the last token (where the answer is predicted), ``at="diff"`` the first
    token where the pair's two prompts differ (for the quote task, the opening quote: where the
    information enters). ``nodes`` None: every channel of every ``L.attn.in`` and ``L.mlp.in``."""
    if at not in AT:
        raise ValueError(f"at must be one of {AT}, not {at!r}")
    t = tasks_mod.get(task)
    if nodes is None:
        nodes = [node_name(f"{l}.{r}", c) for l in range(sparse.config.n_layer) for r in READS
                 for c in range(sparse.config.d_model)]
    parsed = [parse_node(x) for x in nodes]
    for x in nodes:
        read_channel(sparse, x)
    locs = sorted({loc for loc, _ in parsed})
    batch = tasks_mod.encode_pairs(t.pairs(split, n=n, seed=seed), sparse.config.block_size)
    where = batch["last"] if at == "last" else diff_positions(batch)
    vals = {loc: [] for loc in locs}
    for b in range(0, batch["tokens"].shape[0], batch_size):
        toks = batch["tokens"][b:b + batch_size].to(sparse.device)
        _, cache = sparse.run_with_cache(toks, locs)
        rows = torch.arange(toks.shape[0])
        for loc in locs:
            vals[loc].append(cache[loc][rows, where[b:b + batch_size]].float().cpu())    # (n, d)
    vals = {loc: torch.cat(v) for loc, v in vals.items()}                # (2N, d)
    label = batch["label"].bool()
    out = []
    for x, (loc, c) in zip(nodes, parsed):
        v = vals[loc][:, c]
        a, b = v[~label], v[label]
        # the floor on the variance keeps near-constant channels from winning on a tiny difference
        pooled = math.sqrt((float(a.var(unbiased=False)) + float(b.var(unbiased=False))) / 2 + 1e-4)
        out.append(Channel(x, float(a.mean()), float(b.mean()), (float(b.mean()) - float(a.mean())) / pooled, at))
    return out


def pick_channel(sparse: GPT, task, candidates: list[str] | None = None, split: str = "train",
                 n: int | None = None, at: str = "last") -> Channel:
    """The read channel (among ``candidates``, default all) whose value (at the token ``at``, see
    ``channel_stats``) best separates the task's two prompt classes: the largest absolute
    standardized mean difference."""
    stats = channel_stats(sparse, task, candidates, split, n, at=at)
    if not stats:
        raise ValueError("no candidate channels given")
    return max(stats, key=lambda ch: abs(ch.score))


# --------------------------------------------------------------------------- channels from a circuit
def read_nodes(circuit) -> list[str]:
    """A circuit's read channels (its ``L.attn.in`` and ``L.mlp.in`` nodes), the ones a bridge can steer."""
    return [node_name(loc, i) for loc, idx in circuit.nodes.items() if loc.split(".", 1)[1] in READS for i in idx]


def circuits_dir() -> Path | None:
    """The repository's ``results/circuits``, where the shipped models' circuit files are kept
    (``results/circuits/<model dir name>/<task>.json``); None outside the repository."""
    try:
        return ckpt.models_dir().parent.parent / "results" / "circuits"
    except FileNotFoundError:
        return None


def model_names(sparse: GPT) -> list[str]:
    """Names a sparse model's circuits may be filed under in ``results/circuits/<name>/``: its own
    directory's name and, for a bridge's sparse model (``<bridge>/sparse``), the bridge's and the
    checkpoint it started from (with ``train_sparse`` off, the very same weights)."""
    names = []
    path = getattr(sparse, "path", None)
    if path:
        p = Path(path)
        names += [p.name] + ([p.parent.name] if p.name == "sparse" else [])
    init = ((getattr(sparse, "checkpoint", None) or {}).get("train") or {}).get("init_from")
    if init:
        names.append(Path(init).name)
    return list(dict.fromkeys(n for n in names if n))


def find_circuit(sparse: GPT, task: str, root: str | os.PathLike | None = None) -> Path | None:
    """The first ``<root>/<name>/<task>.json`` (root default ``circuits_dir()``, names from
    ``model_names``) that was found in this very model (the circuit file's weight fingerprint), or None."""
    from .ablation import fingerprint
    root = Path(root) if root is not None else circuits_dir()
    if root is None:
        return None
    fp = None
    for name in model_names(sparse):
        path = root / name / f"{tasks_mod.get(task).name}.json"
        if not path.is_file():
            continue
        fp = fp or fingerprint(sparse)
        if json.loads(path.read_text()).get("model_fingerprint") in (None, fp):
            return path
    return None


def task_circuit(sparse: GPT, task: str, circuit=None, progress: bool = True, **prune_kw):
    """The task's circuit in ``sparse``: ``circuit`` itself (a Circuit, or a circuit file, which must
    have been found in this model), else the file ``find_circuit`` finds, else a new one from
    ``cspkit.prune.prune(sparse, task, **prune_kw)`` (a minute or two on CPU; not saved). Sets
    ``circuit.source`` to the file it came from, or ``"pruned"``."""
    from .circuit import Circuit
    if circuit is None:
        path = find_circuit(sparse, task)
        if path is None:
            from .prune import prune
            if progress:
                print(f"no {task} circuit of this model in {circuits_dir()}/"
                      f"{{{','.join(model_names(sparse))}}}/; pruning one (a minute or two on CPU)", file=sys.stderr)
            circuit = prune(sparse, task, progress=progress, **prune_kw)
            circuit.source = "pruned"
            return circuit
        circuit = path
    if not isinstance(circuit, Circuit):
        path, circuit = circuit, Circuit.load(circuit, model=sparse)
        circuit.source = str(path)
    else:
        circuit.attach(sparse)
        circuit.source = getattr(circuit, "source", None)
    if circuit.task != tasks_mod.get(task).name:
        raise ValueError(f"the circuit is for task {circuit.task!r}, not {task!r}")
    return circuit


def circuit_channel(sparse: GPT, task: str, circuit=None, progress: bool = True, split: str = "train",
                    n: int | None = None, at: str = "diff") -> tuple[Channel, Circuit]:
    """The sparse read channel in the task's circuit that best separates the task's two prompt
    classes at the token ``at`` (``pick_channel`` over ``read_nodes``; see ``channel_stats``), and
    the circuit (see ``task_circuit``)."""
    c = task_circuit(sparse, task, circuit, progress)
    reads = read_nodes(c)
    if not reads:
        raise ValueError(f"the {c.task} circuit ({c.n_nodes} nodes) keeps no read channel (L.attn.in / L.mlp.in) "
                         "to steer; name a node instead")
    return pick_channel(sparse, task, reads, split, n, at), c


def site_channels(sparse: GPT, task: str, circuit, channel: Channel, split: str = "train",
                  n: int | None = None) -> list[Channel]:
    """All of the circuit's read channels at ``channel``'s site (read at the same token), the
    most separating first: steered together (``flip_rates`` with the list), they move the
    circuit's reads at that site from one class's means to the other's."""
    site = read_channel(sparse, channel.node)[0]
    nodes = [x for x in read_nodes(circuit) if read_channel(sparse, x)[0] == site]
    if channel.node not in nodes:
        nodes.insert(0, channel.node)
    return sorted(channel_stats(sparse, task, nodes, split, n, at=channel.at), key=lambda ch: -abs(ch.score))


@torch.no_grad()
def flip_rates(dense: GPT, sparse: GPT, bridge: Bridge, task, channel: Channel | list[Channel],
               strengths=(0.25, 0.5, 1.0), split: str = "test", n: int | None = None, seed: int = 0,
               batch_size: int = 64) -> dict:
    """Steer every prompt of the task toward the other class (class-A prompts by +delta, class-B
    by -delta, delta = channel.delta) and count how often the dense model's preferred candidate
    flips to the other class's answer, among the prompts it answered right unsteered;
    ``logit_shift`` is the mean change of their other-minus-own candidate logit gap (positive:
    toward the other class). The control adds a random direction of the same norm at every token
    (one per prompt, seeded). ``channel`` may be a list of channels of one site (``site_channels``):
    all are steered at once, each by its own delta; the result's node, delta, means and score are
    then lists."""
    chans = [channel] if isinstance(channel, Channel) else list(channel)
    node = chans[0].node if isinstance(channel, Channel) else [ch.node for ch in chans]
    deltas = torch.tensor([ch.delta for ch in chans])                     # (k,)
    t = tasks_mod.get(task)
    block = min(dense.config.block_size, sparse.config.block_size)
    batch = tasks_mod.encode_pairs(t.pairs(split, n=n, seed=seed), block)
    label = batch["label"]
    sign = 1.0 - 2.0 * label.float()                                      # +1 class A, -1 class B
    N = label.shape[0]

    i = read_channels(sparse, node)[0]
    # the steering vector is linear in strength: compute it (and the control's) once per batch at
    # strength 1, then run only the dense suffix per strength
    two = {st: [] for st in dict.fromkeys([0.0] + [float(st) for st in strengths])}
    control = {float(st): [] for st in strengths}
    for b in range(0, N, batch_size):
        sl = slice(b, b + batch_size)
        toks = batch["tokens"][sl].to(dense.device)
        d = sign[sl, None] * deltas
        rd = run_sublayers(dense, toks, stop=i)
        vs = {rand: steering_vector(dense, sparse, bridge, node, d, 1.0, toks, seed + b if rand else None)
              for rand in (False, True)}
        sub = {"last": batch["last"][sl], "cands": batch["cands"][sl]}
        for runs, rand in ((two, False), (control, True)):
            for st, out in runs.items():
                logits = run_sublayers(dense, toks, rd + st * vs[rand] if st else rd, start=i)
                out.append(tasks_mod.pair_logits(logits, sub).float().cpu())

    right, rows = _flip_table(two, label, strengths, control)
    return {**_steered(t, split, channel), "site": bridge.sites[i], "prompts": N,
            "dense_right": int(right.sum()), "rows": rows}


@torch.no_grad()
def own_flip_rates(sparse: GPT, task, channel: Channel | list[Channel], strengths=(0.25, 0.5, 1.0),
                   split: str = "test", n: int | None = None, seed: int = 0, batch_size: int = 64) -> dict:
    """``flip_rates`` without the bridge: the same change of the read channel(s), made in the
    sparse model itself at every token (a hook on the read location), and how often the sparse
    model's own answer flips. Beside ``flip_rates`` it tells a channel the sparse model does not
    act on from a bridge that does not carry it to the dense model. No random control."""
    chans = [channel] if isinstance(channel, Channel) else list(channel)
    idx = torch.tensor(read_channels(sparse, [ch.node for ch in chans])[1])   # one site's channels
    loc = parse_node(chans[0].node)[0]
    deltas = torch.tensor([ch.delta for ch in chans])                     # (k,)
    t = tasks_mod.get(task)
    batch = tasks_mod.encode_pairs(t.pairs(split, n=n, seed=seed), sparse.config.block_size)
    label = batch["label"]
    sign = 1.0 - 2.0 * label.float()                                      # +1 class A, -1 class B
    two = {st: [] for st in dict.fromkeys([0.0] + [float(st) for st in strengths])}
    for b in range(0, label.shape[0], batch_size):
        sl = slice(b, b + batch_size)
        toks = batch["tokens"][sl].to(sparse.device)
        d = (sign[sl, None] * deltas).to(toks.device)                     # (B, k)
        sub = {"last": batch["last"][sl], "cands": batch["cands"][sl]}
        for st in two:
            def steer(act, name, st=st):
                act = act.clone()
                act[..., idx] += st * d[:, None, :].to(act.dtype)         # (B, T, k): every token
                return act
            logits = sparse.run_with_hooks(toks, {loc: steer}) if st else sparse(toks)
            two[st].append(tasks_mod.pair_logits(logits, sub).float().cpu())
    right, rows = _flip_table(two, label, strengths)
    return {**_steered(t, split, channel), "prompts": label.shape[0], "sparse_right": int(right.sum()),
            "rows": rows}


@torch.no_grad()
def steering_fidelity(dense: GPT, sparse: GPT, bridge: Bridge, task, channel: Channel | list[Channel],
                      split: str = "test", n: int | None = None, seed: int = 0) -> dict:
    """How much of a steering change the decoder carries into the dense model: at the first token
    where each pair's two prompts differ, the change ``steering_vector`` adds to the dense residual
    of the class-A prompt at strength 1, against the dense model's own class difference there (the
    class-B prompt's residual minus its twin's). Means over pairs of the size ratio, the cosine and
    the coefficient of the change projected on the true difference (1: a faithful translation)."""
    chans = [channel] if isinstance(channel, Channel) else list(channel)
    nodes = [ch.node for ch in chans]
    batch = tasks_mod.encode_pairs(tasks_mod.get(task).pairs(split, n=n, seed=seed), dense.config.block_size)
    tokens = batch["tokens"].to(dense.device)
    k = tokens.shape[0] // 2                                              # pairs
    pos = diff_positions(batch)[:k].to(dense.device)
    at = lambda x: x[torch.arange(k, device=x.device), pos]               # (k, T, d) -> (k, d)
    resid = run_sublayers(dense, tokens, stop=read_channels(sparse, nodes)[0])
    true = at(resid[k:]) - at(resid[:k])                                  # class B minus class A
    deltas = torch.tensor([[ch.delta for ch in chans]]).expand(k, -1)
    v = at(steering_vector(dense, sparse, bridge, nodes, deltas, 1.0, tokens[:k]))
    return {"ratio": float((v.norm(dim=-1) / true.norm(dim=-1)).mean()),
            "cosine": float(F.cosine_similarity(v, true, dim=-1).mean()),
            "projection": float(((v * true).sum(-1) / true.norm(dim=-1) ** 2).mean())}


def _steered(t, split: str, channel: Channel | list[Channel]) -> dict:
    """What was steered, for a result: the node(s), their deltas, class means and scores."""
    chans = [channel] if isinstance(channel, Channel) else list(channel)
    one = isinstance(channel, Channel)
    pick = lambda key: getattr(chans[0], key) if one else [getattr(ch, key) for ch in chans]
    return {"task": t.name, "split": split, "node": pick("node"), "delta": pick("delta"),
            "mean_a": pick("mean_a"), "mean_b": pick("mean_b"), "score": pick("score"), "at": chans[0].at}


def format_flips(rows: list[dict]) -> str:
    """The rows of ``flip_rates`` or ``own_flip_rates`` as a table under a header, one line per
    strength, with the random control's columns where the rows have them."""
    ctl = bool(rows) and "control_flip_rate" in rows[0]
    cols = [("strength", "strength", 8, ".2f"), ("flip rate", "flip_rate", 10, ".3f")]
    cols += [("random control", "control_flip_rate", 15, ".3f")] if ctl else []
    cols += [("logit shift", "logit_shift", 12, ".3f")]
    cols += [("control", "control_logit_shift", 8, ".3f")] if ctl else []
    head = " ".join(f"{title:>{width}s}" for title, _, width, _ in cols)
    return "\n".join([head] + [" ".join(f"{row[key]:>{width}{fmt}}" for _, key, width, fmt in cols)
                               for row in rows])


def _flip_table(two: dict[float, list], label: torch.Tensor, strengths,
                control: dict[float, list] | None = None) -> tuple[torch.Tensor, list[dict]]:
    """From each strength's candidate logits, ``two[strength]`` (batches of (B, 2); strength 0 is
    the unsteered run): which prompts the unsteered model gets right, and per strength the fraction
    of those whose preferred candidate flips and the mean change of their other-minus-own logit gap
    (and the same for ``control``, the random-direction runs, where given)."""
    def prefs(runs: dict[float, list], st: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Preferred candidate (2N,) and the other-minus-own candidate logit difference."""
        t2 = torch.cat(runs[st])
        own = t2.gather(1, label[:, None])[:, 0]
        return t2.argmax(-1), t2.sum(-1) - 2 * own

    base, base_gap = prefs(two, 0.0)
    right = base == label
    rows = []
    for st in strengths:
        row = {"strength": st}
        for name, runs in (("", two), ("control_", control)):
            if runs is None:
                continue
            pref, gap = prefs(runs, float(st))
            row[f"{name}flip_rate"] = float((pref != label)[right].float().mean()) if right.any() else 0.0
            row[f"{name}logit_shift"] = float((gap - base_gap)[right].mean()) if right.any() else 0.0
        rows.append(row)
    return right, rows
