"""The faithfulness controls: each control does what its row says."""
from __future__ import annotations

import pytest
import torch

import cspkit
from cspkit import tasks
from cspkit.config import PruneConfig
from cspkit.pruning import prune
from cspkit.validation import (
    NONSENSE,
    PRUNE_CONTROLS,
    REINIT,
    Row,
    attribution_scores,
    format_table,
    nonsense_task,
    reinit_like,
    validate,
)

FAST = PruneConfig(steps=4, batch_pairs=4, heldout_pairs=16, calib_pairs=8)


@pytest.fixture(scope="module")
def tiny(trained):
    return cspkit.load(trained.dir)


def _task():
    return tasks.Task("quote_small", "quote, fewer pairs", tasks.get("single_double_quote").generator,
                      candidates=('")\n', "')\n"), n_pairs={"train": 40, "test": 8})


def test_reinit_keeps_the_sparsity_pattern(tiny):
    new = reinit_like(tiny, seed=1)
    for (name, (p, _)), (_, (q, _)) in zip(tiny.sparse_parameters().items(), new.sparse_parameters().items()):
        assert torch.equal(p != 0, q != 0), name
        if (p != 0).sum() > 1:
            assert not torch.equal(p, q), name
    assert new.path is None and tiny.path is not None


def test_nonsense_task_keeps_prompts_and_randomizes_labels():
    base = _task()
    bad = nonsense_task(base, seed=0)
    pairs, orig = bad.pairs("train"), base.pairs("train")
    assert [p.prompt_a for p in pairs] == [p.prompt_a for p in orig]
    swapped = sum(p.cand_a != o.cand_a for p, o in zip(pairs, orig))
    assert 0 < swapped < len(orig)


def test_attribution_scores_cover_every_node(tiny):
    s = attribution_scores(tiny, _task(), "mean", _task().pairs("train")[:4])
    assert all(v.shape[0] > 0 and (v >= 0).all() for v in s.values())
    assert sum(float(v.sum()) for v in s.values()) > 0


def test_validate_table(tiny):
    c = prune(tiny, _task(), target=10.0, config=FAST, progress=False)
    rows = validate(c, n_test=8, draws=2, progress=False)
    names = [r.control for r in rows]
    assert names[:4] == ["full model", "circuit alone (sufficiency)", "circuit ablated (necessity)",
                         "random nodes, same count per location"]
    assert any(n.startswith("stochastic") for n in names)
    pruned_again = [r for r in rows if r.control in PRUNE_CONTROLS]
    assert [r.control for r in pruned_again] == [REINIT, NONSENSE]
    assert all(r.reached_target for r in pruned_again)              # any pruning reaches 10 nats
    assert all(r.reached_target is None for r in rows if r not in pruned_again)
    assert Row(NONSENSE, 32, None, None, note="did not reach the target").reached_target is False
    assert rows[1].loss == pytest.approx(c.evaluate(n=8)["loss"], abs=1e-4)
    # necessity: the circuit ablated, with a calibration of its own, in the table and in evaluate
    assert rows[2].loss == pytest.approx(c.evaluate(n=8, invert=True)["loss"], abs=1e-4)
    assert "necessity" in format_table(rows)
    # without the attribution baseline: the same table less its rows
    fewer = validate(c, n_test=8, draws=2, progress=False, attribution=False)
    assert [r.control for r in fewer] == [n for n in names if not n.startswith("attribution")]
    assert any(n.startswith("attribution") for n in names) and fewer[1].loss == rows[1].loss
