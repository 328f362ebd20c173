import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

import cspkit
from cspkit import checkpoint as ckpt
from cspkit.model import GPT
from cspkit.sparsity import project_model_
from cspkit.tokenizer import tokenizer_id


def toks(cfg, T=16):
    return torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def saved(tmp_path, tiny_cfg):
    """A random tiny model (sink and bigram on) projected to 10 percent, saved to tmp_path/ck."""
    torch.manual_seed(0)
    model = GPT(replace(tiny_cfg, bigram_table=True, sink=True)).eval()
    with torch.no_grad():
        model.bigram.normal_()
        for blk in model.h:
            blk.attn.sink_logit.normal_()
            blk.ln_1.weight.uniform_(0.5, 1.5)
    project_model_(model, 0.1, 0.3)
    out = ckpt.save(model, tmp_path / "ck", {"step": 7})
    return model, out


def test_round_trip_identical_logits(saved, tiny_cfg):
    model, out = saved
    loaded = cspkit.load(out)
    assert loaded.config == model.config
    assert not loaded.training
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    x = toks(tiny_cfg)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.encoding is cspkit.get_encoding()
    assert loaded.checkpoint["step"] == 7
    assert loaded.checkpoint["tokenizer"] == tokenizer_id()


def test_dense_model_round_trip(tmp_path, tiny_cfg):
    torch.manual_seed(1)
    model = GPT(tiny_cfg).eval()  # biases and sink logits are all zero: stored as empty index lists
    out = ckpt.save(model, tmp_path / "dense")
    loaded = cspkit.load(out)
    x = toks(tiny_cfg)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_sparse_tensors_stored_as_indices(saved):
    model, out = saved
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    sparse = json.loads(meta["sparse"])
    assert meta["format"] == "cspkit-1"
    sd = model.state_dict()
    for name, t in sd.items():
        if 2 * int((t != 0).sum()) < t.numel():
            assert {f"{name}::idx", f"{name}::val"} <= keys and name not in keys, name
            assert sparse[name] == list(t.shape)
        else:
            assert name in keys and f"{name}::idx" not in keys, name
    # the projected matrices are sparse, the norm gains and the bigram table dense
    assert "h.0.mlp.c_fc.weight" in sparse and "wte.weight" in sparse
    assert "bigram" in keys and "h.0.ln_1.weight" in keys
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        idx = f.get_tensor("h.0.mlp.c_fc.weight::idx")
        val = f.get_tensor("h.0.mlp.c_fc.weight::val")
    assert idx.dtype == torch.int32
    w = sd["h.0.mlp.c_fc.weight"].flatten()
    assert torch.equal(val, w[idx.long()])
    assert idx.numel() == int((w != 0).sum())


def test_config_json_contents(saved):
    model, out = saved
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["d_mlp"] == model.config.d_mlp
    assert cfg["tokenizer"] == tokenizer_id()
    assert cfg["step"] == 7
    assert "git_commit" in cfg
    assert not list(out.glob("*.tmp*"))


def edit_config(out, fn):
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def test_shape_mismatch_names_parameter(saved):
    _, out = saved
    edit_config(out, lambda c: c["model"].update(d_mlp=64))
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.c_fc\.weight") as e:
        cspkit.load(out)
    assert "(128, 32)" in str(e.value) and "(64, 32)" in str(e.value)  # file shape vs config shape


def test_missing_parameter_named(saved):
    _, out = saved
    edit_config(out, lambda c: c["model"].update(bigram_table=False))
    with pytest.raises(ValueError, match="unexpected.*bigram"):
        cspkit.load(out)


def test_other_tokenizer_refused(saved):
    _, out = saved
    edit_config(out, lambda c: c.update(tokenizer="tinypython_2k-000000000000"))
    with pytest.raises(ValueError, match="tokenizer") as e:
        cspkit.load(out)
    assert "tinypython_2k-000000000000" in str(e.value)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-ckpt"):
        cspkit.load(tmp_path / "no-such-ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        cspkit.load(tmp_path / "empty")


def test_missing_weights(saved):
    _, out = saved
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        cspkit.load(out)


def test_missing_paper_weights_name_the_fix(saved, tmp_path):
    _, out = saved
    paper = tmp_path / "paper-e1-sparse"
    shutil.copytree(out, paper)
    (paper / "model.safetensors").unlink()
    edit_config(paper, lambda c: c.update(command="cspkit train --profile paper-e1 --out x",
                                          weights_from="`make paper-models` restores them"))
    with pytest.raises(FileNotFoundError, match=r"make paper-models.*cspkit train --profile paper-e1"):
        cspkit.load(paper)


def test_unknown_config_key(saved):
    _, out = saved
    edit_config(out, lambda c: c["model"].update(d_modle=32))
    with pytest.raises(ValueError, match="d_modle"):
        cspkit.load(out)


def test_read_log(tmp_path):
    assert ckpt.read_log(tmp_path) == []
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n\n{"step": 2}\n')
    assert ckpt.read_log(tmp_path) == [{"step": 1}, {"step": 2}]


def test_training_seconds_sums_each_part_of_each_stage():
    """A resume restarts the clock (rows past the checkpoint were dropped); a stage restarts it too."""
    log = [{"step": 10, "seconds": 5.0}, {"step": 20, "seconds": 9.0},      # stage 0, first part
           {"step": 30, "seconds": 4.0},                                    # resumed at step 20
           {"step": 35, "seconds": 2.0, "stage": 1}, {"step": 40, "seconds": 3.0, "stage": 1},
           {"step": 40, "val_loss": 1.0, "stage": 1}]                       # no clock on this row
    assert ckpt.training_seconds(log) == [13.0, 3.0]
    assert ckpt.training_seconds([]) == []
