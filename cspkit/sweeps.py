"""Circuit sizes over models x tasks x targets x pruning seeds: the sparse-against-dense
comparison of the paper (docs/method.md, "Sparse against dense").

One results file holds every finished run, written atomically after each one, so a killed
sweep resumes by skipping what is done (failed runs are tried again); a later sweep into the
same file adds its models, tasks, targets and seeds to the file's grid. A run is one
(model, task, target, seed):

- ``ok``: pruned; nodes, edges, the calibrated held-out loss reached, seconds;
- ``unsolved``: the full model's own held-out loss is above the target, so no circuit can
  reach it (reported, not dropped);
- ``failed``: pruning raised; the reason is kept.

``smallest`` reduces sweeps made with different pruning configs (a lower k_coef, say) to the
smallest circuit of each run, the per-task hyperparameter search the paper runs.

Every run records the full model's held-out loss. The summary gives, per model and seed, the
geometric mean of edges over the tasks that model can do, and over the tasks every model in
the file can do (the fair comparison: a model that solves only easy tasks is not rewarded for
it); and the ratio dense / sparse of the latter, per seed, with its spread. ``run_controls``
adds the faithfulness controls of cspkit.validate for chosen tasks.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import tasks as tasks_mod
from .ablation import check_ablation, fingerprint, node_means, node_widths
from .checkpoint import git_commit, load, read_config
from .circuit import geometric_mean, split_pairs
from .config import PruneConfig, SweepConfig, to_dict
from .files import atomic_write
from .model import GPT
from .pruning import RankedLoss, prune
from .validation import validate

FORMAT = "cspkit.sweep/1"


def model_key(path: str | os.PathLike) -> str:
    return os.path.normpath(str(path))


def full_model_loss(model: GPT, task, cfg: PruneConfig, ablation: str) -> float:
    """The full model's calibrated held-out task loss, measured on the pairs prune() measures it on."""
    fit, heldout = split_pairs(tasks_mod.get(task), cfg)
    everything = [(loc, i) for loc, w in node_widths(model.config).items() for i in range(w)]
    return RankedLoss(model, everything, fit[:cfg.calib_pairs], heldout, ablation, cfg.calib_steps)(len(everything))


class _Runner:
    """Runs units in one process, loading each model once and measuring each full-model loss once
    (the loss is the same for every target and seed)."""

    def __init__(self, ablation: str, cfg: PruneConfig, models: dict[str, GPT] | None = None,
                 progress: bool = False, device: str = "cpu"):
        self.ablation, self.cfg, self.progress, self.device = ablation, cfg, progress, device
        self.models = dict(models or {})
        self.full: dict[tuple[str, str], float] = {}

    def __call__(self, unit: dict[str, Any]) -> dict[str, Any]:
        key, task, target, seed = unit["model"], unit["task"], unit["target"], unit["seed"]
        t0 = time.time()
        row = {**unit, "threads": torch.get_num_threads(), "device": str(self.device)}
        try:
            if key not in self.models:
                self.models[key] = load(key, device=self.device)
            model = self.models[key]
            if (key, task) not in self.full:
                self.full[key, task] = full_model_loss(model, task, self.cfg, self.ablation)
            row["full_loss"] = self.full[key, task]
            if row["full_loss"] > target:
                return {**row, "status": "unsolved", "seconds": round(time.time() - t0, 2),
                        "reason": f"the full model's held-out loss {row['full_loss']:.4f} is above the target {target}"}
            c = prune(model, task, target, self.ablation, seed, self.cfg, progress=self.progress)
        except Exception as e:  # noqa: BLE001 -- one task failing must not stop the sweep; the reason is kept
            return {**row, "status": "failed", "seconds": round(time.time() - t0, 2),
                    "reason": f"{type(e).__name__}: {e}"}
        return {**row, "status": "ok", "nodes": c.n_nodes, "edges": c.n_edges, "loss": c.loss,
                "seconds": c.seconds, "mask_nodes": c.mask_nodes, "mask_loss": c.mask_loss, "collapsed": c.collapsed}


_worker: _Runner | None = None


def _init_worker(ablation: str, cfg: dict, device: str) -> None:
    global _worker
    torch.set_num_threads(1)  # N processes share the cores; more threads each would oversubscribe them
    _worker = _Runner(ablation, PruneConfig.from_dict(cfg), device=device)


def _work(unit: dict[str, Any]) -> dict[str, Any]:
    return _worker(unit)


def run_key(r: dict) -> tuple:
    return r["model"], r["task"], float(r["target"]), int(r["seed"])


def _union(old: list, new: list) -> list:
    return old + [x for x in new if x not in old]


def open_results(path: str | os.PathLike, cfg: SweepConfig, models: dict[str, GPT]) -> dict[str, Any]:
    """The results file at ``path`` with ``cfg``'s grid merged in, or a new one. Finished runs are
    only reused if they were made with the same ablation, pruning config and model weights."""
    path = Path(path)
    info = {}
    for key, m in models.items():
        meta = read_config(key)
        info[key] = {"name": Path(key).name, "dense": bool(meta.get("dense")), "val_loss": meta.get("val_loss"),
                     "step": meta.get("step"), "params": sum(p.numel() for p in m.parameters()),
                     "fingerprint": fingerprint(m)}
    grid = {"models": list(models), "tasks": list(cfg.tasks), "targets": [float(t) for t in cfg.targets],
            "seeds": [int(s) for s in cfg.seeds]}
    prune_cfg = to_dict(cfg.prune)
    if not path.is_file():
        return {"format": FORMAT, "ablation": cfg.ablation, "prune_config": prune_cfg, "grid": grid,
                "models": info, "runs": [], "controls": {}}
    res = _read(path, "pass a new --out")
    fix = f"write to a new --out, or delete {path} to start over"
    if any("tried" in r for r in res["runs"]):
        raise ValueError(f"{path} holds the smallest circuits of several sweeps (cspkit sweep-merge --smallest), "
                         "whose runs were made with different configs; sweep into a new --out and merge it in")
    if res["ablation"] != cfg.ablation:
        raise ValueError(f"{path} holds runs with {res['ablation']} ablation, not {cfg.ablation}; {fix}")
    if res["prune_config"] != prune_cfg:
        diff = {k: (res["prune_config"].get(k), v) for k, v in prune_cfg.items() if res["prune_config"].get(k) != v}
        raise ValueError(f"{path} holds runs made with another pruning config (file, now: {diff}); {fix}")
    _add(res, info, grid, f"{path}; {fix}")
    return res


def _read(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    res = json.loads(Path(path).read_text())
    if res.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cspkit sweep results file (format {res.get('format')!r}); {fix}")
    # a file written before a PruneConfig field existed reads as it was made (PruneConfig.from_dict)
    res["prune_config"] = to_dict(PruneConfig.from_dict(res["prune_config"]))
    return res


def _add(res: dict[str, Any], info: dict[str, Any], grid: dict[str, list], where: str) -> None:
    """Merge models ``info`` and ``grid`` into the results ``res``; a model already there must
    have the same weights (``where`` names the results in the error)."""
    for key, new in info.items():
        old = res["models"].get(key)
        if old and old["fingerprint"] != new["fingerprint"]:
            raise ValueError(f"the weights of {key} differ from those in {where} (fingerprint "
                             f"{old['fingerprint']}, now {new['fingerprint']})")
    res["models"].update(info)
    res["grid"] = {k: _union(res["grid"][k], v) for k, v in grid.items()}


def _spread(per_seed: dict[str, float | None], floor: float = 1.0) -> dict[str, Any]:
    vals = [v for v in per_seed.values() if v is not None]
    return {"per_seed": per_seed, "gmean": geometric_mean(vals, floor) if vals else None,
            "min": min(vals) if vals else None, "max": max(vals) if vals else None}


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Per target: which tasks each model can do, geometric means of edges per model and seed,
    and the dense / sparse ratios. Recomputed from the runs at every write."""
    grid, runs = res["grid"], {run_key(r): r for r in res["runs"]}
    models, task_names, seeds = grid["models"], grid["tasks"], grid["seeds"]
    pending = [(m, t, tg, s) for m in models for t in task_names for tg in grid["targets"] for s in seeds
               if (m, t, tg, s) not in runs or runs[m, t, tg, s]["status"] == "failed"]
    out: dict[str, Any] = {"complete": not pending, "pending": len(pending), "targets": {}}
    for target in grid["targets"]:
        def ok(m, t, s, target=target):
            r = runs.get((m, t, target, s))
            return r if r and r["status"] == "ok" else None

        common = [t for t in task_names if all(ok(m, t, s) for m in models for s in seeds)]
        per_model = {}
        for m in models:
            mine = [runs[m, t, target, s] for t in task_names for s in seeds if (m, t, target, s) in runs]
            own = {str(s): [ok(m, t, s)["edges"] for t in task_names if ok(m, t, s)] for s in seeds}
            per_model[m] = {
                "can_do": sorted({r["task"] for r in mine if r.get("full_loss") is not None
                                  and r["full_loss"] <= target}, key=task_names.index),
                "cannot_do": {r["task"]: r["full_loss"] for r in mine if r["status"] == "unsolved"},
                "failed": [{"task": r["task"], "seed": r["seed"], "reason": r["reason"]}
                           for r in mine if r["status"] == "failed"],
                "collapsed": [{k: r[k] for k in ("task", "seed", "mask_nodes", "mask_loss")}
                              for r in mine if r.get("collapsed")],
                "tasks_per_seed": {s: len(v) for s, v in own.items()},
                "gm_edges": _spread({s: geometric_mean(v) if v else None for s, v in own.items()}),
                "gm_edges_common": _spread({str(s): geometric_mean([ok(m, t, s)["edges"] for t in common]) if common
                                            else None for s in seeds}),
            }
        ratios = []
        for d in (m for m in models if res["models"][m]["dense"]):
            for sp in (m for m in models if not res["models"][m]["dense"]):
                # over the tasks both models of the pair can do, so that a pair's ratio does not
                # change with the other models in the file
                both = [t for t in task_names if all(ok(m, t, s) for m in (d, sp) for s in seeds)]
                per_seed = {str(s): geometric_mean([ok(d, t, s)["edges"] for t in both])
                            / geometric_mean([ok(sp, t, s)["edges"] for t in both]) if both else None for s in seeds}
                ratios.append({"dense": d, "sparse": sp, "tasks": both, "val_loss": [
                    res["models"][d]["val_loss"], res["models"][sp]["val_loss"]], **_spread(per_seed, floor=0.0)})
        out["targets"][str(target)] = {"tasks_all_can_do": common, "models": per_model, "ratios": ratios}
    return out


def _write(path: Path, res: dict[str, Any]) -> None:
    g = res["grid"]  # every run is in the grid: it is the union of all that was asked
    res["runs"].sort(key=lambda r: (g["models"].index(r["model"]), g["tasks"].index(r["task"]), r["target"], r["seed"]))
    res["summary"] = summarize(res)
    res["git_commit"] = git_commit()  # of the last write; each run records its own
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(res, indent=1) + "\n")


def check_sweep(cfg: SweepConfig) -> SweepConfig:
    """``cfg`` with its tasks filled in (None: every registered task), or a clear error for a bad
    ablation, task name, empty list or model path, before any work."""
    cfg = replace(cfg, tasks=list(cfg.tasks) if cfg.tasks is not None else tasks_mod.names())
    check_ablation(cfg.ablation)
    for t in cfg.tasks:
        tasks_mod.get(t)
    for name, v in (("models", cfg.models), ("tasks", cfg.tasks), ("targets", cfg.targets), ("seeds", cfg.seeds)):
        if not v:
            raise ValueError(f"a sweep needs at least one of {name}")
    for m in cfg.models:
        read_config(m)
    return cfg


def sweep(cfg: SweepConfig, out: str | os.PathLike, jobs: int = 1, progress: bool = True,
          device: str = "cpu") -> dict[str, Any]:
    """Prune every (model, task, target, seed) of ``cfg`` not yet finished in the results file
    ``out`` on ``device``; returns the results (also written to ``out`` after every run).

    >>> import tempfile, cspkit
    >>> from cspkit.config import PruneConfig, SweepConfig
    >>> cfg = SweepConfig(models=[str(cspkit.paths.model_path("small-hour"))], tasks=["single_double_quote"],
    ...                   prune=PruneConfig(steps=20))
    >>> res = cspkit.sweep(cfg, tempfile.mkdtemp() + "/sweep.json", progress=False)
    >>> [run["status"] for run in res["runs"]]
    ['ok']
    """
    cfg = check_sweep(cfg)
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, not {jobs}")
    out = Path(out)
    models = {model_key(p): load(p, device=device) for p in cfg.models}
    res = open_results(out, cfg, models)
    done = {run_key(r) for r in res["runs"] if r["status"] != "failed"}
    units = [{"model": m, "task": t, "target": float(tg), "seed": int(s)}
             for m in models for t in cfg.tasks for tg in cfg.targets for s in cfg.seeds]
    units = [u for u in units if run_key(u) not in done]
    if units and cfg.ablation == "mean":
        for m in models.values():
            node_means(m)  # computed here once and cached beside the weights, not by every worker at once

    commit = git_commit()  # per run: a file's runs may come from several commits

    def record(row: dict[str, Any]) -> None:
        row = {**row, "git_commit": commit}
        res["runs"] = [r for r in res["runs"] if run_key(r) != run_key(row)] + [row]
        _write(out, res)
        bar.update()
        cell = f"{row['edges']} edges" if row["status"] == "ok" else row["status"]
        bar.set_postfix_str(f"{Path(row['model']).name} {row['task']} seed {row['seed']}: {cell}")

    bar = tqdm(total=len(units), desc="sweep", disable=not progress)
    try:
        if jobs == 1:
            run = _Runner(cfg.ablation, cfg.prune, models, progress, device)
            for u in units:
                record(run(u))
        elif units:
            ex = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_init_worker, initargs=(cfg.ablation, to_dict(cfg.prune), device))
            try:
                for fut in as_completed([ex.submit(_work, u) for u in units]):
                    record(fut.result())
            finally:
                ex.shutdown(wait=False, cancel_futures=True)
    finally:
        bar.close()
    if not out.is_file():  # nothing was left to run, but the file should still say so
        _write(out, res)
    return res


def _read_alike(paths: list[str | os.PathLike], keys: tuple[str, ...], why: str) -> list[dict[str, Any]]:
    """The results files at ``paths``, which must agree with the first on ``keys`` (``why`` says
    why in the error)."""
    files = [_read(p, "merge only files written by cspkit sweep") for p in paths]
    for p, f in zip(paths[1:], files[1:]):
        for k in keys:
            if f[k] != files[0][k]:
                raise ValueError(f"{p} was swept with another {k} than {paths[0]} ({f[k]} vs {files[0][k]}); {why}")
    return files


def run_config(res: dict[str, Any], run: dict[str, Any]) -> PruneConfig:
    """The pruning config ``run`` was made with: the file's, with what a search changed for it."""
    return PruneConfig.from_dict({**res["prune_config"], **run.get("prune_set", {})})


def _rank(i: int, r: dict[str, Any]) -> tuple:
    # a circuit beats a model that cannot do the task, which beats a failure; among circuits the
    # fewest edges, then nodes, then the earlier file
    if r["status"] == "ok":
        return 0, r["edges"], r["nodes"], i
    return (1 if r["status"] == "unsolved" else 2), 0, 0, i


def smallest(paths: list[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Sweeps of the same models made with different pruning configs (the default penalty and a
    lower one, say), reduced to the smallest circuit of each (model, task, target, seed): the
    per-task hyperparameter search the paper runs. Every circuit reached the target on the
    held-out train pairs, so the test split decides nothing. A kept run records what its config
    changes from the file's (the first file's) as ``prune_set`` and every config's circuit as
    ``tried``; a file's controls are kept only for the runs kept from it."""
    if len(paths) < 2:
        raise ValueError("--smallest needs at least two results files, swept with different pruning configs")
    files = _read_alike(paths, ("ablation",), "a search compares configs of one ablation")
    base = files[0]
    res = {**base, "runs": [], "controls": {}}
    for p, f in zip(paths[1:], files[1:]):
        _add(res, f["models"], f["grid"], f"the files before {p}")
    candidates: dict[tuple, list[tuple[int, dict]]] = {}
    for i, f in enumerate(files):
        for r in f["runs"]:
            full = {**f["prune_config"], **r.get("prune_set", {})}
            changed = {k: v for k, v in full.items() if base["prune_config"].get(k) != v}
            r = {k: v for k, v in r.items() if k not in ("prune_set", "tried")}
            candidates.setdefault(run_key(r), []).append((i, {**r, "prune_set": changed} if changed else r))
    origin = {}
    for key, cands in candidates.items():
        i, best = min(cands, key=lambda c: _rank(*c))
        origin[key] = i
        tried = [{"prune_set": r.get("prune_set", {}), "status": r["status"], "nodes": r.get("nodes"),
                  "edges": r.get("edges"), "seconds": r["seconds"]} for _, r in cands]
        res["runs"].append({**best, "tried": tried})
    for i, f in enumerate(files):
        for key, per_task in f.get("controls", {}).items():
            for task, entry in per_task.items():
                if origin.get((key, task, float(entry["target"]), int(entry["seed"]))) == i:
                    res["controls"].setdefault(key, {})[task] = entry
    _write(Path(out), res)
    return res


def merge(paths: list[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """One results file from several (swept on a GPU and on a CPU, say), written to ``out``: they
    must share the ablation and pruning config, and a model in two files the same weights."""
    if not paths:
        raise ValueError("merge needs at least one results file")
    res, *rest = _read_alike(paths, ("ablation", "prune_config"), "only runs made the same way can be merged")
    for p, new in zip(paths[1:], rest):
        _add(res, new["models"], new["grid"], f"the files before {p}")
        have = {run_key(r) for r in res["runs"] if r["status"] != "failed"}
        incoming = {run_key(r) for r in new["runs"]}
        # a failure is replaced by the other file's run of the same unit; a finished run is kept
        res["runs"] = [r for r in res["runs"] if r["status"] != "failed" or run_key(r) not in incoming]
        res["runs"] += [r for r in new["runs"] if run_key(r) not in have]
        for key, per_task in new.get("controls", {}).items():
            res["controls"].setdefault(key, {}).update(per_task)
    _write(Path(out), res)
    return res


def run_controls(out: str | os.PathLike, task_names: list[str], seed: int | None = None, draws: int = 4,
                 n_test: int | None = None, progress: bool = True, device: str = "cpu") -> dict[str, Any]:
    """The faithfulness controls of cspkit.validate (re-initialized weights, random labels and the
    rest) for each model's circuit of each task, at the first target, written into the results
    file under "controls". The circuit is pruned again with the sweep's config and seed."""
    out = Path(out)
    res = _read(out, "run the sweep into it first")
    target = res["grid"]["targets"][0]
    seed = res["grid"]["seeds"][0] if seed is None else seed
    runs = {run_key(r): r for r in res["runs"]}
    for key in res["grid"]["models"]:
        for task in task_names:
            tasks_mod.get(task)
            entry = res["controls"].setdefault(key, {})
            if task in entry and entry[task]["seed"] == seed and entry[task]["target"] == target:
                continue
            run = runs.get((key, task, target, seed))
            if run is None or run["status"] != "ok":
                why = run["reason"] if run else "the sweep has no run for it"
                entry[task] = {"target": target, "seed": seed, "rows": [], "note": f"no circuit: {why}"}
            else:
                c = prune(load(key, device=device), task, target, res["ablation"], seed, run_config(res, run),
                          progress=progress)
                same = (c.n_nodes, c.n_edges) == (run["nodes"], run["edges"])
                rows = validate(c, n_test=n_test, draws=draws, seed=seed, progress=progress)
                entry[task] = {"target": target, "seed": seed, "rows": [asdict(r) for r in rows],
                               "note": "" if same else f"pruned again: {c.n_nodes} nodes, {c.n_edges} edges, "
                                                       f"not the sweep's {run['nodes']} and {run['edges']}"}
            _write(out, res)
    return res


def find_run(res: dict[str, Any], model: str | os.PathLike, task: str, seed: int,
             target: float | None = None) -> dict[str, Any]:
    """The run of (model, task, seed) at ``target`` (default: the first) in sweep results."""
    target = res["grid"]["targets"][0] if target is None else target
    want = (model_key(model), task, float(target), int(seed))
    for r in res["runs"]:
        if run_key(r) == want:
            return r
    raise KeyError(f"no run of {model} on {task} with seed {seed} at target {target} in these results")


def edges_gmean(res: dict[str, Any], model: str | os.PathLike, task_names: list[str],
                target: float | None = None) -> dict[str, Any]:
    """The geometric mean of ``model``'s circuit edges over ``task_names`` at ``target`` (default:
    the first), per seed and over the seeds [min, max]: what the summary gives for the tasks every
    model can do, for any list of tasks (an empty circuit counts as 1 edge)."""
    return _spread({str(s): geometric_mean([find_run(res, model, t, s, target)["edges"] for t in task_names])
                    for s in res["grid"]["seeds"]})


def find_ratio(res: dict[str, Any], dense: str | os.PathLike, sparse: str | os.PathLike,
               target: float | None = None) -> dict[str, Any]:
    """The summary's dense / sparse ratio of that pair at ``target`` (default: the first)."""
    target = res["grid"]["targets"][0] if target is None else target
    want = (model_key(dense), model_key(sparse))
    for r in res["summary"]["targets"][str(float(target))]["ratios"]:
        if (r["dense"], r["sparse"]) == want:
            return r
    raise KeyError(f"no ratio of {dense} over {sparse} at target {target} in these results")


def _name(res: dict[str, Any], key: str) -> str:
    names = [v["name"] for v in res["models"].values()]
    name = res["models"][key]["name"]
    return name if names.count(name) == 1 else key


def _num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _tried(res: dict[str, Any], r: dict[str, Any], searched: list[str]) -> str:
    if "tried" not in r:
        return ""

    def made_with(changed: dict[str, Any]) -> str:
        cfg = {**res["prune_config"], **changed}
        return ", ".join(f"{k}={cfg[k]}" for k in searched)
    each = "; ".join(f"{made_with(t['prune_set'])}: {t['edges'] if t['status'] == 'ok' else t['status']}"
                     for t in r["tried"])
    return f"  {made_with(r.get('prune_set', {}))} (edges: {each})"


def collapse_note(r: dict[str, Any]) -> str:
    """A pruning whose masks collapsed, said where its size is printed ("" otherwise)."""
    if not r.get("collapsed"):
        return ""
    return f"  (masks collapsed: their own {r['mask_nodes']} nodes reach held-out loss {r['mask_loss']:.3f})"


def format_summary(res: dict[str, Any]) -> str:
    """The human table: one line per finished (model, task, seed), one per task a model cannot do,
    then the geometric means and the dense / sparse ratios, for every target."""
    summ = res["summary"]
    lines = [f"{res['ablation']} ablation; loss = calibrated held-out task loss; geometric means count a "
             f"circuit with no edges as 1" + ("" if summ["complete"] else f"; {summ['pending']} runs pending")]
    searched = sorted({k for r in res["runs"] for t in r.get("tried", []) for k in t["prune_set"]})
    if any("tried" in r for r in res["runs"]):
        lines.append(f"a run with {', '.join(searched)} at its end is the smallest circuit of those its configs "
                     "reached (sweep-merge --smallest); seconds are the kept run's")
    for target, s in summ["targets"].items():
        lines += ["", f"target {target}",
                  f"{'task':28s} {'model':16s} {'seed':>4s} {'nodes':>6s} {'edges':>7s} {'loss':>7s} {'seconds':>8s}"]
        for key in res["grid"]["models"]:
            for t in res["grid"]["tasks"]:
                rows = [r for r in res["runs"] if r["model"] == key and r["task"] == t and r["target"] == float(target)]
                for r in rows:
                    if r["status"] == "unsolved":
                        if r is rows[0]:
                            lines.append(f"{t:28s} {_name(res, key):16s}    - cannot do: full model's loss "
                                         f"{r['full_loss']:.3f}")
                    elif r["status"] == "failed":
                        lines.append(f"{t:28s} {_name(res, key):16s} {r['seed']:>4d} failed: {r['reason']}")
                    else:
                        lines.append(f"{t:28s} {_name(res, key):16s} {r['seed']:>4d} {r['nodes']:>6d} "
                                     f"{r['edges']:>7d} {r['loss']:>7.4f} {r['seconds']:>8.0f}"
                                     + _tried(res, r, searched) + collapse_note(r))
        common = s["tasks_all_can_do"]
        lines += ["", f"geometric mean of edges over the tasks a model can do (own) and those every model can do "
                      f"(common: {', '.join(common) or 'none'}); gmean over seeds [min, max]"]
        for key, m in s["models"].items():
            for label, g in ((f"own ({len(m['can_do'])})", m["gm_edges"]),
                             (f"common ({len(common)})", m["gm_edges_common"])):
                per = ", ".join(f"seed {k}: {_num(v, '.1f')}" for k, v in g["per_seed"].items())
                lines.append(f"  {_name(res, key):16s} {label:15s} {_num(g['gmean'], '.1f'):>8s}  "
                             f"[{_num(g['min'], '.1f')}, {_num(g['max'], '.1f')}]  ({per})")
        for r in s["ratios"]:
            per = ", ".join(f"seed {k}: {_num(v, '.2f')}" for k, v in r["per_seed"].items())
            vd, vs = r.get("val_loss") or (None, None)
            lines.append(f"  ratio {_name(res, r['dense'])} / {_name(res, r['sparse'])} (over the "
                         f"{len(r['tasks'])} tasks both can do: {', '.join(r['tasks']) or 'none'}): "
                         f"{_num(r['gmean'], '.2f')}  [{_num(r['min'], '.2f')}, {_num(r['max'], '.2f')}]  ({per}; "
                         f"val loss {_num(vd, '.3f')} vs {_num(vs, '.3f')})")
    hours = sum(sum(t["seconds"] for t in r["tried"]) if "tried" in r else r.get("seconds", 0.0)
                for r in res["runs"]) / 3600
    lines += ["", f"pruning time: {hours:.2f} h, the runs' seconds summed (runs in parallel overlap; a search's "
                  "every config)"]
    if res.get("controls"):
        lines += ["", "controls: cspkit.validate rows per model and task in the file's \"controls\""]
    return "\n".join(lines)


def sweep_report(cfg: SweepConfig, out: str | os.PathLike, jobs: int = 1, device: str = "cpu",
                 controls: list[str] | None = None, progress: bool = True) -> tuple[dict[str, Any], str]:
    """What ``cspkit sweep`` does: ``sweep``, then the controls of ``controls``' circuits; the
    results and their summary."""
    res = sweep(cfg, out, jobs=jobs, progress=progress, device=device)
    if controls:
        res = run_controls(out, controls, progress=progress, device=device)
    return res, format_summary(res) + f"\n-> {out}"


def merge_report(paths: list[str | os.PathLike], out: str | os.PathLike, keep_smallest: bool = False,
                 controls: list[str] | None = None, progress: bool = True) -> tuple[dict[str, Any], str]:
    """What ``cspkit sweep-merge`` does: ``merge`` (or ``smallest``), then the controls the merged
    file lacks; the results and their summary."""
    res = (smallest if keep_smallest else merge)(paths, out)
    if controls:
        res = run_controls(out, controls, progress=progress)
    return res, format_summary(res) + f"\n-> {out}"
