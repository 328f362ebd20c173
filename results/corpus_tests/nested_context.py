"""Bracket counting, nested side: template prompts by template and list length, and natural
prompts by whether an earlier line of their context already closes a nested list with ``]]``.

    .venv/bin/python results/corpus_tests/nested_context.py runs/tests-sparse runs/tests-sparse-more \
        > results/corpus_tests/nested_context.txt
"""
import sys
from collections import defaultdict

import cspkit
from cspkit import natural, tasks

CORPUS = ["stdlib", "package:numpy/**/tests", "package:sympy/**/tests"]


def line(name, values):
    acc = sum(v > 0 for v in values) / len(values)
    return f"  {name:44s} {len(values):4d}  accuracy {acc:.3f}  mean margin {sum(values) / len(values):+.2f}"


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
    flat, nested = tasks.margins(model, mined)
    print(line("natural, flat prompts", flat))
    for seen in (True, False):
        group = [m for p, m in zip(mined, nested) if ("]]" in p.prompt_b.rsplit("\n", 1)[0]) == seen]
        print(line(f"natural nested, {'a' if seen else 'no'} ']]' earlier in context", group))
