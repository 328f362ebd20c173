"""Bracket counting, nested side: template prompts by template and list length, and natural
prompts by whether an earlier line of their context already closes a nested list with ``]]``.
Then, for templates and natural prompts, how well the model tells nested from flat apart
whatever its bias: the AUC of its ``]]`` minus ``]`` logit, nested prompts against flat ones.

    .venv/bin/python scripts/nested_context.py runs/tests-sparse runs/tests-sparse-more \
        runs/wide-sparse runs/idioms-sparse runs/idioms2-sparse runs/wide-idioms-sparse \
        > results/history/corpus_tests/nested_context.txt
"""
import sys
from collections import defaultdict

import cspkit
from cspkit import natural, tasks

CORPUS = ["stdlib", "package:numpy/**/tests", "package:sympy/**/tests"]


def line(name, values):
    acc = sum(v > 0 for v in values) / len(values)
    return f"  {name:44s} {len(values):4d}  accuracy {acc:.3f}  mean margin {sum(values) / len(values):+.2f}"


def auc(flat, nested):
    """P(a nested prompt's ]] - ] logit exceeds a flat one's); a flat margin is ] - ]], hence -f."""
    wins = sum((n > -f) + 0.5 * (n == -f) for f in flat for n in nested)
    return f"  {'discrimination, AUC nested against flat':44s} {wins / (len(flat) * len(nested)):.3f}"


template = tasks.get("bracket_counting").pairs("test")
mined = natural.mine("bracket_counting", CORPUS).pairs("test")
for path in sys.argv[1:]:
    model = cspkit.load(path)
    print(path)
    flat, nested = tasks.margins(model, template)
    groups = defaultdict(list)
    for p, m in zip(template, nested):
        last = p.prompt_b.rsplit("\n", 1)[-1]
        groups[f"template '{last.split()[0]} [[...', {last.count(',') + 1} numbers"].append(m)
    print(line("template, flat prompts", flat))
    for k in sorted(groups):
        print(line(k, groups[k]))
    print(auc(flat, nested))
    flat, nested = tasks.margins(model, mined)
    print(line("natural, flat prompts", flat))
    for seen in (True, False):
        group = [m for p, m in zip(mined, nested) if ("]]" in p.prompt_b.rsplit("\n", 1)[0]) == seen]
        print(line(f"natural nested, {'a' if seen else 'no'} ']]' earlier in context", group))
    print(auc(flat, nested))
