"""Bridge training: a bridge profile's configs for a run, and the run itself, written and
resumed as ``cspkit train`` writes and resumes a checkpoint (docs/method.md, "Bridge loss").

The loss (``maps.bridge_loss``): the sparse model's language-model loss, plus nmse_coef times
both maps' normalized MSE, plus kl_coef times both hybrid passes' KL(dense output || hybrid
output); the bridge terms are averaged over sites. The dense model is frozen; gradients flow into
the maps and the sparse model (unless ``train_sparse`` is off).
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import BridgeConfig, ModelConfig, TrainConfig, from_dict, override_configs, to_dict
from ..data import TokenData, build_shards
from ..files import atomic_write
from ..model import GPT
from ..profiles import BRIDGE_MODELS, bridge_profile, profile
from ..sparsity import project_model_
from ..training import (
    check_resumable,
    check_same_corpus,
    corpus_record,
    decayed,
    fit,
    optimizer_step,
    pick_device,
    provenance,
    save_resume,
    schedule,
    start_log,
)
from .evaluation import format_quality, quality, val_tokens
from .maps import Bridge, bridge_loss, check_pair, file_digest, init_maps_, residuals, save_bridge, step_sites


def configs_for(profile_name: str, dense: str | os.PathLike, sparse: str | os.PathLike | None = None,
                seed: int | None = None, max_steps: int | None = None, overrides: list[str] | None = None
                ) -> tuple[ModelConfig, BridgeConfig, TrainConfig]:
    """The configs of a bridge run: a bridge profile, then ``overrides`` (``bridge.X``, ``train.X``,
    and for a sparse model trained from scratch ``model.X``); returns (sparse model, bridge, train).
    A profile that names no corpus takes the dense checkpoint's.

    With ``sparse`` (a checkpoint directory) the sparse model is fine-tuned: it starts from those
    weights (train.init_from) and keeps their sparsity from the first step (the checkpoint's L0
    fractions, no annealing). Without it, the sparse model is trained from scratch jointly with
    the bridge (the paper's way), annealed like ``cspkit train``, in the shape of the model profile
    that ``profiles.BRIDGE_MODELS`` names for the bridge profile, else in the dense model's."""
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
    if sparse is not None:
        mcfg = from_dict(ModelConfig, src["model"], "model config")
    elif profile_name in BRIDGE_MODELS:
        mcfg = profile(BRIDGE_MODELS[profile_name])[0]
    else:
        mcfg = from_dict(ModelConfig, dense_cfg["model"], "model config")
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
    names that checkpoint (path and fingerprint) as it names the dense model.

    One step of the shipped bridge's recipe (maps only) on a small corpus, then the evaluation on
    all sites that ends every run (a few seconds on CPU):

    >>> import sysconfig, tempfile
    >>> from pathlib import Path
    >>> from cspkit import bridges, checkpoint, paths
    >>> models = paths.models_dir()
    >>> corpus = Path(sysconfig.get_paths()["stdlib"]) / "json"
    >>> mcfg, bcfg, tcfg = bridges.configs_for(
    ...     "small", models / "small-dense", models / "small-sparse", max_steps=1,
    ...     overrides=[f'train.corpus=["{corpus}"]', "train.val_percent=15", "train.batch_size=2",
    ...                "train.eval_batches=1"])
    >>> out = Path(tempfile.mkdtemp()) / "bridge"
    >>> dense, sparse, bridge = bridges.train(models / "small-dense", out, bcfg, tcfg, mcfg, progress=False)
    >>> checkpoint.read_config(out)["step"], sorted(p.name for p in out.iterdir())
    (1, ['bridge.safetensors', 'config.json', 'log.jsonl', 'resume.pt'])
    """
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
    bridge = Bridge(dense.config.d_model, mcfg.d_model, mcfg.n_layer, bcfg.enc_afrac, config=bcfg).to(device)
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


def train_report(profile_name: str, dense: str | os.PathLike, out: str | os.PathLike,
                 sparse: str | os.PathLike | None = None, seed: int | None = None, max_steps: int | None = None,
                 overrides: list[str] | None = None, command: str | None = None, progress: bool = True
                 ) -> tuple[dict, str]:
    """What ``cspkit bridge`` does: train (or resume) a bridge profile's run into ``out`` and report
    the sparse model's loss and the bridge's quality per site."""
    mcfg, bcfg, tcfg = configs_for(profile_name, dense, sparse, seed, max_steps, overrides)
    dense_model, sparse_model, bridge = train(dense, out, bcfg, tcfg, mcfg, progress=progress, command=command)
    q = quality(dense_model, sparse_model, bridge, val_tokens(tcfg, sparse_model.config.block_size), tcfg.batch_size)
    cfg = ckpt.read_config(out)
    mode = f"fine-tuned from {sparse}" if sparse else "trained from scratch"
    obj = {"out": str(out), "step": cfg["step"], "val_loss": cfg["val_loss"], "sparse": mode, "quality": q}
    return obj, (f"bridge to {dense}, sparse model {mode}, step {cfg['step']}: sparse val loss {cfg['val_loss']} "
                 f"-> {out}\n" + format_quality(q))
