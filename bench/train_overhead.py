"""Time dense and weight-sparse training steps of the same shape in one run; print sparse/dense.

The sparse step is the dense step plus the top-k projection of every matrix at the final
L0 (the worst case: the projection's cost does not depend on the fraction kept).
Usage: python bench/train_overhead.py [--profile small] [--steps 12] [--warmup 3]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from cspkit.model import GPT
from cspkit.train import config_for, decayed, schedule, train_step


def time_steps(mcfg, tcfg, steps: int, warmup: int, seed: int = 0) -> float:
    torch.manual_seed(seed)
    model = GPT(mcfg)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps)
    params, decay = list(model.parameters()), decayed(model)
    s = schedule(tcfg.max_steps - 1, tcfg)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, mcfg.vocab_size, (tcfg.batch_size, mcfg.block_size + 1), generator=g)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        train_step(model, opt, x[:, :-1], x[:, 1:], s, tcfg, params, decay)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]  # median: robust to a stray slow step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="small")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    mcfg, tcfg = config_for(args.profile)
    dense = time_steps(mcfg, replace(tcfg, dense=True), args.steps, args.warmup)
    sparse = time_steps(mcfg, tcfg, args.steps, args.warmup)
    out = {"profile": args.profile, "threads": torch.get_num_threads(), "tokens_per_step":
           tcfg.batch_size * mcfg.block_size, "dense_s": round(dense, 4), "sparse_s": round(sparse, 4),
           "ratio_sparse_over_dense": round(sparse / dense, 3), "goal": 1.10}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"profile {args.profile}, {out['threads']} threads, {out['tokens_per_step']} tokens/step: "
              f"dense {dense:.3f} s/step, sparse {sparse:.3f} s/step, "
              f"ratio sparse/dense {sparse / dense:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
