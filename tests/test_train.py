import json
import math
import os
import subprocess
import sys
import warnings
from dataclasses import replace

import pytest
import torch
from conftest import REPO, make_corpus, tiny_overrides, tiny_train_config

from cspkit import checkpoint as ckpt
from cspkit.data import TokenData, build_shards
from cspkit.model import GPT
from cspkit.profiles import profile
from cspkit.sparsity import density_report, n_keep
from cspkit.training import check_autocast, check_config_resumable, evaluate_loss, native_bf16, schedule, train


class Killed(Exception):
    """Stands in for the process being killed mid-run."""


def final_state(out):
    return torch.load(out / "resume.pt", weights_only=True)


def test_resume_is_bit_identical(trained, tmp_path, monkeypatch):
    """Kill the run in its 27th step (the last checkpoint is step 20, the log already has step 25), resume:
    the weights equal an uninterrupted run's and the log has no step twice."""
    mcfg, tcfg = trained.mcfg, trained.tcfg
    out = tmp_path / "B"
    real_batch = TokenData.batch

    def dying_batch(self, batch_size, block_size, seed, step, rank=0):
        if seed != -1 and step >= 26:  # seed -1 is the evaluation stream
            raise Killed(step)
        return real_batch(self, batch_size, block_size, seed, step, rank)

    monkeypatch.setattr(TokenData, "batch", dying_batch)
    with pytest.raises(Killed):
        train(mcfg, tcfg, out, progress=False)
    monkeypatch.setattr(TokenData, "batch", real_batch)
    assert final_state(out)["step"] == 20
    assert [r["step"] for r in ckpt.read_log(out)] == [5, 10, 15, 20, 25]

    model = train(mcfg, tcfg, out, progress=False)

    a, b = final_state(trained.dir), final_state(out)
    assert a["step"] == b["step"] == 30
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, a["model"][k]), k
    # the optimizer state matches too
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k
    # the log has every step once, with the same numbers
    log_a, log_b = ckpt.read_log(trained.dir), ckpt.read_log(out)
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a] == [5, 10, 15, 20, 25, 30]
    for ra, rb in zip(log_a, log_b):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}
    # the saved checkpoint is the final model
    loaded = ckpt.load(out)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, a["model"][k]), k
    assert loaded.checkpoint["step"] == 30


def test_sparse_run_ends_at_requested_fractions(trained):
    t = trained.tcfg
    model = ckpt.load(trained.dir)
    rep = density_report(model)
    for name, (p, group) in model.sparse_parameters().items():
        frac = t.l0_frac if group == "matrix" else t.l0_frac_embed
        if p.dim() == 2:
            assert rep[name]["nonzeros"] == n_keep(p.numel(), frac), name
        else:  # biases may hold exact zeros besides the projected-away entries
            assert rep[name]["nonzeros"] <= n_keep(p.numel(), frac), name
    assert rep["total:matrix"]["fraction"] == pytest.approx(t.l0_frac, rel=0.02)
    log = ckpt.read_log(trained.dir)
    assert log[-1]["l0"] == pytest.approx(t.l0_frac)
    # norm gains are not sparsified
    assert bool((model.h[0].ln_1.weight != 0).all())
    cfg = ckpt.read_config(trained.dir)
    assert cfg["dense"] is False and cfg["train"] == json.loads(json.dumps(cfg["train"]))
    assert cfg["corpus"]["train_files"] == 4 and cfg["corpus"]["val_files"] == 1
    assert cfg["corpus"]["sources"] == {}   # a directory has no version to record


def test_dense_run_stays_dense(tmp_path, corpus_dir):
    mcfg, tcfg = tiny_train_config(corpus_dir, "max_steps=8", "dense=true")
    assert tcfg.dense
    model = train(mcfg, tcfg, tmp_path / "dense", progress=False)
    for name, (p, _) in model.sparse_parameters().items():
        if p.dim() == 2:
            assert bool((p != 0).all()), name
    rep = density_report(ckpt.load(tmp_path / "dense"))
    assert rep["total:matrix"]["fraction"] == 1.0
    assert ckpt.read_config(tmp_path / "dense")["dense"] is True
    assert ckpt.read_log(tmp_path / "dense")[-1]["l0"] == 1.0


def test_loss_decreases(trained):
    """Final validation loss is well below the loss of the initial model (about ln 2048)."""
    mcfg, tcfg = trained.mcfg, trained.tcfg
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CSPKIT_CACHE", str(trained.dir.parent / "cache"))
        info = build_shards(tcfg.corpus, tcfg.val_percent)
    val = TokenData(info, "val")
    torch.manual_seed(tcfg.seed)
    initial = evaluate_loss(GPT(mcfg), val, tcfg, mcfg.block_size)
    final = evaluate_loss(ckpt.load(trained.dir).train(), val, tcfg, mcfg.block_size)
    assert initial == pytest.approx(math.log(mcfg.vocab_size), abs=0.3)
    assert final < initial - 0.8
    log = ckpt.read_log(trained.dir)
    assert log[-1]["val_loss"] == pytest.approx(final, rel=1e-5)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert all(r["tokens"] == r["step"] * tcfg.batch_size * mcfg.block_size for r in log)


def test_refuses_resume_with_other_config(trained):
    mcfg, tcfg = trained.mcfg, trained.tcfg
    check_config_resumable(trained.dir, mcfg, tcfg)  # the same config resumes
    check_config_resumable(trained.dir, mcfg, replace(tcfg, device="cpu", threads=2))  # runtime-only fields
    with pytest.raises(ValueError, match=r"train\.lr: checkpoint 0\.02 vs now 0\.05") as e:
        check_config_resumable(trained.dir, mcfg, replace(tcfg, lr=0.05))
    assert "--out" in str(e.value)
    with pytest.raises(ValueError, match=r"model\.d_model"):
        check_config_resumable(trained.dir, replace(mcfg, d_model=64), tcfg)
    with pytest.raises(ValueError, match=r"train\.max_steps"):
        train(mcfg, replace(tcfg, max_steps=40), trained.dir, progress=False)
    assert final_state(trained.dir)["step"] == 30  # nothing was touched


def test_refuses_resume_on_another_corpus(tmp_path):
    """A run resumed after its corpus changed (another numpy installed, say) stops with the
    difference instead of training its second part on other data."""
    corpus = make_corpus(tmp_path / "corpus")
    mcfg, tcfg = tiny_train_config(corpus)
    out = tmp_path / "run"
    train(mcfg, replace(tcfg, stop_at_step=10), out, progress=False)
    recorded = ckpt.read_config(out)["corpus"]
    assert len(recorded["digest"]) == 16
    first = sorted(corpus.iterdir())[0]
    first.write_text(first.read_text() + "\nx = 1\n")
    with pytest.raises(ValueError, match=r"another corpus \(.*digest: checkpoint '[0-9a-f]{16}' vs now") as e:
        train(mcfg, tcfg, out, progress=False)
    assert "constraints.txt" in str(e.value) and "--out" in str(e.value)
    assert final_state(out)["step"] == 10  # nothing was touched


def test_schedule():
    from cspkit.config import TrainConfig
    t = TrainConfig(max_steps=1000, lr=0.01, warmup_frac=0.01, l0_frac=1 / 16, anneal_start=0.01, anneal_end=0.5)
    s0 = schedule(0, t)
    assert s0["frac_matrix"] == 1.0 and s0["frac_embed"] == 1.0
    assert s0["lr"] == pytest.approx(0.01 / 10 * math.sqrt(1 / 16))  # warm-up step 1 of 10, sharkfin
    mid = schedule(250, t)
    assert mid["lr"] == pytest.approx(0.01 * 750 / 990 * math.sqrt((1 / 16) / mid["frac_matrix"]))
    assert schedule(600, t)["lr"] == pytest.approx(0.01 * 400 / 990)  # annealed: factor 1
    assert schedule(999, t)["lr"] == pytest.approx(0.01 * 1 / 990)
    assert schedule(250, replace(t, sharkfin=False))["lr"] == pytest.approx(0.01 * 750 / 990)
    d = schedule(600, replace(t, dense=True))
    assert d["frac_matrix"] == d["frac_embed"] == 1.0


RANK_DUMP = """
import os, sys, torch
import cspkit.training as T
from cspkit import cli
real = T.train
def train(m, t, out, **kw):
    model = real(m, t, out, **kw)
    torch.save(model.state_dict(), os.path.join(sys.argv[1], "rank%s.pt" % os.environ["RANK"]))
    return model
T.train = train
sys.exit(cli.main(sys.argv[2:]))
"""


def test_ddp_two_processes_keep_ranks_identical(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    out, dumps = tmp_path / "ddp", tmp_path / "ranks"
    dumps.mkdir()
    script = tmp_path / "run.py"
    script.write_text(RANK_DUMP)
    env = {**os.environ, "CSPKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(dumps), "train", "--profile", "tiny", "--out", str(out), "--max-steps", "6", "--json",
           *tiny_overrides(corpus)]
    # about 10 s on an idle 2-core machine; the timeout only guards against a hang on a busy one
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # one JSON summary, from rank 0 only
    assert json.loads(lines[0])["step"] == 6
    r0 = torch.load(dumps / "rank0.pt", weights_only=True)
    r1 = torch.load(dumps / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    loaded = ckpt.load(out)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, r0[k]), k
    log = ckpt.read_log(out)
    assert [row["step"] for row in log] == [6]
    assert log[-1]["tokens"] == 6 * 4 * 32 * 2  # steps x batch_size x block_size x 2 processes
    assert "val_loss" in log[-1]


def test_eval_tasks_are_logged_at_every_eval(tmp_path, corpus_dir):
    from cspkit import tasks
    mcfg, tcfg = tiny_train_config(corpus_dir, "max_steps=20", 'eval_tasks=["single_double_quote"]')
    model = train(mcfg, tcfg, tmp_path / "run", progress=False)
    evals = ckpt.eval_rows(ckpt.read_log(tmp_path / "run"))
    assert [r["step"] for r in evals] == [10, 20]
    want = tasks.evaluate(model, "single_double_quote", split="test")
    assert evals[-1]["task/single_double_quote/loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert evals[-1]["task/single_double_quote/accuracy"] == want["accuracy"]
    assert not any("task/" in k for r in ckpt.read_log(tmp_path / "run") if "val_loss" not in r for k in r)
    mcfg, tcfg = tiny_train_config(corpus_dir, 'eval_tasks=["no_such_task"]')
    with pytest.raises(KeyError, match="no_such_task"):
        train(mcfg, tcfg, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_plot_task_curves_draws_each_scored_task(trained):
    from cspkit.viz import plot_task_curves
    rows = [{"step": 10, "tokens": 40, "task/a/loss": 0.6, "task/b/loss": 0.5},
            {"step": 20, "tokens": 80, "task/a/loss": 0.4, "task/b/loss": 0.3}, {"step": 25, "tokens": 100}]
    fig = plot_task_curves({"run": rows, "other": rows[:1]})
    assert [ax.get_title() for ax in fig.axes] == ["a", "b"]
    assert list(fig.axes[0].lines[0].get_ydata()) == [0.6, 0.4] and len(fig.axes[0].lines[1].get_ydata()) == 1
    with pytest.raises(ValueError, match="eval_tasks"):
        plot_task_curves({"untasked": ckpt.read_log(trained.dir)})


# on a CPU that emulates bfloat16 the trainer warns (test below); the tiny run is quick anyway
@pytest.mark.filterwarnings("ignore:autocast='bf16' where bfloat16 is emulated")
def test_bf16_autocast_run_keeps_fp32_weights_and_exact_sparsity(tmp_path, corpus_dir):
    """autocast=bf16 runs the forward in bfloat16 but keeps weights, Adam and the projection in
    fp32: the run ends with fp32 weights at the requested nonzeros, its loss falls as the fp32
    run's does, and the config records the setting so a resume cannot silently drop it."""
    runs = {}
    for name, extra in (("fp32", ()), ("bf16", ("autocast=bf16",))):
        mcfg, tcfg = tiny_train_config(corpus_dir, "max_steps=20", *extra)
        runs[name] = train(mcfg, tcfg, tmp_path / name, progress=False)
    bf16 = runs["bf16"]
    for name, (p, group) in bf16.sparse_parameters().items():
        assert p.dtype == torch.float32, name
        if p.dim() == 2:
            frac = tcfg.l0_frac if group == "matrix" else tcfg.l0_frac_embed
            assert int((p != 0).sum()) == n_keep(p.numel(), frac), name
    logs = {k: ckpt.read_log(tmp_path / k) for k in runs}
    assert logs["bf16"][-1]["val_loss"] < logs["bf16"][0]["train_loss"] - 0.5
    assert logs["bf16"][-1]["val_loss"] == pytest.approx(logs["fp32"][-1]["val_loss"], abs=0.15)
    assert ckpt.read_config(tmp_path / "bf16")["train"]["autocast"] == "bf16"
    with pytest.raises(ValueError, match="autocast"):
        check_config_resumable(tmp_path / "bf16", mcfg, replace(tcfg, autocast=None))


def test_bf16_without_native_support_warns_with_the_fix(monkeypatch):
    """bf16 autocast on a CPU that emulates bfloat16 runs about 20x slower: the trainer says so
    and names the fix; fp32, or bf16 where the hardware has it, trains silently."""
    cpu = torch.device("cpu")
    mcfg, tcfg = profile("small")
    assert tcfg.autocast == "bf16"
    monkeypatch.setattr("cspkit.training.native_bf16", lambda device: False)
    with pytest.warns(UserWarning, match="autocast=null"):
        check_autocast(tcfg, cpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_autocast(replace(tcfg, autocast=None), cpu)
        monkeypatch.setattr("cspkit.training.native_bf16", lambda device: True)
        check_autocast(tcfg, cpu)
    assert isinstance(native_bf16(cpu), bool)


def test_stop_at_step_then_resume_equals_one_run(trained, tmp_path, monkeypatch):
    """stop_at_step ends an invocation with a checkpoint at that step, off the checkpoint interval,
    on max_steps' schedule; the same command without it resumes to the uninterrupted run's weights."""
    mcfg, tcfg = trained.mcfg, trained.tcfg
    out = tmp_path / "split"
    commits = iter(f"commit{i}" for i in range(1000))  # HEAD moves on at every look, as during a long run
    monkeypatch.setattr(ckpt, "git_commit", lambda: next(commits))
    train(mcfg, replace(tcfg, stop_at_step=13), out, progress=False, command="cspkit train ... stop_at_step=13")
    first = ckpt.read_config(out)
    assert final_state(out)["step"] == 13 and first["step"] == 13
    assert [r["step"] for r in ckpt.read_log(out)] == [5, 10]
    train(mcfg, tcfg, out, progress=False, command="cspkit train ...")
    # the config keeps the command and commit that started the run, and lists the resume
    cfg = ckpt.read_config(out)
    assert (cfg["command"], cfg["git_commit"]) == ("cspkit train ... stop_at_step=13", "commit0")
    (resumed,) = cfg["resumed"]
    assert resumed["step"] == 13 and resumed["command"] == "cspkit train ..." and resumed["git_commit"] != "commit0"
    a, b = final_state(trained.dir), final_state(out)
    assert b["step"] == 30
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_cycles_are_the_chain_of_init_from_runs(trained, tmp_path):
    """cycles=[6, 6]: the run's own schedule into stages/0, then two warm restarts, each a plain run
    begun from the weights before it (seed + k, final sparsity from step 0), the last into OUT.
    The chain's weights equal those of the same runs started by hand; a run that ended is not
    run again; a pause by stop_at_step resumes to the same weights."""
    from cspkit.training import last_run, stages
    mcfg, tcfg = trained.mcfg, replace(trained.tcfg, cycles=[6, 6])
    out = tmp_path / "chain"
    train(mcfg, tcfg, out, progress=False)
    runs = stages(tcfg, out)
    assert [d for _, d in runs] == [out / "stages" / "0", out / "stages" / "1", out]
    cfgs = [ckpt.read_config(d)["train"] for _, d in runs]
    assert [c["seed"] for c in cfgs] == [0, 1, 2] and [c["max_steps"] for c in cfgs] == [30, 6, 6]
    assert [c["init_from"] for c in cfgs] == [None, str(out / "stages" / "0"), str(out / "stages" / "1")]
    assert all(c["cycles"] is None for c in cfgs) and cfgs[1]["anneal_end"] == cfgs[2]["anneal_end"] == 0
    for k, v in final_state(trained.dir)["model"].items():  # stage 0 is the plain run
        assert torch.equal(v, final_state(out / "stages" / "0")["model"][k]), k
    by_hand = tmp_path / "by_hand"
    train(mcfg, replace(trained.tcfg, max_steps=6, seed=1, anneal_start=0.0, anneal_end=0.0,
                        init_from=str(trained.dir)), by_hand, progress=False)
    for k, v in final_state(by_hand)["model"].items():
        assert torch.equal(v, final_state(out / "stages" / "1")["model"][k]), k
    assert last_run(tcfg, out) == out
    # the chain's log reads as one run's, its steps and tokens counted from stage 0
    log = ckpt.read_chain_log(out)
    parts = [ckpt.read_log(d) for _, d in runs]
    assert [r["stage"] for r in log] == [k for k, part in enumerate(parts) for _ in part]
    assert [r["step"] for r in log] == [r["step"] + 30 * (k > 0) + 6 * (k > 1)
                                        for k, part in enumerate(parts) for r in part]
    assert log[-1]["step"] == 42 and log[-1]["tokens"] == sum(part[-1]["tokens"] for part in parts)
    assert ckpt.read_chain_log(trained.dir) == [{**r, "stage": 0} for r in ckpt.read_log(trained.dir)]
    from cspkit.viz import plot_schedule
    lr = plot_schedule(tcfg).axes[0].lines[0].get_ydata()
    assert len(lr) == 42 and lr[29] < lr[30] and lr[35] < lr[30] < lr[36] * 1.001  # each restart starts again
    # the restarts hold the final sparsity: no matrix has more nonzeros than the first run kept
    first, last = density_report(ckpt.load(out / "stages" / "0")), density_report(ckpt.load(out))
    assert all(last[name]["nonzeros"] <= row["nonzeros"] for name, row in first.items())

    before = (out / "stages" / "0" / "model.safetensors").stat().st_mtime_ns
    again = train(mcfg, tcfg, out, progress=False)  # every run ended: nothing is trained again
    assert (out / "stages" / "0" / "model.safetensors").stat().st_mtime_ns == before
    for k, v in again.state_dict().items():
        assert torch.equal(v, final_state(out)["model"][k]), k

    paused = tmp_path / "paused"
    train(mcfg, replace(tcfg, stop_at_step=3), paused, progress=False)
    assert last_run(tcfg, paused) == paused / "stages" / "0" and not (paused / "stages" / "1").exists()
    train(mcfg, tcfg, paused, progress=False)
    for k, v in final_state(out)["model"].items():
        assert torch.equal(v, final_state(paused)["model"][k]), k


def test_cycles_end_at_the_target_loss(trained, tmp_path):
    """A run of the chain that reaches stop_at_val_loss ends it: no later run starts."""
    from cspkit.training import last_run
    tcfg = replace(trained.tcfg, cycles=[6], stop_at_val_loss=100.0)
    out = tmp_path / "target"
    model = train(trained.mcfg, tcfg, out, progress=False)
    assert last_run(tcfg, out) == out / "stages" / "0" and not (out / "config.json").exists()
    assert ckpt.read_config(out / "stages" / "0")["step"] == trained.tcfg.eval_interval
    for k, v in model.state_dict().items():
        assert torch.equal(v, final_state(out / "stages" / "0")["model"][k]), k
    with pytest.raises(ValueError, match="one positive step count"):
        replace(trained.tcfg, cycles=[0])
