"""Weight sparsity: the top-k magnitude projection, the per-neuron minimum, L0 annealing, density."""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
import torch.nn as nn


def l0_fraction(step: int, max_steps: int, final: float, start: float = 0.01, end: float = 0.5) -> float:
    """Fraction of entries kept at ``step``: dense until ``start``, the count of nonzeros falling
    linearly to ``final`` at ``end`` (fractions of training), then held."""
    s0, s1 = start * max_steps, end * max_steps
    if step >= s1:  # first, so that start = end = 0 (no annealing) is sparse from step 0
        return final
    if step <= s0:
        return 1.0
    return 1.0 - (1.0 - final) * (step - s0) / (s1 - s0)


def neuron_axis(name: str) -> int | None:
    """The dim along which one neuron / attention channel owns a vector of a weight matrix.

    Inputs of a neuron (c_fc) and of a q/k/v channel (c_attn) are rows (reduce over dim 1);
    outputs of a neuron or a v channel (c_proj) are columns (reduce over dim 0).
    """
    if name.endswith(("mlp.c_fc.weight", "attn.c_attn.weight")):
        return 1
    if name.endswith("c_proj.weight"):
        return 0
    return None


def n_keep(numel: int, frac: float) -> int:
    return max(1, min(numel, round(frac * numel)))


@torch.no_grad()
def project_(p: torch.Tensor, k: int, min_per_neuron: int = 0, axis: int | None = None) -> None:
    """Keep exactly the k entries of largest magnitude of ``p`` in place (ties broken by index
    order of torch.topk, deterministically), after forcing ``min_per_neuron`` per neuron."""
    n = p.numel()
    if k >= n:
        return
    score = p.abs()
    if min_per_neuron and axis is not None and p.dim() == 2:
        j = min(min_per_neuron, p.shape[axis])
        forced = torch.zeros_like(p, dtype=torch.bool)
        forced.scatter_(axis, score.topk(j, dim=axis).indices, True)
        score = score.masked_fill(forced, math.inf)
        k = max(k, int(forced.sum()))
    idx = score.flatten().topk(k, sorted=False).indices
    keep = torch.zeros(n, dtype=torch.bool, device=p.device)
    keep[idx] = True
    p.mul_(keep.view_as(p))


def project_model_(model: nn.Module, frac_matrix: float, frac_embed: float, min_per_neuron: int = 0) -> None:
    """Project every sparse parameter of a GPT to its group's kept fraction."""
    for name, (p, group) in model.sparse_parameters().items():
        frac = frac_matrix if group == "matrix" else frac_embed
        project_(p.data, n_keep(p.numel(), frac), min_per_neuron, neuron_axis(name))


@torch.no_grad()
def density_report(model: nn.Module) -> dict[str, dict]:
    """Per sparse parameter: nonzeros, size, fraction and group; plus the totals per group."""
    rows, totals = {}, {}
    for name, (p, group) in model.sparse_parameters().items():
        nz, size = int((p != 0).sum()), p.numel()
        rows[name] = {"group": group, "nonzeros": nz, "size": size, "fraction": nz / size}
        t = totals.setdefault(group, {"nonzeros": 0, "size": 0})
        t["nonzeros"] += nz
        t["size"] += size
    for group, t in totals.items():
        rows[f"total:{group}"] = {"group": group, **t, "fraction": t["nonzeros"] / max(1, t["size"])}
    return rows


def format_density(report: dict[str, dict]) -> str:
    """The density report as a table: one line per parameter and per group total, under a header."""
    width = max(len("parameter"), *(len(k) for k in report))
    lines = [f"{'parameter':{width}s} {'nonzeros':>10s} {'size':>10s} {'fraction':>9s}"]
    lines += [f"{k:{width}s} {r['nonzeros']:>10,d} {r['size']:>10,d} {r['fraction']:>9.4f}" for k, r in report.items()]
    return "\n".join(lines)


# Below this fraction of nonzeros a CSR product beats the dense one on CPU (a 2.8 percent
# dense (1152, 384) matrix times 1,600 rows: 1.7 ms against 7.3 ms on 2 cores; docs/method.md,
# "Pruning"); at a quarter or more it does not.
CSR_MAX_DENSITY = 0.2


class _CSRLinear(torch.autograd.Function):
    """y = x W^T + b with W as a CSR matrix; backward gives the input's gradient only (the weights
    are frozen), through W^T kept as a second CSR matrix."""

    @staticmethod
    def forward(ctx, x, w, wt, bias):
        ctx.wt = wt
        y = (w @ x.reshape(-1, x.shape[-1]).T).T           # (N, out)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        gx = (ctx.wt @ grad.reshape(-1, grad.shape[-1]).T).T
        return gx.reshape(*grad.shape[:-1], gx.shape[-1]), None, None, None


@contextlib.contextmanager
def sparse_matmuls(model: nn.Module, max_density: float = CSR_MAX_DENSITY) -> Iterator[int]:
    """Within the block, every frozen linear layer of ``model`` whose weight has at most
    ``max_density`` nonzeros multiplies as a CSR matrix (CPU only; elsewhere nothing changes).
    Yields how many layers it switched. Each product equals the dense one up to float rounding
    (the sums run in another order), which can flip an activation AbsTopK's choice between
    near-tied magnitudes (docs/results.md, "Speed", measures how far that moves a model). For
    mask training and circuit evaluation, where the model is frozen and runs thousands of times."""
    switched = []
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if (not isinstance(mod, nn.Linear) or "forward" in vars(mod) or w.device.type != "cpu" or w.requires_grad
                or float((w != 0).float().mean()) > max_density):   # vars: already switched by an outer block
            continue
        with warnings.catch_warnings():   # torch marks CSR tensors beta; the product used here is tested
            warnings.simplefilter("ignore", UserWarning)
            w_csr, wt_csr = w.detach().to_sparse_csr(), w.detach().T.contiguous().to_sparse_csr()
        bias = None if mod.bias is None else mod.bias.detach()

        def forward(x, w_csr=w_csr, wt_csr=wt_csr, bias=bias):
            return _CSRLinear.apply(x, w_csr, wt_csr, bias)
        mod.forward = forward        # an instance attribute shadows nn.Linear.forward until removed
        switched.append(mod)
    try:
        yield len(switched)
    finally:
        for mod in switched:
            del mod.forward
