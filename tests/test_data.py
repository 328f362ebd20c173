import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import JSON_FILES, VAL_FILES, VAL_PERCENT, write_modules

import cspkit
from cspkit.config import TrainConfig
from cspkit.data import TokenData, build_shards, is_val, list_files, load_corpus, sources
from cspkit.paths import cache_dir
from cspkit.tokenizer import get_encoding


def test_cache_dir_follows_env(tmp_path):
    assert cache_dir() == tmp_path / "cspkit-cache"


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not python")
    with pytest.raises(ValueError, match="no .py files found"):
        load_corpus([str(tmp_path / "empty")])


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_corpus([str(missing)])
    with pytest.raises(FileNotFoundError, match="nothing"):
        load_corpus([str(tmp_path / "nowhere" / "*.py")])


def test_non_utf8_file_is_skipped_and_counted(corpus_dir):
    (corpus_dir / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    c = load_corpus([str(corpus_dir)], VAL_PERCENT)
    assert c.skipped_non_utf8 == 1
    assert "latin1.py" not in {f.rel for f in c.train + c.val}
    assert len(c.train) + len(c.val) == len(JSON_FILES)


def test_only_non_utf8_files(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.py").write_bytes(b"\xff\xfe\x00x = 1\n")
    with pytest.raises(ValueError, match="1 non-UTF-8"):
        load_corpus([str(d)])


def test_duplicates_removed(corpus_dir):
    shutil.copy(corpus_dir / "scanner.py", corpus_dir / "scanner_copy.py")
    sub = corpus_dir / "sub"
    sub.mkdir()
    shutil.copy(corpus_dir / "tool.py", sub / "tool.py")
    (corpus_dir / "blank.py").write_text("\n  \n")
    c = load_corpus([str(corpus_dir)], VAL_PERCENT)
    assert c.duplicates == 2
    rels = [f.rel for f in c.train + c.val]
    assert len(rels) == len(JSON_FILES)
    texts = [f.text for f in c.train + c.val]
    assert len(set(texts)) == len(texts)
    # the first copy in name order is the one kept
    assert "scanner.py" in rels and "scanner_copy.py" not in rels
    assert "sub/tool.py" in rels and "tool.py" not in rels  # "sub/tool.py" sorts before "tool.py"
    assert "blank.py" not in rels


def test_split_is_deterministic_and_by_file(corpus_dir):
    a = load_corpus([str(corpus_dir)], VAL_PERCENT)
    b = load_corpus([str(corpus_dir)], VAL_PERCENT)
    assert [f.rel for f in a.train] == [f.rel for f in b.train]
    assert [f.rel for f in a.val] == [f.rel for f in b.val]
    assert sorted(f.rel for f in a.val) == sorted(VAL_FILES)
    assert {f.rel for f in a.train} == set(JSON_FILES) - set(VAL_FILES)
    for f in a.train + a.val:
        assert is_val(f.rel, VAL_PERCENT) == (f in a.val)
        assert f.text == Path(f.path).read_text(encoding="utf-8")  # whole files, never cut
    # the split depends on the relative name, not on where the directory lives
    moved = corpus_dir.parent / "elsewhere"
    shutil.copytree(corpus_dir, moved)
    c = load_corpus([str(moved)], VAL_PERCENT)
    assert [f.rel for f in c.val] == [f.rel for f in a.val]
    # when the hash gives no validation file, the last file (in name order) is held out
    zero = load_corpus([str(corpus_dir)], 0)
    assert [f.rel for f in zero.val] == ["tool.py"]
    assert [f.rel for f in zero.train] == sorted(set(JSON_FILES) - {"tool.py"})
    # ... unless it is the only one
    one = load_corpus([str(corpus_dir / "scanner.py")], 0)
    assert [f.rel for f in one.train] == ["scanner.py"] and one.val == []


def test_list_files_accepts_files_and_globs(corpus_dir):
    # one path: names relative to it
    assert [rel for _, rel in list_files([str(corpus_dir / "tool.py")])] == ["tool.py"]
    assert sorted(rel for _, rel in list_files([str(corpus_dir)])) == sorted(JSON_FILES)
    # several paths: names carry the path as given, so equal relative names stay distinct
    files = list_files([str(corpus_dir / "tool.py"), str(corpus_dir / "s*.py")])
    assert [rel for _, rel in files] == [f"{corpus_dir}/tool.py", f"{corpus_dir}/scanner.py"]
    assert all(p.is_absolute() for p, _ in files)
    other = corpus_dir.parent / "other"
    other.mkdir()
    (other / "tool.py").write_text("print('another tool')\n")
    both = load_corpus([str(corpus_dir), str(other)], VAL_PERCENT)
    rels = {f.rel for f in both.train + both.val}
    assert {f"{corpus_dir}/tool.py", f"{other}/tool.py"} <= rels
    assert len(rels) == len(JSON_FILES) + 1


def test_named_roots_use_import_paths(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fakepkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = [[1, 2], [3, 4]]\n")
    (pkg / "sub" / "mod.py").write_text("y = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert sorted(rel for _, rel in list_files(["package:fakepkg"])) == ["fakepkg/__init__.py", "fakepkg/sub/mod.py"]
    # the stdlib keeps its names, so its split is the same with a package beside it
    alone = {rel for _, rel in list_files()}
    both = {rel for _, rel in list_files(["stdlib", "package:fakepkg"])}
    assert both == alone | {"fakepkg/__init__.py", "fakepkg/sub/mod.py"}
    assert sources(["stdlib", "package:fakepkg", str(tmp_path)]) == {
        "stdlib": f"Python {platform.python_version()}", "package:fakepkg": "unknown"}
    # part of a package keeps the package's names, so each file stays on its side of the split
    (pkg / "sub" / "tests").mkdir()
    (pkg / "sub" / "tests" / "test_mod.py").write_text("assert [[1], [2]]\n")
    assert [rel for _, rel in list_files(["package:fakepkg/**/tests"])] == ["fakepkg/sub/tests/test_mod.py"]
    assert [rel for _, rel in list_files(["package:fakepkg/sub/mod.py"])] == ["fakepkg/sub/mod.py"]
    assert sources(["package:fakepkg/**/tests"]) == {"package:fakepkg/**/tests": "unknown"}
    with pytest.raises(FileNotFoundError, match="'nothing' matches nothing under .*package:fakepkg/\\*\\*/tests"):
        list_files(["package:fakepkg/nothing"])
    with pytest.raises(FileNotFoundError, match="no installed package 'nosuchpkg'"):
        list_files(["package:nosuchpkg"])
    with pytest.raises(FileNotFoundError, match="no installed package 'math'"):
        list_files(["package:math"])   # a built-in module has no source directory


def test_build_shards_contents_and_cache(corpus_dir):
    info = build_shards([str(corpus_dir)], VAL_PERCENT)
    out = Path(info["dir"])
    assert out.parent.parent == cache_dir()
    enc = cspkit.get_encoding()
    c = load_corpus([str(corpus_dir)], VAL_PERCENT)
    for split, files in (("train", c.train), ("val", c.val)):
        path = out / f"{split}.bin"
        want = [t for f in files for t in (*enc.encode_ordinary(f.text), enc.eot_token)]
        arr = np.fromfile(path, dtype=np.uint16)
        assert path.stat().st_size == 2 * len(want)  # uint16
        assert arr.tolist() == want
        assert info[f"{split}_tokens"] == len(want)
        assert info[f"{split}_files"] == len(files)
    assert info["tokenizer"] == cspkit.get_encoding().name
    assert info["skipped_non_utf8"] == 0

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = build_shards([str(corpus_dir)], VAL_PERCENT)
    assert again == info
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    # a changed file, or another split, gives another cache entry
    with open(corpus_dir / "tool.py", "a") as f:
        f.write("\n# changed\n")
    changed = build_shards([str(corpus_dir)], VAL_PERCENT)
    assert changed["dir"] != info["dir"]
    assert changed["train_tokens"] != info["train_tokens"]
    assert build_shards([str(corpus_dir)], 0)["dir"] != changed["dir"]


def test_prebuilt_shards_are_used_as_they_are(corpus_dir, tmp_path):
    info = build_shards([str(corpus_dir)], VAL_PERCENT)
    moved = tmp_path / "shards"
    shutil.copytree(info["dir"], moved)
    again = build_shards([str(moved)], VAL_PERCENT)
    assert again == {**info, "dir": str(moved)}
    x, _ = TokenData(again, "train").batch(2, 8, seed=0, step=0)
    assert torch.equal(x, TokenData(info, "train").batch(2, 8, seed=0, step=0)[0])
    (moved / "info.json").write_text(json.dumps({**info, "tokenizer": "other-tokenizer"}))
    with pytest.raises(ValueError, match="other-tokenizer"):
        build_shards([str(moved)], VAL_PERCENT)


def test_prebuilt_shards_of_several_entries_take_their_weights(tmp_path):
    """A shard directory copied to another machine stands for every entry it was built from: a
    TrainConfig naming it alone takes one weight per entry, and the mixture is the original's."""
    a = write_modules(tmp_path / "a", 4, "x = 1\n")
    b = write_modules(tmp_path / "b", 4, "y = [[2, 3]]\n")
    info = build_shards([str(a), str(b)], 0)
    moved = tmp_path / "shards"
    shutil.copytree(info["dir"], moved)
    tcfg = TrainConfig(corpus=[str(moved)], corpus_weights=[1, 3])
    again = build_shards(tcfg.corpus)
    assert torch.equal(TokenData(again, "train", tcfg.corpus_weights).batch(8, 4, seed=0, step=1)[0],
                       TokenData(info, "train", [1, 3]).batch(8, 4, seed=0, step=1)[0])
    with pytest.raises(ValueError, match="one per corpus entry"):
        TokenData(again, "train", TrainConfig(corpus=[str(moved)], corpus_weights=[1, 1, 1]).corpus_weights)
    with pytest.raises(ValueError, match="one per corpus entry"):  # a plain directory is one entry
        TrainConfig(corpus=[str(a)], corpus_weights=[1, 3])
    # a config recorded where the shards were (results/history/hour_recipe/runs) still reads here, and
    # reading its corpus names the missing path
    elsewhere = TrainConfig(corpus=[str(tmp_path / "gone" / "shards")], corpus_weights=[1, 3])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_shards(elsewhere.corpus)


def test_build_shards_counts_skipped(corpus_dir):
    (corpus_dir / "latin1.py").write_bytes(b"x = '\xe9'\n")
    assert build_shards([str(corpus_dir)], VAL_PERCENT)["skipped_non_utf8"] == 1


def test_token_data_batches(corpus_dir):
    info = build_shards([str(corpus_dir)], VAL_PERCENT)
    data = TokenData(info, "train")
    shard = np.fromfile(Path(info["dir"]) / "train.bin", dtype=np.uint16)
    x, y = data.batch(4, 32, seed=0, step=7, rank=0)
    assert x.shape == y.shape == (4, 32)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # next-token targets
    # each row (inputs plus the last target) is a contiguous window of the shard
    windows = np.lib.stride_tricks.sliding_window_view(shard, 33)
    for i in range(4):
        row = np.r_[x[i].numpy(), y[i, -1].item()]
        assert (windows == row).all(axis=1).any(), i
    x2, y2 = data.batch(4, 32, seed=0, step=7, rank=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(TokenData(info, "train").batch(4, 32, seed=0, step=7, rank=0)[0], x)
    assert not torch.equal(data.batch(4, 32, seed=0, step=8, rank=0)[0], x)
    assert not torch.equal(data.batch(4, 32, seed=0, step=7, rank=1)[0], x)
    assert not torch.equal(data.batch(4, 32, seed=1, step=7, rank=0)[0], x)


def test_token_data_errors(tmp_path, corpus_dir):
    info = build_shards([str(corpus_dir)], VAL_PERCENT)
    data = TokenData(info, "val")
    with pytest.raises(ValueError, match="block_size"):
        data.batch(1, data.tokens.size + 5, seed=0, step=0)
    empty = dict(info, dir=str(tmp_path))
    (tmp_path / "val.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        TokenData(empty, "val")


def test_token_data_deterministic_across_processes(corpus_dir):
    """Batches must not depend on the interpreter's hash seed (resume and DDP rely on it)."""
    info = build_shards([str(corpus_dir)], VAL_PERCENT)
    code = ("import json,sys; from cspkit.data import TokenData; "
            "d = TokenData(json.loads(sys.argv[1]), 'train'); print(d.batch(2, 8, 3, 5, 1)[0].tolist())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    r = subprocess.run([sys.executable, "-c", code, json.dumps(info)], capture_output=True, text=True,
                       env=env, timeout=600, check=True)
    assert r.stdout.strip() == str(TokenData(info, "train").batch(2, 8, 3, 5, 1)[0].tolist())


def test_shards_record_each_entry_and_weights_pick_windows(tmp_path):
    """Spans cover the shard entry by entry; windows come from each entry at its weight's share."""
    a = write_modules(tmp_path / "a", 6, "alpha = 1\n" * 40)
    b = write_modules(tmp_path / "b", 6, "beta = [[2]]\n" * 40)
    info = build_shards([str(a), str(b)], 0)
    assert info["entries"] == 2
    spans = info["spans"]["train"]
    assert spans[0][0] == 0 and spans[-1][1] == info["train_tokens"]
    assert all(s[1] == t[0] for s, t in zip(spans, spans[1:]))  # contiguous, no gap
    shard = np.fromfile(Path(info["dir"]) / "train.bin", dtype=np.uint16)
    enc = cspkit.get_encoding()
    for start, end, entry in spans:
        text = enc.decode(shard[start:end].tolist())
        assert ("beta" in text) == (entry == 1) and ("alpha" in text) == (entry == 0)

    def share_of_b(weights):
        d = TokenData(info, "train", weights)
        return np.mean(d.entry_of(d.starts(400, 8, seed=0, step=0)))

    assert share_of_b([1, 0]) == 0 and share_of_b([0, 1]) == 1
    assert 0.7 < share_of_b([1, 3]) < 0.8
    assert 0.4 < share_of_b(None) < 0.6          # by size: the two entries are about as long
    d = TokenData(info, "train", [1, 3])
    x, y = d.batch(50, 8, seed=0, step=2)
    for row, last, start in zip(x, y[:, -1], d.starts(50, 8, seed=0, step=2)):  # the batch reads those windows
        assert row.tolist() + [int(last)] == shard[start:start + 9].tolist()
    # weighted batches are a function of (seed, step, rank), as unweighted ones: resume relies on it
    assert torch.equal(TokenData(info, "train", [1, 3]).batch(4, 8, 0, 3)[0],
                       TokenData(info, "train", [1, 3]).batch(4, 8, 0, 3)[0])
    assert not torch.equal(TokenData(info, "train", [1, 3]).batch(4, 8, 0, 4)[0],
                           TokenData(info, "train", [1, 3]).batch(4, 8, 0, 3)[0])


def test_corpus_weights_errors(tmp_path):
    a = write_modules(tmp_path / "a", 3, "x = 1\n")
    info = build_shards([str(a)], 0)
    for bad in ([1, 1], [-1], [0]):
        with pytest.raises(ValueError, match="one per corpus entry"):
            TokenData(info, "train", bad)
    old = {k: v for k, v in info.items() if k not in ("spans", "entries")}
    with pytest.raises(ValueError, match="rebuild them"):
        TokenData(old, "train", [1])


def test_tasks_train_root_holds_the_train_idioms_and_never_the_test_split():
    """``tasks:train`` is code made of the tasks' train-split pairs, each prompt followed by its
    right candidate; deterministic; no test-split prompt appears in it, and tasks:test is refused."""
    files = cspkit.tasks.corpus_files("train", n_files=3, pairs_per_file=2)
    assert files == cspkit.tasks.corpus_files("train", n_files=3, pairs_per_file=2)
    assert list(files) == ["0000.py", "0001.py", "0002.py"]
    text = "".join(files.values())
    # every nested literal of bracket_counting is closed by its right candidate, ]]
    closers = re.findall(r"\[\[[0-9, ]+\], \[[0-9, ]+(.*)\n", text)
    assert len(closers) == 3 * 2 and set(closers) == {"]]"}
    # ... and every candidate is a token of the text as it is when scored: a flat literal's "]\n"
    # is not swallowed by a blank line after it into the token "]\n\n"
    enc = get_encoding()
    flat = [enc.decode([t]) for t in enc.encode_ordinary(text)]
    assert flat.count("]]") >= 3 * 2 and flat.count("]\n") >= 3 * 2 and "]\n\n" not in flat
    with pytest.raises(RuntimeError, match="merges with every ending"):
        cspkit.tasks.completed("    x = y", "n", "demo", enc)
    for name in cspkit.tasks.PAPER_TASKS:
        for p in cspkit.tasks.get(name).pairs("test", 16):
            assert p.prompt_a not in text and p.prompt_b not in text, name
    assert len(cspkit.tasks.PAPER_TASKS) == 20
    with pytest.raises(ValueError, match="only the train split"):
        cspkit.tasks.corpus_files("test")
    rel = [rel for _, rel in list_files(["stdlib", "tasks:train"]) if rel.startswith("tasks/")]
    assert rel == [f"tasks/{i:04d}.py" for i in range(200)]
    assert sources(["tasks:train"])["tasks:train"].startswith("task generators ")
    with pytest.raises(ValueError, match="only 'tasks:train' exists"):
        list_files(["tasks:test"])
