"""Run the notebooks one after another in the quick profile and print each one's wall time
(kernel start included); with --save, write them back executed, with light outputs: no widget
state (the explorer's widgets keep a PNG to show without a kernel) and no progress bars.

    python bench/notebooks.py --save                      # all of them, as committed
    python bench/notebooks.py notebooks/09_bridges.ipynb  # one, timed, not saved
    python bench/notebooks.py --clean-only --save         # only clean what is saved

notebooks/README.md's table of run times comes from this command on idle cores.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
WIDGET = "application/vnd.jupyter.widget-view+json"
PROGRESS = re.compile(r"\d+%\|.*\|\s*\d+/\d+|it/s\]|s/it\]")   # what a tqdm bar prints


def is_progress(out) -> bool:
    """A progress bar: a tqdm widget, or the text a tqdm bar writes to stderr."""
    if out.get("output_type") == "stream":
        return out.get("name") == "stderr" and bool(PROGRESS.search(out.get("text", "")))
    data = out.get("data", {})
    return WIDGET in data and bool(PROGRESS.search(str(data.get("text/plain", ""))))


def clean(nb) -> int:
    """Drop widget state, progress-bar outputs and the cells' execution timestamps (which would
    change every saved cell on every run); the number of outputs dropped."""
    nb.metadata.pop("widgets", None)
    dropped = 0
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            kept = [o for o in cell.outputs if not is_progress(o)]
            dropped += len(cell.outputs) - len(kept)
            cell.outputs = kept
    return dropped


def run(path: Path, timeout: int) -> tuple[object, float]:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                   ).execute()
    return nb, time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", type=Path, help="default: every numbered notebook")
    ap.add_argument("--save", action="store_true", help="write each notebook back, executed and cleaned")
    ap.add_argument("--clean-only", action="store_true", help="do not execute, only clean what is saved")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = ap.parse_args(argv)
    paths = args.paths or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if os.environ.get("CSPKIT_PROFILE", "quick") != "quick" and not args.clean_only:
        print(f"note: CSPKIT_PROFILE={os.environ['CSPKIT_PROFILE']}", file=sys.stderr)
    total = 0.0
    for path in paths:
        if args.clean_only:
            nb, seconds = nbformat.read(path, as_version=4), 0.0
        else:
            nb, seconds = run(path, args.timeout)
            total += seconds
        dropped = clean(nb)
        if args.save:
            tmp = path.with_suffix(".ipynb.tmp")
            nbformat.write(nb, tmp)
            tmp.replace(path)
        print(f"{path.name:32s} {seconds:7.1f} s   {dropped} progress outputs dropped", flush=True)
    if not args.clean_only:
        print(f"{'in all':32s} {total:7.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
