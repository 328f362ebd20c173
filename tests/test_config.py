import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import REPO

from cspkit import checkpoint as ckpt
from cspkit.config import LOCATION_TYPES, RUNTIME_FIELDS, ModelConfig, TrainConfig, apply_overrides, from_dict, to_dict
from cspkit.profiles import PROFILES, config_for, profile, resolve_profile


def test_from_dict_rejects_unknown_keys_with_suggestions():
    with pytest.raises(ValueError) as e:
        from_dict(ModelConfig, {"d_modl": 64, "n_layer": 2, "zzzz": 1})
    msg = str(e.value)
    assert "'d_modl'" in msg and "did you mean 'd_model'" in msg
    assert "'zzzz'" in msg
    assert "n_layer" in msg  # known keys are listed
    with pytest.raises(ValueError, match="did you mean 'max_steps'"):
        from_dict(TrainConfig, {"max_step": 3})
    with pytest.raises(ValueError, match="model config"):
        from_dict(ModelConfig, {"bogus": 1}, "model config")


@pytest.mark.parametrize("cls,kw", [
    (ModelConfig, dict(n_layer=3, pos_emb="none", afrac=None, afrac_locations=("attn.q", "mlp.neuron"), sink=False)),
    (ModelConfig, {}),
    (TrainConfig, dict(corpus=["/a", "/b"], betas=(0.8, 0.9), stop_at_val_loss=2.5, threads=1)),
    (TrainConfig, {}),
])
def test_json_round_trip(cls, kw):
    cfg = cls(**kw)
    d = to_dict(cfg)
    back = from_dict(cls, json.loads(json.dumps(d)))
    assert back == cfg
    assert to_dict(back) == d
    assert all(not isinstance(v, tuple) for v in d.values())


def test_profiles_round_trip_and_are_copies():
    for name in PROFILES:
        m, t = profile(name)
        assert from_dict(ModelConfig, json.loads(json.dumps(to_dict(m)))) == m
        assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(t)))) == t
    m, _ = profile("tiny")
    m.d_model = 999
    assert profile("tiny")[0].d_model != 999
    with pytest.raises(ValueError, match="unknown profile 'huge'; choose one of small, tiny, small-v2"):
        profile("huge")
    # an alias configures what it points to, and is not itself a recipe that could change
    assert resolve_profile("small") == "small-v3" and resolve_profile("tiny") == "tiny"
    assert profile("small") == profile("small-v3") and "small" not in PROFILES


def test_apply_overrides_parses_values():
    m, t = apply_overrides(ModelConfig(), TrainConfig(), [
        "d_model=128", "lr=0.003", "pos_emb=none", "sink=false", "afrac=null", "model.bias=false",
        "train.seed=3", "stop_at_val_loss=2.5", 'afrac_locations=["attn.q"]', "betas=[0.9, 0.99]",
        'corpus=["/x/y"]', "device=cpu", "eval_interval=7",
    ])
    assert m.d_model == 128 and isinstance(m.d_model, int)
    assert t.lr == 0.003
    assert m.pos_emb == "none"
    assert m.sink is False and m.bias is False
    assert m.afrac is None
    assert m.afrac_locations == ("attn.q",)
    assert t.seed == 3 and t.stop_at_val_loss == 2.5 and t.eval_interval == 7
    assert t.betas == (0.9, 0.99)
    assert t.corpus == ["/x/y"]
    assert t.device == "cpu"
    # untouched fields keep their values
    assert m.n_layer == ModelConfig().n_layer and t.max_steps == TrainConfig().max_steps


def test_override_corpus_as_plain_path():
    """``corpus=/some/dir`` on the command line is one path, not a list of its characters."""
    _, t = apply_overrides(ModelConfig(), TrainConfig(), ["corpus=/some/dir"])
    assert t.corpus == ["/some/dir"]
    assert TrainConfig(corpus="/a/b").corpus == ["/a/b"]


@pytest.mark.parametrize("item,words", [
    ("bogus_key=1", ["bogus_key"]),
    ("d_modle=64", ["d_modle", "did you mean 'd_model'"]),
    ("max_step=5", ["max_step", "did you mean 'max_steps'"]),
    ("model.lr=1", ["lr"]),
    ("train.d_model=1", ["d_model"]),
    ("other.lr=1", ["prefix"]),
    ("lr", ["key=value"]),
    ("pos_emb=rotary", ["pos_emb", "rotary"]),
    ("afrac_locations=[\"attn.z\"]", ["attn.z"]),
    ("anneal_start=0.9", ["anneal_start"]),
    ("corpus_weights=[1,2]", ["corpus_weights", "one per corpus entry", "stdlib"]),
    ("corpus_weights=[-1]", ["non-negative"]),
    ("corpus_weights=[0]", ["not all zero"]),
    ("autocast=fp16", ["autocast='fp16'", "'bf16'"]),
])
def test_apply_overrides_rejects(item, words):
    with pytest.raises(ValueError) as e:
        apply_overrides(ModelConfig(), TrainConfig(), [item])
    for w in words:
        assert w in str(e.value)


def test_model_config_validation():
    with pytest.raises(ValueError, match="afrac"):
        ModelConfig(afrac=1.5)
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(activation="swish")
    assert ModelConfig().afrac_locations == LOCATION_TYPES
    with pytest.raises(ValueError, match="l0_frac"):
        TrainConfig(l0_frac=0)


def test_config_for():
    m, t = config_for("tiny", dense=True, seed=5, max_steps=12, overrides=["d_model=48", "lr=0.01"])
    assert (m.d_model, t.dense, t.seed, t.max_steps, t.lr) == (48, True, 5, 12, 0.01)
    base_m, base_t = profile("tiny")
    assert m.n_layer == base_m.n_layer and t.batch_size == base_t.batch_size
    assert config_for("tiny")[1].dense is False


# The configs made before the `small` profile became the wide-idioms recipe: their commands say
# `--profile small` and meant what is now `small-v1`. Closed: configs made since record the
# profile their command resolved to ("profile"); the one made between the two (no "profile",
# `--profile small`) meant small-v2.
_MADE_UNDER_SMALL_V1 = {
    "results/history/corpus_numpy/config.json",
    "results/history/corpus_tests/sparse_config.json", "results/history/corpus_tests/more_config.json",
    "results/history/corpus_tests/wide_config.json", "results/history/corpus_tests/bf16_config.json",
    "results/history/corpus_idioms/sparse_config.json", "results/history/corpus_idioms/fixed_config.json",
    "results/history/corpus_idioms/wide_config.json", "results/history/corpus_idioms/wide_more_config.json",
    "results/history/corpus_idioms/idioms3_config.json", "results/history/corpus_idioms/long_config.json",
}
# what `--profile small` meant in the configs that do not record their profile
_OLD_SMALL = {**dict.fromkeys(_MADE_UNDER_SMALL_V1, "small-v1"),
              "results/history/corpus_idioms/dense128_config.json": "small-v2"}


# results/history/corpus_mix/ was made while the `small` profile itself held its corpus (see
# the git_commit in each config): its commands name no corpus and reproduce only at that commit.
_PROFILE_OF_THEIR_COMMIT = {"results/history/corpus_mix/sparse_config.json",
                            "results/history/corpus_mix/dense_config.json"}


def _train_configs() -> list[str]:
    """Every committed config.json that records the `cspkit train` command that made it."""
    paths = sorted({*REPO.glob("data/**/*config.json"), *REPO.glob("results/**/*config.json")})
    return [str(p.relative_to(REPO)) for p in paths
            if json.loads(p.read_text()).get("command", "").startswith("cspkit train ")
            and str(p.relative_to(REPO)) not in _PROFILE_OF_THEIR_COMMIT]


def _assert_configured_by(cfg: dict, m: ModelConfig, t: TrainConfig) -> None:
    """A saved config.json holds the model config ``m`` and the train config ``t``, leaving out
    the fields that vary by machine, and fields added since it was saved whose value is None."""
    assert from_dict(ModelConfig, cfg["model"]) == m
    saved = {k: v for k, v in cfg["train"].items() if k not in RUNTIME_FIELDS}
    assert saved == {k: v for k, v in to_dict(t).items() if k not in RUNTIME_FIELDS and (k in saved or v is not None)}


def test_recorded_configs_are_found():
    found = set(_train_configs())
    assert _MADE_UNDER_SMALL_V1 <= found
    assert {"data/models/small-sparse/config.json", "data/models/small-dense/config.json",
            "data/models/paper-e1-sparse/config.json", "results/history/corpus_idioms/long_config.json"} <= found


# (dense model, the sparse model it is matched to): the shipped pair
_MATCHED = [("data/models/small-dense", "data/models/small-sparse")]


@pytest.mark.parametrize("dense,sparse", _MATCHED)
def test_dense_model_ends_within_005_nats_of_its_sparse_one(dense, sparse):
    """A shipped dense model is compared with its sparse one at matched validation loss."""
    final = {p: ckpt.eval_rows(ckpt.read_log(REPO / p))[-1]["val_loss"] for p in (dense, sparse)}
    assert abs(final[dense] - final[sparse]) <= 0.05, final


def test_data_stays_under_55_mb():
    """What a clone carries in data/ (tokenizer, shipped models) stays small: 40 MB until the
    bridged pair (17 MB, its dense partner 10.8 MB of it) joined the small pair; weights that
    `make paper-models` restores from history are not tracked and not counted."""
    tracked = subprocess.run(["git", "ls-files", "-z", "data"], cwd=REPO, capture_output=True,
                             check=True, text=True).stdout.split("\0")
    size = sum((REPO / f).stat().st_size for f in tracked if f)
    assert size < 55e6, f"data/ holds {size / 1e6:.1f} MB; keep it under 55 MB"


def test_packages_read_as_corpus_are_pinned_at_the_recorded_versions():
    """A model trained on numpy's or sympy's source is reproduced only with that version: `make`
    installs the versions of constraints.txt, and they are the ones every committed config records."""
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    recorded = {}
    for path in [*REPO.glob("data/**/*config.json"), *REPO.glob("results/**/*config.json")]:
        for spec, version in json.loads(path.read_text()).get("corpus", {}).get("sources", {}).items():
            if spec.startswith("package:"):
                recorded.setdefault((spec.removeprefix("package:").split("/")[0], version), path.name)
    assert recorded, "no committed config reads a package"
    assert {name for name, _ in recorded} <= set(pins)
    assert {(name, pins[name]) for name, _ in recorded} == set(recorded), recorded


def test_small_v2_profile_is_the_wide_idioms_long_recipe():
    """`--profile small-v2`, the first stage of today's `small`, configures the run
    results/history/corpus_idioms/ measured (11 tasks solved)."""
    _assert_configured_by(json.loads((REPO / "results/history/corpus_idioms/long_config.json").read_text()),
                          *config_for("small-v2"))


def test_small_profile_is_the_shipped_sparse_models_chain():
    """`--profile small` is small-v2 and three warm restarts: the shipped sparse model's four runs
    (data/models/small-sparse and its stages/), save for their numerics (the first run in fp32,
    the restarts under bf16) and the directories they began from (each restart from the run
    before, copied elsewhere), with seeds 0, 1, 2, 3."""
    from cspkit.training import stages
    m, t = config_for("small", overrides=["autocast=null"])
    shipped = REPO / "data/models/small-sparse"
    runs = [ckpt.read_config(d) for d in [*(ckpt.stage_dir(shipped, k) for k in range(3)), shipped]]
    chain = stages(t, Path("runs/small-sparse"))
    assert len(chain) == len(runs) == 4
    for k, ((tk, _), cfg) in enumerate(zip(chain, runs)):
        if k:
            tk = replace(tk, autocast="bf16", init_from=cfg["train"]["init_from"])
        _assert_configured_by(cfg, m, tk)
    log = ckpt.read_chain_log(REPO / "data/models/small-sparse")
    assert log[-1]["step"] == sum(cfg["train"]["max_steps"] for cfg in runs) == 7500 + 3 * 2400


def test_small_hour_profile_is_the_shipped_hour_model():
    """`--profile small-hour` configures the run data/models/small-hour was trained by (the hour
    recipe, made as small-v2 with overrides before the profile had its name), and its seed-1 twin."""
    for path in ("data/models/small-hour/config.json", "results/small_hour/seed1_config.json"):
        cfg = json.loads((REPO / path).read_text())
        m, t = config_for("small-hour", seed=cfg["train"]["seed"])
        _assert_configured_by(cfg, m, t)


@pytest.mark.parametrize("path", _train_configs())
def test_model_is_its_recorded_command_under_todays_profile(path):
    """Each shipped small model's config.json, and each config a result names its command for,
    equals what its recorded ``cspkit train`` command configures now: the profile and the
    models or results it made cannot drift apart."""
    import shlex

    from cspkit.cli import build_parser
    cfg = json.loads((REPO / path).read_text())
    args = build_parser().parse_args(shlex.split(cfg["command"])[1:])
    if path in _OLD_SMALL:
        assert args.profile == "small" and "profile" not in cfg
        args.profile = _OLD_SMALL[path]
    # the profile the command resolved to when it ran; configs made before it was recorded
    # resolve their command's name today
    args.profile = cfg.get("profile") or args.profile
    m, t = config_for(args.profile, dense=args.dense, seed=args.seed, max_steps=args.max_steps,
                      overrides=args.overrides)
    if t.cycles:  # one run of a chain records its own stage's config (cspkit.training.stages)
        from cspkit.training import stages
        t = next(tk for tk, _ in stages(t, Path(args.out))
                 if (tk.seed, tk.max_steps) == (cfg["train"]["seed"], cfg["train"]["max_steps"]))
    _assert_configured_by(cfg, m, t)
