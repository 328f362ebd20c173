import json

import pytest
import torch
from conftest import tiny_overrides

from cspkit import checkpoint as ckpt
from cspkit.cli import main
from cspkit.sparsity import density_report


def test_info_json(trained, capsys):
    assert main(["info", str(trained.dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model = ckpt.load(trained.dir)
    assert out["params"] == sum(p.numel() for p in model.parameters())
    assert out["step"] == 30
    assert out["dense"] is False
    assert out["tokenizer"] == model.encoding.name
    assert out["config"]["d_model"] == trained.mcfg.d_model
    assert out["val_loss"] == pytest.approx(ckpt.read_log(trained.dir)[-1]["val_loss"])
    assert out["density"] == json.loads(json.dumps(density_report(model)))
    assert out["density"]["total:matrix"]["fraction"] == pytest.approx(trained.tcfg.l0_frac, rel=0.02)


def test_info_human(trained, capsys):
    assert main(["info", str(trained.dir)]) == 0
    text = capsys.readouterr().out
    assert "weight-sparse" in text and "step 30" in text
    assert "h.0.mlp.c_fc.weight" in text


def test_sample_json_is_greedy_continuation(trained, capsys):
    assert main(["sample", str(trained.dir), "--prompt", "def f(", "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "def f("
    model = ckpt.load(trained.dir)
    enc = model.encoding
    idx = torch.tensor([enc.encode_ordinary("def f(")])
    want = model.generate(idx, 5)[0, idx.shape[1]:].tolist()
    assert len(want) == 5
    assert out["completion"] == enc.decode(want)
    # plain output is prompt + completion
    assert main(["sample", str(trained.dir), "--prompt", "def f(", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == "def f(" + out["completion"] + "\n"


def test_sample_with_temperature_is_seeded(trained, capsys):
    args = ["sample", str(trained.dir), "--prompt", "import", "--max-new-tokens", "8", "--temperature", "1.0",
            "--top-k", "50", "--json"]
    outs = []
    for seed in ("1", "1", "2"):
        assert main([*args, "--seed", seed]) == 0
        outs.append(json.loads(capsys.readouterr().out)["completion"])
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_unknown_override_exits_2(tmp_path, corpus_dir, capsys):
    out = tmp_path / "never"
    code = main(["train", "--profile", "tiny", "--out", str(out), *tiny_overrides(corpus_dir), "bogus_key=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "bogus_key" in err and err.startswith("cspkit train: error:")
    assert not out.exists()


def test_tasks_corpus_without_evidence_exits_2(tmp_path, capsys):
    assert main(["tasks", "--corpus", str(tmp_path)]) == 2
    assert "--corpus only applies with --evidence" in capsys.readouterr().err


def test_info_missing_dir_exits_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing-here")]) == 2
    assert "nothing-here" in capsys.readouterr().err


def test_train_json(tmp_path, corpus_dir, capsys):
    out = tmp_path / "run"
    code = main(["train", "--profile", "tiny", "--out", str(out), "--max-steps", "4", "--json", "--seed", "3",
                 *tiny_overrides(corpus_dir)])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["step"] == 4 and res["out"] == str(out)
    cfg = ckpt.read_config(out)
    assert cfg["seed"] == 3 and cfg["train"]["max_steps"] == 4 and cfg["profile"] == "tiny"
    assert res["val_loss"] == pytest.approx(ckpt.read_log(out)[-1]["val_loss"])


def test_eval_detail_shows_margins_and_next_tokens(trained, capsys):
    from cspkit import tasks
    assert main(["eval", "--model", str(trained.dir), "--task", "bracket_counting", "--n", "8", "--detail"]) == 0
    text = capsys.readouterr().out
    r = tasks.evaluate(ckpt.load(trained.dir), "bracket_counting", n=8)
    assert f"margin A {r['margin_a']:+6.2f}  B {r['margin_b']:+6.2f}" in text
    assert "wants ']]'; top: " in text and "wants ']\\n'; top: " in text
    assert main(["eval", "--model", str(trained.dir), "--task", "bracket_counting", "--n", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["models"][0]["results"][0]
    assert "example" not in res and res["p_right"] == pytest.approx(r["p_right"])
    assert main(["eval", "--model", str(trained.dir), "--task", "bracket_counting,var_if", "--n", "4", "--json"]) == 0
    assert [r["task"] for r in json.loads(capsys.readouterr().out)["models"][0]["results"]] == [
        "bracket_counting", "var_if"]
    assert main(["eval", "--model", str(trained.dir), "--task", "bracket_counting,nope"]) == 2
    assert "known tasks" in capsys.readouterr().err


def test_eval_natural_scores_mined_real_code_beside_the_templates(trained, capsys):
    """--natural adds the examples mined from the held-out files of the model's own corpus; they
    are scored as natural.mine + tasks.evaluate score them, tasks with nothing to mine are named,
    and the solved count stays over the template tasks."""
    from cspkit import natural, tasks
    from cspkit.data import load_corpus
    assert main(["eval", "--model", str(trained.dir), "--task", "single_double_quote", "--n", "8",
                 "--natural", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = {r["task"]: r for r in res["models"][0]["results"]}
    corpus = load_corpus([str(trained.corpus)], trained.tcfg.val_percent)
    mined, unmined = [], []
    for n in natural.TASKS:
        try:
            mined.append(natural.mine(n, corpus=corpus))
        except ValueError:
            unmined.append(n)
    assert list(rows) == ["single_double_quote", *(t.name for t in mined)]
    assert len(res["natural_unmined"]) == len(unmined) and len(mined) + len(unmined) == len(natural.TASKS)
    model = ckpt.load(trained.dir)
    for t in mined:
        assert rows[t.name]["loss"] == pytest.approx(tasks.evaluate(model, t, n=8)["loss"])
    assert res["models"][0]["solved"] == len(tasks.solved([rows["single_double_quote"]]))


def test_info_evals_lists_every_evaluation(trained, capsys):
    assert main(["info", str(trained.dir), "--evals", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["evals"]
    # a run without warm restarts reads as its own log, at stage 0
    assert rows == [dict(r, stage=0) for r in ckpt.eval_rows(ckpt.read_log(trained.dir))]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert main(["info", str(trained.dir), "--json"]) == 0
    last = [r for r in ckpt.read_log(trained.dir) if "seconds" in r][-1]
    assert json.loads(capsys.readouterr().out)["training_seconds"] == [last["seconds"]]
    assert main(["info", str(trained.dir), "--evals"]) == 0
    text = capsys.readouterr().out.split("evaluations; each task: loss / accuracy\n")[1].splitlines()
    assert len(text) == 1 + 3 and text[-1].split()[:1] == ["30"]
    assert float(text[-1].split()[3]) == pytest.approx(rows[-1]["val_loss"], abs=5e-4)


def test_info_against_puts_a_reference_run_under_each_evaluation(trained, tmp_path, capsys):
    rows = ckpt.eval_rows(ckpt.read_chain_log(trained.dir))
    ref = [dict(r, val_loss=r["val_loss"] + 1.25) for r in rows if r["step"] != 20]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ref))
    assert main(["info", str(trained.dir), "--against", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["evals"] == rows and out["against"] == {"dir": str(tmp_path), "evals": ref}
    assert main(["info", str(trained.dir), "--against", str(tmp_path / "log.jsonl")]) == 0
    text = capsys.readouterr().out.split("at that step\n")[1].splitlines()[1:]
    assert [t.split()[0] for t in text] == ["10", "against", "20", "against", "30", "against"]
    assert "no evaluation at this step" in text[3]
    assert float(text[5].split()[2]) == pytest.approx(rows[-1]["val_loss"] + 1.25, abs=5e-4)
    assert main(["info", str(trained.dir), "--against", str(tmp_path / "none")]) == 2
    assert "no evaluations there" in capsys.readouterr().err


def test_info_on_a_chain_names_the_stage_and_the_chains_step(trained, tmp_path, capsys):
    """A run with warm restarts (stages/K) is checkpointed at its last stage's step; info also
    gives the step counted from the start of stage 0, as --evals does."""
    import shutil
    chain = tmp_path / "chain"
    shutil.copytree(trained.dir, ckpt.stage_dir(chain, 0))
    shutil.copytree(trained.dir, chain, dirs_exist_ok=True)
    assert main(["info", str(chain), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["step"], out["chain_step"]) == (30, 60) and len(out["training_seconds"]) == 2
    assert main(["info", str(chain)]) == 0
    assert "step 30 of stage 1 (60 from the start of stage 0)" in capsys.readouterr().out.splitlines()[0]
    assert main(["info", str(trained.dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == out["chain_step"] == 30
