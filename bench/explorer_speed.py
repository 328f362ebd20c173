"""Seconds the explorer takes to answer each interaction, on a shipped model, measured in one run.

Goal: after the first load, every interaction under 1 s on 2 CPU cores for small-sparse. The
first load (the explorer built on the saved circuits: corpus statistics, the chosen circuit's
ablation effects, its loss-against-k curve) is printed too, as are the callbacks' own times
without the browser (what the kernel spends; the browser's drawing adds little to a graph of a
few dozen nodes). Each interaction is repeated and the median printed.

Moving k: after each move the explorer computes the slider's two neighbours in the background
(``RankSlider.prefetch``). "move k by one" is a step made once that has finished, as a user
stepping at human pace makes it (the time the background work takes is printed: a user who
steps faster waits for the rest of it); "jump k" goes to a size nothing has computed yet, the
cost every new size pays once.

Usage: python bench/explorer_speed.py [--model data/models/small-sparse] [--task single_double_quote]
                                      [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import cspkit
from cspkit import viz


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="data/models/small-sparse")
    ap.add_argument("--task", default="single_double_quote")
    ap.add_argument("--circuits", default=None, help="default: results/circuits/<model name>")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=16, help="test pairs for the explorer's losses")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = cspkit.load(args.model)
    circuits = args.circuits or cspkit.paths.results_dir() / "circuits" / Path(model.path).name

    t0 = time.perf_counter()
    ex = viz.explore(model, [args.task], circuits=[circuits], n_pairs=args.pairs, cache=False)
    load = time.perf_counter() - t0
    names = ex.circuit.node_names()
    n = ex.circuit.n_nodes
    weights = sorted(abs(w) for *_, w in ex.circuit.edges)
    times: dict[str, list[float]] = {"select a node": [], "move k by one": [], "jump k": [],
                                     "toggle a node off and on": [], "change the edge threshold": []}
    prefetch: list[float] = []
    # sizes nothing has evaluated yet, nearest the circuit first; each repeat starts one step away
    fresh = sorted((k for k in range(ex.k.max + 1) if k not in ex.ranked.ranked.seen), key=lambda k: abs(k - n))
    fresh = [k for k in fresh if k != n and abs(k - n) > 1][:2 * args.repeats]
    for r in range(args.repeats):
        ex.ranked.wait()
        times["select a node"].append(timed(lambda r=r: setattr(ex.graph, "selected", names[r % len(names)])))
        far, start = fresh[2 * r], fresh[2 * r + 1]
        times["jump k"].append(timed(lambda far=far: setattr(ex.k, "value", far)))
        ex.ranked.wait()
        ex.k.value = start
        prefetch.append(timed(ex.ranked.wait))
        times["move k by one"].append(timed(lambda start=start: setattr(ex.k, "value", start + 1)))
        ex.k.value = n
        ex.ranked.wait()
        ex.node.value = names[r % len(names)]
        times["toggle a node off and on"].append(timed(lambda: (setattr(ex.node_off, "value", True),
                                                                setattr(ex.node_off, "value", False))) / 2)
        times["change the edge threshold"].append(timed(
            lambda r=r: setattr(ex.threshold, "value", weights[(r + 1) * len(weights) // (args.repeats + 2)])))
    ex.threshold.value = 0.0
    print(f"{args.model}, {args.task} ({n} nodes, {ex.circuit.n_edges} edges), {args.threads} torch threads, "
          f"{args.pairs} test pairs, median of {args.repeats}")
    print(f"{'first load':28s} {load:7.2f} s")
    worst = 0.0
    for what, ts in times.items():
        med = statistics.median(ts)
        if what != "jump k":
            worst = max(worst, max(ts))
        print(f"{what:28s} {med:7.3f} s   (max {max(ts):.3f})")
    print(f"{'  background after a move':28s} {statistics.median(prefetch):7.3f} s   (max {max(prefetch):.3f})")
    print(f"slowest single interaction (jump k aside) {worst:.3f} s; goal 1 s: {'met' if worst < 1 else 'missed'}")


if __name__ == "__main__":
    main()
