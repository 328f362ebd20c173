"""Seconds to find one task's circuit on a shipped model, with the default PruneConfig.

Goal: 120 s or less per task on a 2-core CPU, 60 s ideally. The node means are
computed (or read from means.safetensors) before timing starts; each task is pruned
``--repeats`` times and the median is printed, with the split between mask training and the
bisection.
Usage: python bench/prune_speed.py [--model data/models/small-sparse] [--tasks single_double_quote indent_for]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import cspkit
from cspkit.ablation import node_means
from cspkit.pruning import prune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="data/models/small-sparse")
    ap.add_argument("--tasks", nargs="+", default=["single_double_quote", "indent_for"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = cspkit.load(args.model)
    node_means(model)

    rows = []
    for task in args.tasks:
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            c = prune(model, task, progress=False)
            runs.append((time.perf_counter() - t0, c.mask_seconds))
        sec, masks = sorted(runs)[len(runs) // 2]
        rows.append({"task": task, "seconds": round(sec, 1), "mask_training_s": round(masks, 1),
                     "bisection_s": round(sec - masks, 1), "nodes": c.n_nodes, "edges": c.n_edges,
                     "goal_s": 120, "ratio_to_goal": round(sec / 120, 2)})
    if args.json:
        print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "rows": rows}))
        return
    print(f"{args.model}, {torch.get_num_threads()} torch threads, default PruneConfig")
    print(f"{'task':24s} {'seconds':>8s} {'masks':>7s} {'bisect':>7s} {'nodes':>6s} {'edges':>6s} {'/ 120 s':>8s}")
    for r in rows:
        print(f"{r['task']:24s} {r['seconds']:>8.1f} {r['mask_training_s']:>7.1f} {r['bisection_s']:>7.1f} "
              f"{r['nodes']:>6d} {r['edges']:>6d} {r['ratio_to_goal']:>8.2f}")


if __name__ == "__main__":
    main()
