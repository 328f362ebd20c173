"""How many edges an edge circuit could still lose: measured greedy removal against the masks.

For an edge circuit from ``cspkit prune --edges``: every edge of its node circuit is removed
alone and the calibrated held-out loss measured (the pruner's own measurement, on its held-out
pairs); then, from the whole node circuit and in that order (least harmful first), each edge is
removed if the loss stays at most the target, in passes until a pass removes none. This spends
one held-out evaluation per try, where the edge masks spend one per bisection step, so it is a
check on how close the masks' circuit is to what removal alone can reach, not a pruner
(docs/results.md, "Edge circuits"). Selecting on the held-out pairs flatters its circuit; the
test split is not used.

Usage: python bench/edge_elimination.py results/circuits/small-sparse-edges/single_double_quote.json [...]
"""
from __future__ import annotations

import argparse
import time

import torch

from cspkit.circuit import Circuit, compute_edges, split_pairs
from cspkit.edges import edge_groups
from cspkit.pruning import edge_set_loss


def eliminate(c: Circuit) -> list[str]:
    model, cfg = c.require_model("measuring its edges"), c.prune_config()
    fit, heldout = split_pairs(c.get_task(), cfg)
    edges = compute_edges(model, c.nodes)
    groups = edge_groups(model, edges, c.ablation)
    n_eval, t0 = 0, time.time()

    def loss(keep: list[int]) -> float:
        nonlocal n_eval
        n_eval += 1
        return edge_set_loss(model, c.nodes, groups, len(edges), keep, fit[:cfg.calib_pairs], heldout, c.ablation,
                             cfg.calib_steps)[0]

    everything = list(range(len(edges)))
    alone = {e: loss([k for k in everything if k != e]) for e in everything}
    lines = [f"{c.task} in {c.model_path} (target {c.target}, {c.ablation} ablation, held-out pairs)",
             f"node circuit: {c.n_nodes} nodes, {len(edges)} edges, loss {loss(everything):.4f}",
             f"edge masks and bisection (the circuit file): {c.n_edges} edges, loss {c.loss:.4f}",
             "loss with one edge removed, sorted: " + " ".join(f"{v:.3f}" for v in sorted(alone.values()))]
    keep, passes = everything, 0
    while True:
        passes += 1
        removed = 0
        for e in sorted(keep, key=lambda i: alone[i]):
            trial = [k for k in keep if k != e]
            if loss(trial) <= c.target:
                keep, removed = trial, removed + 1
        if not removed:
            break
    lines += [f"greedy removal: {len(keep)} edges, loss {loss(keep):.4f} ({passes} passes, {n_eval} evaluations, "
              f"{time.time() - t0:.0f} s)",
              f"edges fewer than the node circuit: masks {len(edges) / max(c.n_edges, 1):.2f}x, "
              f"greedy removal {len(edges) / max(len(keep), 1):.2f}x"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("circuits", nargs="+", help="edge circuit files (cspkit prune --edges)")
    args = ap.parse_args()
    torch.manual_seed(0)
    for path in args.circuits:
        c = Circuit.load(path)
        if not c.edge_level:
            raise SystemExit(f"{path} is a node circuit; give the file `cspkit prune --edges` wrote")
        print("\n".join(eliminate(c)) + "\n")


if __name__ == "__main__":
    main()
