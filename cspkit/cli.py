"""The ``cspkit`` command line. Every command prints a human summary, or one JSON object with --json."""
from __future__ import annotations

import argparse
import json
import shlex
import os
import sys
from pathlib import Path

import torch


def _emit(args, obj: dict, human: str) -> None:
    print(json.dumps(obj) if getattr(args, "json", False) else human)


def cmd_train(args) -> None:
    from .config import resolve_profile
    from .train import config_for, last_run, train
    mcfg, tcfg = config_for(args.profile, dense=args.dense, seed=args.seed, max_steps=args.max_steps,
                            overrides=args.overrides)
    command = "cspkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    train(mcfg, tcfg, args.out, progress=not args.json, command=command, profile=resolve_profile(args.profile))
    from .checkpoint import read_config
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, one summary (one JSON object), from rank 0
        return
    out = last_run(tcfg, args.out)  # with cycles, a stage's directory where the chain stopped early
    cfg = read_config(out)
    _emit(args, {"out": str(out), "step": cfg.get("step"), "val_loss": cfg.get("val_loss")},
          f"trained {args.profile}{' (dense)' if tcfg.dense else ''} to step {cfg.get('step')}: "
          f"val loss {cfg.get('val_loss')} -> {out}")


def cmd_info(args) -> None:
    from .checkpoint import eval_rows, load, read_chain_log, training_seconds
    from .sparsity import density_report, format_density
    model = load(args.dir)
    # a run with warm restarts (cycles) reads as one, its steps counted from its first stage
    log = read_chain_log(args.dir)
    seconds = training_seconds(log)
    rep = density_report(model)
    n_params = sum(p.numel() for p in model.parameters())
    meta = model.checkpoint
    # the checkpoint's step is its own stage's; the chain's counts from the first stage
    chain_step, last_stage = (log[-1]["step"], log[-1]["stage"]) if log else (meta.get("step"), 0)
    obj = {"config": model.config.__dict__, "params": n_params, "step": meta.get("step"), "chain_step": chain_step,
           "val_loss": meta.get("val_loss"), "dense": meta.get("dense"), "tokenizer": meta.get("tokenizer"),
           "density": rep, "training_seconds": seconds}
    step = f"step {meta.get('step')}" + (f" of stage {last_stage} ({chain_step} from the start of stage 0)"
                                         if last_stage else "")
    lines = [f"{args.dir}: {n_params:,} parameters, {step}, val loss {meta.get('val_loss')}, "
             f"{'dense' if meta.get('dense') else 'weight-sparse'}",
             "model: " + ", ".join(f"{k}={v}" for k, v in model.config.__dict__.items()),
             format_density(rep)]
    if seconds:
        per_stage = f" ({', '.join(f'stage {k}: {t / 3600:.2f} h' for k, t in enumerate(seconds))})"
        lines.append(f"training time: {sum(seconds) / 3600:.2f} h{per_stage if len(seconds) > 1 else ''}, "
                     "the log's seconds summed over resumed parts")
    if args.evals or args.against:
        rows = eval_rows(log)
        obj["evals"] = rows
        names = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("task/")})
        ref = {}
        if args.against:
            ref_rows = eval_rows(read_chain_log(args.against))
            if not ref_rows:
                raise ValueError(f"--against {args.against}: no evaluations there; give a run directory "
                                 "(or its log.jsonl) whose log has val_loss rows")
            ref = {r["step"]: r for r in ref_rows}
            obj["against"] = {"dir": str(args.against), "evals": [ref[r["step"]] for r in rows if r["step"] in ref]}
        nan = float("nan")

        def line(r: dict, head: str) -> str:
            return f"{head} {r.get('l0', nan):6.3f} {r['val_loss']:8.3f}" + "".join(
                f" {r.get(f'task/{n}/loss', nan):10.3f} / {r.get(f'task/{n}/accuracy', nan):5.3f}" for n in names)
        lines += ["", "evaluations; each task: loss / accuracy"
                  + (f"; under each step, {args.against} at that step" if ref else ""),
                  f"{'step':>6s} {'tokens':>11s} {'l0':>6s} {'val loss':>8s}"
                  + "".join(f" {n[:18]:>18s}" for n in names)]
        for r in rows:
            lines.append(line(r, f"{r['step']:6d} {r['tokens']:11,d}"))
            if ref:
                lines.append(line(ref[r["step"]], f"{'':6s} {'against':>11s}") if r["step"] in ref
                             else f"{'':6s} {'against':>11s} (no evaluation at this step)")
    _emit(args, obj, "\n".join(lines))


def cmd_sample(args) -> None:
    from .checkpoint import load
    model = load(args.dir)
    enc = model.encoding
    idx = torch.tensor([enc.encode_ordinary(args.prompt) or [enc.eot_token]])
    g = torch.Generator().manual_seed(args.seed)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=g)
    text = enc.decode(out[0, idx.shape[1]:].tolist())
    _emit(args, {"prompt": args.prompt, "completion": text}, args.prompt + text)


def cmd_tasks(args) -> None:
    from . import tasks
    if args.corpus and not args.evidence:
        raise ValueError("--corpus only applies with --evidence (cspkit tasks --evidence --corpus PATH ...)")
    if args.evidence:
        from . import natural
        rows = natural.evidence(args.corpus)
        _emit(args, {"evidence": rows}, natural.format_evidence(rows))
        return
    rows = []
    for name in tasks.names():
        t = tasks.get(name)
        p = t.pairs("train", n=1, seed=args.seed)[0]
        rows.append({"task": name, "description": t.description, "candidates": [p.cand_a, p.cand_b],
                     "example": {"prompt_a": p.prompt_a, "prompt_b": p.prompt_b}})
    human = []
    for r in rows:
        tail_a = r["example"]["prompt_a"].rsplit("\n", 1)[-1]
        tail_b = r["example"]["prompt_b"].rsplit("\n", 1)[-1]
        human.append(f"{r['task']:28s} {r['description']}\n{'':28s} A: ...{tail_a!r} -> {r['candidates'][0]!r}\n"
                     f"{'':28s} B: ...{tail_b!r} -> {r['candidates'][1]!r}")
    _emit(args, {"tasks": rows}, "\n".join(human))


def cmd_viz(args) -> None:
    from .checkpoint import load
    from .circuit import Circuit
    from .viz import circuit_graph
    circuit = Circuit.load(args.circuit, model=load(args.model) if args.model else None)
    if circuit.model is None:
        raise ValueError(f"{args.circuit} does not name its model (no model_path); pass --model DIR")
    net = circuit_graph(circuit, n_pairs=args.pairs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    net.write_html(args.out)
    if args.graphml:
        args.graphml.parent.mkdir(parents=True, exist_ok=True)
        net.write_graphml(args.graphml)
    obj = {"circuit": str(args.circuit), "task": circuit.task, "nodes": circuit.n_nodes, "edges": circuit.n_edges,
           "html": str(args.out), "html_bytes": args.out.stat().st_size,
           "graphml": str(args.graphml) if args.graphml else None}
    _emit(args, obj, f"{circuit.task} circuit, {circuit.n_nodes} nodes and {circuit.n_edges} edges -> {args.out} "
                     f"({obj['html_bytes'] / 1e3:.0f} kB, self-contained, works offline)"
                     + (f" and {args.graphml}" if args.graphml else ""))


def cmd_eval(args) -> None:
    from . import tasks
    from .checkpoint import load
    names = tasks.names() if args.task == "all" else args.task.split(",")
    scored = {n: tasks.get(n) for n in names}
    unmined: list[str] = []
    if args.natural:
        from . import natural
        corpus = natural.real_code_corpus(args.model[0])
        for n in natural.TASKS:
            try:
                scored[f"{n}_natural"] = natural.mine(n, corpus=corpus)
            except ValueError as e:   # no example of it in these validation files
                unmined.append(str(e))
    out = []
    for path in args.model:
        model = load(path, device=args.device)
        results = [tasks.evaluate(model, t, args.split, n=args.n) for t in scored.values()]
        if args.detail:
            for r in results:
                p = scored[r["task"]].pairs(args.split, n=1)[0]
                r["example"] = [(prompt, want, tasks.next_tokens(model, prompt))
                                for prompt, want in ((p.prompt_a, p.cand_a), (p.prompt_b, p.cand_b))]
        out.append({"model": str(path), "results": results})
    for m in out:   # the natural examples test the same tasks again: they are not counted twice
        m["solved"] = len(tasks.solved([r for r in m["results"] if r["task"] in names]))
    res = {"split": args.split, "chance_loss": 0.6931, "chance_accuracy": 0.5, "models": out}
    if args.natural:
        res["natural_unmined"] = unmined
    human = "\n".join([tasks.format_scores(res), *unmined]) + (
        "\n\n" + tasks.format_detail(res) if args.detail else "")
    _emit(args, res, human)


def cmd_prune(args) -> None:
    from . import tasks
    from .checkpoint import load
    from .prune import prune
    names = tasks.names() if args.task == "all" else [args.task]
    for n in names:
        tasks.get(n)
    cfg = _prune_config(args.set)
    model = load(args.model)
    rows, lines = [], []
    for n in names:
        out = args.out / f"{n}.json" if args.task == "all" else args.out
        try:
            c = prune(model, n, args.target, args.ablation, args.seed, cfg, progress=not args.json)
        except ValueError as e:
            if args.task != "all":
                raise
            rows.append({"task": n, "error": str(e)})
            lines.append(f"{n:28s} not pruned: {e}")
            continue
        c.save(out)
        rows.append({"task": n, "nodes": c.n_nodes, "edges": c.n_edges, "loss": c.loss, "full_loss": c.full_loss,
                     "seconds": c.seconds, "out": str(out)})
        lines.append(f"{n:28s} {c.n_nodes:6d} nodes {c.n_edges:6d} edges  held-out loss {c.loss:.4f} "
                     f"(target {args.target}, full model {c.full_loss:.4f})  {c.seconds:.0f} s -> {out}")
    _emit(args, {"model": str(args.model), "ablation": args.ablation, "seed": args.seed, "target": args.target,
                 "results": rows}, "\n".join(lines))


def _prune_config(sets: list[str] | None):
    from .config import override_configs
    from .prune import PruneConfig
    return override_configs({"prune": PruneConfig()}, sets or [])["prune"]


def cmd_validate(args) -> None:
    from dataclasses import asdict
    from .checkpoint import load
    from .circuit import Circuit
    from .validate import format_table, validate
    circuit = Circuit.load(args.circuit, model=load(args.model) if args.model else None)
    if circuit.model is None:
        raise ValueError(f"{args.circuit} does not name its model (no model_path); pass --model DIR")
    rows = validate(circuit, n_test=args.n, draws=args.draws, seed=args.seed,
                    prune_controls=not args.no_prune_controls, progress=not args.json)
    obj = {"circuit": str(args.circuit), "task": circuit.task, "model": circuit.model_path,
           "rows": [asdict(r) for r in rows]}
    if args.out:
        from .files import atomic_write
        atomic_write(args.out, json.dumps(obj, indent=1) + "\n")
    _emit(args, obj, f"{circuit.task} circuit in {circuit.model_path} ({circuit.ablation} ablation); "
                     "loss: calibrated task loss on the test split (raw: uncalibrated), chance 0.693\n"
                     + format_table(rows))


def cmd_sweep(args) -> None:
    from . import tasks
    from .sweep import SweepConfig, format_summary, run_controls, sweep
    names = tasks.names() if args.tasks == "all" else args.tasks.split(",")
    cfg = SweepConfig(models=[str(m) for m in args.models], tasks=names, targets=args.targets, seeds=args.seeds,
                      ablation=args.ablation, prune=_prune_config(args.set))
    res = sweep(cfg, args.out, jobs=args.jobs, progress=not args.json, device=args.device)
    if args.controls:
        res = run_controls(args.out, args.controls.split(","), progress=not args.json, device=args.device)
    _emit(args, res, format_summary(res) + f"\n-> {args.out}")


def cmd_sweep_merge(args) -> None:
    from .sweep import format_summary, merge, run_controls, smallest
    res = (smallest if args.smallest else merge)(args.files, args.out)
    if args.controls:
        res = run_controls(args.out, args.controls.split(","), progress=not args.json)
    if args.plot:
        from .files import atomic_path
        from .plots import plot_frontier
        with atomic_path(args.plot) as tmp:
            fig = plot_frontier(res, target=res["grid"]["targets"][0])
            fig.savefig(tmp, dpi=120, format=args.plot.suffix.lstrip(".") or "png")
    _emit(args, res, format_summary(res) + f"\n-> {args.out}" + (f", {args.plot}" if args.plot else ""))


def cmd_convert_openai(args) -> None:
    from .checkpoint import read_config
    from .compat import convert
    from .config import to_dict
    model = convert(args.src, args.dst, args.tokenizer)
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    nz = sum(int((p != 0).sum()) for p in model.parameters())
    tok = read_config(args.dst)["tokenizer"]
    _emit(args, {"src": str(args.src), "dst": str(args.dst), "params": n, "nonzero": nz, "tokenizer": tok,
                 "config": to_dict(c)},
          f"converted {args.src} -> {args.dst}: {n:,} parameters, {nz / n:.2%} nonzero; {c.n_layer} layers, "
          f"d_model {c.d_model}, {c.n_head} heads of {c.d_head}, {c.norm} norm, sink {c.sink}, "
          f"afrac {c.afrac}, tokenizer {tok}")


def cmd_bridge(args) -> None:
    from . import bridges
    from .checkpoint import read_config
    mcfg, bcfg, tcfg = bridges.configs_for(args.profile, args.dense, args.sparse, args.seed, args.max_steps,
                                           args.overrides)
    command = "cspkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    dense, sparse, bridge = bridges.train(args.dense, args.out, bcfg, tcfg, mcfg, progress=not args.json,
                                          command=command)
    q = bridges.quality(dense, sparse, bridge, bridges.val_tokens(tcfg, sparse.config.block_size), tcfg.batch_size)
    cfg = read_config(args.out)
    mode = f"fine-tuned from {args.sparse}" if args.sparse else "trained from scratch"
    _emit(args, {"out": str(args.out), "step": cfg["step"], "val_loss": cfg["val_loss"], "sparse": mode,
                 "quality": q},
          f"bridge to {args.dense}, sparse model {mode}, step {cfg['step']}: sparse val loss {cfg['val_loss']} "
          f"-> {args.out}\n" + bridges.format_quality(q))


def _shown(path) -> str:
    """A path as the user would type it: relative to the working directory when under it."""
    if path is None or not os.path.isabs(path):  # "pruned": found live, not read from a file
        return str(path)
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def cmd_intervene(args) -> None:
    from . import bridges
    dense, sparse, bridge = bridges.load(args.bridge)
    circuit = None
    if args.node == "auto":
        ch, circuit = bridges.circuit_channel(sparse, args.task, args.circuit, progress=not args.json, at=args.at)
        how = (f" (auto: of the {len(bridges.read_nodes(circuit))} read channels of the {circuit.n_nodes}-node "
               f"circuit {_shown(circuit.source)}, the one that best separates the two prompt classes)")
    else:
        ch, how = bridges.channel_stats(sparse, args.task, [args.node], at=args.at)[0], ""
    if args.site_channels:
        if circuit is None:
            circuit = bridges.task_circuit(sparse, args.task, args.circuit, progress=not args.json)
        ch = bridges.site_channels(sparse, args.task, circuit, ch)
        how += f", with all {len(ch)} of the circuit's read channels at its site, each by its own delta"
    r = bridges.flip_rates(dense, sparse, bridge, args.task, ch, args.strength, args.split, args.n, args.seed)
    if circuit is not None:
        r["circuit"] = {"source": _shown(circuit.source), "nodes": circuit.n_nodes,
                        "read_nodes": bridges.read_nodes(circuit)}
    if args.out:
        from .files import atomic_write
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, json.dumps(r, indent=1) + "\n")
    token = "last token" if r["at"] == "last" else "first token where the pair's prompts differ"
    first = lambda k: r[k] if isinstance(r[k], float) else r[k][0]
    lines = [f"{r['task']}: steering {ch.node if isinstance(ch, bridges.Channel) else ch[0].node}{how}, through "
             f"the bridge at site {r['site']} at every token",
             f"class means of {r['node'] if isinstance(r['node'], str) else r['node'][0]} at the {token}, train "
             f"prompts: A {first('mean_a'):.3f}, B {first('mean_b'):.3f} ({first('score'):+.2f} pooled sd); "
             f"delta = B - A = {first('delta'):+.3f} (A prompts +delta, B prompts -delta)",
             f"{r['split']} split: the dense model prefers the right candidate on {r['dense_right']} of "
             f"{r['prompts']} prompts; flip rate = the fraction of those that switch to the other class's answer; "
             "logit shift = mean change of their other-minus-own candidate logit gap",
             bridges.format_flips(r["rows"])]
    _emit(args, r, "\n".join(lines))


def cmd_bridge_report(args) -> None:
    from . import bridges
    q = bridges.report(args.bridge, dense=args.dense, batches=args.batches)
    human = (f"bridge {args.bridge} at step {q['step']} of {q['max_steps']}\n" + bridges.format_quality(q))
    if args.out:
        from .files import atomic_write
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, human + "\n")
    _emit(args, q, human)


def build_parser() -> argparse.ArgumentParser:
    from .config import BRIDGE_PROFILES, PROFILE_ALIASES, PROFILES
    p = argparse.ArgumentParser(prog="cspkit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a weight-sparse (or --dense) model; resumes from --out")
    t.add_argument("--profile", choices=[*PROFILE_ALIASES, *PROFILES], default="small")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--dense", action="store_true", help="same architecture, no weight sparsity")
    t.add_argument("--seed", type=int)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--json", action="store_true")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. d_model=128 lr=0.003 (model.X / train.X to disambiguate)")
    t.set_defaults(fn=cmd_train)

    i = sub.add_parser("info", help="config, parameters, nonzeros per matrix, val loss")
    i.add_argument("dir", type=Path)
    i.add_argument("--evals", action="store_true",
                   help="also every evaluation of its training log: step, L0, val loss, task scores")
    i.add_argument("--against", type=Path, metavar="REF",
                   help="with the evaluations, another run's (a directory or its log.jsonl) at the same steps, "
                        "to follow a run against a reference")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    s = sub.add_parser("sample", help="continue a prompt (greedy unless --temperature > 0)")
    s.add_argument("dir", type=Path)
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=40)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_sample)

    k = sub.add_parser("tasks", help="the task names, one example pair each, and their candidates")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--evidence", action="store_true",
                   help="instead: how often the training corpus shows each task (candidate token counts, "
                        "and the lines showing each side for the mined tasks)")
    k.add_argument("--corpus", nargs="+", metavar="PATH", help="with --evidence: corpus paths (default: the stdlib)")
    k.add_argument("--json", action="store_true")
    k.set_defaults(fn=cmd_tasks)

    z = sub.add_parser("viz", help="draw a circuit file as a standalone offline HTML page (and GraphML)")
    z.add_argument("--circuit", type=Path, required=True, help="a circuit file written by `cspkit prune --out`")
    z.add_argument("--out", type=Path, required=True, help="the HTML page to write")
    z.add_argument("--graphml", type=Path, help="also write the annotated graph as GraphML")
    z.add_argument("--model", type=Path, help="the circuit's model (default: the model_path in the file)")
    z.add_argument("--pairs", type=int, default=16, help="test pairs for the nodes' ablation effects")
    z.add_argument("--json", action="store_true")
    z.set_defaults(fn=cmd_viz)

    e = sub.add_parser("eval", help="task loss and accuracy of a model")
    e.add_argument("--model", type=Path, required=True, action="append",
                   help="a checkpoint directory; repeat to compare models side by side")
    e.add_argument("--task", default="all", help="a task name, several joined by commas, or 'all'")
    e.add_argument("--split", choices=["train", "test"], default="test")
    e.add_argument("--n", type=int, help="pairs per task (default: the task's split size)")
    e.add_argument("--device", default="cpu", help="torch device the models run on, e.g. cuda")
    e.add_argument("--detail", action="store_true",
                   help="also how each model decides: logit margins per side and the top next tokens of one pair")
    e.add_argument("--natural", action="store_true",
                   help="also the natural examples (real code) mined from the held-out files of the first "
                        "model's training corpus, for the tasks that have a miner")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("prune", help="find a task's circuit: the fewest nodes that keep the task loss at the target")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--task", required=True, help="a task name or 'all' (then --out is a directory)")
    r.add_argument("--target", type=float, default=0.15)
    r.add_argument("--ablation", choices=["mean", "zero", "resample"], default="mean")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--set", action="append", metavar="key=value", help="a PruneConfig value, e.g. k_coef=0.003")
    r.add_argument("--out", type=Path, required=True, help="the circuit file (a directory with --task all)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_prune)

    w = sub.add_parser("validate", help="the faithfulness controls of a circuit file, as one table")
    w.add_argument("--circuit", type=Path, required=True)
    w.add_argument("--model", type=Path, help="the circuit's model (default: the model_path in the file)")
    w.add_argument("--n", type=int, help="test pairs (default: the task's test split)")
    w.add_argument("--draws", type=int, default=4, help="random draws for the random and stochastic controls")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--no-prune-controls", action="store_true",
                   help="skip the two controls that prune again (re-initialized weights, random labels)")
    w.add_argument("--out", type=Path, help="also write the table as JSON")
    w.add_argument("--json", action="store_true")
    w.set_defaults(fn=cmd_validate)

    q = sub.add_parser("sweep", help="prune every task on every model; circuit sizes, geometric means, dense/sparse "
                                     "ratio (resumes from --out)")
    q.add_argument("--models", type=Path, nargs="+", required=True, help="checkpoint directories")
    q.add_argument("--tasks", default="all", help="'all' or task names separated by commas")
    q.add_argument("--targets", type=float, nargs="+", default=[0.15])
    q.add_argument("--seeds", type=int, nargs="+", default=[0], help="pruning seeds")
    q.add_argument("--ablation", choices=["mean", "zero", "resample"], default="mean")
    q.add_argument("--set", action="append", metavar="key=value", help="a PruneConfig value, e.g. steps=50")
    q.add_argument("--jobs", type=int, default=1, help="processes pruning at once (one torch thread each)")
    q.add_argument("--device", default="cpu", help="torch device the models run on, e.g. cuda")
    q.add_argument("--controls", metavar="TASK[,TASK]",
                   help="afterwards, the validation controls of these tasks' circuits (first seed and target)")
    q.add_argument("--out", type=Path, required=True, help="the results file (JSON)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_sweep)

    mg = sub.add_parser("sweep-merge", help="merge sweep results files (same ablation and pruning config; "
                                            "or --smallest)")
    mg.add_argument("files", type=Path, nargs="+", help="results files written by `cspkit sweep`")
    mg.add_argument("--out", type=Path, required=True)
    mg.add_argument("--smallest", action="store_true",
                    help="the files were swept with different pruning configs (e.g. --set k_coef=0.001): keep "
                         "each run's smallest circuit, a per-task search as the paper's")
    mg.add_argument("--controls", metavar="TASK[,TASK]",
                    help="afterwards, the validation controls of these tasks' circuits where the files lack them")
    mg.add_argument("--plot", type=Path, help="also draw the frontier (validation loss against circuit edges) "
                    "at the first target, e.g. PNG")
    mg.add_argument("--json", action="store_true")
    mg.set_defaults(fn=cmd_sweep_merge)

    o = sub.add_parser("convert-openai", help="an openai circuit_sparsity model as a cspkit checkpoint")
    o.add_argument("src", type=Path, help="directory with beeg_config.json and final_model.pt")
    o.add_argument("dst", type=Path, help="new cspkit checkpoint directory")
    o.add_argument("--tokenizer", type=Path, help="directory with encoder.json and vocab.bpe (default: SRC)")
    o.add_argument("--json", action="store_true")
    o.set_defaults(fn=cmd_convert_openai)
    b = sub.add_parser("bridge", help="train a bridge between a dense and a sparse model; resumes from --out")
    b.add_argument("--dense", type=Path, required=True, help="the dense model's checkpoint directory (kept frozen)")
    b.add_argument("--sparse", type=Path, help="fine-tune this sparse checkpoint (default: train one from scratch)")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--profile", choices=list(BRIDGE_PROFILES), default="small")
    b.add_argument("--seed", type=int)
    b.add_argument("--max-steps", type=int)
    b.add_argument("--json", action="store_true")
    b.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. kl_coef=0.5 lr=0.003 (bridge.X / train.X / model.X)")
    b.set_defaults(fn=cmd_bridge)

    v = sub.add_parser("intervene", help="steer the dense model through a sparse channel: flip rate vs control")
    v.add_argument("--bridge", type=Path, required=True, help="a directory written by `cspkit bridge`")
    v.add_argument("--node", required=True, help="a sparse read channel, e.g. 3.mlp.in[41], or 'auto': the read "
                                                 "channel of the task's circuit that best separates the two classes")
    v.add_argument("--circuit", type=Path, help="with --node auto or --site-channels, the task's circuit file in "
                                                "the sparse model (default: results/circuits/<model>/<task>.json, "
                                                "else prune one)")
    v.add_argument("--at", choices=["diff", "last"], default="diff",
                   help="the token whose class means set delta (and pick the auto channel): the first token where "
                        "the pair's two prompts differ (default), or the last")
    v.add_argument("--site-channels", action="store_true",
                   help="steer all of the circuit's read channels at the node's site at once, each by its own delta")
    v.add_argument("--out", type=Path, help="also write the result as JSON (as --json prints it)")
    v.add_argument("--task", required=True)
    v.add_argument("--strength", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    v.add_argument("--split", choices=["train", "test"], default="test")
    v.add_argument("--n", type=int, help="pairs (default: the task's split size)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_intervene)

    g = sub.add_parser("bridge-report", help="a bridge's quality per site: FVE of the maps, KL of the hybrid passes "
                                             "against two baselines")
    g.add_argument("--bridge", type=Path, required=True, help="a directory written by `cspkit bridge`")
    g.add_argument("--dense", type=Path, help="the dense model (default: where the bridge recorded it)")
    g.add_argument("--batches", type=int, help="validation batches (default: the run's eval_batches)")
    g.add_argument("--out", type=Path, help="also write the human report to this file")
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=cmd_bridge_report)

    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"cspkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
