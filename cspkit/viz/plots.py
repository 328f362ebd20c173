"""Matplotlib figures for the notebooks: training curves, task loss during training, the LR / L0
schedule, weight density, task scores, the loss-against-circuit-size frontier, bridge quality and
steering.

Every function returns a ``NotebookFigure``: a plain matplotlib Figure (``savefig`` and the rest
work as usual) that a notebook cell ending in it shows as a PNG, with or without
``%matplotlib inline``. The figures are made without pyplot, so no figure manager holds on to
them: a kernel that runs for days keeps only the figures it still refers to.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch.nn as nn
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..checkpoint import eval_rows
from ..config import TrainConfig
from ..files import atomic_path
from ..sparsity import density_report
from ..training import schedule, stages


class NotebookFigure(Figure):
    """A matplotlib Figure with a PNG rich representation, so Jupyter displays it (a bare
    Figure made without pyplot shows as ``<Figure size 650x420 with 1 Axes>``)."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()


def plot_training(logs: dict[str, list[dict[str, Any]]]) -> NotebookFigure:
    """Train and validation loss against tokens, and the L0 fraction of the matrices against
    step, for one or more runs (label -> rows of ``cspkit.checkpoint.read_log``, or of
    ``read_chain_log`` for a run with warm restarts)."""
    fig = NotebookFigure(figsize=(11, 3.8))
    ax_loss, ax_l0 = fig.subplots(1, 2)
    for label, rows in logs.items():
        evals = eval_rows(rows)
        (line,) = ax_loss.plot([r["tokens"] for r in rows], [r["train_loss"] for r in rows],
                               lw=1, alpha=0.4, label=f"{label} train")
        ax_loss.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-",
                     color=line.get_color(), label=f"{label} val")
        ax_l0.plot([r["step"] for r in evals], [r["l0"] for r in evals], "o-", color=line.get_color(), label=label)
    ax_loss.set(xlabel="tokens", ylabel="loss (nats / token)", title="loss")
    ax_l0.set(xlabel="step", ylabel="fraction of matrix entries kept", ylim=(0, 1.05), title="L0 (at evals)")
    for ax in (ax_loss, ax_l0):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_task_curves(logs: dict[str, list[dict[str, Any]]], target: float = 0.15) -> NotebookFigure:
    """Task loss against tokens for the tasks a run scored while training (its ``eval_tasks``: the
    ``task/NAME/loss`` fields of its log), one panel per task, with chance and the circuit target."""
    names = sorted({k.split("/")[1] for rows in logs.values() for r in rows for k in r if k.startswith("task/")})
    if not names:
        raise ValueError("no run in these logs scored tasks while training; train with eval_tasks=[...]")
    fig = NotebookFigure(figsize=(5.5 * len(names), 3.8))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        for label, rows in logs.items():
            pts = [(r["tokens"], r[f"task/{name}/loss"]) for r in rows if f"task/{name}/loss" in r]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, label=label)
        ax.axhline(0.693, color="gray", ls="--", lw=1, label="chance")
        ax.axhline(target, color="black", ls=":", lw=1, label=f"target {target}")
        ax.set(xlabel="tokens", ylabel="task loss (test split)", title=name, ylim=(0, None))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_schedule(t: TrainConfig) -> NotebookFigure:
    """Learning rate and kept fractions of ``cspkit.training.schedule`` over a whole run, and over
    each warm restart after it where the config has ``cycles`` (``cspkit.training.stages``)."""
    rows = [schedule(s, tk) for tk, _ in stages(t, Path(".")) for s in range(tk.max_steps)]
    steps = range(len(rows))
    fig = NotebookFigure(figsize=(11, 3.5))
    ax_lr, ax_frac = fig.subplots(1, 2)
    ax_lr.plot(steps, [r["lr"] for r in rows])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="LR: warm-up, linear decay, sharkfin factor")
    ax_frac.plot(steps, [r["frac_matrix"] for r in rows], label="matrices")
    ax_frac.plot(steps, [r["frac_embed"] for r in rows], label="embeddings, unembedding, biases")
    ax_frac.set(xlabel="step", ylabel="fraction kept", ylim=(0, 1.05), title="L0 annealing")
    ax_frac.legend(fontsize=8)
    for ax in (ax_lr, ax_frac):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_density(model: nn.Module) -> NotebookFigure:
    """Fraction of nonzero entries in every sparse parameter, coloured by group."""
    rows = {k: r for k, r in density_report(model).items() if not k.startswith("total:")}
    groups = {"matrix": ("tab:blue", "matrices"), "embed": ("tab:orange", "embeddings, unembedding, biases")}
    fig = NotebookFigure(figsize=(7, 0.22 * len(rows) + 1.2))
    ax = fig.subplots()
    fracs = [r["fraction"] for r in rows.values()]
    bars = ax.barh(list(rows), fracs, color=[groups[r["group"]][0] for r in rows.values()])
    ax.bar_label(bars, labels=[f"{f:.4g}" for f in fracs], padding=2, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="fraction of entries nonzero", xlim=(0, 1.15), title="weight density per parameter")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(handles=[Patch(color=c, label=label) for c, label in groups.values()], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_task_scores(results: dict[str, list[dict[str, Any]]]) -> NotebookFigure:
    """Per-task accuracy of one or more models (label -> rows of ``cspkit.tasks.evaluate``, in the
    same task order), with chance (0.5) and the 0.9 line a task counts as solved at."""
    tasks = [r["task"] for r in next(iter(results.values()), [])]
    width = 0.8 / max(len(results), 1)
    fig = NotebookFigure(figsize=(11, 4))
    ax = fig.subplots()
    for i, (label, rows) in enumerate(results.items()):
        if [r["task"] for r in rows] != tasks:
            raise ValueError(f"{label}: the tasks differ from those of {next(iter(results))}")
        ax.bar([t + (i - (len(results) - 1) / 2) * width for t in range(len(tasks))],
               [r["accuracy"] for r in rows], width, label=label)
    ax.axhline(0.5, color="gray", ls="--", lw=1, label="chance")
    ax.axhline(0.9, color="black", ls=":", lw=1, label="solved (0.9)")
    ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="accuracy (per prompt)", ylim=(0, 1.05), title="task accuracy on the test split")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_frontier(results: dict[str, Any], target: float | None = None, common: bool = True) -> NotebookFigure:
    """One point per model of a ``cspkit sweep`` results file: its validation loss against the
    geometric mean of circuit edges (log scale; the bar spans the pruning seeds), over the tasks
    every model can do (``common``) or over each model's own."""
    targets = results["summary"]["targets"]
    if target is None and len(targets) > 1:
        raise ValueError(f"the results hold targets {', '.join(targets)}; pass target=")
    key = str(float(target)) if target is not None else next(iter(targets))
    if key not in targets:
        raise ValueError(f"no target {target} in the results; they hold {', '.join(targets)}")
    summ = targets[key]
    fig = NotebookFigure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    colors = {True: "tab:orange", False: "tab:blue"}
    for path, m in summ["models"].items():
        g = m["gm_edges_common" if common else "gm_edges"]
        info = results["models"][path]
        if g["gmean"] is None or info["val_loss"] is None:
            continue
        ax.errorbar(g["gmean"], info["val_loss"], xerr=[[g["gmean"] - g["min"]], [g["max"] - g["gmean"]]],
                    fmt="o", color=colors[info["dense"]], capsize=3)
        ax.annotate(info["name"], (g["gmean"], info["val_loss"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.set_xscale("log")
    n = len(summ["tasks_all_can_do"])
    ax.set(xlabel="geometric mean of circuit edges" + (f" over the {n} common task(s)" if common else ""),
           ylabel="validation loss (nats / token)", title=f"circuit size against loss (target {key})")
    ax.legend(handles=[Patch(color=c, label="dense" if d else "weight-sparse") for d, c in colors.items()],
              fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def save_frontier(results: dict[str, Any], path: str | os.PathLike, target: float | None = None,
                  dpi: int = 120) -> Path:
    """``plot_frontier`` of a sweep results file at ``target`` (default: the results' first
    target) written whole to ``path`` (its format from the suffix, PNG without one)."""
    path = Path(path)
    target = results["grid"]["targets"][0] if target is None else target
    with atomic_path(path) as tmp:
        plot_frontier(results, target=target).savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


def _finish(fig: NotebookFigure, *axes) -> NotebookFigure:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_bridge_quality(q: dict[str, Any]) -> NotebookFigure:
    """A bridge's quality per site (``cspkit.bridges.quality`` / ``report``): the maps' fraction
    of variance explained, and the KL from the dense output of the two hybrid passes beside the
    two baselines (the site's sublayer skipped, its residual mean-ablated) and the sparse model's
    own output (log scale)."""
    sites = [r["site"] for r in q["sites"]]
    x = range(len(sites))
    fig = NotebookFigure(figsize=(11, 3.8))
    ax_fve, ax_kl = fig.subplots(1, 2)
    for off, key, label in ((-0.2, "fve_enc", "encoder (dense -> sparse)"),
                            (0.2, "fve_dec", "decoder (sparse -> dense)")):
        ax_fve.bar([i + off for i in x], [r[key] for r in q["sites"]], 0.4, label=label)
    ax_fve.axhline(0, color="gray", lw=1)
    ax_fve.set_xticks(list(x), sites)
    ax_fve.set(xlabel="site", ylabel="fraction of variance explained", ylim=(min(0, *(r[k] for r in q["sites"]
               for k in ("fve_enc", "fve_dec"))) - 0.05, 1.05), title="maps: FVE (mean predictor = 0)")
    styles = {"kl_d2s": ("o-", "hybrid d2s (dense prefix, encoder, sparse suffix)"),
              "kl_s2d": ("s-", "hybrid s2d (sparse prefix, decoder, dense suffix)"),
              "kl_skip": ("x--", "baseline: sublayer skipped"), "kl_mean": ("+--", "baseline: residual mean-ablated")}
    for key, (fmt, label) in styles.items():
        ax_kl.plot(list(x), [max(r[key], 1e-4) for r in q["sites"]], fmt, label=label)
    ax_kl.axhline(q["kl_sparse"], color="black", ls=":", lw=1, label="the sparse model itself")
    ax_kl.set_yscale("log")
    ax_kl.set_xticks(list(x), sites)
    ax_kl.set(xlabel="site", ylabel="KL from the dense output (nats / token)", title="hybrid passes against baselines")
    return _finish(fig, ax_fve, ax_kl)


def plot_bridge_training(rows: list[dict[str, Any]]) -> NotebookFigure:
    """A bridge run's evaluations against step (rows of ``cspkit.checkpoint.read_log`` of a
    ``cspkit bridge`` directory): the sparse model's validation loss, both maps' normalized MSE
    and both hybrid passes' KL from the dense output, averaged over the sites. Curves still
    falling at the last step say the run stopped before the losses settled."""
    evals = eval_rows(rows)
    steps = [r["step"] for r in evals]
    fig = NotebookFigure(figsize=(11, 3.8))
    ax_lm, ax_maps = fig.subplots(1, 2)
    ax_lm.plot(steps, [r["val_loss"] for r in evals], "o-", label="sparse model, val loss")
    ax_lm.set(xlabel="step", ylabel="nats / token", title="the sparse model's own loss")
    for key, fmt, label in (("val_nmse_enc", "o-", "NMSE encoder"), ("val_nmse_dec", "s-", "NMSE decoder"),
                            ("val_kl_d2s", "^--", "KL hybrid d2s"), ("val_kl_s2d", "v--", "KL hybrid s2d")):
        ax_maps.plot(steps, [r[key] for r in evals], fmt, label=label)
    ax_maps.set(xlabel="step", ylabel="NMSE / KL (nats / token)", ylim=(0, None),
                title="bridge losses, mean over sites (validation)")
    return _finish(fig, ax_lm, ax_maps)


def plot_steering(results: dict[str, dict[str, Any]]) -> NotebookFigure:
    """Flip rate and the probability of the other class's answer against steering strength
    (label -> a ``cspkit.bridges.flip_rates`` or ``steer_report`` result): the dense model steered
    through the bridge (solid), its random-direction control of the same norm (dashed) and, where
    the result has it (``steer_report``'s ``own``), the same change made in the sparse model
    itself (dotted). Strengths above 1 (shaded) extrapolate past the other class's mean."""
    fig = NotebookFigure(figsize=(11, 3.8))
    ax_flip, ax_p = fig.subplots(1, 2)
    for label, r in results.items():
        s = [row["strength"] for row in r["rows"]]
        for ax, key in ((ax_flip, "flip_rate"), (ax_p, "p_other")):
            (line,) = ax.plot(s, [row[key] for row in r["rows"]], "o-", label=f"{label}: dense, steered")
            ax.plot(s, [row[f"control_{key}"] for row in r["rows"]], "x--", color=line.get_color(),
                    label=f"{label}: dense, random control")
            if "own" in r:
                ax.plot([row["strength"] for row in r["own"]["rows"]], [row[key] for row in r["own"]["rows"]],
                        "^:", color=line.get_color(), label=f"{label}: the sparse model itself")
    for ax in (ax_flip, ax_p):
        if max((row["strength"] for r in results.values() for row in r["rows"]), default=0) > 1:
            ax.axvspan(1, ax.get_xlim()[1], color="gray", alpha=0.12, lw=0)
        ax.set_ylim(-0.03, 1.03)
    ax_flip.set(xlabel="strength (1 = moved to the other class's mean)", ylabel="flip rate",
                title="answers switched to the other class's")
    ax_p.set(xlabel="strength", ylabel="P(other class's answer)", title="probability of the other answer")
    return _finish(fig, ax_flip, ax_p)


def plot_patching(m: dict[str, Any]) -> NotebookFigure:
    """A ``cspkit.patching.patching_map``: the share of the A-minus-B answer that patching A's
    residual into B's run recovers, per site (rows) and position (columns, labelled by B's
    tokens), on a colour scale centred at zero."""
    rec = m["recovered"].numpy()
    fig = NotebookFigure(figsize=(max(6.0, 0.42 * rec.shape[1] + 2), 0.38 * rec.shape[0] + 1.6))
    ax = fig.subplots()
    top = max(1.0, float(abs(rec).max()))
    im = ax.imshow(rec, cmap="RdBu_r", vmin=-top, vmax=top, aspect="auto")
    ax.set_yticks(range(len(m["sites"])), m["sites"])
    ax.set_xticks(range(len(m["tokens"])), [repr(t)[1:-1] for t in m["tokens"]], rotation=60, ha="right",
                  fontsize=8)
    ax.set(xlabel="position (the B prompt's tokens)", ylabel="residual entering",
           title="activation patching A -> B: share of the answer recovered")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return fig
