"""Matplotlib figures for the notebooks: training curves, the LR / L0 schedule, weight density,
task scores."""
from __future__ import annotations

from typing import Any

import torch.nn as nn
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .config import TrainConfig
from .sparsity import density_report
from .train import schedule


def plot_training(logs: dict[str, list[dict[str, Any]]]) -> Figure:
    """Train and validation loss against tokens, and the L0 fraction of the matrices against
    step, for one or more runs (label -> rows of ``cspkit.checkpoint.read_log``)."""
    fig = Figure(figsize=(11, 3.8))
    ax_loss, ax_l0 = fig.subplots(1, 2)
    for label, rows in logs.items():
        evals = [r for r in rows if "val_loss" in r]
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


def plot_schedule(t: TrainConfig) -> Figure:
    """Learning rate and kept fractions of ``cspkit.train.schedule`` over a whole run."""
    steps = range(t.max_steps)
    rows = [schedule(s, t) for s in steps]
    fig = Figure(figsize=(11, 3.5))
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


def plot_density(model: nn.Module) -> Figure:
    """Fraction of nonzero entries in every sparse parameter, coloured by group."""
    rows = {k: r for k, r in density_report(model).items() if not k.startswith("total:")}
    groups = {"matrix": ("tab:blue", "matrices"), "embed": ("tab:orange", "embeddings, unembedding, biases")}
    fig = Figure(figsize=(7, 0.22 * len(rows) + 1.2))
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


def plot_task_scores(results: dict[str, list[dict[str, Any]]]) -> Figure:
    """Per-task accuracy of one or more models (label -> rows of ``cspkit.tasks.evaluate``, in the
    same task order), with chance (0.5) and the 0.9 line a task counts as solved at."""
    tasks = [r["task"] for r in next(iter(results.values()), [])]
    width = 0.8 / max(len(results), 1)
    fig = Figure(figsize=(11, 4))
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
