"""The student version of the notebook series: every notebook without its solution cells and
without outputs, written into a folder of its own (``cspkit student --out DIR``)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..files import atomic_write

PARTS = ("stub", "solution", "check")


def exercise_cells(nb: dict, required: tuple[str, ...] = PARTS) -> dict[str, dict[str, int]]:
    """{exercise name: {part: cell index}} of a notebook (as JSON), from the cells' metadata; every
    exercise must have the ``required`` parts (a student version has no solutions)."""
    found: dict[str, dict[str, int]] = {}
    for i, cell in enumerate(nb["cells"]):
        mark = cell.get("metadata", {}).get("exercise")
        if mark is None:
            continue
        if not isinstance(mark, dict) or mark.get("part") not in PARTS or not mark.get("name"):
            raise ValueError(f"cell {i}: exercise metadata must be {{'name': ..., 'part': one of {PARTS}}}, "
                             f"not {mark!r}")
        parts = found.setdefault(mark["name"], {})
        if mark["part"] in parts:
            raise ValueError(f"cell {i}: a second {mark['part']} cell for exercise {mark['name']!r}")
        parts[mark["part"]] = i
    for name, parts in found.items():
        missing = [p for p in required if p not in parts]
        if missing:
            raise ValueError(f"exercise {name!r} has no {', '.join(missing)} cell")
    return found


def student_notebook(nb: dict) -> dict:
    """The notebook without its solution cells, every output and execution count cleared."""
    exercise_cells(nb)                      # malformed exercises fail here, not in a student's hands
    out = dict(nb)
    out["cells"] = []
    for cell in nb["cells"]:
        if cell.get("metadata", {}).get("exercise", {}).get("part") == "solution":
            continue
        cell = dict(cell)
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        out["cells"].append(cell)
    return out


def make_student_version(src: str | os.PathLike, out: str | os.PathLike) -> list[Path]:
    """Write the student version of every notebook in ``src`` (and its README) into ``out``, which
    must not be ``src``; returns the notebooks written."""
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ValueError(f"the student version needs a folder of its own, not {src}")
    notebooks = sorted(src.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise ValueError(f"{src} holds no numbered notebooks (NN_name.ipynb)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        nb = student_notebook(json.loads(path.read_text()))
        atomic_write(out / path.name, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        written.append(out / path.name)
    if (src / "README.md").is_file():
        shutil.copyfile(src / "README.md", out / "README.md")
    return written
