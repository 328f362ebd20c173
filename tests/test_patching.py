"""Taking a circuit apart by hand, on the shipped small-sparse model and its quote circuit."""
from __future__ import annotations

import pytest
import torch

import cspkit
from cspkit import patching, paths, tasks
from cspkit.circuit import Circuit

TASK = "single_double_quote"


@pytest.fixture(scope="module")
def model():
    return cspkit.load("small-sparse")


@pytest.fixture(scope="module")
def circuit(model):
    return Circuit.load(paths.results_dir() / "circuits" / "small-sparse" / f"{TASK}.json", model=model)


def test_direct_logit_attribution_sums_to_the_logit_difference(model):
    shares = patching.direct_logit_attribution(model, TASK, n=8)
    pairs = tasks.get(TASK).pairs("test", n=8)
    b = tasks.encode_pairs(pairs, model.config.block_size, model.encoding)
    with torch.no_grad():
        two = tasks.pair_logits(model(tasks.trim(b["tokens"], b["last"]), last=b["last"]), b)
    diff = (two.gather(1, b["label"][:, None]) - two.gather(1, 1 - b["label"][:, None])).mean()
    assert sum(shares.values()) == pytest.approx(float(diff), abs=1e-3)
    picked = patching.direct_logit_attribution(model, TASK, n=8, nodes=["3.attn.out[350]"])
    assert picked["3.attn.out[350]"] == pytest.approx(shares["3.attn.out[350]"])
    with pytest.raises(ValueError, match="does not write into the residual"):
        patching.direct_logit_attribution(model, TASK, n=8, nodes=["3.attn.q[98]"])


def test_patching_is_exact_where_it_must_be(model):
    m = patching.patching_map(model, TASK)
    rec = dict(zip(m["sites"], m["recovered"].tolist()))
    assert len(m["tokens"]) == len(rec["final"])
    # the final residual at the last token is the answer; nothing after the last MLP reads other positions
    assert rec["final"][-1] == pytest.approx(1.0) and all(v == 0 for v in rec["final"][:-1])
    assert rec["3.mlp"][-1] == pytest.approx(1.0) and all(abs(v) < 1e-6 for v in rec["3.mlp"][:-1])


def test_the_head_rule_states_what_the_quote_head_does(circuit, model):
    enc = model.encoding

    def last_quote(ids):
        return max(i for i, t in enumerate(ids) if any(q in enc.decode([t]) for q in "'\""))

    rule = patching.evaluate_head_rule(circuit, 3, 6, last_quote, n=16)
    control = patching.evaluate_head_rule(circuit, 3, 6, lambda ids: 0, n=16)
    assert rule["loss"] <= circuit.target and control["accuracy"] <= 0.6, (rule, control)
    with pytest.raises(ValueError, match="only in the last layer"):
        patching.evaluate_head_rule(circuit, 1, 6, last_quote, n=4)
    with pytest.raises(ValueError, match="outside the prompt"):
        patching.evaluate_head_rule(circuit, 3, 6, lambda ids: len(ids), n=4)
