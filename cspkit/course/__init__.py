"""Exercises for the notebook series: each has a box (difficulty and importance 1 to 5, minutes to
spend), a stub the student fills in, a self-check (``check``) that compares the answer with the
library and says what is wrong in a sentence, and a solution in a collapsed cell.

In a notebook an exercise is three code cells, marked in their metadata
(``"exercise": {"name": ..., "part": ...}``): the ``stub`` (a signature, a docstring and
``raise NotImplementedError``), the ``solution`` (tagged ``solution``, its source collapsed in
JupyterLab), and the ``check`` (``course.check(name, answer)``). The committed notebooks run with
their solutions; ``make_student_version`` writes the series without them
(``cspkit student --out DIR``). notebooks/README.md lists the exercises by notebook.

>>> from cspkit import course
>>> course.check("edge_ratio", lambda dense, sparse: 1.0)
Traceback (most recent call last):
...
cspkit.course.checks.CheckFailed: edge_ratio: edge_ratio gave 1.000; the ratio of geometric means is 37.004
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import checks
from .checks import CheckFailed
from .student import exercise_cells, make_student_version


@dataclass(frozen=True)
class Exercise:
    name: str
    notebook: str        # the notebook's number
    title: str
    difficulty: int      # 1 (a few lines) to 5 (a research question)
    importance: int      # 1 (a detail) to 5 (the method's core)
    minutes: int
    check: Callable[..., str]

    def box(self) -> str:
        """The line under the exercise's heading in its notebook."""
        return (f"difficulty {self.difficulty}/5 · importance {self.importance}/5 · "
                f"about {self.minutes} minutes")


EXERCISES: dict[str, Exercise] = {e.name: e for e in (
    Exercise("split_files", "01", "Split a corpus by file", 2, 3, 10, checks.split_files),
    Exercise("project_topk", "02", "The top-k weight projection", 2, 5, 15, checks.project_topk),
    Exercise("abs_topk", "02", "AbsTopK on activations", 2, 4, 10, checks.abs_topk_rows),
    Exercise("pair_loss", "03", "The pair loss", 1, 5, 10, checks.pair_loss),
    Exercise("user_task", "03", "A task of your own, with disjoint train and test pools", 3, 4, 20,
             checks.user_task),
    Exercise("heaviside_gate", "04", "The Heaviside gate and its surrogate gradient", 3, 5, 20,
             checks.heaviside_gate),
    Exercise("mean_ablation_hook", "04", "Mean ablation through a hook", 2, 5, 15, checks.mean_ablation_hook),
    Exercise("smallest_k", "04", "The bisection over k", 3, 4, 20, checks.smallest_k),
    Exercise("count_edges", "05", "Edges from weights", 3, 4, 20, checks.count_edges),
    Exercise("head_attention", "05", "One head's attention pattern", 2, 3, 15, checks.head_attention),
    Exercise("bracket_depth", "06", "Which nodes carry the depth?", 4, 4, 45, checks.bracket_depth),
    Exercise("random_like", "07", "The random-circuit control", 2, 4, 10, checks.random_like),
    Exercise("edge_ratio", "08", "The geometric-mean ratio", 1, 3, 10, checks.edge_ratio),
    Exercise("bridge_nmse", "09", "A bridge's normalized MSE", 2, 4, 10, checks.bridge_nmse),
    Exercise("flip_rate", "10", "A flip rate", 2, 4, 10, checks.flip_rate),
)}


def check(name: str, answer) -> None:
    """Run exercise ``name``'s self-check on ``answer`` (the student's function or object): prints
    what was checked, or raises CheckFailed saying what is wrong."""
    if name not in EXERCISES:
        raise KeyError(f"no exercise {name!r}; the exercises are {', '.join(EXERCISES)}")
    try:
        said = EXERCISES[name].check(answer)
    except CheckFailed as e:
        raise CheckFailed(f"{name}: {e}") from None
    except NotImplementedError:
        raise CheckFailed(f"{name}: still the stub; replace `raise NotImplementedError` with your code and run "
                          "that cell again") from None
    except Exception as e:  # the student's code failed: say where, keep the traceback
        raise CheckFailed(f"{name}: your code raised {type(e).__name__}: {e}") from e
    print(f"✓ {EXERCISES[name].title}: {said}")


__all__ = ["Exercise", "EXERCISES", "CheckFailed", "check", "checks", "exercise_cells", "make_student_version"]
