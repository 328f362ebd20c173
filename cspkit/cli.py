"""The ``cspkit`` command line. Every command prints a human summary, or one JSON object with --json."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .ablation import ABLATIONS
from .bridges import report_file, steer_report, train_report
from .checkpoint import describe, load
from .compat import convert_report
from .config import PruneConfig, SweepConfig, override_configs
from .course import make_student_version
from .natural import evidence_report, score_models
from .profiles import BRIDGE_PROFILES, PROFILE_ALIASES, PROFILES
from .pruning import prune_to_files
from .sweeps import merge_report, sweep_report
from .tasks import catalog, complete
from .training import train_profile
from .validation import validate_file
from .viz import save_frontier, write_graph


def _emit(args, obj: dict, human: str) -> None:
    print(json.dumps(obj) if getattr(args, "json", False) else human)


def _command() -> str:
    """The command line as typed, recorded beside what it trains."""
    return "cspkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def cmd_train(args) -> None:
    done = train_profile(args.profile, args.out, dense=args.dense, seed=args.seed, max_steps=args.max_steps,
                         overrides=args.overrides, command=_command(), progress=not args.json)
    if done is not None:   # under torchrun, one summary from the first process
        _emit(args, *done)


def cmd_info(args) -> None:
    _emit(args, *describe(args.dir, evals=args.evals, against=args.against))


def cmd_sample(args) -> None:
    text = complete(load(args.dir), args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    _emit(args, {"prompt": args.prompt, "completion": text}, args.prompt + text)


def cmd_tasks(args) -> None:
    if args.corpus and not args.evidence:
        raise ValueError("--corpus only applies with --evidence (cspkit tasks --evidence --corpus PATH ...)")
    if args.evidence:
        _emit(args, *evidence_report(args.corpus))
        return
    rows, human = catalog(args.seed)
    _emit(args, {"tasks": rows}, human)


def cmd_viz(args) -> None:
    _emit(args, *write_graph(args.circuit, args.out, args.graphml, args.model, args.pairs))


def cmd_eval(args) -> None:
    _emit(args, *score_models(args.model, args.task, args.split, args.n, args.device, args.detail, args.natural))


def cmd_prune(args) -> None:
    _emit(args, *prune_to_files(args.model, args.task, args.out, args.target, args.ablation, args.seed,
                                _prune_config(args.set), progress=not args.json, edges=args.edges))


def _prune_config(sets: list[str] | None):
    return override_configs({"prune": PruneConfig()}, sets or [])["prune"]


def cmd_validate(args) -> None:
    _emit(args, *validate_file(args.circuit, args.model, args.n, args.draws, args.seed,
                               prune_controls=not args.no_prune_controls, out=args.out, progress=not args.json))


def cmd_sweep(args) -> None:
    cfg = SweepConfig(models=[str(m) for m in args.models],
                      tasks=None if args.tasks == "all" else args.tasks.split(","), targets=args.targets,
                      seeds=args.seeds, ablation=args.ablation, prune=_prune_config(args.set))
    _emit(args, *sweep_report(cfg, args.out, args.jobs, args.device, _names(args.controls), progress=not args.json))


def _names(joined: str | None) -> list[str] | None:
    return joined.split(",") if joined else None


def cmd_sweep_merge(args) -> None:
    res, human = merge_report(args.files, args.out, args.smallest, _names(args.controls), progress=not args.json)
    if args.plot:
        save_frontier(res, args.plot)
        human += f", {args.plot}"
    _emit(args, res, human)


def cmd_convert_openai(args) -> None:
    _emit(args, *convert_report(args.src, args.dst, args.tokenizer))


def cmd_bridge(args) -> None:
    _emit(args, *train_report(args.profile, args.dense, args.out, args.sparse, args.seed, args.max_steps,
                              args.overrides, command=_command(), progress=not args.json))


def cmd_intervene(args) -> None:
    _emit(args, *steer_report(args.bridge, args.task, args.node, args.circuit, args.circuits, args.at,
                              args.site_channels, args.strength, args.split, args.n, args.seed, args.out,
                              progress=not args.json))


def cmd_bridge_report(args) -> None:
    _emit(args, *report_file(args.bridge, dense=args.dense, batches=args.batches, out=args.out))


def cmd_student(args) -> None:
    written = make_student_version(args.src, args.out)
    _emit(args, {"out": str(args.out), "notebooks": [str(p) for p in written]},
          f"the student version of {len(written)} notebooks (no solutions, no outputs) -> {args.out}")


def build_parser() -> argparse.ArgumentParser:
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
    r.add_argument("--ablation", choices=ABLATIONS, default="mean")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--set", action="append", metavar="key=value", help="a PruneConfig value, e.g. k_coef=0.003")
    r.add_argument("--out", type=Path, required=True, help="the circuit file (a directory with --task all)")
    r.add_argument("--edges", action="store_true",
                   help="then prune the node circuit's edges too (a mask per weight between kept nodes)")
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
    q.add_argument("--ablation", choices=ABLATIONS, default="mean")
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
                                                "the sparse model (default: found in --circuits, else pruned live, "
                                                "a minute or two on CPU)")
    v.add_argument("--circuits", type=Path, metavar="DIR", help="a directory of circuit files laid out "
                   "DIR/<model name>/<task>.json, searched when --circuit is not given (e.g. results/circuits)")
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

    st = sub.add_parser("student", help="the notebook series without its exercises' solutions, for a course")
    st.add_argument("--src", type=Path, default=Path("notebooks"), help="the series (default: notebooks)")
    st.add_argument("--out", type=Path, required=True, help="a folder of its own, e.g. student/")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_student)

    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e   # str(KeyError) adds quotes
        print(f"cspkit {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
