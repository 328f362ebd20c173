"""Atomic writes leave the old file or the new one, and no temporary file."""
import pytest

from cspkit.files import atomic_dir, atomic_path, atomic_write
from cspkit.paths import MODELS_ENV, models_dir


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    f = tmp_path / "x.txt"
    atomic_write(f, "old")
    atomic_write(f, b"new")
    assert f.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    f = tmp_path / "x.txt"
    atomic_write(f, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(f) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert f.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_models_dir_is_explicit_else_the_environment_else_the_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv(MODELS_ENV, raising=False)
    assert models_dir().joinpath("small-sparse").is_dir()          # the checkout's data/models
    assert models_dir(tmp_path) == tmp_path
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    assert models_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models_dir(tmp_path / "missing")
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=f"{MODELS_ENV}=.* is not a directory"):
        models_dir()


def test_atomic_dir_appears_complete_or_not_at_all(tmp_path):
    d = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(d) as tmp:
        (tmp / "a").write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"] and (d / "a").read_text() == "whole"
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_dir(d):
            pass
