"""The notebooks as committed (nbval runs them; these read the saved files): executed top to bottom
in one go, outputs light, every widget and figure with a picture that shows without a kernel,
and the decimal numbers their prose quotes present in their own outputs."""
from __future__ import annotations

import json
import re

import pytest
from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
WIDGET = "application/vnd.jupyter.widget-view+json"
MAX_LINES = 40          # a printed output longer than this is a dump, not something to read
MAX_HTML = 60_000       # characters of HTML in one output (an inlined graph page is about 580,000)
MAX_IMAGE = 300_000     # base64 characters of one picture (a training curve with every step: about 260,000)
MAX_FILE = 1_000_000    # bytes of a saved notebook
# a decimal number as prose quotes one: 0.945, 2.806, 36.3 (not versions, or exercise numbers like 04.2)
NUMBER = re.compile(r"(?<![\w.\-/])(?<!Exercise )((?:0|[1-9]\d*)\.\d+)(?![\w.]*\d)")


# numbers the prose quotes from elsewhere, each with where it comes from
QUOTED = {
    ("00_quickstart", "0.693"): "ln 2, the pair loss at chance",
    ("02_train_sparse_model", "6.3"): "small-sparse's training time, docs/models.md",
    ("02_train_sparse_model", "0.05"): "the dense partner's stopping rule, docs/models.md",
    ("03_tasks", "2.34"): "the shipped models' validation loss, docs/models.md",
    ("03_tasks", "0.914"): "results/task_scores.txt, the full profile's table",
    ("04_circuit_discovery", "0.696"): "the calibration experiment in docs/method.md",
    ("05_explore_circuits", "0.988"): "bracket counting's test accuracy, notebook 04's output",
    ("08_sparse_vs_dense", "0.05"): "the dense partner's stopping rule, docs/models.md",
    ("08_sparse_vs_dense", "3.483"): "paper-e1-sparser's validation loss, docs/models.md",
    ("08_sparse_vs_dense", "3.399"): "paper-e2-sparse's validation loss, docs/models.md",
    ("10_interventions", "0.129"): "results/intervene_bridged_quote_layer1.txt",
    ("10_interventions", "3.5"): "results/intervene_quote_site.txt",
    ("10_interventions", "46.1"): "results/intervene_quote_site.txt",
}
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]*[A-Z0-9]\b")  # e.g. LIVE_PROSE left in by an editor


def _cells(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _text(out: dict) -> str:
    if out["output_type"] == "stream":
        return "".join(out["text"])
    return "".join(out.get("data", {}).get("text/plain", ""))


def test_every_notebook_is_checked():
    assert len(NOTEBOOKS) >= 12, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_saved_executed_in_order_with_light_outputs(path):
    nb = _cells(path)
    assert "widgets" not in nb["metadata"], f"{path.name} keeps widget state: save it with bench/notebooks.py --save"
    assert path.stat().st_size <= MAX_FILE, f"{path.name} is {path.stat().st_size:,} bytes, over {MAX_FILE:,}"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name} was not saved after one run top to bottom (execution counts {counts})")
    for i, cell in enumerate(code, 1):
        for out in cell["outputs"]:
            where = f"{path.name}, code cell {i}"
            assert out["output_type"] != "error", f"{where} saved an error: {out.get('ename')}"
            assert len(_text(out).splitlines()) <= MAX_LINES, f"{where} prints over {MAX_LINES} lines"
            data = out.get("data", {})
            if WIDGET in data:
                assert "image/png" in data or "text/html" in data, f"{where}: a widget with no picture to show"
                assert "tqdm" not in json.dumps(data), f"{where}: a saved progress bar"
            assert len("".join(data.get("text/html", ""))) <= MAX_HTML, f"{where}: HTML output over {MAX_HTML:,}"
            assert len(data.get("image/png", "")) <= MAX_IMAGE, f"{where}: a picture over {MAX_IMAGE:,} characters"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_numbers_in_the_prose_come_from_the_outputs(path):
    """A number the prose quotes after the first code cell (the setup) must be printed by some
    cell of the same notebook: prose written against another run is caught here."""
    cells = _cells(path)["cells"]
    first_code = next(i for i, c in enumerate(cells) if c["cell_type"] == "code")
    shown = " ".join(_text(out) for c in cells if c["cell_type"] == "code" for out in c["outputs"])
    shown += " ".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    missing = []
    for c in cells[first_code:]:
        if c["cell_type"] != "markdown" or "exercise" in c.get("metadata", {}):
            continue
        prose = re.sub(r"`[^`]*`", "", "".join(c["source"]))          # code spans name things, not results
        left = PLACEHOLDER.findall(prose)
        assert not left, f"{path.name}: placeholders left in the prose: {left}"
        for n in NUMBER.findall(prose):
            if n not in shown and n.rstrip("0") not in shown and (path.stem, n) not in QUOTED:
                missing.append(n)
    assert not missing, f"{path.name}: the prose quotes {missing}, which no output of the notebook shows"
