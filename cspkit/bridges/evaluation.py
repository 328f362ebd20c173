"""How good a bridge is: each map's fraction of variance explained and each hybrid pass's KL
from the dense output, per site, beside trivial baselines (docs/method.md, "Bridges")."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import TrainConfig, from_dict
from ..data import TokenData, build_shards
from ..files import atomic_write
from ..model import GPT
from .maps import Bridge, kl, load, nmse, residuals, run_sublayers


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
    """``quality`` or ``report`` as a table, one line per site, and what the columns mean."""
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


def report_file(path: str | os.PathLike, dense: str | os.PathLike | None = None, batches: int | None = None,
                out: str | os.PathLike | None = None) -> tuple[dict, str]:
    """What ``cspkit bridge-report`` does: ``report`` as an object and as text, the text also
    written to ``out`` when given."""
    q = report(path, dense=dense, batches=batches)
    human = f"bridge {path} at step {q['step']} of {q['max_steps']}\n" + format_quality(q)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, human + "\n")
    return q, human
