"""Taking a circuit apart by hand: direct logit attribution of the residual writes, activation
patching from class A prompts into class B (site x position), and a circuit scored with one
head's attention replaced by a rule (docs/method.md, "Reading a circuit by hand").

All three read the pair loss's one position, each prompt's last token, and the difference of the
right and the wrong candidate's logits there (the logit difference, positive when the model is
right)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import tasks as tasks_mod
from .ablation import ablation_values, gate_hooks
from .bridges.maps import residuals, run_sublayers
from .circuit import Circuit, score
from .model import GPT, node_name

WRITES = ("attn.out", "mlp.out")   # the node locations that write into the residual stream


def _batch(model: GPT, pairs) -> dict[str, torch.Tensor]:
    b = tasks_mod.encode_pairs(pairs, model.config.block_size, model.encoding)
    b["tokens"] = tasks_mod.trim(b["tokens"], b["last"]).to(model.device)
    return b


def _unembed_rows(model: GPT) -> torch.Tensor:
    return model.wte.weight if model.lm_head is None else model.lm_head.weight   # (vocab, d_model)


@torch.no_grad()
def direct_logit_attribution(model: GPT, task, split: str = "test", n: int | None = None,
                             nodes: list[str] | None = None) -> dict[str, float]:
    """Per residual write (``L.attn.out[c]``, ``L.mlp.out[c]``; default every one), its direct
    effect on the logit difference at the last token, mean over the split's prompts: the write
    times the final norm's gain over the final residual's RMS (frozen at its value on that
    prompt), times the unembedding's right-minus-wrong row. ``embed[c]`` is the token and
    position embedding's share. With an RMS norm and no logit biases the shares of all channels
    sum to the logit difference."""
    cfg = model.config
    if cfg.norm != "rms":
        raise ValueError("direct logit attribution here assumes an RMS final norm (a LayerNorm also "
                         "centres the residual, which mixes every channel into every other)")
    b = _batch(model, tasks_mod.get(task).pairs(split, n=n))
    locs = ["embed"] + [f"{L}.{w}" for L in range(cfg.n_layer) for w in WRITES]
    _, cache = model.run_with_cache(b["tokens"], names=locs)
    rows = torch.arange(len(b["last"]))
    at_last = {loc: cache[loc][rows, b["last"]].float() for loc in locs}               # (P, d_model) each
    final = sum(at_last.values())                                                      # the final residual
    scale = model.ln_f.weight.float() * torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + model.ln_f.eps)
    right = b["cands"].gather(1, b["label"][:, None])[:, 0]
    wrong = b["cands"].gather(1, 1 - b["label"][:, None])[:, 0]
    W = _unembed_rows(model).float()
    direction = (W[right] - W[wrong]).to(final.device) * scale                          # (P, d_model)
    share = {loc: (x * direction).mean(0).cpu() for loc, x in at_last.items()}        # (d_model,) each
    if nodes is not None:
        out = {}
        for name in nodes:
            loc, c = name.rsplit("[", 1)
            if loc not in share:
                raise ValueError(f"{name} does not write into the residual stream; attribute one of "
                                 f"{', '.join(WRITES)} nodes or embed[c]")
            out[name] = float(share[loc][int(c[:-1])])
        return out
    return {node_name(loc, c): v for loc, vec in share.items() for c, v in enumerate(vec.tolist())}


def _logit_diff(logits: torch.Tensor, b: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
    two = tasks_mod.pair_logits(logits, {"last": b["last"][rows], "cands": b["cands"][rows]})
    label = b["label"][rows].to(two.device)
    return two.gather(1, label[:, None])[:, 0] - two.gather(1, 1 - label[:, None])[:, 0]


def _same_length_pairs(model: GPT, task, split: str, n: int) -> list:
    pairs = [p for p in tasks_mod.get(task).pairs(split, n=4 * n)
             if len(model.encoding.encode(p.prompt_a)) == len(model.encoding.encode(p.prompt_b))][:n]
    if not pairs:
        raise ValueError(f"{task}: no pair of {split} has prompts of one length; patching needs positions "
                         "that line up")
    return pairs


@torch.no_grad()
def _patched(model: GPT, b: dict, res: list[torch.Tensor], i: int, where: torch.Tensor) -> torch.Tensor:
    """B's logit difference with B's residual at site i replaced by A's where ``where`` (N, T) is
    true (the pair's A prompt is row j, its B prompt row N + j)."""
    N = len(b["last"]) // 2
    x = torch.where(where[..., None].to(res[i].device), res[i][:N], res[i][N:])
    sites = len(model.sublayers())
    out = model.unembed(x, b["tokens"][N:]) if i == sites else run_sublayers(model, b["tokens"][N:], x, start=i)
    return _logit_diff(out, b, slice(N, 2 * N))


@torch.no_grad()
def _runs(model: GPT, pairs) -> tuple[dict, list[torch.Tensor], torch.Tensor, torch.Tensor, list[str]]:
    """The batch, the residual at every site (and the final one), B's own logit difference, and
    A's answer in B's terms (B's right-minus-wrong is A's wrong-minus-right)."""
    b = _batch(model, pairs)
    N = len(pairs)
    logits, res = residuals(model, b["tokens"])
    res = res + [run_sublayers(model, b["tokens"], res[-1], start=len(res) - 1, stop=len(res))]
    sites = [s for s, _ in model.sublayers()] + ["final"]
    return b, res, _logit_diff(logits[N:], b, slice(N, 2 * N)), -_logit_diff(logits[:N], b, slice(0, N)), sites


def patching_map(model: GPT, task, split: str = "test", index: int = 0) -> dict:
    """Activation patching of one pair (the ``index``-th of the split whose prompts have one
    length), from its A prompt into its B prompt: for every residual site (``L.attn``, ``L.mlp``:
    the residual entering that sublayer; ``final``: the last one) and every position, B's residual
    at that one place replaced by A's. ``recovered`` (sites x positions) says how far that moves
    B's logit difference from its own value to A's answer (0: nothing, 1: all the way); ``tokens``
    label the positions (B's prompt)."""
    pair = _same_length_pairs(model, task, split, index + 1)[index]
    b, res, base, target, sites = _runs(model, [pair])
    T = int(b["last"][1]) + 1
    recovered = torch.zeros(len(sites), T)
    for i in range(len(sites)):
        for t in range(T):
            where = torch.zeros(1, res[i].shape[1], dtype=torch.bool)
            where[0, t] = True
            moved = _patched(model, b, res, i, where)
            recovered[i, t] = float((base - moved) / (base - target))
    toks = [model.encoding.decode([t]) for t in b["tokens"][1, :T].tolist()]
    return {"sites": sites, "tokens": toks, "recovered": recovered, "pair": pair}


def patching_summary(model: GPT, task, split: str = "test", n: int = 32) -> dict:
    """``patching_map`` over ``n`` pairs, with positions grouped by their role: the first token
    where the pair's prompts differ, the tokens between it and the last, and the last token;
    ``recovered`` (sites x 3) is the mean over pairs of patching the whole group at once."""
    pairs = _same_length_pairs(model, task, split, n)
    b, res, base, target, sites = _runs(model, pairs)
    N, T = len(pairs), b["tokens"].shape[1]
    pos = torch.arange(T)[None, :]
    differ = (b["tokens"][:N] != b["tokens"][N:]).cpu()
    first = differ.float().argmax(1)[:, None]                       # (N, 1): the first differing token
    last = b["last"][N:][:, None].cpu()
    groups = {"first differing token": pos == first, "between": (pos > first) & (pos < last), "last token": pos == last}
    recovered = torch.zeros(len(sites), len(groups))
    for i in range(len(sites)):
        for j, where in enumerate(groups.values()):
            moved = _patched(model, b, res, i, where)
            recovered[i, j] = float(((base - moved) / (base - target)).mean())
    return {"sites": sites, "groups": list(groups), "recovered": recovered, "pairs": N}


def head_rule_hook(model: GPT, layer: int, head: int, source: torch.Tensor) -> dict[str, Callable]:
    """A hook on ``L.attn.v`` that replaces head ``head``'s value at every position by its value
    at ``source[i]`` on prompt i: the head's output at any token is then that value, as if it
    attended to ``source`` alone. Exact at the last token for the last layer only (the values
    other positions then carry feed no later layer), so it is refused for earlier layers."""
    if layer != model.config.n_layer - 1:
        raise ValueError(f"a head rule replaces values, which is exact only in the last layer "
                         f"({model.config.n_layer - 1}), not layer {layer}")
    d = model.config.d_head
    sl = slice(head * d, (head + 1) * d)

    def hook(v, name):                                       # v: (B, T, n_head * d_head)
        v = v.clone()
        picked = v[torch.arange(v.shape[0]), source.to(v.device), sl]                  # (B, d_head)
        v[:, :, sl] = picked[:, None, :]
        return v
    return {f"{layer}.attn.v": hook}


@torch.no_grad()
def evaluate_head_rule(circuit: Circuit, layer: int, head: int, rule: Callable[[list[int]], int],
                       split: str = "test", n: int | None = None) -> dict[str, float]:
    """The circuit's task loss (its calibration, the rest of the model ablated as the circuit
    ablates it) with head ``head`` of layer ``layer`` made to attend only where ``rule`` says:
    ``rule(token_ids)`` gets a prompt's tokens (up to its last) and returns a position. The
    model has no sink there and the rule's position gets all of the head's attention; compare
    with ``circuit.evaluate(split, n)``."""
    model = circuit.require_model()
    if model.config.sink:
        raise ValueError("the head rule assumes attention without a sink (the head's weights sum to 1)")
    pairs = circuit.get_task().pairs(split, n=n)
    b = _batch(model, pairs)
    source = torch.tensor([rule(b["tokens"][i, :int(b["last"][i]) + 1].tolist()) for i in range(len(b["last"]))])
    if ((source < 0) | (source > b["last"])).any():
        raise ValueError("the rule returned a position outside the prompt (or after its last token)")
    gates, edges = circuit.ablation_gates()
    if edges is not None:
        raise ValueError("evaluate_head_rule takes a node circuit; an edge circuit's edge gates are not applied")
    if circuit.ablation == "resample":
        raise ValueError("evaluate_head_rule takes a mean- or zero-ablated circuit")
    hooks = gate_hooks(gates, ablation_values(model, circuit.ablation))
    rule_hooks = head_rule_hook(model, layer, head, source)
    for name, fn in rule_hooks.items():        # after the ablation at the same location
        hooks[name] = [hooks[name], fn] if name in hooks else fn
    logits = model.run_with_hooks(b["tokens"], hooks, last=b["last"])
    two = tasks_mod.pair_logits(logits, b)
    return score(two, b["label"], circuit.calibration)
