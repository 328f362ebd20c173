"""The trainer: the weight-sparse recipe of docs/method.md ("Weight-sparse training"), checkpoints, resume and DDP.

Each step: forward, backward, (all-reduce), rescale the whole gradient to RMS 1, Adam
(eps 0.1), weight decay by hand on matrices, then project every sparse matrix to its top-k.
Batches are drawn from a generator seeded by (seed, step, rank), and ``resume.pt`` holds
the weights, the Adam state and the step in one atomic file, so a killed-and-resumed run
ends with the weights an uninterrupted run would have.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import tasks
from .config import RUNTIME_FIELDS, ModelConfig, TrainConfig, from_dict, to_dict
from .data import TokenData, build_shards, sources
from .files import atomic_path, atomic_write
from .model import GPT
from .profiles import config_for, resolve_profile
from .sparsity import l0_fraction, project_model_
from .tokenizer import get_encoding


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run in hardware on ``device``. A CPU without AVX512-BF16 or AMX
    emulates them: there the small profile's bf16 step took 45 s against 2.3 s in fp32 (2-core
    AVX2 EPYC; docs/results.md, "Speed")."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def check_autocast(tcfg: TrainConfig, device: torch.device) -> None:
    if tcfg.autocast == "bf16" and not native_bf16(device):
        warnings.warn(f"autocast='bf16' where bfloat16 is emulated ({device.type}; a CPU needs AVX512-BF16 or AMX "
                      "for it): each step runs about 20x slower than in fp32. Add autocast=null to the command to "
                      "train in fp32 (a different run: its weights will not equal the bf16 run's).", stacklevel=3)


def schedule(step: int, t: TrainConfig) -> dict[str, float]:
    """LR and kept fractions at ``step``: warm-up, linear decay to zero, times the sharkfin
    factor sqrt(L0_final / L0_now) while the matrices anneal."""
    warm = max(1, round(t.warmup_frac * t.max_steps))
    if step < warm:
        lr = t.lr * (step + 1) / warm
    else:
        lr = t.lr * max(0.0, t.max_steps - step) / max(1, t.max_steps - warm)
    if t.dense:
        return {"lr": lr, "frac_matrix": 1.0, "frac_embed": 1.0}
    fm = l0_fraction(step, t.max_steps, t.l0_frac, t.anneal_start, t.anneal_end)
    fe = l0_fraction(step, t.max_steps, t.l0_frac_embed, t.anneal_start, t.anneal_end)
    if t.sharkfin:
        lr *= math.sqrt(t.l0_frac / fm)
    return {"lr": lr, "frac_matrix": fm, "frac_embed": fe}


def decayed(model: GPT) -> list[torch.nn.Parameter]:
    """Parameters that get weight decay: the matrices (embeddings included), not the bigram table."""
    return [p for n, p in model.named_parameters() if p.dim() == 2 and n != "bigram"]


@torch.no_grad()
def rescale_grad_(params: list[torch.nn.Parameter]) -> float:
    """Divide the whole gradient by its global RMS; returns that RMS."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.stack([g.pow(2).sum() for g in grads]).sum()
    n = sum(g.numel() for g in grads)
    rms = float((sq / n).sqrt())
    if rms > 0:
        for g in grads:
            g.div_(rms)
    return rms


@torch.no_grad()
def evaluate_loss(model: GPT, data: TokenData, t: TrainConfig, block_size: int) -> float:
    model.eval()
    losses = []
    for i in range(t.eval_batches):
        x, y = data.batch(t.batch_size, block_size, seed=-1, step=i)
        losses.append(float(model(x.to(model.device), y.to(model.device))[1]))
    model.train()
    return sum(losses) / len(losses)


def evaluate_tasks(model: GPT, names: list[str] | None) -> dict[str, float]:
    """Task loss and accuracy on each task's test split, as log fields ``task/NAME/loss`` and ``.../accuracy``."""
    out = {}
    for name in names or []:
        r = tasks.evaluate(model, name, split="test")
        out[f"task/{name}/loss"], out[f"task/{name}/accuracy"] = r["loss"], r["accuracy"]
    model.train()
    return out


def optimizer_step(opt: torch.optim.Optimizer, s: dict[str, float], tcfg: TrainConfig,
                   groups: list[list[torch.nn.Parameter]], decay: list[torch.nn.Parameter], world: int = 1) -> None:
    """The recipe after backward: (all-reduce,) each group's gradient rescaled to RMS 1 on its own,
    Adam at the scheduled LR, weight decay by hand on ``decay``."""
    for params in groups:
        if world > 1:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        rescale_grad_(params)
    for g in opt.param_groups:
        g["lr"] = s["lr"]
    opt.step()
    with torch.no_grad():
        for p in decay:
            p.mul_(1 - s["lr"] * tcfg.weight_decay)


def train_step(model: GPT, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, s: dict[str, float],
               tcfg: TrainConfig, params: list[torch.nn.Parameter], decay: list[torch.nn.Parameter],
               world: int = 1) -> torch.Tensor:
    """One optimizer step of the recipe; ``s`` is ``schedule(step, tcfg)``. Returns the loss."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=tcfg.autocast == "bf16"):
        _, loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    optimizer_step(opt, s, tcfg, [params], decay, world)
    if not tcfg.dense:
        project_model_(model, s["frac_matrix"], s["frac_embed"], tcfg.min_per_neuron)
    return loss.detach()


def fit(tcfg: TrainConfig, start: int, step_fn: Callable, eval_fn: Callable, save_fn: Callable,
        log_dir: Path | None, tokens_per_step: int, progress: bool = True, desc: str = "train") -> None:
    """The loop every trainer shares: steps ``start`` to ``max_steps``; a log.jsonl row every
    ``log_interval`` steps and at evals (``eval_interval`` and the last step); a checkpoint every
    ``ckpt_interval`` steps and at the end; an early stop at ``stop_at_val_loss`` or ``stop_at_step``;
    a tqdm bar.

    step_fn(step, s) -> (loss, {name: value}) is one optimizer step with s = schedule(step); the
    extra values go into the log row. eval_fn() -> {"val_loss": ..., name: value}. save_fn(done,
    val_loss) writes the checkpoint. log_dir None writes no log (DDP ranks other than 0).
    """
    bar = tqdm(total=tcfg.max_steps, initial=start, disable=not progress, desc=desc, dynamic_ncols=True)
    val_loss = None
    t0 = time.time()
    for step in range(start, tcfg.max_steps):
        s = schedule(step, tcfg)
        loss, extra = step_fn(step, s)

        done = step + 1
        is_eval = done % tcfg.eval_interval == 0 or done == tcfg.max_steps
        if done % tcfg.log_interval == 0 or is_eval:
            row = {"step": done, "tokens": done * tokens_per_step, "lr": s["lr"], "train_loss": loss.item(),
                   **{k: float(v) for k, v in extra.items()}, "seconds": round(time.time() - t0, 2)}
            if is_eval:
                row.update(eval_fn())
                val_loss = row["val_loss"]
                row["l0"] = s["frac_matrix"]
            if log_dir is not None:
                with open(log_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val_loss:.3f}" if val_loss else "-",
                            l0=f"{s['frac_matrix']:.3f}")
        bar.update(1)
        stop = (is_eval and tcfg.stop_at_val_loss is not None and val_loss <= tcfg.stop_at_val_loss
                or tcfg.stop_at_step is not None and done >= tcfg.stop_at_step)
        if done % tcfg.ckpt_interval == 0 or done == tcfg.max_steps or stop:
            save_fn(done, val_loss)
        if stop:
            break
    bar.close()


def start_log(out: Path, start: int) -> None:
    """Keep the log lines up to the checkpoint a resumed run restarts from (none for a fresh run)."""
    kept = [l for l in ckpt.read_log(out) if l["step"] <= start] if start else []
    atomic_write(out / "log.jsonl", "".join(json.dumps(l) + "\n" for l in kept))


def save_resume(path: Path, state: dict) -> None:
    """Weights, optimizer state and step in one file, written atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_resumable(out: Path, sections: dict[str, dict]) -> None:
    """Refuse to resume ``out`` when its config.json differs from ``sections`` ({section: dict});
    runtime-only fields (config.RUNTIME_FIELDS) may differ."""
    old = ckpt.read_config(out)
    diffs = [f"{sec}.{k}: checkpoint {old.get(sec, {}).get(k)!r} vs now {v!r}"
             for sec in sections for k, v in sections[sec].items()
             if old.get(sec, {}).get(k) != v and k not in RUNTIME_FIELDS]
    if diffs:
        raise ValueError(f"{out} holds a run with another config ({'; '.join(diffs)}); "
                         "resume with the same settings or choose a new --out")


def check_config_resumable(out: Path, mcfg: ModelConfig, tcfg: TrainConfig) -> None:
    """Refuse to resume ``out`` with another model or training config than the one it recorded."""
    check_resumable(out, {"model": to_dict(mcfg), "train": to_dict(tcfg)})


def corpus_record(info: dict, tcfg: TrainConfig) -> dict:
    """What config.json records of the corpus a run reads (``build_shards``'s ``info``): its sizes,
    digest and the versions of its sources, which ``check_same_corpus`` compares on resume."""
    corpus = {k: info[k] for k in ("train_files", "val_files", "train_tokens", "val_tokens", "skipped_non_utf8")}
    return corpus | {"digest": info.get("digest"), "sources": sources(tcfg.corpus)}


def check_same_corpus(out: Path, corpus: dict) -> None:
    """Refuse to resume ``out`` on another corpus than the one its config.json records: another
    Python's standard library, another numpy's tests or a changed task generator would change
    the data part-way through the run without a trace."""
    old = ckpt.read_config(out).get("corpus", {})
    keys = [k for k in ("train_files", "val_files", "train_tokens", "val_tokens", "digest")
            if old.get(k) is not None and corpus.get(k) is not None]  # a run begun before digests: its counts
    diffs = [f"{k}: checkpoint {old[k]!r} vs now {corpus[k]!r}" for k in keys if old[k] != corpus[k]]
    if diffs:
        raise ValueError(f"{out} was trained on another corpus ({'; '.join(diffs)}; its sources then "
                         f"{old.get('sources')}, now {corpus.get('sources')}); resume where those versions "
                         "are installed (`make` installs the pinned ones of constraints.txt) or choose a new --out")


def provenance(out: Path, start: int, command: str | None) -> dict:
    """The command and commit that started the run in ``out`` (the commit read once, so that
    commits made while it trains do not change it); a resumed run keeps them and adds the step,
    command and commit of each resume, so that a run split across invocations still names the
    command that reproduces it."""
    if not start:
        return {"command": command, "git_commit": ckpt.git_commit()}
    first = ckpt.read_config(out)
    return {"command": first.get("command"), "git_commit": first.get("git_commit"),
            "resumed": [*first.get("resumed", []), {"step": start, "command": command,
                                                    "git_commit": ckpt.git_commit()}]}


def _init_weights_from(model: GPT, path: str, mcfg: ModelConfig) -> None:
    """Continued training: start from another run's weights (fresh optimizer and schedule)."""
    theirs = to_dict(from_dict(ModelConfig, ckpt.read_config(path)["model"], "model config"))
    if theirs != to_dict(mcfg):
        diffs = [k for k, v in to_dict(mcfg).items() if theirs.get(k) != v]
        raise ValueError(f"init_from={path} has another model config (differs in {diffs}); "
                         "use the same profile and model overrides as that run")
    src = ckpt.load(path, device=model.device)
    model.load_state_dict(src.state_dict())


def train(mcfg: ModelConfig, tcfg: TrainConfig, out: str | os.PathLike, progress: bool = True,
          command: str | None = None, profile: str | None = None) -> GPT:
    """Train (or resume) a model into the checkpoint directory ``out``; returns the model.
    ``command`` (the command line that started it) and ``profile`` (the name of the profile it
    configures, aliases resolved) are recorded in config.json.

    >>> import tempfile, cspkit
    >>> mcfg, tcfg = cspkit.config_for("tiny", max_steps=4, eval_interval=2, eval_batches=1)
    >>> out = tempfile.mkdtemp()
    >>> model = cspkit.train(mcfg, tcfg, out, progress=False)
    >>> cspkit.load(out).checkpoint["step"]
    4
    """
    out = Path(out)
    if tcfg.cycles:
        return train_stages(mcfg, tcfg, out, progress, command, profile)
    for name in tcfg.eval_tasks or []:
        tasks.get(name)  # an unknown name fails before any file is written, not at the first evaluation
    rank, world = _dist_info()
    device = pick_device(tcfg.device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    check_autocast(tcfg, device)

    if rank == 0:
        info = build_shards(tcfg.corpus, tcfg.val_percent)
    if world > 1:
        dist.barrier()
    if rank != 0:
        info = build_shards(tcfg.corpus, tcfg.val_percent)
    train_data = TokenData(info, "train", tcfg.corpus_weights)
    val_data = TokenData(info, "val", tcfg.corpus_weights)

    torch.manual_seed(tcfg.seed)
    model = GPT(mcfg).to(device)
    model.encoding = get_encoding()
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps, weight_decay=0.0)
    start = 0
    resume = out / "resume.pt"
    corpus = corpus_record(info, tcfg)
    if resume.is_file():
        check_config_resumable(out, mcfg, tcfg)
        check_same_corpus(out, corpus)
        state = torch.load(resume, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    else:
        if tcfg.init_from:
            _init_weights_from(model, tcfg.init_from, mcfg)
        if not tcfg.dense:
            s = schedule(0, tcfg)
            project_model_(model, s["frac_matrix"], s["frac_embed"], tcfg.min_per_neuron)

    extra = {"train": to_dict(tcfg), "seed": tcfg.seed, "dense": tcfg.dense, **provenance(out, start, command),
             "profile": profile, "corpus": corpus}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        start_log(out, start)
        if not start:
            ckpt.save(model, out, {**extra, "step": 0})

    def save_all(step: int, val_loss: float | None):
        if rank != 0:
            return
        save_resume(resume, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step})
        ckpt.save(model, out, {**extra, "step": step, "val_loss": val_loss})

    params = [p for p in model.parameters() if p.requires_grad]
    decay = decayed(model)

    def step_fn(step: int, s: dict[str, float]):
        x, y = train_data.batch(tcfg.batch_size, mcfg.block_size, tcfg.seed, step, rank)
        return train_step(model, opt, x.to(device), y.to(device), s, tcfg, params, decay, world), {}

    model.train()
    def eval_fn() -> dict[str, float]:
        return {"val_loss": evaluate_loss(model, val_data, tcfg, mcfg.block_size),
                **evaluate_tasks(model, tcfg.eval_tasks)}

    fit(tcfg, start, step_fn, eval_fn,
        save_all, out if rank == 0 else None, tcfg.batch_size * mcfg.block_size * world,
        progress=progress and rank == 0)
    if world > 1:  # every rank applied the same updates, so the weights must agree exactly
        with torch.no_grad():
            sums = torch.stack([sum(p.double().abs().sum() for p in params),
                                sum(p.double().sum() for p in params)])
        gathered = [torch.zeros_like(sums) for _ in range(world)]
        dist.all_gather(gathered, sums)
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"ranks diverged: parameter checksums (sum |p|, sum p) per rank "
                               f"{[g.tolist() for g in gathered]}")
    return model.eval()


def stages(tcfg: TrainConfig, out: Path) -> list[tuple[TrainConfig, Path]]:
    """The runs a config with ``cycles`` stands for, each with its directory: its own schedule,
    then one warm restart per cycle from the weights of the run before, the last one in ``out``."""
    cycles = tcfg.cycles or []
    dirs = [ckpt.stage_dir(out, k) for k in range(len(cycles))] + [Path(out)]
    main = replace(tcfg, cycles=None)
    runs = [main] + [replace(main, max_steps=n, seed=tcfg.seed + k, anneal_start=0.0, anneal_end=0.0,
                             init_from=str(dirs[k - 1])) for k, n in enumerate(cycles, start=1)]
    return list(zip(runs, dirs))


def _stage_end(out: Path, tcfg: TrainConfig) -> str | None:
    """How the run in ``out`` ended: "done" (all its steps), "target" (stop_at_val_loss) or None."""
    if not (out / "config.json").is_file():
        return None
    cfg = ckpt.read_config(out)
    if cfg.get("step", 0) >= tcfg.max_steps:
        return "done"
    target, val = tcfg.stop_at_val_loss, cfg.get("val_loss")
    return "target" if target is not None and val is not None and val <= target else None


def last_run(tcfg: TrainConfig, out: Path) -> Path:
    """Where training into ``out`` got to: ``out`` itself, or the stage (cycles) that ended or paused the chain."""
    for tcfg_k, out_k in stages(tcfg, Path(out)):
        if _stage_end(out_k, tcfg_k) != "done":
            return out_k
    return Path(out)


def train_stages(mcfg: ModelConfig, tcfg: TrainConfig, out: Path, progress: bool = True,
                 command: str | None = None, profile: str | None = None) -> GPT:
    """Train the runs of ``stages`` in turn, each an ordinary run (resumed where it stopped; one
    that ended is not run again). A run that reaches stop_at_val_loss ends the chain there, and
    stop_at_step (a step of whichever run is going) pauses it: the same command carries on."""
    for tcfg_k, out_k in stages(tcfg, out):
        model, end = None, _stage_end(out_k, tcfg_k)
        if end is None:
            model = train(mcfg, tcfg_k, out_k, progress, command, profile)
            end = _stage_end(out_k, tcfg_k)
        if end != "done":
            break
    return model if model is not None else ckpt.load(out_k, device=pick_device(tcfg.device))


def train_profile(profile_name: str, out: str | os.PathLike, dense: bool = False, seed: int | None = None,
                  max_steps: int | None = None, overrides: list[str] | None = None, command: str | None = None,
                  progress: bool = True) -> tuple[dict, str] | None:
    """What ``cspkit train`` does: train (or resume) a profile's run into ``out`` and summarize
    it; None on every process but the first under torchrun (one summary per run)."""
    mcfg, tcfg = config_for(profile_name, dense=dense, seed=seed, max_steps=max_steps, overrides=overrides)
    train(mcfg, tcfg, out, progress=progress, command=command, profile=resolve_profile(profile_name))
    if _dist_info()[0] != 0:
        return None
    last = last_run(tcfg, Path(out))  # with cycles, a stage's directory where the chain stopped early
    cfg = ckpt.read_config(last)
    return ({"out": str(last), "step": cfg.get("step"), "val_loss": cfg.get("val_loss")},
            f"trained {profile_name}{' (dense)' if tcfg.dense else ''} to step {cfg.get('step')}: "
            f"val loss {cfg.get('val_loss')} -> {last}")
