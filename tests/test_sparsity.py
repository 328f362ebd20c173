import pytest
import torch

from cspkit.model import GPT
from cspkit.sparsity import density_report, format_density, l0_fraction, n_keep, neuron_axis, project_, project_model_


def nnz(t: torch.Tensor) -> int:
    return int((t != 0).sum())


def test_project_keeps_exactly_k_largest():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(50, 40, generator=g)
    orig = p.clone()
    project_(p, 137)
    assert nnz(p) == 137
    kept = p != 0
    # kept entries are unchanged, and none dropped is larger than any kept
    assert torch.equal(p[kept], orig[kept])
    assert orig[kept].abs().min() >= orig[~kept].abs().max()


def test_project_all_equal_values_keeps_exactly_k():
    p = torch.ones(20, 30)
    project_(p, 77)
    assert nnz(p) == 77
    assert torch.equal(p[p != 0], torch.ones(77))


def test_project_many_duplicates_keeps_exactly_k():
    g = torch.Generator().manual_seed(1)
    vals = torch.tensor([-2.0, -1.0, 1.0, 2.0])
    p = vals[torch.randint(0, 4, (40, 40), generator=g)]
    orig = p.clone()
    n_big = int((orig.abs() == 2).sum())
    k = n_big + 100  # the threshold falls inside the run of |1| values
    project_(p, k)
    assert nnz(p) == k
    assert bool((p[orig.abs() == 2] != 0).all()), "every magnitude-2 entry outranks the ties at 1"


def test_project_k_at_least_numel_is_noop():
    p = torch.randn(5, 6)
    orig = p.clone()
    project_(p, 30)
    assert torch.equal(p, orig)
    project_(p, 1000)
    assert torch.equal(p, orig)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("k", [10, 300])
def test_project_min_per_neuron(axis, k):
    g = torch.Generator().manual_seed(2)
    p = torch.randn(16, 32, generator=g) + 3 * torch.sign(torch.randn(16, 32, generator=g))
    # make some neurons tiny, so a global top-k alone would drop them entirely
    if axis == 1:
        p[:4] *= 1e-3
    else:
        p[:, :4] *= 1e-3
    j = 4
    n_neurons = p.shape[1 - axis]
    forced = n_neurons * j
    project_(p, k, min_per_neuron=j, axis=axis)
    per_neuron = (p != 0).sum(dim=axis)
    assert per_neuron.numel() == n_neurons
    assert int(per_neuron.min()) >= j
    assert nnz(p) == max(k, forced)


def test_project_min_per_neuron_with_ties():
    p = torch.ones(12, 10)
    project_(p, 5, min_per_neuron=3, axis=1)  # 12 rows x 3 forced = 36 > 5
    assert nnz(p) == 36
    assert torch.equal((p != 0).sum(dim=1), torch.full((12,), 3))
    p = torch.ones(12, 10)
    project_(p, 50, min_per_neuron=3, axis=0)  # 10 columns x 3 forced = 30 < 50
    assert nnz(p) == 50
    assert int((p != 0).sum(dim=0).min()) >= 3


def test_neuron_axis():
    assert neuron_axis("h.0.mlp.c_fc.weight") == 1
    assert neuron_axis("h.3.attn.c_attn.weight") == 1
    assert neuron_axis("h.0.mlp.c_proj.weight") == 0
    assert neuron_axis("h.1.attn.c_proj.weight") == 0
    assert neuron_axis("wte.weight") is None
    assert neuron_axis("h.0.mlp.c_fc.bias") is None


def _random_gpt(tiny_cfg, **kw):
    from dataclasses import replace
    torch.manual_seed(0)
    model = GPT(replace(tiny_cfg, **kw))
    with torch.no_grad():
        for p in model.parameters():  # no exact zeros anywhere (biases start at zero)
            p.copy_(torch.randn_like(p).sign() * (0.5 + torch.rand_like(p)))
    return model


def test_project_model_gives_each_group_its_fraction(tiny_cfg):
    model = _random_gpt(tiny_cfg, sink=True, bigram_table=True)
    untouched = {n: p.detach().clone() for n, p in model.named_parameters()
                 if n not in model.sparse_parameters()}
    assert untouched, "norm gains, sink logits and the bigram table are not sparse parameters"
    project_model_(model, 0.1, 0.3)
    rep = density_report(model)
    groups = {n: g for n, (_, g) in model.sparse_parameters().items()}
    assert set(groups.values()) == {"matrix", "embed"}
    for name, group in groups.items():
        frac = 0.1 if group == "matrix" else 0.3
        assert rep[name]["group"] == group
        assert rep[name]["nonzeros"] == n_keep(rep[name]["size"], frac), name
    for group in ("matrix", "embed"):
        names = [n for n, g in groups.items() if g == group]
        assert rep[f"total:{group}"]["nonzeros"] == sum(rep[n]["nonzeros"] for n in names)
        assert rep[f"total:{group}"]["size"] == sum(rep[n]["size"] for n in names)
    params = dict(model.named_parameters())
    for name, before in untouched.items():
        assert torch.equal(params[name], before), f"{name} must never be projected"


def test_format_density_has_a_line_per_report_row(tiny_cfg):
    model = _random_gpt(tiny_cfg)
    project_model_(model, 0.1, 0.3)
    rep = density_report(model)
    header, *lines = format_density(rep).splitlines()
    assert header.split() == ["parameter", "nonzeros", "size", "fraction"]
    assert len(lines) == len(rep)
    for line, (name, r) in zip(lines, rep.items()):
        assert line.split() == [name, f"{r['nonzeros']:,}", f"{r['size']:,}", f"{r['fraction']:.4f}"]


def test_project_model_min_per_neuron(tiny_cfg):
    model = _random_gpt(tiny_cfg)
    project_model_(model, 0.01, 0.3, min_per_neuron=4)
    for name, (p, _) in model.sparse_parameters().items():
        axis = neuron_axis(name)
        if axis is None:
            continue
        assert int((p != 0).sum(dim=axis).min()) >= 4, name


def test_l0_fraction_schedule():
    kw = dict(max_steps=1000, final=0.1, start=0.1, end=0.5)  # anneal from step 100 to step 500
    assert l0_fraction(0, **kw) == 1.0
    assert l0_fraction(50, **kw) == 1.0
    assert l0_fraction(100, **kw) == 1.0
    assert l0_fraction(300, **kw) == pytest.approx(0.55)
    assert l0_fraction(500, **kw) == pytest.approx(0.1)
    assert l0_fraction(501, **kw) == pytest.approx(0.1)
    assert l0_fraction(999, **kw) == pytest.approx(0.1)
    assert l0_fraction(5000, **kw) == pytest.approx(0.1)
    # no annealing: sparse from the first step
    assert l0_fraction(0, 1000, 0.1, start=0.0, end=0.0) == pytest.approx(0.1)
    # the count of nonzeros falls linearly in the step
    fr = [l0_fraction(s, **kw) for s in range(100, 501, 50)]
    diffs = [a - b for a, b in zip(fr, fr[1:])]
    assert diffs == pytest.approx([diffs[0]] * len(diffs))
    assert diffs[0] == pytest.approx(0.9 * 50 / 400)
    # monotone non-increasing everywhere
    all_fr = [l0_fraction(s, **kw) for s in range(0, 1001, 7)]
    assert all(a >= b for a, b in zip(all_fr, all_fr[1:]))


def test_n_keep_bounds():
    assert n_keep(100, 0.1) == 10
    assert n_keep(100, 1e-9) == 1
    assert n_keep(100, 1.0) == 100
