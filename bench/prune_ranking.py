"""How well the trained masks rank nodes, with the default PruneConfig.

For each model, task and seed: the masks' own node set (every open gate) and its held-out loss,
the circuit the bisection returns and its ratio to that set, whether the masks collapsed, and
the loss along the ranking at the sizes the bisection visited: the largest rise above the target
after the first size under it (the bisection assumes there is none; "monotone enough" allows
0.05). docs/method.md, "Penalty" and "Ranking and bisection".

Usage: python bench/prune_ranking.py [--models data/models/small-sparse data/models/small-dense]
                                     [--tasks single_double_quote bracket_counting var_if] [--seeds 0 1]
"""
from __future__ import annotations

import argparse
import json

import cspkit
from cspkit.pruning import MASK_SLACK, prune, rise_after_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["data/models/small-sparse", "data/models/small-dense"])
    ap.add_argument("--tasks", nargs="+", default=["single_double_quote", "bracket_counting", "var_if"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for path in args.models:
        model = cspkit.load(path)
        for task in args.tasks:
            for seed in args.seeds:
                c = prune(model, task, seed=seed, progress=False)
                rows.append({"model": path, "task": task, "seed": seed, "mask_nodes": c.mask_nodes,
                             "mask_loss": round(c.mask_loss, 4), "nodes": c.n_nodes, "edges": c.n_edges,
                             "loss": round(c.loss, 4), "ratio": round(c.n_nodes / max(c.mask_nodes, 1), 2),
                             "collapsed": c.collapsed, "rise": round(rise_after_target(c.trace, c.target), 4),
                             "trace": [(k, round(v, 4)) for k, v in c.trace]})
    if args.json:
        print(json.dumps({"mask_slack": MASK_SLACK, "rows": rows}))
        return
    print("default PruneConfig, target 0.15; ratio = circuit nodes / the masks' own nodes; rise = the largest "
          "loss above the target after the first size under it")
    print(f"{'model':28s} {'task':20s} {'seed':>4s} {'masks':>6s} {'loss':>6s} {'nodes':>6s} {'edges':>7s} "
          f"{'loss':>6s} {'ratio':>6s} {'collapsed':>9s} {'rise':>6s}")
    for r in rows:
        print(f"{r['model']:28s} {r['task']:20s} {r['seed']:>4d} {r['mask_nodes']:>6d} {r['mask_loss']:>6.3f} "
              f"{r['nodes']:>6d} {r['edges']:>7d} {r['loss']:>6.3f} {r['ratio']:>6.2f} {str(r['collapsed']):>9s} "
              f"{r['rise']:>6.3f}")
    worst = max(r["rise"] for r in rows)
    ratios = [r["ratio"] for r in rows]
    print(f"collapsed: {sum(r['collapsed'] for r in rows)} of {len(rows)}; circuit / masks from {min(ratios):.2f} "
          f"to {max(ratios):.2f}; largest rise above the target after reaching it: {worst:.3f} (allowed 0.05)")


if __name__ == "__main__":
    main()
