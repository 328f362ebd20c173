"""The corpus: local Python files -> deduplicated, split by file -> cached uint16 token shards.

By default the corpus is the standard library of the running interpreter (site-packages
excluded, so two machines with the same Python build the same corpus). Besides directories,
files and globs, a corpus names three kinds of root that mean the same on every machine:
``stdlib``; ``package:NAME`` (the installed source of an importable package, numpy say),
or part of one, ``package:NAME/GLOB`` (``package:numpy/**/tests``: numpy's test directories);
and ``tasks:train``, code made of the 20 tasks' idioms from their train split (written into
the cache by ``cspkit.tasks.corpus_files``, named ``tasks/0000.py`` ...).
Their files are named by their import path (``json/decoder.py``, ``numpy/linalg/_linalg.py``),
so the train/validation split of the stdlib is the same with or without packages beside it,
and a file of a package falls on the same side of the split whichever part of it is named.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import tasks
from .config import check_corpus_weights, is_shard_dir
from .files import atomic_dir, atomic_write
from .paths import TOKENIZER_PATH, cache_dir
from .tokenizer import get_encoding, tokenizer_id


def default_roots() -> list[str]:
    return [sysconfig.get_paths()["stdlib"]]


@dataclass
class CorpusFile:
    path: str       # absolute path
    rel: str        # path relative to its root: the stable name used for the split
    text: str
    root: int = 0   # index of the corpus entry (directory, glob, named root) it came from


@dataclass
class Corpus:
    train: list[CorpusFile]
    val: list[CorpusFile]
    skipped_non_utf8: int
    duplicates: int


def _package_spec(spec: str) -> tuple[str, str]:
    """``package:NAME/GLOB`` -> (NAME, GLOB); GLOB is empty for the whole package."""
    name, _, part = spec.removeprefix("package:").partition("/")
    return name, part


def _task_root(spec: str) -> Path:
    """The directory of ``tasks:train`` (cspkit.tasks.corpus_files), written once into the cache
    under a digest of the task generators' source and of the tokenizer they check names against."""
    split = spec.removeprefix("tasks:")
    if split != "train":
        raise ValueError(f"corpus root {spec!r}: only 'tasks:train' exists; the test split of the tasks "
                         "is what they are scored on, so it is never trained on")
    h = hashlib.sha256()
    for source in sorted(Path(tasks.__file__).parent.glob("*.py")):   # every module the pairs come from
        h.update(source.read_bytes())
    h.update(tokenizer_id(str(TOKENIZER_PATH)).encode())
    root = cache_dir() / "tasks-corpus" / h.hexdigest()[:16] / "tasks"
    if not root.is_dir():
        with atomic_dir(root) as tmp:
            for name, text in tasks.corpus_files(split).items():
                (tmp / name).write_text(text)
    return root


def _named_root(spec: str) -> tuple[Path, list[Path]] | None:
    """(the directory a named root stands for, the files or directories it names in it), or
    None if ``spec`` is a path or glob."""
    if spec == "stdlib":
        root = Path(default_roots()[0])
        return root, [root]
    if spec.startswith("tasks:"):
        root = _task_root(spec)
        return root, [root]
    if not spec.startswith("package:"):
        return None
    name, part = _package_spec(spec)
    found = importlib.util.find_spec(name) if name and "." not in name else None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"corpus root {spec!r}: no installed package {name!r} with source "
                                f"directory; install it or name a directory instead")
    root = Path(list(found.submodule_search_locations)[0])
    if not part:
        return root, [root]
    hits = sorted(Path(p) for p in glob.glob(str(root / part), recursive=True))
    if not hits:
        raise FileNotFoundError(f"corpus root {spec!r}: {part!r} matches nothing under {root}; "
                                f"give a path or glob relative to the package, such as 'package:{name}/**/tests'")
    return root, hits


def _expand(spec: str) -> list[Path]:
    if any(ch in spec for ch in "*?["):
        hits = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        if not hits:
            raise FileNotFoundError(f"corpus glob {spec!r} matches nothing; check the pattern")
        return hits
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"corpus path {spec!r} does not exist; pass a directory, a .py file, a glob, "
                                f"'stdlib', 'package:NAME' or 'tasks:train'")
    return [p]


def list_files(paths: list[str] | None = None) -> list[tuple[Path, str]]:
    """(absolute path, stable name) for every .py file under the given paths.

    The stable name decides the train/validation split. Under a named root it is the import
    path; under one directory it is the path relative to it; with several paths it is prefixed
    by the path as given, so that ``json/__init__.py`` and ``http/__init__.py`` stay distinct.
    """
    return [(path, rel) for path, rel, _ in _files_by_entry(paths)]


def _files_by_entry(paths: list[str] | None) -> list[tuple[Path, str, int]]:
    """list_files, with the index of the corpus entry each file came from."""
    specs = paths or ["stdlib"]
    # (file or directory, the directory its files' names start from, prefix of those names, entry)
    roots: list[tuple[Path, Path, str, int]] = []
    for i, spec in enumerate(specs):
        named = _named_root(spec)
        if named is not None:
            base, hits = named
            roots += [(p, base, "" if spec == "stdlib" else f"{base.name}/", i) for p in hits]
            continue
        for p in _expand(spec):
            alone = len(specs) == 1 and p == Path(spec)
            roots.append((p, p, "" if alone else f"{p.as_posix()}/", i))
    out = []
    for p, base, prefix, i in roots:
        if p.is_file():
            if p != base:   # a file a package glob matched: named by its import path
                name = prefix + p.relative_to(base).as_posix()
            else:           # a file named as such: by its path as given, or alone by its name
                name = prefix.rstrip("/") or p.name
            out.append((p.resolve(), name, i))
            continue
        for f in sorted(p.rglob("*.py")):
            rel = f.relative_to(base)
            if "site-packages" in rel.parts or not f.is_file():
                continue
            out.append((f.resolve(), prefix + rel.as_posix(), i))
    if not out:
        raise ValueError(f"no .py files found under {specs}; name directories or globs that contain Python source")
    return out


def sources(paths: list[str] | None = None) -> dict[str, str]:
    """The version of every named root of a corpus, to record beside a model trained on it."""
    out = {}
    for spec in paths or ["stdlib"]:
        if spec == "stdlib":
            out[spec] = f"Python {platform.python_version()}"
        elif spec.startswith("tasks:"):
            out[spec] = f"task generators {_task_root(spec).parent.name}"
        elif spec.startswith("package:"):
            try:
                out[spec] = importlib.metadata.version(_package_spec(spec)[0])
            except importlib.metadata.PackageNotFoundError:
                out[spec] = "unknown"
    return out


def is_val(rel: str, val_percent: float) -> bool:
    h = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16)
    return (h % 10_000) < val_percent * 100


def load_corpus(paths: list[str] | None = None, val_percent: float = 5.0) -> Corpus:
    """Read, deduplicate by content and split by file name hash; deterministic order."""
    seen: set[str] = set()
    train, val = [], []
    skipped = dups = 0
    for path, rel, root in sorted(_files_by_entry(paths), key=lambda x: (x[1], str(x[0]))):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in seen or not text.strip():
            dups += digest in seen
            continue
        seen.add(digest)
        (val if is_val(rel, val_percent) else train).append(CorpusFile(str(path), rel, text, root))
    if not val and len(train) > 1:
        # a small corpus can get no validation file by chance: hold out the last one
        val.append(train.pop())
    if not train:
        raise ValueError(f"corpus under {paths or default_roots()} has no readable UTF-8 Python "
                         f"for training ({skipped} non-UTF-8 files skipped)")
    return Corpus(train, val, skipped, dups)


def build_shards(paths: list[str] | None = None, val_percent: float = 5.0,
                 tokenizer: str | None = None, corpus: Corpus | None = None) -> dict:
    """Tokenize the corpus once into ``train.bin``/``val.bin`` (uint16) in the cache; return info.

    The cache key (``digest`` in the info) covers the tokenizer and every file's name and
    content, so a changed file or tokenizer rebuilds the shards. A single path holding an
    ``info.json`` is taken as shards built before (by this function, elsewhere) and used as they
    are. ``corpus``: the corpus of ``paths`` already loaded (with ``val_percent``), to save
    reading it again.
    """
    tok_path = tokenizer or str(TOKENIZER_PATH)
    if paths and len(paths) == 1 and is_shard_dir(paths[0]):
        return _prebuilt(Path(paths[0]), tok_path)
    enc = get_encoding(tok_path)
    corpus = corpus or load_corpus(paths, val_percent)
    h = hashlib.sha256(tokenizer_id(tok_path).encode())
    for f in corpus.train + corpus.val:
        h.update(f"{f.rel}\0{len(f.text)}\0".encode())
        h.update(hashlib.sha256(f.text.encode()).digest())
    h.update(f"val={val_percent} entries={len(paths or [None])} spans".encode())
    digest = h.hexdigest()[:16]
    out = cache_dir() / "shards" / digest
    info_path = out / "info.json"
    if info_path.exists():
        return {"digest": digest, **json.loads(info_path.read_text())}  # shards cached before digests were kept
    out.mkdir(parents=True, exist_ok=True)
    eot = enc.eot_token
    info = {"dir": str(out), "digest": digest, "tokenizer": tokenizer_id(tok_path),
            "skipped_non_utf8": corpus.skipped_non_utf8,
            "duplicates": corpus.duplicates, "entries": len(paths or [None]), "spans": {}}
    for split, files in (("train", corpus.train), ("val", corpus.val)):
        ids = enc.encode_ordinary_batch([f.text for f in files], num_threads=os.cpu_count() or 1)
        arr = np.fromiter((t for doc in ids for t in (*doc, eot)), dtype=np.uint16,
                          count=sum(len(d) + 1 for d in ids))
        atomic_write(out / f"{split}.bin", arr.tobytes())
        info[f"{split}_files"] = len(files)
        info[f"{split}_tokens"] = int(arr.size)
        info["spans"][split] = _spans(files, [len(d) + 1 for d in ids])
    atomic_write(info_path, json.dumps(info, indent=1).encode())
    return info


def _spans(files: list[CorpusFile], sizes: list[int]) -> list[list[int]]:
    """[start, end, entry] token ranges of a shard, consecutive files of one corpus entry merged."""
    spans: list[list[int]] = []
    pos = 0
    for f, n in zip(files, sizes):
        if spans and spans[-1][2] == f.root and spans[-1][1] == pos:
            spans[-1][1] += n
        else:
            spans.append([pos, pos + n, f.root])
        pos += n
    return spans


def _prebuilt(d: Path, tok_path: str) -> dict:
    """Shards built elsewhere (copied to a GPU machine, say): the same tokens whatever Python runs."""
    info = json.loads((d / "info.json").read_text())
    if info.get("tokenizer") != tokenizer_id(tok_path):
        raise ValueError(f"shards in {d} were tokenized with {info.get('tokenizer')!r}, not "
                         f"{tokenizer_id(tok_path)!r}; rebuild them from the source files")
    return {**info, "dir": str(d)}


class TokenData:
    """Random windows from a shard, chosen by a generator seeded per (seed, step, rank).

    Seeding per step makes a resumed run read exactly the batches an uninterrupted one would.
    ``weights`` (one per corpus entry, as TrainConfig.corpus_weights) draws each window from
    entry i with probability weights[i] / sum(weights), uniformly within it; without them a
    window starts anywhere, so each entry is read in proportion to its size. A window may run
    on past its entry's last file into the next file of the shard.
    """

    def __init__(self, info: dict, split: str, weights: list[float] | None = None):
        path = Path(info["dir"]) / f"{split}.bin"
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        if self.tokens.size < 2:
            raise ValueError(f"{split} shard {path} is empty; the corpus needs more files for a {split} split")
        self.dir, self.split = info["dir"], split
        # (start, end, entry) rows; None for shards built before cspkit recorded entries
        spans = info.get("spans", {}).get(split)
        self.spans = None if spans is None else np.array(spans, dtype=np.int64).reshape(-1, 3)
        self.mix = None if weights is None else self._mixture(weights, info.get("entries"))

    def _need_spans(self) -> np.ndarray:
        if self.spans is None:
            raise ValueError(f"shards in {self.dir} record no corpus entries (built by an older cspkit); "
                             "rebuild them from the source files to use corpus_weights or entry_of")
        return self.spans

    def _mixture(self, weights: list[float], n_entries: int | None
                 ) -> tuple[torch.Tensor, list[tuple[np.ndarray, np.ndarray]]]:
        """(probability per entry, per entry its [start, end] token ranges and their cumulative lengths)."""
        spans = self._need_spans()
        check_corpus_weights(weights, n_entries, f"of the shards in {self.dir}")
        ranges = [spans[spans[:, 2] == i, :2] for i in range(len(weights))]
        # an entry with no files in this split (no validation file, say) is left out of its mixture
        w = torch.tensor([float(wi) if r.size else 0.0 for wi, r in zip(weights, ranges)], dtype=torch.float64)
        if not w.sum() > 0:
            raise ValueError(f"no corpus entry with a positive weight has {self.split} files")
        return w / w.sum(), [(r, np.cumsum(r[:, 1] - r[:, 0])) for r in ranges]

    def starts(self, batch_size: int, block_size: int, seed: int, step: int, rank: int = 0) -> list[int]:
        """Where in the shard each window of ``batch`` begins."""
        n = self.tokens.size - block_size - 1
        if n <= 0:
            raise ValueError(f"shard has {self.tokens.size} tokens, fewer than block_size {block_size} + 1")
        g = torch.Generator().manual_seed(hash((seed, step, rank)) & 0x7FFF_FFFF_FFFF)
        if self.mix is None:
            return torch.randint(0, n, (batch_size,), generator=g).tolist()
        return self._mixed_starts(batch_size, n, g)

    def entry_of(self, positions: list[int]) -> list[int]:
        """The corpus entry (index into the corpus list) that each shard position belongs to."""
        spans = self._need_spans()
        return spans[np.searchsorted(spans[:, 1], positions, side="right"), 2].tolist()

    def batch(self, batch_size: int, block_size: int, seed: int, step: int, rank: int = 0):
        starts = self.starts(batch_size, block_size, seed, step, rank)
        # (batch, block_size + 1) -> inputs and next-token targets
        rows = np.stack([self.tokens[s:s + block_size + 1] for s in starts]).astype(np.int64)
        x = torch.from_numpy(rows[:, :-1])
        y = torch.from_numpy(rows[:, 1:])
        return x, y

    def _mixed_starts(self, batch_size: int, n: int, g: torch.Generator) -> list[int]:
        probs, ranges = self.mix
        entries = torch.multinomial(probs, batch_size, replacement=True, generator=g).tolist()
        offsets = torch.rand(batch_size, generator=g, dtype=torch.float64).tolist()
        starts = []
        for e, u in zip(entries, offsets):
            r, ends = ranges[e]                             # ends: tokens of entry e up to each range's end
            k = int(u * ends[-1])
            j = int(np.searchsorted(ends, k, side="right"))
            starts.append(min(int(r[j, 0] + k - (ends[j - 1] if j else 0)), n - 1))
        return starts
