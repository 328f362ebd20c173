import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config

from cspkit import bridges
from cspkit import checkpoint as ckpt
from cspkit import tasks as tasks_mod
from cspkit.cli import main
from cspkit.config import BridgeConfig, ModelConfig, from_dict, to_dict
from cspkit.data import TokenData
from cspkit.model import GPT, parse_node
from cspkit.profiles import profile
from cspkit.training import train as train_model


class Killed(Exception):
    pass


def make(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def identity_bridge(model: GPT, enc_afrac=None) -> bridges.Bridge:
    d = model.config.d_model
    b = bridges.Bridge(d, d, model.config.n_layer, enc_afrac)
    with torch.no_grad():
        for lin in [*b.enc, *b.dec]:
            lin.weight.copy_(torch.eye(d))
            lin.bias.zero_()
    return b.eval()


def tokens(cfg: ModelConfig, B: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=g)


@pytest.fixture(scope="module")
def pair(trained, tmp_path_factory):
    """A tiny dense model trained on the same corpus as the test run's shared tiny sparse model."""
    root = tmp_path_factory.mktemp("pair")
    mcfg, tcfg = tiny_train_config(trained.corpus, "max_steps=10", "dense=true")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CSPKIT_CACHE", str(root / "cache"))
        train_model(mcfg, tcfg, root / "dense", progress=False)
    return root / "dense", trained


def bridge_overrides(corpus, *extra):
    return [f'train.corpus=["{corpus}"]', "train.val_percent=15", "train.threads=1", "train.batch_size=2",
            "train.log_interval=1", "train.eval_interval=2", "train.ckpt_interval=2", "train.eval_batches=1", *extra]


def run_bridge(pair, out, *extra, sparse=True, max_steps=4):
    dense_dir, trained = pair
    mcfg, bcfg, tcfg = bridges.configs_for("tiny", dense_dir, trained.dir if sparse else None, max_steps=max_steps,
                                           overrides=bridge_overrides(trained.corpus, *extra))
    return bridges.train(dense_dir, out, bcfg, tcfg, mcfg, progress=False), (mcfg, bcfg, tcfg)


def test_run_sublayers_and_hybrids_with_identity_maps(tiny_cfg):
    model = make(tiny_cfg)
    other = copy.deepcopy(model)
    b = identity_bridge(model)
    x = tokens(tiny_cfg)
    want = model(x)
    assert torch.equal(bridges.run_sublayers(model, x), want)
    assert len(b.sites) == 2 * tiny_cfg.n_layer and b.sites[:3] == ["0.attn", "0.mlp", "1.attn"]
    for i, site in enumerate(b.sites):
        mid = bridges.run_sublayers(model, x, stop=i)
        assert torch.equal(bridges.run_sublayers(model, x, mid, start=i), want)
        for direction in ("d2s", "s2d"):
            got = bridges.hybrid(model, other, b, x, site, direction)
            assert torch.allclose(got, want, atol=1e-5), (site, direction)
    # two different models: switching at the first site runs the other model on the first's embedding
    sparse = make(tiny_cfg, seed=1)
    with torch.no_grad():
        sparse.wte.weight.copy_(model.wte.weight)
        sparse.wpe.weight.copy_(model.wpe.weight)
    assert torch.allclose(bridges.hybrid(model, sparse, b, x, "0.attn", "d2s"), sparse(x), atol=1e-5)
    assert torch.allclose(bridges.hybrid(model, sparse, b, x, "0.attn", "s2d"), model(x), atol=1e-5)
    with pytest.raises(KeyError, match="unknown site"):
        bridges.hybrid(model, other, b, x, "9.attn", "d2s")


def test_loss_terms_are_what_they_claim(tiny_cfg):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(2, 5, 8, generator=g) * 3 + 1
    assert float(bridges.nmse(r, r)) == 0.0
    mean = r.flatten(0, 1).mean(0).expand_as(r)
    assert float(bridges.nmse(mean, r)) == pytest.approx(1.0)
    logits = torch.randn(2, 5, 50, generator=g)
    assert float(bridges.kl(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(bridges.kl(logits, logits.flip(-1))) > 0.1

    model = make(tiny_cfg)
    x = tokens(tiny_cfg)
    with torch.no_grad():
        t = bridges.bridge_loss(model, copy.deepcopy(model), identity_bridge(model), x[:, :-1], x[:, 1:],
                                BridgeConfig(enc_afrac=None), [0, 1, 2, 3])
        lm = model(x[:, :-1], x[:, 1:])[1]
    assert float(t["nmse_enc"]) == float(t["nmse_dec"]) == 0.0
    assert float(t["kl_d2s"]) == pytest.approx(0.0, abs=1e-5) and float(t["kl_s2d"]) == pytest.approx(0.0, abs=1e-5)
    assert float(t["loss"]) == pytest.approx(float(t["lm"]), abs=1e-4)
    assert float(t["lm"]) == pytest.approx(float(lm), rel=1e-6)


def test_encoder_applies_abs_topk(tiny_cfg):
    b = identity_bridge(make(tiny_cfg), enc_afrac=0.25)
    x = torch.randn(2, 3, tiny_cfg.d_model)
    assert torch.equal((b.encode(0, x) != 0).sum(-1), torch.full((2, 3), tiny_cfg.d_model // 4))
    assert torch.equal(b.decode(0, x), x)


def test_step_sites_are_seeded():
    cfg = BridgeConfig(kl_sites=2)
    a = bridges.step_sites(8, cfg, seed=0, step=5)
    assert len(a) == 2 and a == bridges.step_sites(8, cfg, seed=0, step=5)
    assert {tuple(bridges.step_sites(8, cfg, 0, s)) for s in range(20)} != {tuple(a)}
    assert bridges.step_sites(8, BridgeConfig(), 0, 0) == list(range(8))
    assert bridges.step_sites(8, BridgeConfig(kl_coef=0), 0, 0) == []


@torch.no_grad()
def test_init_maps_recovers_linear_maps_across_scales():
    """Residuals 50 times apart in scale (as the first shipped pair's): both maps fit, in raw units."""
    g = torch.Generator().manual_seed(0)
    rd = [torch.randn(4, 16, 5, generator=g) * 5 + 20]
    W = torch.randn(6, 5, generator=g) * 0.02
    rs = [rd[0] @ W.T + 0.5]
    b = bridges.Bridge(5, 6, 1, None)
    bridges.init_maps_(b, rd + rd, rs + rs, ridge=1e-9)
    assert torch.allclose(b.encode(0, rd[0]), rs[0], atol=1e-4)
    assert torch.allclose(b.decode(0, rs[0]), rd[0], atol=1e-3)
    dx = torch.randn(3, 5, generator=g) @ W.T                            # changes the sparse side can take
    assert torch.allclose(b.decode_change(0, dx), dx @ torch.linalg.pinv(W).T, atol=1e-3)
    assert float(b.scale_dense[0]) == pytest.approx(5, rel=0.2) and float(b.scale_sparse[0]) < 0.5
    # in the maps' own units the weights are of one size in both directions
    assert 0.1 < float(b.enc[0].weight.abs().max() / b.dec[0].weight.abs().max()) < 10


def test_config_json_round_trip_and_rejects_unknown_keys():
    cfg = BridgeConfig(enc_afrac=None, kl_sites=3, nmse_coef=0.5, train_sparse=False)
    assert from_dict(BridgeConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(ValueError, match="did you mean 'kl_coef'"):
        from_dict(BridgeConfig, {"kl_coeff": 1.0})
    with pytest.raises(ValueError, match="kl_sites"):
        BridgeConfig(kl_sites=0)


def test_check_pair_names_the_problem(tiny_cfg):
    with pytest.raises(ValueError, match="n_layer 2 vs 3"):
        bridges.check_pair(make(tiny_cfg), make(replace(tiny_cfg, n_layer=3)))
    with pytest.raises(ValueError, match="vocab_size"):
        bridges.check_pair(make(tiny_cfg), make(replace(tiny_cfg, vocab_size=100)))
    bridges.check_pair(make(tiny_cfg), make(replace(tiny_cfg, d_model=48, n_head=3)))  # widths may differ


def test_training_freezes_dense_and_round_trips(pair, tmp_path):
    dense_dir, trained = pair
    out = tmp_path / "b"
    (dense, sparse, bridge), (mcfg, bcfg, tcfg) = run_bridge(pair, out)
    assert tcfg.init_from == str(trained.dir) and tcfg.anneal_end == 0.0
    # the maps learn on the corpus the dense model was trained on, unless told otherwise
    assert tcfg.corpus == ckpt.read_config(dense_dir)["train"]["corpus"] and tcfg.corpus is not None
    _, _, other = bridges.configs_for("small", dense_dir, trained.dir, overrides=['train.corpus=["elsewhere"]'])
    assert other.corpus == ["elsewhere"]
    assert tcfg.l0_frac == trained.tcfg.l0_frac
    # the dense model is frozen: no gradients, the weights of its checkpoint
    original = ckpt.load(dense_dir)
    for (name, p), q in zip(dense.named_parameters(), original.parameters()):
        assert not p.requires_grad and p.grad is None, name
        assert torch.equal(p, q), name
    # the sparse model and the maps did move
    assert any(not torch.equal(p, q) for p, q in zip(sparse.parameters(), ckpt.load(trained.dir).parameters()))
    log = ckpt.read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert {"lm", "nmse_enc", "nmse_dec", "kl_d2s", "kl_s2d"} <= set(log[0])
    assert {"val_loss", "val_nmse_enc", "val_kl_s2d", "l0"} <= set(log[1])
    # load gives back the same three models
    d2, s2, b2 = bridges.load(out)
    for a, b in ((dense, d2), (sparse, s2), (bridge, b2)):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), k
    assert b2.config == bcfg and ckpt.load(out / "sparse").config == mcfg
    cfg = ckpt.read_config(out)
    assert cfg["step"] == 4 and cfg["dense_model"]["path"] == "../../" + "/".join(dense_dir.parts[-2:])


def test_load_refuses_another_dense_model(pair, tmp_path):
    _, trained = pair
    out = tmp_path / "b"
    run_bridge(pair, out, max_steps=1)
    with pytest.raises(ValueError, match="not the dense model"):
        bridges.load(out, dense=trained.dir)


def test_resume_is_bit_identical(pair, tmp_path, monkeypatch):
    (_, _, bridge_a), _ = run_bridge(pair, tmp_path / "A", max_steps=5)
    real = TokenData.batch

    def dying(self, batch_size, block_size, seed, step, rank=0):
        if seed != -1 and step >= 3:
            raise Killed(step)
        return real(self, batch_size, block_size, seed, step, rank)

    monkeypatch.setattr(TokenData, "batch", dying)
    with pytest.raises(Killed):
        run_bridge(pair, tmp_path / "B", max_steps=5)
    monkeypatch.setattr(TokenData, "batch", real)
    assert torch.load(tmp_path / "B" / "resume.pt", weights_only=True)["step"] == 2
    run_bridge(pair, tmp_path / "B", max_steps=5)
    a, b = (torch.load(tmp_path / d / "resume.pt", weights_only=True) for d in "AB")
    assert a["step"] == b["step"] == 5
    for part in ("model", "bridge"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(ckpt.read_log(tmp_path / "A")) == strip(ckpt.read_log(tmp_path / "B"))
    assert [r["step"] for r in ckpt.read_config(tmp_path / "B")["resumed"]] == [2]
    with pytest.raises(ValueError, match="bridge.kl_coef"):
        run_bridge(pair, tmp_path / "B", "bridge.kl_coef=0.5", max_steps=5)


def test_refuses_resume_on_another_corpus(pair, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(pair[1].corpus, corpus)
    run_bridge(pair, tmp_path / "b", f'train.corpus=["{corpus}"]', max_steps=2)
    assert ckpt.read_config(tmp_path / "b")["corpus"]["train_files"] > 0
    first = sorted(corpus.iterdir())[0]
    first.write_text(first.read_text() + "\nx = 1\n")
    with pytest.raises(ValueError, match=r"another corpus \(.*digest: checkpoint"):
        run_bridge(pair, tmp_path / "b", f'train.corpus=["{corpus}"]', max_steps=2)


def test_joint_training_from_scratch(pair, tmp_path):
    dense_dir, _ = pair
    (dense, sparse, _), (mcfg, _, tcfg) = run_bridge(pair, tmp_path / "s", "bridge.kl_sites=1", sparse=False,
                                                     max_steps=3)
    assert tcfg.init_from is None and mcfg == dense.config
    assert ckpt.read_log(tmp_path / "s")[-1]["l0"] < 1.0  # annealing like cspkit train
    with pytest.raises(ValueError, match="model overrides"):
        bridges.configs_for("tiny", dense_dir, pair[1].dir, overrides=["model.d_model=16"])


def test_frozen_sparse_trains_only_the_maps_and_is_named_not_copied(pair, tmp_path):
    """With train_sparse off the sparse model is its checkpoint, weight for weight: the bridge
    names that checkpoint (path relative to the bridge, fingerprint) instead of a second copy."""
    dense_dir, trained = pair
    out = tmp_path / "f"
    (_, sparse, bridge), _ = run_bridge(pair, out, "bridge.train_sparse=false", max_steps=2)
    for p, q in zip(sparse.parameters(), ckpt.load(trained.dir).parameters()):
        assert torch.equal(p, q)
    assert not (out / "sparse").exists()
    ref = ckpt.read_config(out)["sparse_model"]
    assert (out / ref["path"]).resolve() == trained.dir.resolve()
    _, s2, b2 = bridges.load(out)
    assert Path(s2.path).resolve() == trained.dir.resolve() and bridges.model_names(s2) == [trained.dir.name]
    for (k, v), w in zip(bridge.state_dict().items(), b2.state_dict().values()):
        assert torch.equal(v, w), k
    with pytest.raises(ValueError, match="not the sparse model"):
        bridges.load(out, sparse=dense_dir)


def test_intervene_strength_zero_is_exact_and_control_has_same_norm(pair, tmp_path):
    (dense, sparse, bridge), _ = run_bridge(pair, tmp_path / "b", max_steps=1)
    x = tokens(dense.config)
    node = "1.mlp.in[3]"
    assert torch.equal(bridges.intervene(dense, sparse, bridge, node, 2.0, 0.0, tokens=x), dense(x))
    v = bridges.steering_vector(dense, sparse, bridge, node, 2.0, 1.0, x)
    c = bridges.steering_vector(dense, sparse, bridge, node, 2.0, 1.0, x, control_seed=0)
    assert v.shape == c.shape == (*x.shape, dense.config.d_model)
    assert torch.allclose(v.norm(dim=-1), c.norm(dim=-1), rtol=1e-5)
    assert not torch.allclose(v, c)
    # the vector scales with strength and delta; one delta per sequence works
    half = bridges.steering_vector(dense, sparse, bridge, node, 2.0, 0.5, x)
    assert torch.allclose(half, v / 2, rtol=1e-5, atol=1e-7)
    per = bridges.steering_vector(dense, sparse, bridge, node, torch.tensor([2.0, 0.0, -2.0]), 1.0, x)
    assert torch.allclose(per[0], v[0]) and float(per[1].abs().max()) == 0 and torch.allclose(per[2], -v[2], atol=1e-7)
    assert not torch.equal(bridges.intervene(dense, sparse, bridge, node, 2.0, 1.0, tokens=x), dense(x))
    for bad in ("1.mlp.neuron[3]", "7.attn.in[0]", "1.attn.in[999]", "1.attn.in"):
        with pytest.raises(ValueError):
            bridges.intervene(dense, sparse, bridge, bad, 1.0, tokens=x)
    # several channels of one site at once: the sum of their vectors (the map is linear), per node
    # deltas or per sequence and node
    w = bridges.steering_vector(dense, sparse, bridge, "1.mlp.in[5]", -1.0, 1.0, x)
    both = bridges.steering_vector(dense, sparse, bridge, [node, "1.mlp.in[5]"], torch.tensor([2.0, -1.0]), 1.0, x)
    assert torch.allclose(both, v + w, rtol=1e-4, atol=1e-6)
    rows = torch.tensor([[2.0, -1.0], [0.0, 0.0], [-2.0, 1.0]])
    per = bridges.steering_vector(dense, sparse, bridge, [node, "1.mlp.in[5]"], rows, 1.0, x)
    assert torch.allclose(per[0], both[0]) and float(per[1].abs().max()) == 0 and torch.allclose(per[2], -both[2])
    assert torch.equal(bridges.steering_vector(dense, sparse, bridge, [node], 2.0, 1.0, x), v)
    with pytest.raises(ValueError, match="different sites"):
        bridges.steering_vector(dense, sparse, bridge, [node, "1.attn.in[5]"], torch.ones(2), 1.0, x)


def test_diff_positions():
    pad = 0
    tokens = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, pad, pad], [1, 9, 3, 4, 5], [1, 2, 3, pad, pad]])
    batch = {"tokens": tokens, "last": torch.tensor([4, 2, 4, 2])}       # pairs (row 0, row 2) and (1, 3)
    # pair 0 first differs at 1; pair 1 never differs: its last token
    assert bridges.diff_positions(batch).tolist() == [1, 2, 1, 2]


@torch.no_grad()
def test_steering_moves_the_read_channel_by_delta(tiny_cfg):
    """Same model on both sides, identity decoder, no top-k on reads: the steered dense model's read
    channel moves by about delta (first order: the residual's RMS moves a little too)."""
    cfg = replace(tiny_cfg, afrac=None)
    model = make(cfg)
    b = identity_bridge(model)
    x = tokens(cfg)
    loc, c, delta = "1.attn.in", 5, 0.05
    _, before = model.run_with_cache(x, [loc])
    i = bridges.read_channel(model, f"{loc}[{c}]")[0]
    v = bridges.steering_vector(model, model, b, f"{loc}[{c}]", delta, 1.0, x)
    resid = bridges.run_sublayers(model, x, stop=i) + v
    after = model.h[1].ln_1(resid)
    moved = after[..., c] - before[loc][..., c]
    assert float((moved / delta - 1).abs().max()) < 0.15 and float(moved.mean() / delta) == pytest.approx(1, abs=0.03)
    others = torch.cat([after[..., :c] - before[loc][..., :c], after[..., c + 1:] - before[loc][..., c + 1:]], -1)
    assert float(others.abs().max()) < 0.2 * delta  # the others move only through the RMS


def test_pick_channel_and_flip_rates(pair, tmp_path):
    (dense, sparse, bridge), _ = run_bridge(pair, tmp_path / "b", max_steps=1)
    nodes = ["0.attn.in[1]", "1.mlp.in[2]", "1.attn.in[7]"]
    stats = bridges.channel_stats(sparse, "single_double_quote", nodes, n=8)
    best = bridges.pick_channel(sparse, "single_double_quote", nodes, n=8)
    assert best.node in nodes and abs(best.score) == max(abs(s.score) for s in stats)
    assert best.delta == pytest.approx(best.mean_b - best.mean_a)
    auto = bridges.pick_channel(sparse, "single_double_quote", n=8)
    assert abs(auto.score) >= abs(best.score)  # all read channels include the three
    with pytest.raises(ValueError, match="not a read channel"):
        bridges.pick_channel(sparse, "single_double_quote", ["0.mlp.neuron[1]"])
    r = bridges.flip_rates(dense, sparse, bridge, "single_double_quote", best, [0.0, 1.0], n=4)
    assert r["prompts"] == 8 and [row["strength"] for row in r["rows"]] == [0.0, 1.0]
    assert r["rows"][0]["flip_rate"] == 0.0 and r["rows"][0]["logit_shift"] == 0.0
    assert all(0 <= row[k] <= 1 for row in r["rows"] for k in ("flip_rate", "control_flip_rate"))
    # the same numbers as steering prompt by prompt with intervene
    batch = tasks_mod.encode_pairs(tasks_mod.get("single_double_quote").pairs("test", n=4), dense.config.block_size)
    sign = 1.0 - 2.0 * batch["label"].float()
    two = tasks_mod.pair_logits(bridges.intervene(dense, sparse, bridge, best.node, sign * best.delta, 1.0,
                                                  tokens=batch["tokens"]), batch)
    base = tasks_mod.pair_logits(dense(batch["tokens"]), batch)
    gap = lambda t: t.sum(-1) - 2 * t.gather(1, batch["label"][:, None])[:, 0]
    right = base.argmax(-1) == batch["label"]
    assert r["rows"][1]["logit_shift"] == pytest.approx(float((gap(two) - gap(base))[right].mean()), abs=1e-4)
    # P(other): the other candidate's probability under the softmax over the whole vocabulary
    steered = bridges.intervene(dense, sparse, bridge, best.node, sign * best.delta, 1.0, tokens=batch["tokens"])
    probs = tasks_mod.last_logits(steered, batch["last"]).softmax(-1)
    p_other = probs.gather(1, batch["cands"])[torch.arange(8), 1 - batch["label"]]
    assert r["rows"][1]["p_other"] == pytest.approx(float(p_other[right].mean()), abs=1e-4)

    # the same change made in the sparse model itself, through a hook on the read location
    own = bridges.own_flip_rates(sparse, "single_double_quote", best, [0.0, 1.0], n=4)
    assert {k: own["rows"][0][k] for k in ("strength", "flip_rate", "logit_shift")} == \
        {"strength": 0.0, "flip_rate": 0.0, "logit_shift": 0.0}
    loc, c = parse_node(best.node)

    def steer(act, name):
        act = act.clone()
        act[..., c] += (sign * best.delta)[:, None]
        return act
    with torch.no_grad():
        two = tasks_mod.pair_logits(sparse.run_with_hooks(batch["tokens"], {loc: steer}), batch)
        base = tasks_mod.pair_logits(sparse(batch["tokens"]), batch)
    right = base.argmax(-1) == batch["label"]
    shift = float((gap(two) - gap(base))[right].mean()) if right.any() else 0.0
    assert own["sparse_right"] == int(right.sum()) and own["rows"][1]["logit_shift"] == pytest.approx(shift, abs=1e-4)
    lines = bridges.format_flips(r["rows"]).splitlines()
    assert len(lines) == 3 and lines[0].split() == ["strength", "flip", "rate", "random", "control", "logit",
                                                    "shift", "control", "P(other)", "control"]
    row = r["rows"][1]
    assert lines[2].split() == [f"{v:.{p}f}" for v, p in zip(
        [1.0, row["flip_rate"], row["control_flip_rate"], row["logit_shift"], row["control_logit_shift"],
         row["p_other"], row["control_p_other"]], [2, 3, 3, 3, 3, 3, 3])]
    assert "control" not in bridges.format_flips(own["rows"])
    # strengths past the other class's mean are labelled as extrapolation
    far = bridges.format_flips([{**row, "strength": 2.0}, row]).splitlines()
    assert far[1].endswith("(extrapolation)") and not far[2].endswith("(extrapolation)")

    # at the token where the two prompts differ; several channels of one site at once
    at_diff = bridges.channel_stats(sparse, "single_double_quote", nodes, n=8, at="diff")
    assert [s.at for s in at_diff] == ["diff"] * 3 and at_diff != stats
    with pytest.raises(ValueError, match="at must be"):
        bridges.channel_stats(sparse, "single_double_quote", nodes, at="first")
    circuit = quote_circuit(sparse, nodes + ["1.attn.in[9]", "1.attn.v[0]"])
    group = bridges.site_channels(sparse, "single_double_quote", circuit, at_diff[2], n=8)
    assert sorted(g.node for g in group) == ["1.attn.in[7]", "1.attn.in[9]"]
    assert abs(group[0].score) >= abs(group[1].score)
    r = bridges.flip_rates(dense, sparse, bridge, "single_double_quote", group, [1.0], n=4)
    assert r["node"] == [g.node for g in group] and r["delta"] == [g.delta for g in group] and r["at"] == "diff"
    assert r["site"] == "1.attn"
    # what the decoder makes of the change at the opening quote, against the dense model's own difference
    f = bridges.steering_fidelity(dense, sparse, bridge, "single_double_quote", best, n=4)
    pos = bridges.diff_positions(batch)[:4]
    resid = bridges.run_sublayers(dense, batch["tokens"], stop=bridges.read_channel(sparse, best.node)[0])
    true = resid[4:][torch.arange(4), pos] - resid[:4][torch.arange(4), pos]
    v = bridges.steering_vector(dense, sparse, bridge, best.node, best.delta, 1.0, batch["tokens"][:4])
    v = v[torch.arange(4), pos]
    assert f["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(v, true, dim=-1).mean()), abs=1e-5)
    assert f["ratio"] == pytest.approx(float((v.norm(dim=-1) / true.norm(dim=-1)).mean()), rel=1e-5)
    own = bridges.own_flip_rates(sparse, "single_double_quote", group, [1.0], n=4)
    assert own["node"] == r["node"] and len(own["rows"]) == 1
    with pytest.raises(ValueError, match="different sites"):
        bridges.own_flip_rates(sparse, "single_double_quote", [stats[0], *group], [1.0], n=4)


def quote_circuit(model, nodes, task="single_double_quote"):
    """A hand-made circuit file's worth of circuit, found (so it says) in ``model``."""
    from cspkit.ablation import fingerprint
    from cspkit.circuit import Circuit, node_list
    return Circuit(task=task, nodes=node_list(nodes), edges=[], target=0.15, loss=0.1,
                   model_path=getattr(model, "path", None), model_fingerprint=fingerprint(model))


def test_circuit_channel_picks_among_the_circuits_read_nodes(pair, tmp_path, monkeypatch):
    from cspkit import pruning as prune_mod
    run_bridge(pair, tmp_path / "b", max_steps=1)
    _, sparse, _ = bridges.load(tmp_path / "b")
    task, reads = "single_double_quote", ["0.attn.in[1]", "1.mlp.in[2]", "1.attn.in[7]"]
    c = quote_circuit(sparse, reads + ["1.attn.v[3]", "0.mlp.neuron[5]"])
    assert sorted(bridges.read_nodes(c)) == sorted(reads)
    want = bridges.pick_channel(sparse, task, reads, n=8, at="diff")
    ch, got = bridges.circuit_channel(sparse, task, c, n=8)
    assert ch == want and got is c
    path = c.save(tmp_path / "c.json")
    ch, got = bridges.circuit_channel(sparse, task, path, n=8)
    assert ch == want and got.source == str(path) and got.nodes == c.nodes

    # no circuit given: <circuits>/<name>/<task>.json, for the names of the bridge's sparse model
    root = tmp_path / "circuits"
    names = bridges.model_names(sparse)
    assert names == ["sparse", "b", pair[1].dir.name]  # its dir, the bridge's, the checkpoint it started from
    stranger = quote_circuit(sparse, reads)
    stranger.model_fingerprint = "0" * 16                                 # found in another model: passed over
    stranger.save(root / "b" / f"{task}.json")
    calls = []

    def fake_prune(model, task, progress=True, **kw):
        calls.append((model, task))
        return quote_circuit(model, ["1.attn.in[7]", "1.attn.q[0]"])

    monkeypatch.setattr(prune_mod, "prune", fake_prune)
    assert bridges.find_circuit(sparse, task, root) is None
    ch, got = bridges.circuit_channel(sparse, task, circuits=root, n=8, progress=False)
    assert calls == [(sparse, task)] and got.source == "pruned" and ch.node == "1.attn.in[7]"
    c.save(root / pair[1].dir.name / f"{task}.json")
    assert bridges.find_circuit(sparse, task, root) == root / pair[1].dir.name / f"{task}.json"
    ch, got = bridges.circuit_channel(sparse, task, circuits=root, n=8)
    assert ch == want and len(calls) == 1 and got.source == str(root / pair[1].dir.name / f"{task}.json")
    # neither a circuit nor a directory of them: pruned live, whatever files lie about
    ch, got = bridges.circuit_channel(sparse, task, n=8, progress=False)
    assert len(calls) == 2 and got.source == "pruned" and ch.node == "1.attn.in[7]"

    with pytest.raises(ValueError, match="no read channel"):
        bridges.circuit_channel(sparse, task, quote_circuit(sparse, ["1.attn.v[3]"]))
    with pytest.raises(ValueError, match="not 'single_double_quote'"):
        bridges.circuit_channel(sparse, task, quote_circuit(sparse, reads, task="indent_for"))
    with pytest.raises(ValueError, match="not in the model given"):
        bridges.circuit_channel(sparse, task, stranger)


def test_cli_bridge_and_intervene(pair, tmp_path, capsys, monkeypatch):
    dense_dir, trained = pair
    out = tmp_path / "cli"
    code = main(["bridge", "--dense", str(dense_dir), "--sparse", str(trained.dir), "--out", str(out),
                 "--profile", "tiny", "--max-steps", "2", "--json", *bridge_overrides(trained.corpus)])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["step"] == 2 and len(res["quality"]["sites"]) == 2 * trained.mcfg.n_layer
    res_quality = res["quality"]
    row = res["quality"]["sites"][0]
    assert {"fve_enc", "fve_dec", "kl_d2s", "kl_s2d", "kl_skip", "kl_mean"} <= set(row)
    assert row["fve_dec"] <= 1.0 and row["kl_mean"] >= 0

    args = ["intervene", "--bridge", str(out), "--task", "single_double_quote", "--n", "4", "--strength", "0.5", "1"]
    circuit = quote_circuit(ckpt.load(out / "sparse"), ["0.attn.in[1]", "1.attn.in[7]", "1.attn.v[3]"])
    cfile = circuit.save(tmp_path / "quote.json")
    assert main([*args, "--node", "auto", "--circuit", str(cfile), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["strength"] for r in res["rows"]] == [0.5, 1.0] and res["node"] in ("0.attn.in[1]", "1.attn.in[7]")
    assert res["circuit"] == {"source": str(cfile), "nodes": 3, "read_nodes": ["0.attn.in[1]", "1.attn.in[7]"]}
    monkeypatch.chdir(tmp_path)  # a circuit under the working directory is shown as the user would type it
    assert main([*args, "--node", "auto", "--circuit", str(cfile)]) == 0
    assert "of the 2 read channels of the 3-node circuit quote.json," in capsys.readouterr().out
    assert main([*args, "--node", "1.mlp.in[2]", "--site-channels", "--circuit", str(cfile), "--at", "last",
                 "--out", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert "with all 1 of the circuit's read channels at its site" in text and "at the last token" in text
    assert saved["node"] == ["1.mlp.in[2]"] and saved["at"] == "last"
    assert main([*args, "--node", "1.mlp.in[2]"]) == 0
    text = capsys.readouterr().out
    assert "1.mlp.in[2]" in text and "random control" in text
    assert main([*args, "--node", "1.mlp.neuron[2]"]) == 2
    assert "not a read channel" in capsys.readouterr().err

    assert main(["bridge-report", "--bridge", str(out), "--out", str(tmp_path / "q.txt"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["step"] == rep["max_steps"] == 2 and rep["sites"] == res_quality["sites"]
    assert (tmp_path / "q.txt").read_text().startswith(f"bridge {out} at step 2 of 2\nsite ")

    from cspkit.viz import plot_bridge_quality, plot_bridge_training, plot_steering
    assert len(plot_bridge_quality(rep).axes) == 2
    curves = plot_bridge_training(ckpt.read_log(out)).axes[1].lines     # both maps' NMSE, both hybrids' KL
    assert [len(line.get_xdata()) for line in curves] == [len(ckpt.eval_rows(ckpt.read_log(out)))] * 4
    # the CLI's result carries the sparse model's own curve: drawn beside the steered and control ones
    assert {"sparse_right", "rows"} <= set(saved["own"]) and "the sparse model itself" in text
    assert len(plot_steering({"a": res, "b": saved}).axes[0].lines) == 6


def test_bridge_reads_the_dense_models_corpus_mixture(pair, tmp_path):
    dense_dir, trained = pair
    cfg = ckpt.read_config(dense_dir)
    mixed = tmp_path / "mixed-dense"
    mixed.mkdir()
    cfg["train"].update(corpus=["stdlib", "package:numpy"], corpus_weights=[1.0, 3.0])
    (mixed / "config.json").write_text(json.dumps(cfg))
    _, _, tcfg = bridges.configs_for("small", mixed, trained.dir)
    assert (tcfg.corpus, tcfg.corpus_weights) == (["stdlib", "package:numpy"], [1.0, 3.0])
    # another corpus drops the dense model's mixture, unless weights for it are given too
    _, _, other = bridges.configs_for("small", mixed, trained.dir, overrides=['train.corpus=["elsewhere"]'])
    assert (other.corpus, other.corpus_weights) == (["elsewhere"], None)
    _, _, both = bridges.configs_for("small", mixed, trained.dir,
                                     overrides=['corpus=["a", "b"]', "corpus_weights=[1, 1]"])
    assert both.corpus_weights == [1.0, 1.0]


def test_small_bridge_profiles_freeze_or_fine_tune_the_sparse_model(pair):
    dense_dir, trained = pair
    _, frozen, _ = bridges.configs_for("small", dense_dir, trained.dir)
    _, joint, tcfg = bridges.configs_for("small-joint", dense_dir, trained.dir)
    assert frozen.train_sparse is False and joint.train_sparse is True
    assert tcfg.init_from == str(trained.dir) and tcfg.anneal_end == 0.0
    # the maps learn on the corpus the dense model was trained on, unless told otherwise
    assert tcfg.corpus == ckpt.read_config(dense_dir)["train"]["corpus"] and tcfg.corpus is not None
    _, _, other = bridges.configs_for("small", dense_dir, trained.dir, overrides=['train.corpus=["elsewhere"]'])
    assert other.corpus == ["elsewhere"]
    # the bridged pair's profile trains a sparse model from scratch in small-hour's shape and recipe
    b_model, b_bridge, b_train = bridges.configs_for("bridged-small", dense_dir)
    hour_model, hour_train = profile("small-hour")
    assert b_model == hour_model and b_bridge.train_sparse and b_train.init_from is None
    assert (b_train.lr, b_train.l0_frac, b_train.anneal_end) == \
        (hour_train.lr, hour_train.l0_frac, hour_train.anneal_end)
    assert b_train.max_steps < hour_train.max_steps  # a bridged step costs about three plain ones
    assert bridges.configs_for("bridged-small", dense_dir, overrides=["model.n_layer=1"])[0].n_layer == 1
