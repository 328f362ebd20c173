"""The hour-recipe sweep's evaluations (scripts/hour_recipe_sweep.sh), one row per run:
validation loss, bracket counting and the quote task at each of the steps named (the
in-training evaluations of log.jsonl: 128 test pairs a task). RUNS defaults to the committed
sweep's run directories.

    python scripts/hour_recipe_table.py [--runs RUNS] [STEP ...] > results/history/hour_recipe/table.txt
"""
import json
import sys
from pathlib import Path

args = sys.argv[1:]
RUNS = Path(__file__).resolve().parent.parent / "results" / "history" / "hour_recipe" / "runs"
if args[:1] == ["--runs"]:
    RUNS, args = Path(args[1]), args[2:]
steps = [int(s) for s in args] or [1200, 1600, 2000]
print("run".ljust(17) + "".join(f"| step {s}: val, bracket loss/acc, quote loss/acc ".ljust(52) for s in steps)
      + "| overrides")
for run in sorted(RUNS.iterdir()):
    evals = {r["step"]: r for line in open(run / "log.jsonl") if "val_loss" in (r := json.loads(line))}
    cells = []
    for s in steps:
        r = evals.get(s, evals[max(evals)] if s > max(evals) else None)  # a run that ended sooner: its end
        if r is None:
            cells.append("| -".ljust(52))
            continue
        cells.append(f"| {r['step']:>5}: {r['val_loss']:.3f}, {r['task/bracket_counting/loss']:.3f}/"
                     f"{r['task/bracket_counting/accuracy']:.3f}, {r['task/single_double_quote/loss']:.3f}/"
                     f"{r['task/single_double_quote/accuracy']:.3f} ".ljust(52))
    command = json.loads((run / "config.json").read_text())["command"]
    print(run.name.ljust(17) + "".join(cells) + "| " + command.split("threads=1 ")[1].split(" ", 1)[-1])
