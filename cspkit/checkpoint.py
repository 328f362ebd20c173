"""Checkpoint directories: config.json, model.safetensors, log.jsonl, and optionally
tokenizer.tiktoken when the model does not use the shipped tokenizer.

Sparse parameters are stored as flat int32 indices plus values when that is smaller.
Every file is written to a temporary name and renamed, so a crash leaves no half file.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig, from_dict, to_dict
from .files import atomic_path, atomic_write
from .model import GPT
from .paths import TOKENIZER_PATH, model_path
from .sparsity import density_report, format_density
from .tokenizer import get_encoding, tokenizer_id

TOKENIZER_FILE = "tokenizer.tiktoken"


def git_commit() -> str | None:
    """The checkout's HEAD commit, with "-dirty" when tracked files differ from it (the code that
    ran is then not exactly that commit's); None outside a git checkout."""
    try:
        here = Path(__file__).parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()
        return (out.stdout.strip() + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def pack_state(model: GPT) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with sparse tensors as ``name::idx`` + ``name::val`` when that saves space."""
    tensors, sparse = {}, {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        nz = int((t != 0).sum())
        if t.dim() >= 1 and nz * 2 < t.numel():  # int32 index + fp32 value per nonzero
            idx = t.flatten().nonzero().flatten()
            tensors[f"{name}::idx"] = idx.to(torch.int32)
            tensors[f"{name}::val"] = t.flatten()[idx].contiguous()
            sparse[name] = list(t.shape)
        else:
            tensors[name] = t
    return tensors, {"sparse": json.dumps(sparse), "format": "cspkit-1"}


def unpack_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict[str, torch.Tensor]:
    sparse = json.loads((metadata or {}).get("sparse", "{}"))
    out = {k: v for k, v in tensors.items() if "::" not in k}
    for name, shape in sparse.items():
        idx, val = tensors[f"{name}::idx"].long(), tensors[f"{name}::val"]
        flat = torch.zeros(int(torch.tensor(shape).prod()), dtype=val.dtype)
        flat[idx] = val
        out[name] = flat.view(shape)
    return out


def save_weights(model: GPT, path: Path) -> None:
    tensors, meta = pack_state(model)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return unpack_state(load_file(str(path)), meta)


def save(model: GPT, out: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into the directory ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "model.safetensors")
    extra = extra or {}
    # a training run passes the commit it started from; looking it up again would be wasted work
    commit = extra["git_commit"] if "git_commit" in extra else git_commit()
    cfg = {"model": to_dict(model.config), "tokenizer": tokenizer_id(), "git_commit": commit, **extra}
    atomic_write(out / "config.json", json.dumps(cfg, indent=1) + "\n")
    return out


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist; pass a directory written by "
                                "`cspkit train` (e.g. data/models/small-sparse)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a cspkit checkpoint directory?")
    return json.loads((path / "config.json").read_text())


def load_state_into(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"weights in {source} do not match the model config: missing {missing}, "
                         f"unexpected {unexpected}, shape mismatches {wrong}")
    model.load_state_dict(state)


def _no_weights(path: Path, cfg: dict[str, Any]) -> str:
    msg = f"{path} has no model.safetensors"
    if "weights_from" in cfg:
        # shipped models whose weights live elsewhere (git history, for the data/ size cap) say where
        msg += f"; its weights are not in the checkout: {cfg['weights_from']}"
    if "command" in cfg:
        msg += f"; or train it again: {cfg['command']}"
    return msg


def load(path: str | os.PathLike, device: str | torch.device = "cpu", tokenizer: str | None = None,
         models: str | os.PathLike | None = None) -> GPT:
    """A GPT from a checkpoint directory or a shipped model's name (``cspkit.paths.model_path``),
    with ``.config`` and ``.encoding`` set, in eval mode. ``models``: where shipped models are
    (default ``$CSPKIT_MODELS``, else the checkout's data/models).

    >>> import cspkit
    >>> model = cspkit.load("small-sparse")
    >>> model.config.n_layer
    4
    """
    path = model_path(path, models)
    cfg = read_config(path)
    own = path / TOKENIZER_FILE  # a checkpoint may carry its own tokenizer (converted openai models do)
    tok_path = tokenizer or str(own if own.is_file() else TOKENIZER_PATH)
    want = cfg.get("tokenizer")
    have = tokenizer_id(tok_path)
    if want is not None and want != have:
        raise ValueError(f"checkpoint {path} was trained with tokenizer {want}, but {tok_path} is {have}; "
                         "pass the matching tokenizer file (tokenizer=...)")
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(_no_weights(path, cfg))
    model = GPT(from_dict(ModelConfig, cfg["model"], "model config"))
    load_state_into(model, read_weights(path / "model.safetensors"), str(path / "model.safetensors"))
    model.encoding = get_encoding(tok_path)
    model.checkpoint = {k: v for k, v in cfg.items() if k != "model"}
    model.path = str(path)  # node means are cached beside the weights
    return model.to(device).eval()


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's ``log.jsonl``: ``path`` is its checkpoint directory or the file itself."""
    f = Path(path) if Path(path).is_file() else Path(path) / "log.jsonl"
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def stage_dir(out: str | os.PathLike, k: int) -> Path:
    """Where run ``k`` of a chain of warm restarts into ``out`` keeps its checkpoint (all but the
    last, which is ``out`` itself; ``cspkit.training.stages``)."""
    return Path(out) / "stages" / str(k)


def read_chain_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The log of a run and of the stages before it (``cycles``: ``path/stages/K``, see
    ``cspkit.training.stages``) as one run's: rows in order, each with its ``stage`` and with its
    ``step`` and ``tokens`` counted from the start of stage 0. A run without stages reads as
    ``read_log`` does, each row at stage 0."""
    path = Path(path)
    n_stages = 0
    while stage_dir(path, n_stages).is_dir():
        n_stages += 1
    rows: list[dict[str, Any]] = []
    step0 = tokens0 = 0
    for k, d in enumerate([*(stage_dir(path, k) for k in range(n_stages)), path]):
        part = [{**r, "stage": k, "step": r["step"] + step0, "tokens": r["tokens"] + tokens0} for r in read_log(d)]
        if part:
            rows += part
            step0, tokens0 = part[-1]["step"], part[-1]["tokens"]
    return rows


def training_seconds(log: list[dict[str, Any]]) -> list[float]:
    """Seconds of training per stage of ``read_chain_log`` rows. Each invocation's clock starts at
    zero and a resume drops the rows past its checkpoint, so a stage's time is the sum of the
    last ``seconds`` of each of its parts (steps trained again after a resume are not counted)."""
    rows = [r for r in log if "seconds" in r]
    totals: dict[int, float] = {}
    for r, nxt in zip(rows, rows[1:] + [None]):
        stage = r.get("stage", 0)
        if nxt is None or nxt.get("stage", 0) != stage or nxt["seconds"] < r["seconds"]:  # a part ends
            totals[stage] = totals.get(stage, 0.0) + r["seconds"]
    return [totals[k] for k in sorted(totals)]


def eval_rows(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a log written at evaluations (those with a validation loss)."""
    return [r for r in log if "val_loss" in r]


def describe(path: str | os.PathLike, evals: bool = False, against: str | os.PathLike | None = None
             ) -> tuple[dict[str, Any], str]:
    """What ``cspkit info`` shows of a checkpoint: its config, parameter count, nonzeros per
    matrix, step and validation loss, training time per stage and, with ``evals`` or
    ``against``, every evaluation of its log (beside another run's at the same steps). Returns
    the JSON object and the human text."""
    model = load(path)
    # a run with warm restarts (cycles) reads as one, its steps counted from its first stage
    log = read_chain_log(model.path)
    seconds = training_seconds(log)
    rep = density_report(model)
    n_params = sum(p.numel() for p in model.parameters())
    meta = model.checkpoint
    # the checkpoint's step is its own stage's; the chain's counts from the first stage
    chain_step, last_stage = (log[-1]["step"], log[-1]["stage"]) if log else (meta.get("step"), 0)
    obj = {"config": to_dict(model.config), "params": n_params, "step": meta.get("step"), "chain_step": chain_step,
           "val_loss": meta.get("val_loss"), "dense": meta.get("dense"), "tokenizer": meta.get("tokenizer"),
           "density": rep, "training_seconds": seconds}
    step = f"step {meta.get('step')}" + (f" of stage {last_stage} ({chain_step} from the start of stage 0)"
                                         if last_stage else "")
    lines = [f"{path}: {n_params:,} parameters, {step}, val loss {meta.get('val_loss')}, "
             f"{'dense' if meta.get('dense') else 'weight-sparse'}",
             "model: " + ", ".join(f"{k}={v}" for k, v in model.config.__dict__.items()),
             format_density(rep)]
    if seconds:
        per_stage = f" ({', '.join(f'stage {k}: {t / 3600:.2f} h' for k, t in enumerate(seconds))})"
        lines.append(f"training time: {sum(seconds) / 3600:.2f} h{per_stage if len(seconds) > 1 else ''}, "
                     "the log's seconds summed over resumed parts")
    if evals or against:
        rows = eval_rows(log)
        obj["evals"] = rows
        ref = {}
        if against:
            ref_rows = eval_rows(read_chain_log(against))
            if not ref_rows:
                raise ValueError(f"--against {against}: no evaluations there; give a run directory "
                                 "(or its log.jsonl) whose log has val_loss rows")
            ref = {r["step"]: r for r in ref_rows}
            obj["against"] = {"dir": str(against), "evals": [ref[r["step"]] for r in rows if r["step"] in ref]}
        lines += ["", format_evals(rows, ref, against)]
    return obj, "\n".join(lines)


def format_evals(rows: list[dict[str, Any]], ref: dict[int, dict[str, Any]], against=None) -> str:
    """A log's evaluations as a table (step, tokens, L0, val loss, each task's loss / accuracy),
    each followed by the reference run's row at the same step where ``ref`` has one."""
    names = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("task/")})
    nan = float("nan")

    def line(r: dict, head: str) -> str:
        return f"{head} {r.get('l0', nan):6.3f} {r['val_loss']:8.3f}" + "".join(
            f" {r.get(f'task/{n}/loss', nan):10.3f} / {r.get(f'task/{n}/accuracy', nan):5.3f}" for n in names)
    lines = ["evaluations; each task: loss / accuracy" + (f"; under each step, {against} at that step" if ref else ""),
             f"{'step':>6s} {'tokens':>11s} {'l0':>6s} {'val loss':>8s}" + "".join(f" {n[:18]:>18s}" for n in names)]
    for r in rows:
        lines.append(line(r, f"{r['step']:6d} {r['tokens']:11,d}"))
        if ref:
            lines.append(line(ref[r["step"]], f"{'':6s} {'against':>11s}") if r["step"] in ref
                         else f"{'':6s} {'against':>11s} (no evaluation at this step)")
    return "\n".join(lines)
