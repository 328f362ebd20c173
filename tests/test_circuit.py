"""Circuits: edges from weights (checked by brute force), graph, JSON round trip, evaluation."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

import cspkit
from cspkit.ablation import fingerprint, keep_gates, node_widths
from cspkit.circuit import (
    Circuit,
    compute_edges,
    extra_edges,
    fit_calibration,
    geometric_mean_edges,
    masked_pair_logits,
    node_list,
    score,
    split_pairs,
)
from cspkit.config import PruneConfig
from cspkit.model import GPT, node_name
from cspkit.sparsity import project_model_


@pytest.fixture(scope="module")
def sparse_tiny():
    torch.manual_seed(0)
    from cspkit.config import ModelConfig
    m = GPT(ModelConfig(n_layer=2, d_model=32, n_head=2, d_head=16, d_mlp=64, block_size=32))
    project_model_(m, 1 / 4, 1 / 2)
    return m.eval()


def _random_nodes(model, frac=0.3, seed=0):
    rng = random.Random(seed)
    return {loc: sorted(rng.sample(range(w), max(1, int(frac * w)))) for loc, w in node_widths(model.config).items()}


def _brute_force_edges(model, nodes):
    """Walk every weight entry of every matrix, one by one."""
    cfg = model.config
    inner = cfg.n_head * cfg.d_head
    kept = {node_name(l, i) for l, idx in nodes.items() for i in idx}
    out = set()
    for L, b in enumerate(model.h):
        mats = [(b.attn.c_attn.weight, lambda r, L=L: f"{L}.attn.{'qkv'[r // inner]}[{r % inner}]", f"{L}.attn.in"),
                (b.attn.c_proj.weight, lambda r, L=L: f"{L}.attn.out[{r}]", f"{L}.attn.v"),
                (b.mlp.c_fc.weight, lambda r, L=L: f"{L}.mlp.neuron[{r}]", f"{L}.mlp.in"),
                (b.mlp.c_proj.weight, lambda r, L=L: f"{L}.mlp.out[{r}]", f"{L}.mlp.neuron")]
        for W, dst_of, src_loc in mats:
            W = W.detach()
            for r in range(W.shape[0]):
                for c in range(W.shape[1]):
                    src, dst = f"{src_loc}[{c}]", dst_of(r)
                    if W[r, c] != 0 and src in kept and dst in kept:
                        out.add((src, dst, float(W[r, c])))
    return out


def test_edges_match_a_brute_force_count(sparse_tiny):
    nodes = _random_nodes(sparse_tiny)
    edges = compute_edges(sparse_tiny, nodes)
    assert len(edges) == len(set(edges))
    assert set(edges) == _brute_force_edges(sparse_tiny, nodes)
    assert len(edges) > 0


def test_dense_model_connects_every_kept_pair():
    from cspkit.config import ModelConfig
    m = GPT(ModelConfig(n_layer=1, d_model=16, n_head=1, d_head=16, d_mlp=32, block_size=8))
    nodes = {"0.mlp.in": [0, 1, 2], "0.mlp.neuron": [4, 5], "0.mlp.out": [7]}
    assert len(compute_edges(m, nodes)) == 3 * 2 + 2 * 1


def test_extra_edges_residual_order_and_qk_pairs():
    nodes = {"0.attn.out": [3], "0.mlp.in": [3], "1.attn.in": [3, 4], "0.attn.in": [3],
             "1.attn.q": [5, 17], "1.attn.k": [17]}
    extra = set(extra_edges(nodes))
    assert ("0.attn.out[3]", "0.mlp.in[3]", "residual") in extra
    assert ("0.attn.out[3]", "1.attn.in[3]", "residual") in extra
    assert ("0.attn.out[3]", "0.attn.in[3]", "residual") not in extra     # a read before the write
    assert ("1.attn.q[17]", "1.attn.k[17]", "qk") in extra
    assert not any(s == "1.attn.q[5]" for s, _, _ in extra)


def _circuit(model, nodes, **kw):
    return Circuit("single_double_quote", nodes, compute_edges(model, nodes), 0.15, 0.1, model=model,
                   model_fingerprint=fingerprint(model), **kw)


def test_json_round_trip_is_exact(sparse_tiny, tmp_path):
    c = _circuit(sparse_tiny, _random_nodes(sparse_tiny, 0.2), calibration=(1.25, -0.125), trace=[(5, 0.3)],
                 config={"steps": 3}, seed=7)
    path = c.save(tmp_path / "c.json")
    d = json.loads(path.read_text())
    assert d["n_edges"] == c.n_edges and d["format"] == "cspkit.circuit/1"
    back = Circuit.load(path, model=sparse_tiny)
    assert back == c
    assert back.to_dict() == c.to_dict()
    g1, g2 = c.to_networkx(), back.to_networkx()
    assert sorted(g1.edges(data=True)) == sorted(g2.edges(data=True))
    assert sum(1 for *_, k in g1.edges(data="kind") if k == "weight") == c.n_edges
    assert g1.number_of_nodes() == c.n_nodes


def test_load_refuses_another_model(sparse_tiny, tmp_path):
    c = _circuit(sparse_tiny, {"0.mlp.neuron": [1, 2]})
    path = c.save(tmp_path / "c.json")
    other = GPT(sparse_tiny.config)
    with pytest.raises(ValueError, match="not in the model given"):
        Circuit.load(path, model=other)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a cspkit circuit file"):
        Circuit.load(bad, model=sparse_tiny)
    with pytest.raises(FileNotFoundError, match="cspkit prune"):
        Circuit.load(tmp_path / "missing.json")


def test_evaluate_full_circuit_equals_the_model(trained):
    model = cspkit.load(trained.dir)
    all_nodes = {loc: list(range(w)) for loc, w in node_widths(model.config).items()}
    c = _circuit(model, all_nodes)
    got = c.evaluate("test", n=8)
    ref = cspkit.tasks.evaluate(model, "single_double_quote", "test", n=8)
    assert got["raw_loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)    # identity calibration
    # ablating everything (invert) leaves only the embedding path and the mean writes
    assert c.evaluate("test", n=8, invert=True)["loss"] != pytest.approx(got["loss"])


def test_ablating_the_circuit_fits_its_own_calibration(trained):
    model = cspkit.load(trained.dir)
    c = _circuit(model, {"0.mlp.neuron": [1, 2], "1.attn.v": [0]}, calibration=(-3.0, 1.0))
    cfg = PruneConfig()
    calib = split_pairs(c.get_task(), cfg)[0][:cfg.calib_pairs]
    gates = keep_gates(model.config, c.nodes, model.device, invert=True)
    own = fit_calibration(*masked_pair_logits(model, calib, gates, "mean"), cfg.calib_steps)
    assert c.calibration_for(gates) == own and own != c.calibration
    test = masked_pair_logits(model, c.get_task().pairs("test", n=8), gates, "mean")
    assert c.evaluate("test", n=8, invert=True) == score(*test, own)
    # another node set is scored under the circuit's own calibration (the explorer's what-if)
    rest = {"0.mlp.neuron": [1]}
    gates = keep_gates(model.config, rest, model.device)
    kept = masked_pair_logits(model, c.get_task().pairs("test", n=8), gates, "mean")
    assert c.evaluate("test", n=8, nodes=rest) == score(*kept, c.calibration)


def test_geometric_mean_and_node_list(sparse_tiny):
    a = _circuit(sparse_tiny, {"0.mlp.neuron": [1]})
    a.edges = [("x", "y", 1.0)] * 4
    b = _circuit(sparse_tiny, {"0.mlp.neuron": [1]})
    b.edges = [("x", "y", 1.0)] * 16
    assert geometric_mean_edges([a, b]) == pytest.approx(8.0)
    assert node_list(["1.attn.q[3]", "0.mlp.neuron[9]", "1.attn.q[1]"]) == {"1.attn.q": [1, 3], "0.mlp.neuron": [9]}
    with pytest.raises(ValueError):
        geometric_mean_edges([])
    assert math.isfinite(geometric_mean_edges([_circuit(sparse_tiny, {})]))


def test_every_attribute_of_a_circuit_is_a_declared_field():
    from dataclasses import fields

    from cspkit.paths import results_dir
    c = Circuit.load(results_dir() / "circuits" / "small-sparse" / "single_double_quote.json")
    c.evaluate("test", n=4)
    assert set(vars(c)) == {f.name for f in fields(c)}
