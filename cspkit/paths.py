"""Where things live: the package's own assets, the shipped models, the checkout's results and
the cache.

Shipped models are found from an explicit path, else the ``CSPKIT_MODELS`` environment
variable, else the ``data/models`` of a cspkit checkout (found from the working directory or
from the package itself, for an editable install). A wheel installed elsewhere needs one of
the first two; the tokenizer ships inside the package, so everything else works anywhere.
"""
from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_PATH = ASSETS / "tinypython_2k.tiktoken"
MODELS_ENV = "CSPKIT_MODELS"
CACHE_ENV = "CSPKIT_CACHE"


def checkout(start: str | os.PathLike | None = None) -> Path | None:
    """The root of the cspkit checkout that holds ``start`` (default: the working directory) or
    this package, if any: the first directory up from either with ``data/models``."""
    places = [Path(start or Path.cwd()).resolve(), Path(__file__).resolve().parent]
    for here in places:
        for p in (here, *here.parents):
            if (p / "data" / "models").is_dir() and (p / "pyproject.toml").is_file():
                return p
    return None


def models_dir(path: str | os.PathLike | None = None) -> Path:
    """The directory of shipped models: ``path``, else ``$CSPKIT_MODELS``, else the checkout's
    ``data/models``; an error that names all three where none is found."""
    if path is not None:
        where = Path(path)
        if not where.is_dir():
            raise FileNotFoundError(f"models directory {where} does not exist; pass a directory of model "
                                    "checkpoints (a cspkit checkout's data/models)")
        return where
    if os.environ.get(MODELS_ENV):
        where = Path(os.environ[MODELS_ENV])
        if not where.is_dir():
            raise FileNotFoundError(f"{MODELS_ENV}={where} is not a directory; point it at a directory of "
                                    "model checkpoints (a cspkit checkout's data/models) or unset it")
        return where
    root = checkout()
    if root is None:
        raise FileNotFoundError(
            "no shipped models found: pass their directory explicitly (cspkit.load(name, models=DIR)), or set "
            f"{MODELS_ENV}=/path/to/cspkit/data/models, or work inside a cspkit checkout "
            "(its data/models is found from the working directory)")
    return root / "data" / "models"


def model_path(name_or_path: str | os.PathLike, models: str | os.PathLike | None = None) -> Path:
    """A checkpoint directory: ``name_or_path`` itself where it is a directory (from the working
    directory, else from the checkout's root), else the shipped model of that name
    (``small-sparse``) in ``models_dir(models)``."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    root = checkout()
    if not p.is_absolute() and root is not None and (root / p).is_dir():
        return root / p   # a path recorded relative to the checkout (circuit files name their model so)
    if len(p.parts) != 1:
        raise FileNotFoundError(f"checkpoint directory {p} does not exist; pass a directory written by "
                                "`cspkit train`, or a shipped model's name such as small-sparse")
    root = models_dir(models)
    if not (root / p).is_dir():
        names = ", ".join(shipped_models(root)) or "none"
        raise FileNotFoundError(f"no model named {str(p)!r} in {root}; shipped models there: {names}")
    return root / p


def shipped_models(models: str | os.PathLike | None = None) -> list[str]:
    """The names of the checkpoints in ``models_dir(models)``."""
    root = models_dir(models)
    return sorted(d.name for d in root.iterdir() if (d / "config.json").is_file())


def results_dir() -> Path:
    """The checkout's ``results/``: the committed result files notebooks read."""
    root = checkout()
    if root is None or not (root / "results").is_dir():
        raise FileNotFoundError("no results/ directory: the committed results ship with the cspkit checkout, "
                                "not with the package; work inside a checkout")
    return root / "results"


def cache_dir() -> Path:
    """Where built token shards, node statistics and explorer caches go: ``$CSPKIT_CACHE``, else
    ``~/.cache/cspkit``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "cspkit"))
