"""Seconds to find one task's circuit on a shipped model, with the default PruneConfig.

Goal: 30 s or less for the quote task on small-sparse on a 2-core CPU. The node means are
computed (or read from the cache) before timing starts; the split between mask training and the
bisection is printed. With ``--baseline REV`` the same prunings run, alternating, in a git
worktree of commit REV (each run in a fresh Python process on both sides), and the ratio of the
median times is printed: a speed-up measured in one run on one machine, not against an old figure.

Usage: python bench/prune_speed.py [--model data/models/small-sparse] [--tasks single_double_quote]
                                   [--repeats 3] [--baseline REV]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in a child process so that both sides start equal (imports, caches, allocator); uses only
# what every cspkit version has: load, node_means, prune and the circuit's size.
CHILD = """
import json, sys, time
import cspkit
from cspkit.ablation import node_means
from cspkit.pruning import prune
model = cspkit.load(sys.argv[1])
node_means(model)
t0 = time.perf_counter()
c = prune(model, sys.argv[2], progress=False)
sec = time.perf_counter() - t0
masks = getattr(c, "mask_seconds", None)
print(json.dumps({"seconds": sec, "masks": masks, "nodes": c.n_nodes, "edges": c.n_edges}))
"""


def run_once(checkout: Path, model: str, task: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / model), task], cwd=checkout, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/small-sparse")
    ap.add_argument("--tasks", nargs="+", default=["single_double_quote"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--baseline", metavar="REV", help="also time the pruner of this commit, alternating")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        sides = {"this checkout": ROOT}
        if args.baseline:
            base = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline],
                           check=True, capture_output=True)
            sides[args.baseline] = base
        try:
            rows = []
            for task in args.tasks:
                runs = {side: [] for side in sides}
                for _ in range(args.repeats):
                    for side, checkout in sides.items():      # alternate, so that load drifts hit both
                        runs[side].append(run_once(checkout, args.model, task))
                for side, rs in runs.items():
                    sec = statistics.median(r["seconds"] for r in rs)
                    masks = statistics.median(r["masks"] for r in rs) if side == "this checkout" else None
                    rows.append({"task": task, "pruner": side, "seconds": round(sec, 1), "runs": len(rs),
                                 "mask_training_s": None if masks is None else round(masks, 1),
                                 "bisection_s": None if masks is None else round(sec - masks, 1),
                                 "nodes": rs[-1]["nodes"], "edges": rs[-1]["edges"]})
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                               check=False, capture_output=True)
    threads = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             capture_output=True, text=True).stdout.strip()
    if args.json:
        print(json.dumps({"model": args.model, "threads": threads, "rows": rows}))
        return
    print(f"{args.model}, {threads} torch threads, default PruneConfig, median of {args.repeats}")
    print(f"{'task':24s} {'pruner':14s} {'seconds':>8s} {'masks':>7s} {'bisect':>7s} {'nodes':>6s} {'edges':>6s}")
    for r in rows:
        split = (f"{r['mask_training_s']:>7.1f} {r['bisection_s']:>7.1f}" if r["mask_training_s"] is not None
                 else f"{'':>7s} {'':>7s}")
        print(f"{r['task']:24s} {r['pruner']:14s} {r['seconds']:>8.1f} {split} {r['nodes']:>6d} {r['edges']:>6d}")
    if args.baseline:
        for task in args.tasks:
            new, old = (next(r["seconds"] for r in rows if r["task"] == task and r["pruner"] == s) for s in sides)
            print(f"{task}: {old / new:.2f}x faster than {args.baseline} ({old:.1f} s -> {new:.1f} s); goal 30 s")


if __name__ == "__main__":
    main()
