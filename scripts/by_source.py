"""Why flat lists are the hard side of bracket counting, and where each cycle's gains land.

Per source of the recipe's corpus: how often a digit is followed by ``]]`` and by ``]`` plus a
newline in its Python files (the prior a model learns for closing a list of numbers), then per
model: validation loss on the recipe's mix and on each source alone (the same validation
windows for every model), and bracket counting's test loss and mean margin on each side.

    .venv/bin/python scripts/by_source.py data/models/small-sparse runs/small-sparse-more \
        runs/small-sparse-more2 runs/small-sparse-more3 > results/history/corpus_idioms/by_source.txt
"""
import dataclasses
import re
import sys

import cspkit
from cspkit import data, tasks
from cspkit.profiles import profile
from cspkit.training import evaluate_loss

BATCHES = 32  # batches of 16 windows of 256 tokens per mixture: 131k validation tokens each

recipe = profile("small")[1]
sources = recipe.corpus[:3]  # the task idioms (entry 4) are templates, not a source of real code

print("digit then ']]' against digit then ']\\n', in the training files of each source")
corpus = data.load_corpus(recipe.corpus, recipe.val_percent)
for i, name in enumerate(sources):
    text = [f.text for f in corpus.train if f.root == i]
    nested = sum(len(re.findall(r"\d\]\]", t)) for t in text)
    flat = sum(len(re.findall(r"\d\]\n", t)) for t in text)
    print(f"  {name:26s} {len(text):6d} files  ]] {nested:6d}  ]\\n {flat:6d}  ratio {nested / flat:.2f}")

info = data.build_shards(recipe.corpus, recipe.val_percent, corpus=corpus)
mixes = {"recipe mix": recipe.corpus_weights}
mixes.update({name: [float(j == i) for j in range(len(recipe.corpus))] for i, name in enumerate(sources)})
evals = {name: data.TokenData(info, "val", w) for name, w in mixes.items()}
settings = dataclasses.replace(recipe, eval_batches=BATCHES)

print(f"\n{'model':28s}" + "".join(f"{n:>24s}" for n in mixes) + "   bracket loss  margin flat  margin nested")
for path in sys.argv[1:]:
    model = cspkit.load(path)
    losses = [evaluate_loss(model, d, settings, model.config.block_size) for d in evals.values()]
    r = tasks.evaluate(model, "bracket_counting")
    print(f"{path:28s}" + "".join(f"{v:24.3f}" for v in losses)
          + f"   {r['loss']:12.3f}  {r['margin_a']:+11.2f}  {r['margin_b']:+13.2f}")
