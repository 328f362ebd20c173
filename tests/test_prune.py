"""Pruning: the gate, ablations, mask training, bisection, calibration, determinism, errors."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_corpus

import cspkit
from cspkit import tasks
from cspkit.ablation import ablation_values, gate_hooks, keep_gates, node_means, node_widths, resample_shift
from cspkit.circuit import fit_calibration
from cspkit.config import PruneConfig, to_dict
from cspkit.model import GPT, parse_node
from cspkit.pruning import bisect, gate, prune, ranking, top_nodes

FAST = PruneConfig(steps=6, batch_pairs=8, heldout_pairs=16, calib_pairs=16)


def _task(n_train=48, n_test=16):
    return tasks.Task("quote_small", "quote task, fewer pairs", tasks.get("single_double_quote").generator,
                      candidates=('")\n', "')\n"), n_pairs={"train": n_train, "test": n_test})


@pytest.fixture(scope="module")
def tiny(trained):
    return cspkit.load(trained.dir)


def test_gate_forward_is_heaviside_and_backward_is_sigmoid_derivative():
    tau = torch.tensor([-0.5, 0.0, 0.3], requires_grad=True)
    g = gate(tau, temperature=0.5)
    assert g.tolist() == [0.0, 0.0, 1.0]
    g.sum().backward()
    s = torch.sigmoid(tau.detach() / 0.5)
    assert torch.allclose(tau.grad, s * (1 - s) / 0.5)
    assert (tau.grad > 0).all()


def test_all_ones_mask_reproduces_the_model_exactly(tiny):
    x = torch.randint(0, 2000, (2, 16))
    gates = {k: torch.ones(w) for k, w in node_widths(tiny.config).items()}
    with torch.no_grad():
        base = tiny(x)
        out = tiny.run_with_hooks(x, gate_hooks(gates, ablation_values(tiny, "mean")))
    assert torch.equal(base, out)


def test_all_zeros_mask_gives_the_mean_ablated_output(tiny):
    x = torch.randint(0, 2000, (2, 16))
    means = node_means(tiny)
    gates = {k: torch.zeros(w) for k, w in node_widths(tiny.config).items()}

    def set_mean(act, name):
        return means[name].expand_as(act).clone()

    with torch.no_grad():
        out = tiny.run_with_hooks(x, gate_hooks(gates, means))
        ref = tiny.run_with_hooks(x, {k: set_mean for k in means})
    assert torch.allclose(out, ref, atol=1e-6)
    # with every location frozen, the final residual is the embedding plus the mean writes
    cfg = tiny.config
    resid = tiny.wte(x) + tiny.wpe(torch.arange(x.shape[1]))
    resid = resid + sum(means[f"{L}.{w}"] for L in range(cfg.n_layer) for w in ("attn.out", "mlp.out"))
    with torch.no_grad():
        expect = tiny.lm_head(tiny.ln_f(resid))
    assert torch.allclose(out, expect, atol=1e-5)


def test_node_means_are_cached_beside_the_checkpoint(tiny, trained):
    m = node_means(tiny)
    assert (trained.dir / "means.safetensors").is_file()
    again = cspkit.load(trained.dir)
    m2 = node_means(again)
    assert all(torch.equal(m[k], m2[k]) for k in m)


def test_zero_and_resample_values(tiny):
    zero = ablation_values(tiny, "zero")
    assert all((v == 0).all() for v in zero.values())
    toks = torch.randint(0, 2000, (6, 8))
    res = ablation_values(tiny, "resample", toks, shift=1)
    _, cache = tiny.run_with_cache(toks.roll(1, 0), names=list(res))
    assert all(torch.equal(res[k], cache[k]) for k in res)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert resample_shift(6, g) not in (0, 3)
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation_values(tiny, "median")


def test_keep_gates_and_node_names(tiny):
    g = keep_gates(tiny.config, {"0.mlp.neuron": [3, 5]})
    assert g["0.mlp.neuron"].sum() == 2 and g["0.attn.in"].sum() == 0
    inv = keep_gates(tiny.config, {"0.mlp.neuron": [3, 5]}, invert=True)
    assert inv["0.mlp.neuron"].sum() == tiny.config.d_mlp - 2
    assert parse_node("1.attn.q[12]") == ("1.attn.q", 12)
    with pytest.raises(ValueError, match="LOCATION"):
        parse_node("attn.q:12")


def test_ranking_and_top_nodes_are_deterministic():
    taus = {"0.attn.in": torch.tensor([0.5, -0.2, 0.5]), "0.mlp.neuron": torch.tensor([0.9, 0.1])}
    order = ranking(taus)
    assert order == [("0.mlp.neuron", 0), ("0.attn.in", 0), ("0.attn.in", 2), ("0.mlp.neuron", 1), ("0.attn.in", 1)]
    assert top_nodes(order, 3) == {"0.mlp.neuron": [0], "0.attn.in": [0, 2]}
    # nodes the clamp left tied at the same tau are ordered by their average tau over training
    tied = {"0.attn.in": torch.tensor([-1.0, -1.0, 1.0])}
    assert ranking(tied, {"0.attn.in": torch.tensor([-0.9, -0.2, 0.5])}) == [
        ("0.attn.in", 2), ("0.attn.in", 1), ("0.attn.in", 0)]


def test_bisect_finds_the_smallest_k():
    losses = [1.0 - 0.1 * k for k in range(11)]   # falls with k; <= 0.35 from k = 7
    calls = []

    def ev(k):
        calls.append(k)
        return losses[k]

    assert bisect(ev, 10, 0.35) == 7
    assert len(calls) <= math.ceil(math.log2(10)) + 2
    assert bisect(lambda k: 0.1, 10, 0.35) == 0          # nothing needed: the direct path suffices
    for start in (1, 2, 3, 7, 9):
        assert bisect(lambda k: losses[k], 10, 0.35, start=start) == 7


def test_calibration_fits_scale_and_shift():
    diff = torch.linspace(-1, 1, 64)
    label = (diff < 0).long()                         # A is right when diff > 0
    two = torch.stack([diff, torch.zeros_like(diff)], 1)
    scale, shift = fit_calibration(two, label)
    assert scale > 3                                  # sharpening a correct but timid separation
    raw = tasks.task_loss(two, label)
    z = scale * diff + shift
    cal = torch.nn.functional.binary_cross_entropy_with_logits(z, (label == 0).float())
    assert cal < raw


def test_calibration_stays_finite_on_separable_prompts():
    # calibration prompts that the circuit separates perfectly, held-out ones that overlap a little
    g = torch.Generator().manual_seed(0)
    label = torch.arange(64) % 2
    diff = torch.where(label == 0, 2.7, -0.95) + 0.2 * torch.randn(64, generator=g)
    assert bool(((diff > 0) == (label == 0)).all())
    scale, shift = fit_calibration(torch.stack([diff, torch.zeros_like(diff)], 1), label)
    assert 1 < scale < 10 and abs(shift) < 10, (scale, shift)
    held = torch.where(label == 0, 2.1, -1.3) + 1.2 * torch.randn(64, generator=g)
    z = scale * held + shift
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, (label == 0).float())
    assert loss < 0.3, loss    # hard targets: scale and shift in the tens, and a held-out loss near chance


def test_prune_meets_the_target_and_is_deterministic(tiny):
    task = _task()
    full = prune(tiny, task, target=10.0, config=FAST, progress=False)
    target = full.full_loss + 0.02          # a tiny model does not solve the task: prune relative to itself
    a = prune(tiny, task, target=target, config=FAST, seed=3, progress=False)
    b = prune(tiny, task, target=target, config=FAST, seed=3, progress=False)
    assert a.loss <= target and a.n_nodes < a.n_nodes_total
    assert a.nodes == b.nodes and a.edges == b.edges and a.loss == b.loss
    assert (a.n_nodes, a.loss) in [(k, v) for k, v in a.trace]
    # re-evaluating the circuit from the model on the held-out pairs gives the bisection's loss
    heldout = task.pairs("train")[-FAST.heldout_pairs:]
    held = tasks.Task.from_pairs("held", [(p.prompt_a, p.cand_a, p.prompt_b, p.cand_b) for p in heldout])
    a.task_obj = held
    assert a.evaluate("train")["loss"] == pytest.approx(a.loss, abs=1e-5)


def test_prune_resample_and_zero_run(tiny):
    for kind in ("zero", "resample"):
        c = prune(tiny, _task(), target=10.0, ablation=kind, config=FAST, progress=False)
        assert c.ablation == kind and c.loss <= 10.0


def test_prune_errors(tiny):
    with pytest.raises(KeyError, match="known tasks"):
        prune(tiny, "no_such_task", config=FAST, progress=False)
    with pytest.raises(ValueError, match="full model's own held-out task loss"):
        prune(tiny, _task(), target=0.001, config=FAST, progress=False)
    with pytest.raises(ValueError, match="unknown ablation"):
        prune(tiny, _task(), ablation="median", config=FAST, progress=False)
    with pytest.raises(ValueError, match="unknown prune config key"):
        PruneConfig.from_dict({"stepz": 3})


def test_masks_do_not_train_the_model(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    prune(tiny, _task(), target=10.0, config=FAST, progress=False)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert all(p.requires_grad for p in tiny.parameters())


def test_untrained_model_means_need_a_corpus(tiny_cfg, corpus_dir):
    model = GPT(tiny_cfg)
    from cspkit.ablation import compute_means
    m = compute_means(model, n_tokens=256, corpus=[str(corpus_dir)], batch_size=2)
    assert set(m) == set(node_widths(tiny_cfg))


def test_cli_prune_and_validate(trained, tmp_path, capsys):
    import json

    from cspkit.cli import main
    out = tmp_path / "c.json"
    sets = ["--set", "steps=4", "--set", "batch_pairs=4", "--set", "heldout_pairs=16", "--set", "calib_pairs=8"]
    assert main(["prune", "--model", str(trained.dir), "--task", "single_double_quote", "--target", "10",
                 "--out", str(out), "--json", *sets]) == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert res["nodes"] >= 0 and out.is_file()
    assert main(["validate", "--circuit", str(out), "--n", "8", "--draws", "1", "--no-prune-controls",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["control"] == "full model" and rows[1]["nodes"] == res["nodes"]
    assert main(["prune", "--model", str(trained.dir), "--task", "nope", "--out", str(out)]) == 2
    assert "known tasks" in capsys.readouterr().err
    assert main(["prune", "--model", str(trained.dir), "--task", "single_double_quote", "--out", str(out),
                 *sets]) == 2
    assert "above the target" in capsys.readouterr().err


def test_node_penalty_scales_with_the_node_count():
    assert PruneConfig(k_coef=3e-3, k_ref_nodes=None).node_penalty(22528) == 3e-3
    assert PruneConfig(k_coef=3e-3, k_ref_nodes=11264).node_penalty(11264) == 3e-3
    assert PruneConfig(k_coef=3e-3, k_ref_nodes=11264).node_penalty(22528) == 1.5e-3
    with pytest.raises(ValueError, match="k_ref_nodes"):
        PruneConfig(k_ref_nodes=0)
    with pytest.raises(ValueError, match="penalty_start=0"):
        PruneConfig(penalty_start=0)
    with pytest.raises(ValueError, match="penalty_start at most penalty_max=0.001"):
        PruneConfig(penalty_max=0.001)
    # a circuit or sweep file from before the multiplier recorded no penalty_start: its penalty was fixed
    old = PruneConfig.from_dict({"steps": 100, "k_coef": 0.003})
    assert (old.penalty_start, old.penalty_rate, old.calibrate_masks, old.steps) == (1.0, 0.0, False, 100)
    assert old.retry_penalty is None
    assert PruneConfig.from_dict({}) == PruneConfig(penalty_start=1.0, penalty_rate=0.0, calibrate_masks=False,
                                                    retry_penalty=None)
    # and one from before the retry recorded no retry_penalty: one mask run
    no_retry = {k: v for k, v in to_dict(PruneConfig()).items() if k != "retry_penalty"}
    assert PruneConfig.from_dict(no_retry) == PruneConfig(retry_penalty=None)
    assert PruneConfig.from_dict(to_dict(PruneConfig())) == PruneConfig()


def test_the_default_penalty_does_not_collapse_where_a_fixed_one_does():
    """small-dense's with_as: a fixed penalty at the default k_coef closes every gate that matters
    within 20 steps (the last step's masks keep under 50 nodes far above the target), and settle
    goes back to the last step whose masks meet it; the default multiplier, which starts tiny and
    follows the target, keeps a node set under the target, and the bisection's circuit is within
    2x of it (docs/method.md, "Penalty")."""
    from cspkit.pruning import MaskSteps
    model = cspkit.load("small-dense")
    fixed = PruneConfig(penalty_start=1.0, penalty_rate=0.0, calibrate_masks=False, steps=20)
    steps = MaskSteps.nodes(model, tasks.get("with_as"), fixed, "mean", 0, False, None, 0.15)
    assert steps.n_open(steps.last) < 50 and steps.loss(steps.last) > 0.15 + 0.05
    kept = steps.settle()
    assert kept < steps.last and steps.loss(kept) <= 0.15 and steps.n_open(kept) > 50
    c = prune(model, "with_as", progress=False)
    assert not c.collapsed and c.mask_loss <= c.target + 0.05
    assert c.mask_nodes / 2 <= c.n_nodes <= 2 * c.mask_nodes


def test_the_multiplier_stops_at_its_ceiling(tiny):
    """Under a target no mask misses, the multiplier only grows: capped at its start, the masks are
    those of a fixed penalty of that strength; uncapped, they differ."""
    from cspkit.pruning import train_masks
    small = dict(steps=6, batch_pairs=4, heldout_pairs=16, calib_pairs=8, penalty_start=0.5, k_coef=0.05)
    runs = [train_masks(tiny, _task(), PruneConfig(**small, **extra), progress=False, target=50.0)[0]
            for extra in ({"penalty_max": 0.5}, {"penalty_rate": 0.0}, {})]
    assert all(torch.equal(runs[0][loc], runs[1][loc]) for loc in runs[0])
    assert not all(torch.equal(runs[0][loc], runs[2][loc]) for loc in runs[0])


def test_scaled_penalty_trains_the_same_masks_as_the_equal_unscaled_one(tiny):
    from cspkit.pruning import train_masks
    n = sum(node_widths(tiny.config).values())
    runs = [train_masks(tiny, _task(), PruneConfig(steps=4, batch_pairs=4, heldout_pairs=16, calib_pairs=8,
                                                   k_coef=k, k_ref_nodes=ref), progress=False)[0]
            for k, ref in ((0.05, 2 * n), (0.1, None), (0.05, None))]
    assert all(torch.equal(runs[0][loc], runs[1][loc]) for loc in runs[0])
    # and the penalty matters: half of it leaves other masks
    assert not all(torch.equal(runs[0][loc], runs[2][loc]) for loc in runs[0])


def test_means_follow_the_checkpoints_corpus_mixture(tiny_cfg, corpus_dir, tmp_path, monkeypatch):
    from cspkit import ablation, data
    other = make_corpus(tmp_path / "other")
    seen = []

    class Spy(data.TokenData):
        def __init__(self, info, split, weights=None):
            seen.append(weights)
            super().__init__(info, split, weights)

    monkeypatch.setattr(ablation, "TokenData", Spy)   # ablation reads shards through its own import
    model = GPT(tiny_cfg)
    model.checkpoint = {"train": {"corpus": [str(corpus_dir), str(other)], "corpus_weights": [1.0, 3.0],
                                  "val_percent": 0}}
    ablation.compute_means(model, n_tokens=64, batch_size=2)
    ablation.compute_means(model, n_tokens=64, corpus=[str(corpus_dir)], batch_size=2)  # another corpus: by size
    assert seen == [[1.0, 3.0], None]


def test_masks_that_collapse_are_reported_in_the_circuit_and_its_file(tmp_path):
    """A penalty so large, and steps so long, that the first step closes every gate leaves no
    step whose masks meet the target, so settle has nothing to go back to: the masks' own node
    set is at chance, and the circuit says so (the bisection still returns one); with no penalty
    every gate stays open and nothing collapsed."""
    model = cspkit.load("small-hour")
    fast = dict(steps=6, batch_pairs=8, heldout_pairs=16, calib_pairs=16)   # Platt: loss floor -ln(17/18) = 0.06
    fixed = dict(penalty_start=1.0, penalty_rate=0.0)      # a fixed penalty, as before the multiplier
    # Adam's first step moves every tau by lr: from 0.1 to -0.9
    c = prune(model, "single_double_quote", config=PruneConfig(k_coef=10.0, lr=1.0, warmup_frac=0.0, **fixed, **fast),
              progress=False)
    assert c.mask_nodes == 0 and c.mask_loss > 0.15 + 0.05 and c.collapsed is True
    assert c.loss <= 0.15 and "masks collapsed" in repr(c)
    c.save(tmp_path / "c.json")
    again = cspkit.Circuit.load(tmp_path / "c.json", model=model)
    assert (again.mask_nodes, again.mask_loss, again.collapsed) == (c.mask_nodes, c.mask_loss, True)
    # two Adam steps move a tau by at most about 2 * lr = 0.06, less than its start at 0.1: no gate closes
    open_gates = prune(model, "single_double_quote", config=PruneConfig(k_coef=0.0, **{**fast, "steps": 2}),
                       progress=False)
    assert open_gates.mask_nodes == open_gates.n_nodes_total and open_gates.collapsed is False
    assert open_gates.mask_loss == pytest.approx(open_gates.full_loss)


def test_settle_keeps_the_last_step_or_the_fewest_gates_that_meet_the_target():
    from cspkit.pruning import MaskSteps
    loss_by_open = {4: 0.05, 3: 0.10, 2: 0.14, 1: 0.50}
    taus = [[1, 1, 1, 1], [1, 1, 1, -1], [1, 1, -1, -1], [1, -1, -1, -1], [1, -1, -1, -1]]
    def loss_of(snap):       # (held-out loss, calibration), as the real one returns
        return loss_by_open[int((snap["a"] > 0).sum())], (1.0, 0.0)


    steps = MaskSteps(loss_of, target=0.15)
    steps.snaps = [{"a": torch.tensor(t, dtype=torch.float)} for t in taus]
    assert steps.settle() == 2          # the last two steps overshot; step 2 keeps the fewest gates under it
    assert steps.loss(4) == 0.5 and steps.seen[2] == (0.14, (1.0, 0.0))
    final, mean = steps.at(2)           # step 2's taus, and their average over steps 0..2
    assert torch.equal(final["a"], steps.snaps[2]["a"])
    assert torch.allclose(mean["a"], torch.tensor([1, 1, 1 / 3, -1 / 3]))
    steps = MaskSteps(loss_of, target=0.6)
    steps.snaps = [{"a": torch.tensor(t, dtype=torch.float)} for t in taus]
    assert steps.settle() == 4          # the last step meets the target: kept, nothing else evaluated
    assert list(steps.seen) == [4]


def test_a_retry_with_a_fixed_penalty_follows_an_overshoot_and_keeps_the_fewer_masks(monkeypatch):
    """Four steps of a penalty far above any task gradient at lr 0.04 move every tau from 0.1 down
    by 0.04 a step: all gates open for two steps, all shut from the third, so settle goes back.
    Without retry_penalty that is the one mask run; with it the masks train again under that fixed
    penalty, and the circuit keeps the run whose kept masks are fewer and meet the target, and
    records which."""
    from cspkit.pruning import MaskSteps
    model = cspkit.load("small-hour")
    runs, real = [], MaskSteps.nodes.__func__

    def spy(cls, model, task, cfg, *args):
        steps = real(cls, model, task, cfg, *args)
        kept = steps.settle()
        runs.append((cfg.penalty_start, cfg.penalty_rate, kept < steps.last, steps.n_open(kept), steps.loss(kept)))
        return steps

    monkeypatch.setattr(MaskSteps, "nodes", classmethod(spy))
    fast = dict(steps=4, extra_steps=0, batch_pairs=8, heldout_pairs=16, calib_pairs=16, k_coef=10.0, lr=0.04,
                warmup_frac=0.0)
    c = prune(model, "single_double_quote", config=PruneConfig(**fast, retry_penalty=None), progress=False)
    assert len(runs) == 1 and runs[0][2] and c.mask_retry is False, runs   # settle went back, no second run
    runs.clear()
    c = prune(model, "single_double_quote", config=PruneConfig(**fast, retry_penalty=1e-4), progress=False)
    assert len(runs) == 2 and runs[0][2] and runs[1][:2] == (1e-4, 0.0), runs
    first, retry = runs[0][3:], runs[1][3:]
    chosen = retry if retry[1] <= 0.15 and retry[0] < first[0] else first
    assert (c.mask_nodes, c.mask_loss) == chosen and c.config["retry_penalty"] == 1e-4
    assert c.mask_retry == (chosen is retry)
