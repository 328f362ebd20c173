"""Time dense and weight-sparse training steps of the same shape in one run; print sparse/dense.

The sparse step is the dense step plus the top-k projection of every matrix at the final
L0; both run in fp32, whatever the profile's autocast. A third model times the sparse step
under bf16 autocast, which pays where the CPU multiplies bfloat16 natively (AMX, AVX512-BF16);
where it emulates bfloat16 (20x slower) the third model is left out and the output says so.
`--variant key=value` adds one more sparse model (fp32) with that change and prints what it
costs against the plain sparse step: `--variant sink=true` prices the attention sink.
Steps of the models alternate, and each time is the median over the steps.
Usage: python bench/train_overhead.py [--profile small] [--steps 12] [--warmup 3] [--out results/train_overhead.json]
       [--variant key=value ...] [key=value ...]   (overrides of the profile, as cspkit train takes them:
       d_model=512 l0_frac=0.015625)
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from cspkit.files import atomic_write
from cspkit.model import GPT
from cspkit.profiles import config_for, resolve_profile
from cspkit.training import decayed, native_bf16, schedule, train_step


class Runner:
    """A model, its optimizer and a fixed batch: one training step on call."""

    def __init__(self, mcfg, tcfg, seed: int = 0):
        torch.manual_seed(seed)
        self.model = GPT(mcfg)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps)
        self.params, self.decay = list(self.model.parameters()), decayed(self.model)
        self.tcfg, self.s = tcfg, schedule(tcfg.max_steps - 1, tcfg)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, mcfg.vocab_size, (tcfg.batch_size, mcfg.block_size + 1), generator=g)

    def step(self) -> float:
        t0 = time.perf_counter()
        train_step(self.model, self.opt, self.x[:, :-1], self.x[:, 1:], self.s, self.tcfg, self.params, self.decay)
        return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="small")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the result as JSON (the same run as the printed one)")
    ap.add_argument("--variant", action="append", default=[], metavar="key=value",
                    help="also time the sparse step with this change to the config (repeatable, all applied together)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the profile's config")
    args = ap.parse_args()
    args.profile = resolve_profile(args.profile)  # recorded as what it is, not as an alias that may move on
    mcfg, tcfg = config_for(args.profile, overrides=args.overrides)
    tcfg = replace(tcfg, autocast=None)
    runners = {"dense": Runner(mcfg, replace(tcfg, dense=True)), "sparse": Runner(mcfg, tcfg)}
    if native_bf16(torch.device("cpu")):
        runners["sparse_bf16"] = Runner(mcfg, replace(tcfg, autocast="bf16"))
    if args.variant:
        vm, vt = config_for(args.profile, overrides=args.overrides + args.variant)
        runners["variant"] = Runner(vm, replace(vt, autocast=None))
    times: dict[str, list[float]] = {k: [] for k in runners}
    # alternate the two, step by step, so that load from elsewhere falls on both alike
    for i in range(args.warmup + args.steps):
        for k, r in runners.items():
            t = r.step()
            if i >= args.warmup:
                times[k].append(t)
    dense, sparse = median(times["dense"]), median(times["sparse"])
    out = {"profile": args.profile, "overrides": args.overrides, "threads": torch.get_num_threads(),
           "tokens_per_step": tcfg.batch_size * mcfg.block_size, "dense_s": round(dense, 4),
           "sparse_s": round(sparse, 4), "ratio_sparse_over_dense": round(sparse / dense, 3), "goal": 1.10}
    if "sparse_bf16" in times:
        bf16 = median(times["sparse_bf16"])
        out.update(sparse_bf16_s=round(bf16, 4), speedup_bf16=round(sparse / bf16, 3))
        bf16_text = f"sparse under bf16 autocast {bf16:.3f} s/step, {sparse / bf16:.2f}x faster"
    else:
        bf16_text = "bf16 autocast not timed: this CPU emulates bfloat16"
    variant_text = ""
    if "variant" in times:
        var = median(times["variant"])
        out.update(variant=args.variant, variant_s=round(var, 4), ratio_variant_over_sparse=round(var / sparse, 3))
        variant_text = f"; sparse with {' '.join(args.variant)} {var:.3f} s/step, {var / sparse:.3f}x the sparse step"
    if args.out:
        atomic_write(args.out, (json.dumps(out) + "\n").encode())
    if args.json:
        print(json.dumps(out))
    else:
        shape = " ".join([args.profile, *args.overrides])
        print(f"profile {shape}, {out['threads']} threads, {out['tokens_per_step']} tokens/step: "
              f"dense {dense:.3f} s/step, sparse {sparse:.3f} s/step, "
              f"ratio sparse/dense {sparse / dense:.3f} (goal <= 1.10); {bf16_text}{variant_text}")


if __name__ == "__main__":
    main()
