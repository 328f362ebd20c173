"""The sweep: every (model, task, target, seed) pruned or reported, resumable, parallel, summarized."""
from __future__ import annotations

import json
import math

import pytest

import cspkit
from cspkit import cli
from cspkit import sweeps as sweep_mod
from cspkit.checkpoint import save
from cspkit.validation import reinit_like
from cspkit.viz import plot_frontier

TASKS = "single_double_quote,bracket_counting"
FAST = ["--set", "steps=4", "--set", "batch_pairs=4", "--set", "heldout_pairs=16", "--set", "calib_pairs=8"]


@pytest.fixture(scope="module")
def pair(trained, tmp_path_factory):
    """The tiny trained model as the sparse one, and a re-initialized copy saved as a 'dense' one."""
    dense = tmp_path_factory.mktemp("dense") / "tiny-dense"
    save(reinit_like(cspkit.load(trained.dir), seed=1), dense, extra={"dense": True, "val_loss": 9.5})
    return trained.dir, dense


def _run(capsys, *argv):
    code = cli.main(["sweep", *map(str, argv), *FAST, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def swept(pair, tmp_path_factory):
    """Both models, two tasks, a target everything meets (10) and one nothing meets, two seeds."""
    out = tmp_path_factory.mktemp("sweep") / "res.json"
    cfg = sweep_mod.SweepConfig(models=[str(p) for p in pair], tasks=TASKS.split(","), targets=[10.0, 1e-9],
                                seeds=[0, 1], prune=cspkit.config.PruneConfig(steps=4, batch_pairs=4,
                                                                             heldout_pairs=16, calib_pairs=8))
    sweep_mod.sweep(cfg, out, progress=False)
    return out


def test_every_run_is_pruned_or_reported(swept, pair):
    res = json.loads(swept.read_text())
    assert len(res["runs"]) == 2 * 2 * 2 * 2
    for r in res["runs"]:
        assert r["full_loss"] > 0 and r["git_commit"] == res["git_commit"]
        if r["target"] == 10.0:
            assert r["status"] == "ok" and r["nodes"] >= 0 and r["loss"] <= 10.0 and r["seconds"] >= 0
        else:
            assert r["status"] == "unsolved" and "above the target" in r["reason"]
    assert res["summary"]["complete"]
    sparse, dense = (sweep_mod.model_key(p) for p in pair)
    assert res["models"][dense]["dense"] and not res["models"][sparse]["dense"]

    easy = res["summary"]["targets"]["10.0"]
    assert easy["tasks_all_can_do"] == TASKS.split(",")
    for key, m in easy["models"].items():
        edges = {s: [r["edges"] for r in res["runs"] if r["model"] == key and r["target"] == 10.0 and r["seed"] == s]
                 for s in (0, 1)}
        for s in (0, 1):
            gm = math.exp(sum(math.log(max(e, 1)) for e in edges[s]) / 2)
            assert m["gm_edges"]["per_seed"][str(s)] == pytest.approx(gm)
            assert m["gm_edges_common"]["per_seed"][str(s)] == pytest.approx(gm)
    (ratio,) = easy["ratios"]
    assert (ratio["dense"], ratio["sparse"]) == (dense, sparse) and ratio["tasks"] == TASKS.split(",")
    for s, v in ratio["per_seed"].items():
        assert v == pytest.approx(easy["models"][dense]["gm_edges_common"]["per_seed"][s]
                                  / easy["models"][sparse]["gm_edges_common"]["per_seed"][s])
    assert ratio["min"] <= ratio["gmean"] <= ratio["max"]

    # an impossible target: every task reported with the full model's loss, nothing averaged
    hard = res["summary"]["targets"]["1e-09"]
    assert hard["tasks_all_can_do"] == []
    for m in hard["models"].values():
        assert set(m["cannot_do"]) == set(TASKS.split(",")) and m["can_do"] == []
        assert m["gm_edges"]["gmean"] is None
    assert hard["ratios"][0]["gmean"] is None
    text = sweep_mod.format_summary(res)
    assert "cannot do: full model's loss" in text and "ratio tiny-dense / A" in text
    assert f"pruning time: {sum(r['seconds'] for r in res['runs']) / 3600:.2f} h" in text


def test_a_pairs_ratio_is_over_its_own_tasks_whatever_else_is_in_the_file():
    def run(model, task, seed, edges):
        status = "ok" if edges is not None else "unsolved"
        return {"model": model, "task": task, "target": 0.15, "seed": seed, "status": status,
                "edges": edges, "full_loss": 0.1 if edges is not None else 0.5}
    edges = {"D": {"t1": 100, "t2": 400}, "S": {"t1": 10, "t2": 10}, "W": {"t1": 20, "t2": None}}
    res = {"grid": {"models": list(edges), "tasks": ["t1", "t2"], "seeds": [0], "targets": [0.15]},
           "models": {m: {"dense": m == "D", "val_loss": 3.0} for m in edges},
           "runs": [run(m, t, 0, e) for m, per in edges.items() for t, e in per.items()]}
    summ = sweep_mod.summarize(res)["targets"]["0.15"]
    assert summ["tasks_all_can_do"] == ["t1"]          # the frontier's common tasks: W cannot do t2
    ratios = {r["sparse"]: r for r in summ["ratios"]}
    assert ratios["S"]["tasks"] == ["t1", "t2"] and ratios["S"]["gmean"] == pytest.approx(20.0)  # sqrt(100*400)/10
    assert ratios["W"]["tasks"] == ["t1"] and ratios["W"]["gmean"] == pytest.approx(5.0)


def test_edges_gmean_gives_the_summarys_means_for_any_task_list():
    from conftest import REPO
    res = json.loads((REPO / "results" / "sparse_vs_dense.json").read_text())
    summ = sweep_mod.summarize(res)["targets"]["0.15"]
    for model, per in summ["models"].items():
        mine = sweep_mod.edges_gmean(res, model, summ["tasks_all_can_do"])
        assert mine["gmean"] == pytest.approx(per["gm_edges_common"]["gmean"])
        assert mine["per_seed"] == pytest.approx(per["gm_edges_common"]["per_seed"])
    two = sweep_mod.edges_gmean(res, "data/models/small-sparse", ["single_double_quote", "indent_for"])
    quote = [sweep_mod.find_run(res, "data/models/small-sparse", "single_double_quote", s)["edges"] for s in (0, 1)]
    assert two["per_seed"] == pytest.approx({str(s): math.sqrt(e) for s, e in enumerate(quote)})  # empty counts as 1


def test_a_finished_sweep_recomputes_nothing_and_a_killed_one_only_the_rest(swept, pair, capsys, monkeypatch):
    calls = []
    real = sweep_mod.prune

    def counting(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "prune", counting)
    before = swept.read_bytes()
    argv = ["--models", *pair, "--tasks", TASKS, "--targets", "10", "1e-9", "--seeds", "0", "1", "--out", swept]
    _run(capsys, *argv)
    assert calls == [] and swept.read_bytes() == before

    # a sweep killed before its last run: only that one is pruned, and it comes out the same; the
    # file may predate a config field (written without it: made with its default)
    res = json.loads(before)
    lost = next(r for r in res["runs"] if r["status"] == "ok")
    res["runs"].remove(lost)
    del res["prune_config"]["penalty_max"]
    swept.write_text(json.dumps(res))
    again = _run(capsys, *argv)
    assert calls == [lost["task"]]
    redone = next(r for r in again["runs"] if sweep_mod.run_key(r) == sweep_mod.run_key(lost))
    assert {k: redone[k] for k in ("nodes", "edges", "loss", "full_loss")} == \
           {k: lost[k] for k in ("nodes", "edges", "loss", "full_loss")}


def test_a_failing_task_is_recorded_and_retried(pair, tmp_path, capsys, monkeypatch):
    real = sweep_mod.prune

    def flaky(model, task, *a, **k):
        if task == "bracket_counting":
            raise RuntimeError("out of memory")
        return real(model, task, *a, **k)

    monkeypatch.setattr(sweep_mod, "prune", flaky)
    out = tmp_path / "res.json"
    argv = ["--models", pair[0], "--tasks", TASKS, "--targets", "10", "--out", out]
    res = _run(capsys, *argv)
    status = {r["task"]: r["status"] for r in res["runs"]}
    assert status == {"single_double_quote": "ok", "bracket_counting": "failed"}
    (failed,) = res["summary"]["targets"]["10.0"]["models"][sweep_mod.model_key(pair[0])]["failed"]
    assert failed["reason"] == "RuntimeError: out of memory" and not res["summary"]["complete"]
    monkeypatch.setattr(sweep_mod, "prune", real)
    res = _run(capsys, *argv)
    assert {r["status"] for r in res["runs"]} == {"ok"} and res["summary"]["complete"]


def test_resuming_with_another_config_is_refused(swept, pair, capsys):
    code = cli.main(["sweep", "--models", str(pair[0]), "--tasks", TASKS, "--targets", "10", "--out", str(swept),
                     *FAST, "--set", "k_coef=0.5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "another pruning config" in err and "k_coef" in err and "new --out" in err
    with pytest.raises(ValueError, match="unknown ablation"):
        sweep_mod.sweep(sweep_mod.SweepConfig(models=[str(pair[0])], ablation="median"), swept, progress=False)


def test_parallel_jobs_give_the_serial_results(swept, pair, tmp_path, capsys):
    res = _run(capsys, "--models", pair[0], "--tasks", "single_double_quote", "--targets", "10", "--seeds", "0", "1",
               "--jobs", "2", "--out", tmp_path / "par.json")
    serial = {sweep_mod.run_key(r): r for r in json.loads(swept.read_text())["runs"]}
    assert len(res["runs"]) == 2
    for r in res["runs"]:
        assert r["threads"] == 1
        assert {k: r[k] for k in ("nodes", "edges", "loss")} == {k: serial[sweep_mod.run_key(r)][k]
                                                                 for k in ("nodes", "edges", "loss")}


def test_frontier_plot(swept):
    res = json.loads(swept.read_text())
    fig = plot_frontier(res, target=10.0)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.texts] == ["A", "tiny-dense"]
    with pytest.raises(ValueError, match="pass target="):
        plot_frontier(res)


def test_controls_are_written_into_the_results(pair, tmp_path):
    out = tmp_path / "res.json"
    cfg = sweep_mod.SweepConfig(models=[str(pair[0])], tasks=["single_double_quote", "bracket_counting"],
                                targets=[10.0], prune=cspkit.config.PruneConfig(steps=4, batch_pairs=4,
                                                                               heldout_pairs=16, calib_pairs=8))
    sweep_mod.sweep(cfg, out, progress=False)
    run = json.loads(out.read_text())["runs"][0]
    run["status"], run["reason"] = "failed", "RuntimeError: test"   # as if the quote task had failed
    res = json.loads(out.read_text())
    res["runs"][0] = run
    out.write_text(json.dumps(res))
    res = sweep_mod.run_controls(out, ["single_double_quote", "bracket_counting"], draws=1, n_test=16, progress=False)
    ctl = json.loads(out.read_text())["controls"][sweep_mod.model_key(pair[0])]
    assert ctl == res["controls"][sweep_mod.model_key(pair[0])]
    assert ctl["single_double_quote"]["rows"] == [] and "RuntimeError: test" in ctl["single_double_quote"]["note"]
    names = [r["control"] for r in ctl["bracket_counting"]["rows"]]
    assert any(n.startswith("re-initialized weights") for n in names) and any(n.startswith("random labels")
                                                                              for n in names)
    assert ctl["bracket_counting"]["note"] == ""   # pruned again, the same circuit as the sweep's


def test_merging_split_sweeps_gives_the_whole_sweep(swept, pair, tmp_path, capsys):
    """Each model swept into its own file (on different machines, say), merged: the same runs and
    summary as sweeping both into one file; a file made another way is refused."""
    res = json.loads(swept.read_text())
    parts = []
    for i, p in enumerate(pair):
        out = tmp_path / f"part{i}.json"
        _run(capsys, "--models", p, "--tasks", TASKS, "--targets", 10, 1e-9, "--seeds", 0, 1, "--out", out)
        parts.append(out)
    code = cli.main(["sweep-merge", *map(str, parts), "--out", str(tmp_path / "all.json"),
                     "--plot", str(tmp_path / "frontier.png"), "--json"])
    merged = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    key = lambda r: (r["model"], r["task"], r["target"], r["seed"])  # noqa: E731
    runs = lambda d: sorted((key(r), r.get("edges")) for r in d["runs"])
    assert runs(merged) == runs(res)
    assert merged["summary"] == res["summary"]
    other = json.loads(parts[1].read_text())
    other["prune_config"]["steps"] = 5
    parts[1].write_text(json.dumps(other))
    with pytest.raises(ValueError, match="prune_config"):
        sweep_mod.merge(parts, tmp_path / "bad.json")


def test_smallest_keeps_each_runs_smallest_circuit_with_the_config_that_made_it(swept, pair, tmp_path, capsys):
    """Two sweeps of the same grid with different penalties: each run keeps the circuit with the
    fewest edges and the config it came from, which prunes it again; controls follow the kept run."""
    base = json.loads(swept.read_text())
    low = tmp_path / "low.json"
    _run(capsys, "--models", *pair, "--tasks", TASKS, "--targets", 10, 1e-9, "--seeds", 0, 1, "--out", low,
         "--set", "k_coef=1e-6")
    # the real second sweep may tie the first everywhere on this tiny model: make its first
    # circuit strictly smaller and its last strictly larger, so both ways of choosing are
    # exercised, and the first sweep's second circuit larger, so that a real run of the
    # second sweep is kept
    other = json.loads(low.read_text())
    ok = [r for r in other["runs"] if r["status"] == "ok"]
    first = {sweep_mod.run_key(r): r for r in base["runs"]}
    ok[0]["edges"] = first[sweep_mod.run_key(ok[0])]["edges"] - 1
    ok[-1]["edges"] = first[sweep_mod.run_key(ok[-1])]["edges"] + 1
    first[sweep_mod.run_key(ok[1])]["edges"] = ok[1]["edges"] + 1000
    task = ok[0]["task"]
    fake = {"target": ok[0]["target"], "seed": ok[0]["seed"], "rows": [], "note": "made on the smaller circuit"}
    other["controls"] = {ok[0]["model"]: {task: fake}}
    low.write_text(json.dumps(other))
    base["controls"] = {ok[0]["model"]: {task: {**fake, "note": "made on the other circuit"}},
                        ok[-1]["model"]: {ok[-1]["task"]: {**fake, "target": ok[-1]["target"],
                                                           "seed": ok[-1]["seed"], "note": "kept"}}}
    high = tmp_path / "high.json"
    high.write_text(json.dumps(base))

    code = cli.main(["sweep-merge", str(high), str(low), "--smallest", "--out", str(tmp_path / "best.json"), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res == json.loads((tmp_path / "best.json").read_text())
    lows = {sweep_mod.run_key(r): r for r in other["runs"]}
    assert len(res["runs"]) == len(base["runs"])
    for r in res["runs"]:
        k = sweep_mod.run_key(r)
        assert [t["prune_set"] for t in r["tried"]] == [{}, {"k_coef": 1e-6}]
        if r["status"] != "ok":
            assert r["status"] == first[k]["status"] == "unsolved" and "prune_set" not in r
            continue
        pick = lows[k] if lows[k]["edges"] < first[k]["edges"] else first[k]
        assert r["edges"] == pick["edges"] == min(t["edges"] for t in r["tried"])
        assert r.get("prune_set", {}) == ({"k_coef": 1e-6} if pick is lows[k] else {})
    first = next(r for r in res["runs"] if sweep_mod.run_key(r) == sweep_mod.run_key(ok[0]))
    assert first["prune_set"] == {"k_coef": 1e-6}
    assert res["controls"] == {ok[0]["model"]: {task: fake},
                               ok[-1]["model"]: {ok[-1]["task"]: base["controls"][ok[-1]["model"]][ok[-1]["task"]]}}
    assert res["summary"] == sweep_mod.summarize(res)
    text = sweep_mod.format_summary(res)
    assert "sweep-merge --smallest" in text and "k_coef=1e-06 (edges: k_coef=0.003:" in text
    tried = sum(t["seconds"] for r in res["runs"] for t in r["tried"])
    assert tried == pytest.approx(sum(r["seconds"] for r in base["runs"] + other["runs"]))
    assert f"pruning time: {tried / 3600:.2f} h" in text

    # the config a kept run records prunes its circuit again (an untouched run of the second sweep)
    real = next(r for r in res["runs"] if sweep_mod.run_key(r) == sweep_mod.run_key(ok[1]))
    assert real["prune_set"] == {"k_coef": 1e-6} and real["edges"] == ok[1]["edges"]
    cfg = sweep_mod.run_config(res, real)
    assert cfg.k_coef == 1e-6 and cfg.steps == 4
    c = cspkit.prune(cspkit.load(real["model"]), real["task"], real["target"], "mean", real["seed"], cfg)
    assert (c.n_nodes, c.n_edges) == (real["nodes"], real["edges"])

    code = cli.main(["sweep", "--models", str(pair[0]), "--tasks", TASKS, "--targets", "10", *FAST,
                     "--out", str(tmp_path / "best.json")])
    assert code == 2 and "sweep-merge --smallest" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least two"):
        sweep_mod.smallest([high], tmp_path / "x.json")
    other["ablation"] = "zero"
    low.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="one ablation"):
        sweep_mod.smallest([high, low], tmp_path / "x.json")
