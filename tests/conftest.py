"""Shared fixtures: a tiny corpus made from stdlib files, tiny configs, one tiny trained checkpoint."""
from __future__ import annotations

import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cspkit.config import ModelConfig, TrainConfig

# Tests share two CPU cores with other work: one thread keeps them light (and deterministic).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
JSON_FILES = ("__init__.py", "decoder.py", "encoder.py", "scanner.py", "tool.py")
# The split hashes file names: at 15 percent, decoder.py is the one validation file of JSON_FILES.
VAL_PERCENT = 15
VAL_FILES = ("decoder.py",)


def make_corpus(dest: Path) -> Path:
    """A flat directory holding copies of the stdlib ``json`` package's modules."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in JSON_FILES:
        shutil.copy(STDLIB / "json" / name, dest / name)
    return dest


def write_modules(dest: Path, n: int, body: str) -> Path:
    """``n`` files ``mod{i}.py``, each ``# module {i}`` and then ``body``: a corpus with known counts."""
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (dest / f"mod{i}.py").write_text(f"# module {i}\n" + body)
    return dest


def tiny_overrides(corpus: Path, *extra: str) -> list[str]:
    """Overrides that shrink the ``tiny`` profile to a couple of seconds of training."""
    return [f'corpus=["{corpus}"]', f"val_percent={VAL_PERCENT}", "threads=1", "batch_size=4",
            "block_size=32", "d_model=32", "n_head=2", "d_mlp=128", *extra]


def tiny_train_config(corpus: Path, *extra: str) -> tuple[ModelConfig, TrainConfig]:
    from cspkit.profiles import config_for
    return config_for("tiny", overrides=tiny_overrides(
        corpus, "max_steps=30", "ckpt_interval=10", "eval_interval=10", "log_interval=5", *extra))


@pytest.fixture(autouse=True)
def _shard_cache(tmp_path, monkeypatch):
    """Keep token-shard caches out of the home directory."""
    monkeypatch.setenv("CSPKIT_CACHE", str(tmp_path / "cspkit-cache"))


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    return make_corpus(tmp_path / "corpus")


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(n_layer=2, d_model=32, n_head=2, d_head=16, d_mlp=128, block_size=32)


@dataclass
class Trained:
    dir: Path
    corpus: Path
    mcfg: ModelConfig
    tcfg: TrainConfig


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    """The tiny profile, shrunk, trained weight-sparse for 30 steps (log every 5, eval and checkpoint every 10)."""
    from cspkit.training import train
    root = tmp_path_factory.mktemp("trained")
    corpus = make_corpus(root / "corpus")
    mcfg, tcfg = tiny_train_config(corpus)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CSPKIT_CACHE", str(root / "cache"))
        train(mcfg, tcfg, root / "A", progress=False)
    return Trained(root / "A", corpus, mcfg, tcfg)
