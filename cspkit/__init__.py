"""cspkit: train weight-sparse transformers, find the circuits they use for Python next-token
tasks, explore them, and bridge them to dense models (Gao et al. 2025, "Weight-sparse
transformers have interpretable circuits"; docs/method.md).

The pipeline, one call a step:

    model   = cspkit.load("small-sparse")                  # or cspkit.train(*cspkit.config_for("tiny"), out)
    scores  = cspkit.evaluate(model, "single_double_quote")  # a task from cspkit.tasks
    circuit = cspkit.prune(model, "single_double_quote")     # the smallest node set at loss 0.15
    table   = cspkit.validate(circuit)                       # the controls
    cspkit.circuit_graph(circuit)                            # or cspkit.explore(model, tasks)
    cspkit.bridges.load(path)                                # a sparse model steering a dense one
    cspkit.course.check(name, answer)                        # the notebooks' exercises

Modules, in the order they depend on each other: paths, files, config, profiles, tokenizer,
tasks, data, hooks, model, sparsity, checkpoint, training, natural, ablation, circuit, pruning,
validation, sweeps, viz, bridges, patching, compat, course, cli.
"""
from . import bridges, course, tasks
from .checkpoint import load
from .circuit import Circuit
from .compat import load_openai_checkpoint
from .profiles import config_for
from .pruning import prune
from .sweeps import sweep
from .tasks import evaluate
from .tokenizer import get_encoding
from .training import train
from .validation import validate
from .viz import circuit_graph, explore, token_heatmap

__all__ = ["load", "get_encoding", "config_for", "train", "tasks", "evaluate", "prune", "Circuit", "validate",
           "sweep", "circuit_graph", "explore", "token_heatmap", "load_openai_checkpoint", "bridges",
           "course"]
__version__ = "0.1.0"
