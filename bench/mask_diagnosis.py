"""What mask training leaves behind, per seed: how many nodes it keeps (tau > 0), how many the
clamp pinned at +1 and -1, and the calibrated held-out task loss of the top-k nodes of the
ranking at k = kept x 1, 2, 4 and at a few fixed sizes. A loss that does not fall as k grows is
why a bisection over k can end far from the masks' own circuit. With ``--every N``, also the
open-node count and held-out loss of the masks every N steps of their training, and the step
``settle`` keeps: how the penalty's multiplier moved them (docs/method.md, "Penalty").

Usage: python bench/mask_diagnosis.py [--model data/models/paper-e1-sparse] [--task single_double_quote]
       [--seeds 0 1] [--set k_ref_nodes=null] [--every 5] [--target 0.15]
       [--out results/mask_diagnosis_paper-e1-sparse.txt]
"""
from __future__ import annotations

import argparse
import time

import torch

import cspkit
from cspkit import tasks
from cspkit.ablation import node_widths
from cspkit.circuit import split_pairs
from cspkit.config import PruneConfig, override_configs
from cspkit.files import atomic_write
from cspkit.model import GPT, frozen
from cspkit.pruning import MaskSteps, RankedLoss, ranking
from cspkit.sparsity import sparse_matmuls
from cspkit.tasks import Task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="data/models/paper-e1-sparse")
    ap.add_argument("--task", default="single_double_quote")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--set", action="append", default=[], metavar="key=value",
                    help="a PruneConfig value other than the default, e.g. k_ref_nodes=null (unscaled penalty)")
    ap.add_argument("--every", type=int, default=0, help="also the masks' own loss every this many steps")
    ap.add_argument("--target", type=float, default=0.15, help="the target the multiplier follows and settle meets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the lines to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = cspkit.load(args.model)
    cfg = override_configs({"prune": PruneConfig()}, args.set)["prune"]
    task = tasks.get(args.task)
    fit, heldout = split_pairs(task, cfg)
    n_nodes = sum(node_widths(model.config).values())
    lines = [f"{args.model}, task {args.task}, PruneConfig steps {cfg.steps}, k_coef {cfg.k_coef}, k_ref_nodes "
             f"{cfg.k_ref_nodes}: penalty {cfg.node_penalty(n_nodes):g} per node of {n_nodes}, target {args.target}, "
             f"mean ablation, {args.threads} threads" + "".join(f", --set {kv}" for kv in args.set)]
    print(lines[0], flush=True)
    for seed in args.seeds:
        t0 = time.time()
        with frozen(model), sparse_matmuls(model):
            new = diagnose(model, task, cfg, seed, fit, heldout, args.target, args.every, args.sizes)
        new[-1] += f" ({time.time() - t0:.0f} s)"
        print("\n".join(new), flush=True)
        lines += new
    if args.out:
        atomic_write(args.out, "\n".join(lines) + "\n")


def diagnose(model: GPT, task: Task, cfg: PruneConfig, seed: int, fit: list, heldout: list, target: float,
             every: int, sizes: list[int]) -> list[str]:
    """One seed's lines: the masks step by step (every ``every`` steps, if any), then what the
    step settle keeps leaves: its open, pinned and closed nodes and the loss along its ranking."""
    steps = MaskSteps.nodes(model, task, cfg, "mean", seed, False, fit, target)
    kept_step = steps.settle()
    taus, mean_taus = steps.at(kept_step)
    lines = []
    if every:
        visited = sorted(set(range(0, steps.last, every)) | {kept_step, steps.last})
        lines.append(f"seed {seed}: step (open nodes, held-out loss) " + ", ".join(
            f"{i} ({steps.n_open(i)}, {steps.loss(i):.3f})" for i in visited) + f"; settle keeps step {kept_step}")
    flat = torch.cat([t.flatten() for t in taus.values()])
    ev = RankedLoss(model, ranking(taus, mean_taus), fit[:cfg.calib_pairs], heldout, "mean", cfg.calib_steps)
    kept = int((flat > 0).sum())
    ks = [k for k in (kept, 2 * kept, 4 * kept, *sizes) if 0 < k <= flat.numel()]
    lines.append(f"seed {seed}: {flat.numel()} nodes, kept (tau > 0) {kept}, pinned at +1 {int((flat >= 1).sum())}, "
                 f"at -1 {int((flat <= -1).sum())}; held-out loss " + ", ".join(f"k={k}: {ev(k):.3f}" for k in ks))
    return lines


if __name__ == "__main__":
    main()
