"""The exercises: every self-check passes on the notebook's solution and fails on the stub and on
typical wrong answers (a check that cannot fail is a defect); the student version drops exactly
the solutions; every exercise's box matches the registry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cspkit import course
from cspkit.cli import main

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

# typical wrong answers, each redefining the exercise's function the way a student might get it wrong
WRONG = {
    "split_files": ["""
def split_files(paths, val_percent):
    n = round(len(paths) * val_percent / 100)
    return paths[n:], paths[:n]
"""],
    "project_topk": ["""
def project_topk(w, k):
    keep = torch.zeros(w.numel(), dtype=torch.bool)
    keep[w.flatten().topk(k).indices] = True
    return w * keep.view_as(w)
""", """
def project_topk(w, k):
    w[w.abs() < w.abs().flatten().topk(k).values[-1]] = 0
    return w
"""],
    "abs_topk": ["""
def abs_topk(x, k):
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[x.abs().flatten().topk(k).indices] = True
    return x * keep.view_as(x)
"""],
    "pair_loss": ["""
def pair_loss(two, label):
    return -torch.log_softmax(two, -1).gather(1, (1 - label)[:, None]).mean()
""", """
def pair_loss(two, label):
    return -torch.log_softmax(two, -1).gather(1, label[:, None]).sum()
"""],
    "user_task": ["""
def make_task():
    def generator(rng, split):
        name = rng.choice(TRAIN_NAMES + TEST_NAMES)
        n = rng.randint(1, 9)
        return f"{name} = [{n}, {n + 1}", f"{name} = ({n}, {n + 1}"
    return Task.from_generator("close_the_bracket", generator, candidates=("]", ")"))
"""],
    "heaviside_gate": ["""
class Heaviside(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tau, temperature):
        ctx.save_for_backward(tau)
        return (tau > 0).to(tau.dtype)

    @staticmethod
    def backward(ctx, grad):
        (tau,) = ctx.saved_tensors
        s = torch.sigmoid(tau)
        return grad * s * (1 - s), None
""", """
def gate(tau, temperature=1.0):
    return torch.sigmoid(tau / temperature)
"""],
    "mean_ablation_hook": ["""
def mean_ablation_hook(keep, mean):
    return lambda x, name: x * keep
""", """
def mean_ablation_hook(keep, mean):
    return lambda x, name: x * (1 - keep) + keep * mean
"""],
    "smallest_k": ["""
def smallest_k(loss_at, n, target):
    return next(k for k in range(n + 1) if loss_at(k) <= target)
""", """
def smallest_k(loss_at, n, target):
    lo, hi = -1, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if loss_at(mid) <= target else (mid, hi)
    return max(lo, 0)
"""],
    "count_edges": ["""
def count_edges(model, nodes):
    total = 0
    for L in range(model.config.n_layer):
        for a, b in [("attn.in", "attn.q"), ("attn.in", "attn.k"), ("attn.in", "attn.v"), ("attn.v", "attn.out"),
                     ("mlp.in", "mlp.neuron"), ("mlp.neuron", "mlp.out")]:
            total += len(nodes.get(f"{L}.{a}", [])) * len(nodes.get(f"{L}.{b}", []))
    return total
"""],
    "head_attention": ["""
def head_attention(q, k):
    return (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1)
""", """
def head_attention(q, k):
    T = q.shape[1]
    scores = (q @ k.transpose(1, 2)).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1)
"""],
    "bracket_depth": ["""
def bracket_depth_nodes():
    return ["3.mlp.neuron[0]"]
""", """
def bracket_depth_nodes():
    return ["3.attn.out[356]", "0.attn.in[180]"]
""", """
def bracket_depth_nodes():
    return []
"""],
    "random_like": ["""
def random_like(nodes, widths, rng):
    fixed = random.Random(0)
    return {loc: sorted(fixed.sample(range(widths[loc]), len(idx))) for loc, idx in nodes.items()}
""", """
def random_like(nodes, widths, rng):
    n = sum(len(v) for v in nodes.values())
    return {"0.attn.in": rng.sample(range(widths["0.attn.in"]), n)}
"""],
    "edge_ratio": ["""
def edge_ratio(dense_edges, sparse_edges):
    return (sum(dense_edges) / len(dense_edges)) / (sum(max(s, 1) for s in sparse_edges) / len(sparse_edges))
""", """
def edge_ratio(dense_edges, sparse_edges):
    gmean = lambda xs: math.prod(xs) ** (1 / len(xs))
    return gmean(dense_edges) / gmean(sparse_edges)
"""],
    "bridge_nmse": ["""
def nmse(pred, target):
    return (pred - target).pow(2).sum() / target.pow(2).sum()
""", """
def nmse(pred, target):
    flat = target.flatten(0, -2)
    return (pred - target).pow(2).sum() / (flat - flat.mean(0)).pow(2).sum()
"""],
    "flip_rate": ["""
def flip_rate(before, after, label):
    return float((after.argmax(-1) != label).float().mean())
"""],
}


def _exercises() -> dict[str, tuple[dict, dict[str, int], Path]]:
    found = {}
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(path.read_text())
        for name, parts in course.exercise_cells(nb).items():
            assert name not in found, f"exercise {name} appears twice"
            found[name] = (nb, parts, path)
    return found


EXERCISES = _exercises()


def _source(nb: dict, i: int) -> str:
    src = nb["cells"][i]["source"]
    return "".join(src) if isinstance(src, list) else src


def _answer(nb: dict, parts: dict[str, int]):
    """What the check cell passes to course.check, evaluated in ``ns`` (the name after the comma)."""
    call = _source(nb, parts["check"]).strip().splitlines()[-1]
    return call[call.index(",") + 1:call.rindex(")")].strip()


def test_every_exercise_of_the_registry_is_in_its_notebook():
    assert set(EXERCISES) == set(course.EXERCISES) and len(EXERCISES) >= 14
    for name, (nb, parts, path) in EXERCISES.items():
        ex = course.EXERCISES[name]
        assert path.name.startswith(ex.notebook), (name, path.name)
        box = _source(nb, parts["stub"] - 1)
        assert ex.title in box and f"*{ex.box()}*" in box, (name, box[:200])
        assert parts["stub"] < parts["solution"] < parts["check"]
        meta = nb["cells"][parts["solution"]]["metadata"]
        assert meta.get("jupyter", {}).get("source_hidden") is True and "solution" in meta.get("tags", [])
        assert f'course.check("{name}"' in _source(nb, parts["check"])


@pytest.mark.parametrize("name", sorted(course.EXERCISES))
def test_check_fails_on_the_stub_and_wrong_answers_and_passes_on_the_solution(name, capsys):
    nb, parts, _ = EXERCISES[name]
    answer = _answer(nb, parts)
    ns: dict = {}
    exec(_source(nb, parts["stub"]), ns)
    with pytest.raises(course.CheckFailed, match="still the stub"):
        course.check(name, eval(answer, ns))
    exec(_source(nb, parts["solution"]), ns)
    course.check(name, eval(answer, ns))
    assert capsys.readouterr().out.startswith(f"✓ {course.EXERCISES[name].title}: ")
    assert WRONG[name], f"{name} has no wrong answer to fail on"
    for wrong in WRONG[name]:
        ns = {}     # fresh: the stub's functions look names up in the namespace they were defined in
        for src in (_source(nb, parts["stub"]), _source(nb, parts["solution"]), wrong):
            exec(src, ns)
        with pytest.raises(course.CheckFailed) as err:
            course.check(name, eval(answer, ns))
        message = str(err.value)
        assert message.startswith(f"{name}: ") and "still the stub" not in message and len(message) > 30, message


def test_student_version_drops_the_solutions_only(tmp_path):
    assert main(["student", "--src", str(NOTEBOOKS), "--out", str(tmp_path / "student")]) == 0
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        teacher = json.loads(path.read_text())
        student = json.loads((tmp_path / "student" / path.name).read_text())
        kept = [c for c in teacher["cells"] if c["metadata"].get("exercise", {}).get("part") != "solution"]
        assert [c["source"] for c in student["cells"]] == [c["source"] for c in kept]
        assert all(not c.get("outputs") for c in student["cells"] if c["cell_type"] == "code")
        stubs = course.exercise_cells(student, required=("stub", "check"))
        assert all("solution" not in parts for parts in stubs.values())
        assert set(stubs) == set(course.exercise_cells(teacher))
    assert (tmp_path / "student" / "README.md").is_file()


def test_student_version_refuses_to_overwrite_the_series(tmp_path):
    assert main(["student", "--src", str(NOTEBOOKS), "--out", str(NOTEBOOKS)]) == 2


def test_malformed_exercise_metadata_is_named():
    nb = {"cells": [{"cell_type": "code", "metadata": {"exercise": {"name": "x", "part": "stub"}}, "source": ""}]}
    with pytest.raises(ValueError, match="exercise 'x' has no solution, check cell"):
        course.exercise_cells(nb)
