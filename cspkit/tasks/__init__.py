"""Binary next-token tasks on Python (docs/method.md, "Tasks"): a registry of named tasks, each a
deterministic list of prompt pairs per split, scored by the pair loss.

>>> import cspkit
>>> cspkit.tasks.names()[:2]
['single_double_quote', 'bracket_counting']
>>> task = cspkit.tasks.get("single_double_quote")
>>> pair = task.pairs("test", n=1)[0]
>>> (pair.cand_a, pair.cand_b)
('")\\n', "')\\n")

Your own task: ``Task.from_pairs(name, pairs)`` or ``Task.from_generator(name, fn, candidates)``,
then ``register(task)`` to name it everywhere.
"""
from .core import (
    SOLVED_ACCURACY,
    SPLITS,
    Pair,
    Task,
    catalog,
    check_pair,
    check_split,
    complete,
    encode_pairs,
    evaluate,
    format_detail,
    format_scores,
    get,
    last_logits,
    margins,
    names,
    next_tokens,
    pair_logits,
    pairs_digest,
    register,
    solved,
    task,
    task_loss,
    token_id,
    trim,
)
from .generators import PAPER_TASKS, completed, corpus_files

__all__ = ["SOLVED_ACCURACY", "SPLITS", "PAPER_TASKS", "Pair", "Task", "check_pair", "check_split", "complete",
           "completed", "catalog", "corpus_files", "encode_pairs", "evaluate", "format_detail", "format_scores",
           "get", "last_logits", "margins", "names", "next_tokens", "pair_logits", "pairs_digest", "register",
           "solved", "task", "task_loss", "token_id", "trim"]
