"""The node statistics the graph and the explorer show: each circuit node's ablation effect on
its task, and the corpus contexts where each node of a model is most strongly active.

Both are cached in memory (per circuit and per model) so that redrawing a graph or choosing
another node costs nothing. ``as_node`` and ``model_encoding`` are the small helpers the other
viz modules share.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import tiktoken
import torch
from tqdm.auto import tqdm

from .. import tasks as tasks_mod
from ..ablation import ablation_values, fingerprint, gate_hooks, keep_gates, node_widths
from ..circuit import Circuit, score
from ..data import TokenData, build_shards
from ..model import GPT, parse_node
from ..tokenizer import get_encoding


def as_node(node) -> tuple[str, int]:
    """A node given as ``"1.mlp.neuron[37]"`` or ``("1.mlp.neuron", 37)``, as (location, index)."""
    if isinstance(node, str):
        return parse_node(node)
    loc, i = node
    return loc, int(i)


def model_encoding(model: GPT) -> tiktoken.Encoding:
    """The model's own tokenizer (``model.encoding``), else the shipped one."""
    return model.encoding if getattr(model, "encoding", None) is not None else get_encoding()


# --------------------------------------------------------------------------- ablation effects
_EFFECTS: dict[tuple, dict[str, float]] = {}


@torch.no_grad()
def ablation_effects(circuit: Circuit, n_pairs: int = 16, split: str = "test", chunk: int = 4,
                     progress: bool = False) -> dict[str, float]:
    """Per circuit node, the change in the circuit's task loss when that node is ablated too:
    ``circuit.evaluate(nodes=circuit minus node) - circuit.evaluate()`` on the first ``n_pairs``
    pairs of ``split``, with the circuit's ablation and calibration. Positive: the circuit needs
    the node. ``chunk`` nodes share one forward pass (the prompts repeated once per node);
    results are cached per circuit."""
    model = circuit.require_model("drawing it")
    task = circuit.task_obj if circuit.task_obj is not None else tasks_mod.get(circuit.task)
    pairs = task.pairs(split, n=n_pairs)
    # keyed by the prompts and candidates themselves: a task redefined under the same name differs
    key = (circuit.model_fingerprint or fingerprint(model), tasks_mod.pairs_digest(pairs), circuit.ablation,
           tuple(circuit.calibration), json.dumps(circuit.nodes, sort_keys=True))
    if key in _EFFECTS:
        return _EFFECTS[key]
    batch = tasks_mod.encode_pairs(pairs, model.config.block_size, model.encoding)
    tokens, P = batch["tokens"].to(model.device), batch["tokens"].shape[0]
    values = ablation_values(model, circuit.ablation, tokens)
    keep = keep_gates(model.config, circuit.nodes, model.device)
    names = circuit.node_names()
    base = score(*_pair_logits(model, tokens, batch, {k: g.expand(P, 1, -1) for k, g in keep.items()}, values, 1),
                 circuit.calibration)["loss"]
    out = {}
    for s in tqdm(range(0, len(names), chunk), desc=f"ablation effects {circuit.task}", disable=not progress,
                  leave=False):
        group = names[s:s + chunk]
        gates = {loc: g.repeat(len(group), 1) for loc, g in keep.items()}        # (len(group), width)
        for row, name in enumerate(group):
            loc, i = parse_node(name)
            gates[loc][row, i] = 0.0
        gates = {loc: g.repeat_interleave(P, 0).unsqueeze(1) for loc, g in gates.items()}  # (len(group) * P, 1, width)
        two, label = _pair_logits(model, tokens, batch, gates, values, len(group))
        for row, name in enumerate(group):
            rows = slice(row * P, (row + 1) * P)
            out[name] = score(two[rows], label[rows], circuit.calibration)["loss"] - base
    _EFFECTS[key] = out
    return out


def _pair_logits(model, tokens, batch, gates, values, copies: int):
    """Candidate logits of the prompts repeated ``copies`` times, each copy with its own gates."""
    resample = values[next(iter(values))].dim() == 3
    if resample:  # per-prompt values, repeated like the prompts
        values = {k: v.repeat(copies, 1, 1) for k, v in values.items()}
    sel = {"last": batch["last"].repeat(copies), "cands": batch["cands"].repeat(copies, 1)}
    # the pair loss reads only the last tokens' logits: the unembedding (and the last block, unless
    # resample values differ per position) runs there alone, as in Circuit.evaluate
    logits = model.run_with_hooks(tokens.repeat(copies, 1), gate_hooks(gates, values), last=sel["last"],
                                  last_block_at_last=not resample)
    return tasks_mod.pair_logits(logits, sel).float().cpu(), batch["label"].repeat(copies)


# --------------------------------------------------------------------------- corpus activations
@dataclass
class CorpusStats:
    """The strongest activations of every node over a few corpus windows (validation split).
    ``top[loc]`` and ``bottom[loc]`` hold (values, flat positions), each (k, width): the k
    largest and the k most negative activations, strongest first; a flat position is
    window * window_length + token."""
    tokens: torch.Tensor                               # (windows, window_length)
    strings: list[list[str]]                           # the decoded tokens
    top: dict[str, tuple[torch.Tensor, torch.Tensor]]
    bottom: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def extremes(self, node, sign: int = 1, n: int = 3) -> list[tuple[int, int, float]]:
        """(window, token, activation) of the node's n strongest positive (sign 1) or negative
        (sign -1) activations, zeros left out."""
        loc, i = as_node(node)
        vals, pos = (self.top if sign > 0 else self.bottom)[loc]
        T = self.tokens.shape[1]
        out = [(*divmod(int(p), T), float(v)) for v, p in zip(vals[:, i], pos[:, i]) if v * sign > 0]
        return out[:n]

    def top_tokens(self, node, sign: int = 1, n: int = 4) -> list[tuple[str, float]]:
        """The distinct tokens at the node's strongest activations of that sign, with the strongest value."""
        seen: dict[str, float] = {}
        for w, t, v in self.extremes(node, sign, n=len(self.top[as_node(node)[0]][0])):
            seen.setdefault(self.strings[w][t], v)
        return list(seen.items())[:n]


_STATS: dict[tuple, CorpusStats] = {}


@torch.no_grad()
def corpus_stats(model: GPT, n_windows: int = 32, window: int = 64, k: int = 16, seed: int = 0) -> CorpusStats:
    """Strongest activations of every node on ``n_windows`` random windows of the validation
    split of the model's training corpus (one forward pass; cached per model)."""
    key = (fingerprint(model), n_windows, window, k, seed)
    if key in _STATS:
        return _STATS[key]
    train_cfg = (getattr(model, "checkpoint", None) or {}).get("train") or {}
    info = build_shards(train_cfg.get("corpus"), train_cfg.get("val_percent", 5.0))
    x, _ = TokenData(info, "val").batch(n_windows, min(window, model.config.block_size), seed, 0)
    top, bottom = {}, {}

    def record(act, name):
        flat = act.flatten(0, 1).float()                                   # (windows * window_length, width)
        kk = min(k, flat.shape[0])
        v, p = flat.topk(kk, dim=0)
        top[name] = (v.cpu(), p.cpu())
        v, p = (-flat).topk(kk, dim=0)
        bottom[name] = (-v.cpu(), p.cpu())

    model.run_with_hooks(x.to(model.device), {loc: record for loc in node_widths(model.config)})
    enc = model_encoding(model)
    stats = CorpusStats(x, [[enc.decode([t]) for t in row] for row in x.tolist()], top, bottom)
    _STATS[key] = stats
    return stats
