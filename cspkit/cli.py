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
    from .train import config_for, train
    mcfg, tcfg = config_for(args.profile, dense=args.dense, seed=args.seed, max_steps=args.max_steps,
                            overrides=args.overrides)
    command = "cspkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    train(mcfg, tcfg, args.out, progress=not args.json, command=command)
    from .checkpoint import read_config
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, one summary (one JSON object), from rank 0
        return
    cfg = read_config(args.out)
    _emit(args, {"out": str(args.out), "step": cfg.get("step"), "val_loss": cfg.get("val_loss")},
          f"trained {args.profile}{' (dense)' if tcfg.dense else ''} to step {cfg.get('step')}: "
          f"val loss {cfg.get('val_loss')} -> {args.out}")


def cmd_info(args) -> None:
    from .checkpoint import load
    from .sparsity import density_report
    model = load(args.dir)
    rep = density_report(model)
    n_params = sum(p.numel() for p in model.parameters())
    meta = model.checkpoint
    obj = {"config": model.config.__dict__, "params": n_params, "step": meta.get("step"),
           "val_loss": meta.get("val_loss"), "dense": meta.get("dense"), "tokenizer": meta.get("tokenizer"),
           "density": rep}
    lines = [f"{args.dir}: {n_params:,} parameters, step {meta.get('step')}, val loss {meta.get('val_loss')}, "
             f"{'dense' if meta.get('dense') else 'weight-sparse'}",
             "model: " + ", ".join(f"{k}={v}" for k, v in model.config.__dict__.items()),
             f"{'parameter':32s} {'nonzeros':>10s} {'size':>10s} {'fraction':>9s}"]
    lines += [f"{k:32s} {r['nonzeros']:>10,d} {r['size']:>10,d} {r['fraction']:>9.4f}" for k, r in rep.items()]
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


def cmd_eval(args) -> None:
    from . import tasks
    from .checkpoint import load
    names = tasks.names() if args.task == "all" else [args.task]
    for n in names:
        tasks.get(n)
    out, cols = [], []
    for path in args.model:
        model = load(path)
        out.append({"model": str(path), "results": [tasks.evaluate(model, n, args.split, n=args.n) for n in names]})
        cols.append(Path(path).name)
    head = f"{'task':28s}" + "".join(f" {c[:22]:>22s}" for c in cols)
    lines = [f"{args.split} split; each cell: task loss / accuracy (chance: 0.693 / 0.5)", head]
    for i, n in enumerate(names):
        lines.append(f"{n:28s}" + "".join(f" {m['results'][i]['loss']:>14.3f} / {m['results'][i]['accuracy']:.3f}"
                                          for m in out))
    for m in out:
        m["solved"] = sum(r["accuracy"] >= 0.9 for r in m["results"])
    lines.append(f"{'solved (accuracy >= 0.9)':28s}" + "".join(f" {m['solved']:>22d}" for m in out))
    _emit(args, {"split": args.split, "chance_loss": 0.6931, "chance_accuracy": 0.5, "models": out},
          "\n".join(lines))


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


def cmd_intervene(args) -> None:
    from . import bridges
    dense, sparse, bridge = bridges.load(args.bridge)
    if args.node == "auto":
        ch = bridges.pick_channel(sparse, args.task)
    else:
        ch = bridges.channel_stats(sparse, args.task, [args.node])[0]
    r = bridges.flip_rates(dense, sparse, bridge, args.task, ch, args.strength, args.split, args.n, args.seed)
    lines = [f"{r['task']}: steering {r['node']}{' (auto)' if args.node == 'auto' else ''} through the bridge at "
             f"site {r['site']}; last-token class means on train prompts A {r['mean_a']:.3f}, B {r['mean_b']:.3f} "
             f"({r['score']:+.2f} pooled sd), delta = B - A = {r['delta']:+.3f} (A prompts +delta, B prompts -delta)",
             f"{r['split']} split: the dense model prefers the right candidate on {r['dense_right']} of "
             f"{r['prompts']} prompts; flip rate = the fraction of those that switch to the other class's answer",
             f"{'strength':>8s} {'flip rate':>10s} {'random control':>15s} {'logit shift':>12s} {'control':>8s}"]
    lines += [f"{row['strength']:>8.2f} {row['flip_rate']:>10.3f} {row['control_flip_rate']:>15.3f} "
              f"{row['logit_shift']:>12.3f} {row['control_logit_shift']:>8.3f}" for row in r["rows"]]
    _emit(args, r, "\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    from .config import BRIDGE_PROFILES, PROFILES
    p = argparse.ArgumentParser(prog="cspkit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a weight-sparse (or --dense) model; resumes from --out")
    t.add_argument("--profile", choices=list(PROFILES), default="small")
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
    k.add_argument("--json", action="store_true")
    k.set_defaults(fn=cmd_tasks)

    e = sub.add_parser("eval", help="task loss and accuracy of a model")
    e.add_argument("--model", type=Path, required=True, action="append",
                   help="a checkpoint directory; repeat to compare models side by side")
    e.add_argument("--task", default="all", help="a task name or 'all'")
    e.add_argument("--split", choices=["train", "test"], default="test")
    e.add_argument("--n", type=int, help="pairs per task (default: the task's split size)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

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
    v.add_argument("--node", required=True, help="a sparse read channel, e.g. 3.mlp.in[41], or 'auto'")
    v.add_argument("--task", required=True)
    v.add_argument("--strength", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    v.add_argument("--split", choices=["train", "test"], default="test")
    v.add_argument("--n", type=int, help="pairs (default: the task's split size)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_intervene)
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
