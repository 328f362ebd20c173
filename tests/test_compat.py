"""OpenAI circuit_sparsity checkpoints and tokenizer: small checkpoints in the released format,
written here, loaded by cspkit.compat and compared with an independent reference forward."""
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import JSON_FILES, STDLIB
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

import cspkit
from cspkit import compat, tasks
from cspkit.cli import main
from cspkit.model import GPT

ALL_LOCTYPES = "attn_in,attn_out,mlp_in,mlp_out,mlp_neuron,attn_q,attn_k,attn_v"
# What the released beeg_config.json files look like, shrunk; the last keys only matter in training.
BASE = {"block_size": 16, "vocab_size": 64, "n_layer": 2, "n_head": 4, "d_head": 8, "d_model": 32, "d_mlp": 64,
        "dropout": 0.0, "bias": True, "ln_bias": True, "rms_norm": False, "residual_activation_type": "identity",
        "activation_type": "gelu", "afrac": None, "afrac_loctypes": "attn_in,attn_out,mlp_in,mlp_out",
        "debug_nans": False, "tied_unembed": True, "tokenizer_name": "tinypython_2k", "grad_checkpointing": True,
        "enable_bigram_table": False, "learnable_bigram_table": False, "d_pos_emb": None,
        "dropout_cat_pos_emb": False, "sinusoidal_cat_pos_emb": False, "enable_sparse_kernels": False,
        "flash": True, "sink": False, "pfrac": 0.01, "expansion_factor": 1, "expansion_factor_mlp": 1,
        "bigram_table_rank": None, "afrac_approx": False, "rtopk": False, "ignore_dw_grad": False,
        "sparse_matmul_impl": None, "debug_exact_topk": False}


def openai_state(c: dict, seed: int = 0, embed_scale: float = 1.0, zero_wpe: bool = False) -> dict:
    """Random weights under nanoGPT's names, half of each matrix zero like a weight-sparse model,
    at scales that make every part of the forward pass count."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=1.0: torch.randn(*shape, generator=g) * s
    sparse = lambda w: w * (torch.rand(w.shape, generator=g) < 0.5)
    d, V, H = c["d_model"], c["vocab_size"], c["n_head"]
    D = c.get("d_head") or d // H
    M = c.get("d_mlp") or c.get("n_mlp") or 4 * d
    wpe = rnd(c["block_size"], d, s=embed_scale)
    sd = {"transformer.wte.weight": sparse(rnd(V, d, s=embed_scale)),
          "transformer.wpe.weight": torch.zeros_like(wpe) if zero_wpe else wpe}

    def linear(name, n_out, n_in):
        sd[f"{name}.weight"] = sparse(rnd(n_out, n_in, s=2 / math.sqrt(n_in)))
        if c["bias"]:
            sd[f"{name}.bias"] = rnd(n_out, s=0.1)

    def norm(name):
        sd[f"{name}.weight"] = 1 + rnd(d, s=0.2)
        if c["ln_bias"] and not c["rms_norm"]:
            sd[f"{name}.bias"] = rnd(d, s=0.1)

    for l in range(c["n_layer"]):
        p = f"transformer.h.{l}"
        norm(f"{p}.ln_1")
        linear(f"{p}.attn.c_attn", 3 * H * D, d)
        linear(f"{p}.attn.c_proj", d, H * D)
        if c["sink"]:
            sd[f"{p}.attn.attn_imp.sink_logit"] = rnd(H, s=2.0)
        norm(f"{p}.ln_2")
        linear(f"{p}.mlp.c_fc", M, d)
        linear(f"{p}.mlp.c_proj", d, M)
    norm("transformer.ln_f")
    sd["lm_head.weight"] = sd["transformer.wte.weight"] if c["tied_unembed"] else sparse(rnd(V, d))
    sd["final_logits_bias"] = rnd(V)
    if c["enable_bigram_table"]:
        sd["bigram_table"] = rnd(V, V)
    return sd


def write_openai(path: Path, cfg: dict, sd: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "beeg_config.json").write_text(json.dumps(cfg))
    torch.save(sd, path / "final_model.pt")
    return path


def reference_logits(cfg: dict, sd: dict, idx: torch.Tensor) -> torch.Tensor:
    """The openai forward, written from their GPT (circuit_sparsity/inference/gpt.py) with its
    explicit attention, and independent of cspkit: the sink is a prepended zero key/value slot."""
    c = dict(cfg)
    d, H = c["d_model"], c["n_head"]
    D = c.get("d_head") or d // H
    locs = c.get("afrac_loctypes", "attn_in,attn_out,mlp_in,mlp_out").split(",")

    def sparsify(x, loc):
        if c.get("afrac") is None or loc not in locs:
            return x
        _, ind = torch.topk(x.abs(), int(c["afrac"] * x.shape[-1]), dim=-1, sorted=False)
        return torch.zeros_like(x).scatter_(-1, ind, x.gather(-1, ind))

    def norm(x, name):
        if c["rms_norm"]:
            return torch.nn.functional.rms_norm(x, (d,), sd[f"{name}.weight"])  # eps=None, as nn.RMSNorm
        bias = sd[f"{name}.bias"] if c["ln_bias"] else None
        return F.layer_norm(x, (d,), sd[f"{name}.weight"], bias, 1e-5)

    def linear(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"] if c["bias"] else None)

    B, T = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for l in range(c["n_layer"]):
        p = f"transformer.h.{l}"
        a = sparsify(norm(x, f"{p}.ln_1"), "attn_in")
        q, k, v = linear(a, f"{p}.attn.c_attn").split(H * D, dim=2)
        k, q, v = sparsify(k, "attn_k"), sparsify(q, "attn_q"), sparsify(v, "attn_v")
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        att = att.masked_fill(~causal, torch.finfo(att.dtype).min)
        if c["sink"]:
            sink = sd[f"{p}.attn.attn_imp.sink_logit"].view(1, H, 1, 1).expand(B, H, T, 1)
            att = torch.cat([sink, att], dim=-1)
            v = torch.cat([torch.zeros(B, H, 1, D), v], dim=2)
        y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(B, T, H * D)
        x = x + sparsify(linear(y, f"{p}.attn.c_proj"), "attn_out")
        if c["residual_activation_type"] == "relu":
            x = torch.relu(x)
        h = linear(sparsify(norm(x, f"{p}.ln_2"), "mlp_in"), f"{p}.mlp.c_fc")
        h = sparsify(F.gelu(h) if c["activation_type"] == "gelu" else torch.relu(h), "mlp_neuron")
        x = x + sparsify(linear(h, f"{p}.mlp.c_proj"), "mlp_out")
        if c["residual_activation_type"] == "relu":
            x = torch.relu(x)
    logits = F.linear(norm(x, "transformer.ln_f"), sd["lm_head.weight"]) + sd.get("final_logits_bias", 0)
    if c["enable_bigram_table"]:
        logits = logits + sd["bigram_table"][idx]
    return logits


def tokens(cfg: dict, B: int = 3) -> torch.Tensor:
    return torch.randint(0, cfg["vocab_size"], (B, cfg["block_size"]), generator=torch.Generator().manual_seed(1))


# Every option on and off; each case changes BASE. "kw" go to openai_state.
CASES = {
    "layernorm_tied": ({}, {}),
    "layernorm_without_biases_untied": ({"ln_bias": False, "bias": False, "tied_unembed": False}, {}),
    "rmsnorm_small_residual": ({"rms_norm": True, "tied_unembed": False}, {"embed_scale": 1e-3}),
    "sink": ({"sink": True, "rms_norm": True}, {}),
    "bigram_table": ({"enable_bigram_table": True, "learnable_bigram_table": True, "tied_unembed": False}, {}),
    "afrac_every_location": ({"afrac": 0.25, "afrac_loctypes": ALL_LOCTYPES, "sink": True}, {}),
    "afrac_default_locations": ({"afrac": 0.5}, {}),
    "d_head_not_d_model_over_n_head": ({"d_head": 16, "afrac": 0.25, "afrac_loctypes": "attn_q,attn_k,attn_v"}, {}),
    "relu_mlp_relu_residual": ({"activation_type": "relu", "residual_activation_type": "relu"}, {}),
    "no_positional_embedding": ({}, {"zero_wpe": True}),
    "everything": ({"rms_norm": True, "sink": True, "enable_bigram_table": True, "tied_unembed": False,
                    "afrac": 0.25, "afrac_loctypes": ALL_LOCTYPES, "d_head": 12, "activation_type": "relu",
                    "residual_activation_type": "relu"}, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_the_reference(tmp_path, case):
    change, kw = CASES[case]
    cfg = {**BASE, **change}
    if case == "afrac_default_locations":
        del cfg["afrac_loctypes"]  # the reference's default: attn_in, attn_out, mlp_in, mlp_out
    sd = openai_state(cfg, **kw)
    model = compat.load_openai_checkpoint(write_openai(tmp_path / case, cfg, sd))
    idx = tokens(cfg)
    with torch.no_grad():
        got, want = model(idx), reference_logits(cfg, sd, idx)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4, case
    assert want.std() > 1, "the test weights should make logits large enough to show any difference"
    c = model.config
    assert c.sink == cfg["sink"] and c.bigram_table == cfg["enable_bigram_table"]
    assert c.tied_unembed == cfg["tied_unembed"] and (model.lm_head is None) == cfg["tied_unembed"]
    assert c.norm == ("rms" if cfg["rms_norm"] else "layer")
    assert c.pos_emb == ("none" if kw.get("zero_wpe") else "learned")
    assert c.final_logits_bias
    if cfg["afrac"] is not None:
        want_locs = cfg.get("afrac_loctypes", "attn_in,attn_out,mlp_in,mlp_out").split(",")
        assert set(c.afrac_locations) == {compat.AFRAC_LOCATIONS[l] for l in want_locs}


def test_the_comparison_sees_the_sink_and_the_rmsnorm_epsilon(tmp_path):
    """A model that drops the sink, or uses RMSNorm's usual 1e-5, is far off: the test above
    would catch either mistake."""
    cfg = {**BASE, "rms_norm": True, "sink": True, "tied_unembed": False}
    sd = openai_state(cfg, embed_scale=1e-3)
    model = compat.load_openai_checkpoint(write_openai(tmp_path / "m", cfg, sd))
    idx = tokens(cfg)
    want = reference_logits(cfg, sd, idx)
    state = model.state_dict()
    for wrong in (replace(model.config, sink=False), replace(model.config, norm_eps=None)):
        other = GPT(wrong).eval()
        other.load_state_dict({k: v for k, v in state.items() if k in other.state_dict()})
        with torch.no_grad():
            assert (other(idx) - want).abs().max() > 1e-2


def test_n_mlp_causal_mask_buffers_and_sparse_tensors_load(tmp_path):
    """Older files say n_mlp; attention without flash saves its causal mask as ``attn.bias``; sparse
    kernels may save sparse tensors. None of these change the logits."""
    cfg = {**BASE, "n_mlp": 48}
    del cfg["d_mlp"]
    sd = openai_state(cfg)
    want = reference_logits(cfg, sd, tokens(cfg))
    sd["transformer.h.1.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    sd["transformer.h.0.mlp.c_fc.weight"] = sd["transformer.h.0.mlp.c_fc.weight"].to_sparse()
    model = compat.load_openai_checkpoint(write_openai(tmp_path / "m", cfg, sd))
    assert model.config.d_mlp == 48
    with torch.no_grad():
        assert (model(tokens(cfg)) - want).abs().max() <= 1e-4


def test_missing_final_logits_bias_is_zero_and_tied_lm_head_wins(tmp_path):
    cfg = dict(BASE)
    sd = openai_state(cfg)
    del sd["final_logits_bias"]
    # tied, the reference shares one tensor and loads lm_head.weight into it last
    sd["transformer.wte.weight"] = torch.zeros_like(sd["lm_head.weight"])
    model = compat.load_openai_checkpoint(write_openai(tmp_path / "m", cfg, sd))
    assert not model.config.final_logits_bias
    sd["transformer.wte.weight"] = sd["lm_head.weight"]
    with torch.no_grad():
        assert (model(tokens(cfg)) - reference_logits(cfg, sd, tokens(cfg))).abs().max() <= 1e-4


def test_hook_names_map_to_cspkit_locations(tmp_path):
    assert compat.node_name("3.attn.act_in") == "3.attn.in"
    assert compat.node_name("0.mlp.post_act") == "0.mlp.neuron"
    assert compat.node_name("7.attn.resid_delta") == "7.attn.out"
    with pytest.raises(KeyError, match="attn.y"):
        compat.node_name("1.attn.y")
    cfg = {**BASE, "afrac": 0.25, "afrac_loctypes": ALL_LOCTYPES}
    model = compat.load_openai_checkpoint(write_openai(tmp_path / "m", cfg, openai_state(cfg)))
    names = [compat.node_name(f"{l}.{n}") for l in range(2) for n in compat.NODE_NAMES]
    _, cache = model.run_with_cache(tokens(cfg), names)
    assert (cache["1.mlp.neuron"] != 0).sum(-1).max() == 16  # a quarter of d_mlp 64


@pytest.mark.parametrize("change, message", [
    ({"d_pos_emb": 8}, "concatenates a positional embedding"),
    ({"use_tied_aux_matrix": True}, "use_tied_aux_matrix"),
    ({"afrac": 0.25, "afrac_loctypes": "attn_in,resid_post_mlp"}, "resid_post_mlp"),
    ({"afrac": 0.01, "afrac_loctypes": "attn_in"}, "keeps no entries at \\['attn_in'\\]"),
    ({"residual_activation_type": "gelu"}, "residual_activation_type='gelu'"),
    ({"rope": True}, "unknown key\\(s\\) \\['rope'\\]"),
])
def test_configurations_cspkit_cannot_reproduce_are_refused(tmp_path, change, message):
    cfg = {**BASE, **change}
    path = write_openai(tmp_path / "m", cfg, openai_state({**BASE, **change}))
    with pytest.raises(ValueError, match=message):
        compat.load_openai_checkpoint(path)


class NotATensor:
    pass


def test_weights_that_need_code_to_unpickle_are_refused(tmp_path):
    path = write_openai(tmp_path / "m", BASE, {**openai_state(BASE), "extra": NotATensor()})
    with pytest.raises(ValueError, match="test_compat.NotATensor.*weights_only=True"):
        compat.load_openai_checkpoint(path)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias"), "missing \\['transformer.h.1.mlp.c_fc.bias'\\]"),
    (lambda sd: sd.update({"transformer.h.0.attn.attn_imp.sink_logit": torch.zeros(4)}),
     "not used by this config \\['transformer.h.0.attn.attn_imp.sink_logit'\\]"),
    (lambda sd: sd.update({"transformer.ln_f.weight": torch.ones(8)}), "transformer.ln_f.weight: \\(8,\\)"),
])
def test_weights_that_do_not_match_the_config_are_refused(tmp_path, edit, message):
    sd = openai_state(BASE)
    edit(sd)
    with pytest.raises(ValueError, match=message):
        compat.load_openai_checkpoint(write_openai(tmp_path / "m", BASE, sd))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="beeg_config.json"):
        compat.load_openai_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        compat.load_openai_tokenizer(tmp_path)


# --------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def datagym(tmp_path_factory) -> Path:
    return compat.export_datagym(cspkit.get_encoding(), tmp_path_factory.mktemp("tinypython"))


def test_exported_pair_reads_as_tiktoken_reads_it(datagym, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache: read these very files
    theirs = data_gym_to_mergeable_bpe_ranks(str(datagym / "vocab.bpe"), str(datagym / "encoder.json"))
    enc = compat.load_openai_tokenizer(datagym)
    assert compat.mergeable_ranks(enc) == theirs
    assert enc.eot_token == 2047 and enc.n_vocab == 2048
    assert enc.encode("<|endoftext|>", allowed_special="all") == [2047]


def test_tokenizer_round_trip_splits_text_as_the_shipped_bpe(datagym):
    shipped, enc = cspkit.get_encoding(), compat.load_openai_tokenizer(datagym)
    text = "".join((STDLIB / "json" / f).read_text() for f in JSON_FILES) + "\nx = 'é ü 😀'\n"
    ours, theirs = shipped.encode_ordinary(text), enc.encode_ordinary(text)
    assert enc.decode(theirs) == text
    assert [enc.decode_single_token_bytes(t) for t in theirs] == [shipped.decode_single_token_bytes(t) for t in ours]
    # data-gym files fix the ids of single bytes (GPT-2's order); merged tokens keep theirs
    assert all(a == b for a, b in zip(ours, theirs) if a >= 256)
    assert enc.encode_ordinary("!") == [0] and shipped.encode_ordinary("!") == [ord("!")]


def test_inconsistent_tokenizer_files_are_refused(datagym, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "vocab.bpe").write_text((datagym / "vocab.bpe").read_text())
    listed = json.loads((datagym / "encoder.json").read_text())
    first, second = list(listed)[300:302]
    listed[first], listed[second] = listed[second], listed[first]
    (bad / "encoder.json").write_text(json.dumps(listed))
    with pytest.raises(ValueError, match="disagree"):
        compat.load_openai_tokenizer(bad)


# --------------------------------------------------------------------------- conversion and CLI
@pytest.fixture
def full_vocab(tmp_path) -> tuple[Path, dict, dict]:
    """A model with the tokenizer's 2048 ids, so that tasks can run on it."""
    cfg = {**BASE, "vocab_size": 2048, "block_size": 128, "rms_norm": True, "sink": True, "afrac": 0.25,
           "afrac_loctypes": ALL_LOCTYPES}
    sd = openai_state(cfg)
    return write_openai(tmp_path / "csp_tiny", cfg, sd), cfg, sd


def test_convert_writes_a_checkpoint_cspkit_loads(full_vocab, datagym, tmp_path, capsys):
    src, cfg, sd = full_vocab
    dst = tmp_path / "converted"
    assert main(["convert-openai", str(src), str(dst), "--tokenizer", str(datagym), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer.tiktoken"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    model = cspkit.load(dst)
    assert out["tokenizer"] == model.checkpoint["tokenizer"] == model.encoding.name
    assert out["params"] == sum(p.numel() for p in model.parameters())
    assert model.checkpoint["openai"]["beeg_config"] == cfg
    idx = tokens(cfg, B=2)
    with torch.no_grad():
        assert (model(idx) - reference_logits(cfg, sd, idx)).abs().max() <= 1e-4
    assert model.encoding.encode_ordinary("def f(x):\n") == compat.load_openai_tokenizer(datagym).encode_ordinary(
        "def f(x):\n")
    # the human summary
    assert main(["convert-openai", str(src), str(tmp_path / "again"), "--tokenizer", str(datagym)]) == 0
    assert "nonzero" in capsys.readouterr().out


def test_eval_runs_on_a_converted_model_with_its_own_tokenizer(full_vocab, datagym, tmp_path, capsys):
    src, _, _ = full_vocab
    dst = tmp_path / "converted"
    compat.convert(src, dst, tokenizer=datagym)
    assert main(["eval", "--model", str(dst), "--task", "single_double_quote", "--n", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["models"][0]["results"][0]
    assert result["pairs"] == 4 and 0 <= result["accuracy"] <= 1
    # the prompts are tokenized by the model's tokenizer, whose single-byte ids differ from the shipped one's
    model = cspkit.load(dst)
    pairs = tasks.get("single_double_quote").pairs("test", n=4)
    ours = tasks.encode_pairs(pairs, model.config.block_size, model.encoding)
    shipped = tasks.encode_pairs(pairs, model.config.block_size)
    want = model.encoding.encode_ordinary(pairs[0].prompt_a)[-model.config.block_size:]
    assert ours["tokens"][0, : ours["last"][0] + 1].tolist() == want
    assert not torch.equal(ours["tokens"], shipped["tokens"])


def test_convert_refuses_an_existing_destination_and_leaves_nothing_on_failure(full_vocab, datagym, tmp_path, capsys):
    src, _, _ = full_vocab
    dst = tmp_path / "converted"
    # no tokenizer in src and none given
    assert main(["convert-openai", str(src), str(dst)]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    dst.mkdir()
    assert main(["convert-openai", str(src), str(dst), "--tokenizer", str(datagym)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_prune_and_validate_a_converted_model_end_to_end(full_vocab, datagym, tmp_path, capsys):
    from cspkit.circuit import Circuit
    src, _, _ = full_vocab
    dst = tmp_path / "converted"
    compat.convert(src, dst, tokenizer=datagym)
    out = tmp_path / "quote.json"
    # a random model does not solve the task: prune to a target above its own loss
    assert main(["prune", "--model", str(dst), "--task", "single_double_quote", "--target", "10",
                 "--ablation", "zero", "--out", str(out), "--set", "steps=3", "--set", "batch_pairs=4",
                 "--set", "heldout_pairs=16", "--set", "calib_pairs=8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    model = cspkit.load(dst)
    circuit = Circuit.load(out, model=model)
    assert circuit.n_nodes == res["nodes"] and circuit.ablation == "zero"
    assert circuit.evaluate("test", n=4)["loss"] >= 0
    assert main(["validate", "--circuit", str(out), "--n", "4", "--draws", "1", "--no-prune-controls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][1]["nodes"] == circuit.n_nodes
