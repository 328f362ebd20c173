"""How far the CSR products of pruning (cspkit.sparsity.sparse_matmuls) move a model's outputs
from the dense products: per model and task, the largest difference of the candidates' logits
over the held-out pairs, and the full model's calibrated held-out loss both ways.

Each product agrees to float rounding (about 1e-6), but an activation AbsTopK keeps the k largest
magnitudes, and where two of them are nearly tied at the k-th place the rounding decides which
one is kept: the model's function then differs by the value of the activation that moved
(docs/results.md, "Speed").

Usage: python bench/csr_agreement.py [--models data/models/small-sparse ...] [--tasks single_double_quote ...]
"""
from __future__ import annotations

import argparse

import torch

import cspkit
from cspkit import tasks
from cspkit.ablation import keep_gates, node_widths
from cspkit.circuit import masked_pair_logits, split_pairs
from cspkit.config import PruneConfig
from cspkit.model import frozen
from cspkit.sparsity import sparse_matmuls
from cspkit.sweeps import full_model_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["data/models/small-sparse", "data/models/paper-e1-sparse"])
    ap.add_argument("--tasks", nargs="+", default=["single_double_quote", "lambda_func"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PruneConfig()
    print(f"model, task: largest |logit difference| CSR against dense over the held-out prompts; full model's "
          f"calibrated held-out loss dense / CSR ({args.threads} threads)")
    for path in args.models:
        model = cspkit.load(path)
        everything = keep_gates(model.config, {loc: list(range(w)) for loc, w in node_widths(model.config).items()})
        for name in args.tasks:
            heldout = split_pairs(tasks.get(name), cfg)[1]
            with frozen(model):
                dense = masked_pair_logits(model, heldout, everything, "mean")[0]
                loss = full_model_loss(model, name, cfg, "mean")
                with sparse_matmuls(model) as n_csr:
                    csr = masked_pair_logits(model, heldout, everything, "mean")[0]
                    loss_csr = full_model_loss(model, name, cfg, "mean")
            print(f"{path}, {name}: {n_csr} CSR layers; logits differ by at most {(dense - csr).abs().max():.2e}; "
                  f"held-out loss {loss:.4f} / {loss_csr:.4f}", flush=True)


if __name__ == "__main__":
    main()
