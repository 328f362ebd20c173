"""Steering the dense model through a sparse read channel: the change of the channel, carried
through the bridge's decoder into the dense residual (``steering_vector``, ``intervene``); which
channel separates a task's two prompt classes (``channel_stats``, ``pick_channel``); and how often
steering flips the answer (``flip_rates`` against a random direction of the same norm,
``own_flip_rates`` in the sparse model itself, ``steering_fidelity``). docs/method.md,
"Interventions".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import tasks as tasks_mod
from ..model import GPT, node_name, parse_node
from .maps import KINDS, Bridge, run_sublayers

READS = {"attn.in": "ln_1", "mlp.in": "ln_2"}  # read location -> the norm that produces it


def read_channel(model: GPT, node: str) -> tuple[int, int, nn.Module]:
    """A read channel ``L.attn.in[c]`` / ``L.mlp.in[c]`` -> (site index, c, the norm it reads through)."""
    loc, c = parse_node(node)
    layer, _, kind = loc.partition(".")
    if kind not in READS or not layer.isdigit() or int(layer) >= model.config.n_layer:
        raise ValueError(f"node {node!r} is not a read channel; steer an L.attn.in[c] or L.mlp.in[c] "
                         f"node with L < {model.config.n_layer}")
    if c >= model.config.d_model:
        raise ValueError(f"node {node!r}: channel {c} is out of range (d_model {model.config.d_model})")
    return 2 * int(layer) + KINDS.index(kind.split(".")[0]), c, getattr(model.h[int(layer)], READS[kind])


def read_channels(model: GPT, nodes: str | list[str]) -> tuple[int, list[int], nn.Module]:
    """One read channel or several at one site -> (site index, channels, the norm they read through)."""
    nodes = [nodes] if isinstance(nodes, str) else list(nodes)
    if not nodes:
        raise ValueError("no channel to steer")
    got = [read_channel(model, x) for x in nodes]
    if len({i for i, _, _ in got}) > 1:
        raise ValueError(f"the channels {nodes} read different sites; steer channels of one site at a time")
    return got[0][0], [c for _, c, _ in got], got[0][2]


@torch.no_grad()
def steering_vector(dense: GPT, sparse: GPT, bridge: Bridge, node: str | list[str], delta: float | torch.Tensor,
                    strength: float, tokens: torch.Tensor, control_seed: int | None = None) -> torch.Tensor:
    """What ``intervene`` adds to the dense residual at the node's site, (N, T, d_dense).

    The node is a normalized read of the sparse model, n_c = g_c * r_c / s(r) with s the RMS of
    the residual r (for LayerNorm models, its standard deviation); the AbsTopK after the norm is
    ignored. Raising n_c by delta at a token is, to first order (s moves a little too), raising
    the residual channel r_c by delta * s(r) / g_c. The decoder's
    linear part maps that change into the dense residual, and the result is rescaled by the
    ratio of residual norms ||r_dense|| / ||decoder(r_sparse)|| at each token: the change then
    has the same size relative to the dense residual as to the decoded one, which corrects a
    decoder that shrinks or inflates its output.

    ``node``: one read channel, or a list of k read channels of one site, all changed at once.
    ``delta``: for one node a number or one per sequence (N,); for k nodes one per node (k,) or
    per sequence and node (N, k). ``strength`` multiplies it. With ``control_seed`` the vector is
    replaced by a random direction per sequence (drawn from that seed) with the same norm at
    every token: the control.
    """
    i, cs, norm = read_channels(sparse, node)
    rs, rd = run_sublayers(sparse, tokens, stop=i), run_sublayers(dense, tokens, stop=i)
    var = rs.var(-1, unbiased=False, keepdim=True) if norm.kind == "layer" else rs.pow(2).mean(-1, keepdim=True)
    gain = norm.weight[cs].to(rs)                                         # (k,)
    if bool((gain == 0).any()):
        raise ValueError(f"node {node!r}: norm gain 0, the sparse model never reads it")
    d = torch.as_tensor(delta, dtype=rs.dtype, device=rs.device)
    d = d.reshape(-1, 1) if isinstance(node, str) else d.reshape(-1, len(cs))
    d = d[:, None, :] * strength                                          # (N or 1, 1, k)
    dx = torch.zeros_like(rs)
    dx[..., cs] = d * torch.sqrt(var + norm.eps) / gain                   # the change of the residual channels
    v = bridge.decode_change(i, dx)                                       # (N, T, d_dense)
    v = v * rd.norm(dim=-1, keepdim=True) / bridge.decode(i, rs).norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if control_seed is not None:
        g = torch.Generator().manual_seed(control_seed)
        u = torch.randn(v.shape[0], 1, v.shape[-1], generator=g).to(v)   # (N, 1, d): one direction per sequence
        v = u / u.norm(dim=-1, keepdim=True) * v.norm(dim=-1, keepdim=True)
    return v


@torch.no_grad()
def intervene(dense: GPT, sparse: GPT, bridge: Bridge, node: str | list[str], delta: float | torch.Tensor,
              strength: float = 1.0, *, tokens: torch.Tensor, control_seed: int | None = None) -> torch.Tensor:
    """The dense model's logits (N, T, vocab) on ``tokens`` with the sparse read channel ``node``
    (or several of one site) changed by ``strength * delta`` at every token, carried into the
    dense residual at the node's site through the bridge's decoder (``steering_vector``).
    Strength 0 gives the dense model's own logits exactly. ``control_seed``: the random-direction
    control of the same norm.

    >>> import torch
    >>> from cspkit import bridges, paths
    >>> dense, sparse, bridge = bridges.load(paths.models_dir() / "small-bridge")
    >>> tokens = torch.tensor([dense.encoding.encode("x = 'a'")])
    >>> steered = bridges.intervene(dense, sparse, bridge, "3.attn.in[112]", -5.0, tokens=tokens)
    >>> steered.shape == dense(tokens).shape, torch.equal(steered, dense(tokens))
    (True, False)
    >>> torch.equal(bridges.intervene(dense, sparse, bridge, "3.attn.in[112]", -5.0, 0.0, tokens=tokens),
    ...             dense(tokens))
    True
    """
    tokens = tokens.to(dense.device)
    i = read_channels(sparse, node)[0]
    v = steering_vector(dense, sparse, bridge, node, delta, strength, tokens, control_seed)
    return run_sublayers(dense, tokens, run_sublayers(dense, tokens, stop=i) + v, start=i)


@dataclass
class Channel:
    """A sparse read channel's values at one token of a task's prompts (``at``, see ``channel_stats``)."""
    node: str
    mean_a: float        # mean over the prompts whose answer is cand_a
    mean_b: float
    score: float         # (mean_b - mean_a) / pooled standard deviation
    at: str = "last"

    @property
    def delta(self) -> float:
        """The default steering delta: strength 1 moves class A's mean value to class B's."""
        return self.mean_b - self.mean_a


@torch.no_grad()
def diff_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2N,) for ``tasks.encode_pairs`` output: the first token where each pair's two prompts differ
    (the same index for both), or the prompt's last token where they do not differ before it."""
    tok, last = batch["tokens"], batch["last"]
    n = tok.shape[0] // 2
    stop = torch.minimum(last[:n], last[n:])                              # (N,)
    pos = torch.arange(tok.shape[1])
    differ = (tok[:n] != tok[n:]) & (pos[None] <= stop[:, None])
    first = torch.where(differ.any(1), differ.float().argmax(1), stop)
    out = first.repeat(2)
    return torch.minimum(out, last)


AT = ("last", "diff")  # where channel_stats reads a channel


@torch.no_grad()
def channel_stats(sparse: GPT, task, nodes: list[str] | None = None, split: str = "train", n: int | None = None,
                  seed: int = 0, batch_size: int = 64, at: str = "last") -> list[Channel]:
    """Class means and standardized mean difference of read channels at one token of the task's
    prompts: ``at="last"`` the last token (where the answer is predicted), ``at="diff"`` the first
    token where the pair's two prompts differ (for the quote task, the opening quote: where the
    information enters). ``nodes`` None: every channel of every ``L.attn.in`` and ``L.mlp.in``."""
    if at not in AT:
        raise ValueError(f"at must be one of {AT}, not {at!r}")
    t = tasks_mod.get(task)
    if nodes is None:
        nodes = [node_name(f"{l}.{r}", c) for l in range(sparse.config.n_layer) for r in READS
                 for c in range(sparse.config.d_model)]
    parsed = [parse_node(x) for x in nodes]
    for x in nodes:
        read_channel(sparse, x)
    locs = sorted({loc for loc, _ in parsed})
    batch = tasks_mod.encode_pairs(t.pairs(split, n=n, seed=seed), sparse.config.block_size)
    where = batch["last"] if at == "last" else diff_positions(batch)
    vals = {loc: [] for loc in locs}
    for b in range(0, batch["tokens"].shape[0], batch_size):
        toks = batch["tokens"][b:b + batch_size].to(sparse.device)
        _, cache = sparse.run_with_cache(toks, locs)
        rows = torch.arange(toks.shape[0])
        for loc in locs:
            vals[loc].append(cache[loc][rows, where[b:b + batch_size]].float().cpu())    # (n, d)
    vals = {loc: torch.cat(v) for loc, v in vals.items()}                # (2N, d)
    label = batch["label"].bool()
    out = []
    for x, (loc, c) in zip(nodes, parsed):
        v = vals[loc][:, c]
        a, b = v[~label], v[label]
        # the floor on the variance keeps near-constant channels from winning on a tiny difference
        pooled = math.sqrt((float(a.var(unbiased=False)) + float(b.var(unbiased=False))) / 2 + 1e-4)
        out.append(Channel(x, float(a.mean()), float(b.mean()), (float(b.mean()) - float(a.mean())) / pooled, at))
    return out


def pick_channel(sparse: GPT, task, candidates: list[str] | None = None, split: str = "train",
                 n: int | None = None, at: str = "last") -> Channel:
    """The read channel (among ``candidates``, default all) whose value (at the token ``at``, see
    ``channel_stats``) best separates the task's two prompt classes: the largest absolute
    standardized mean difference."""
    stats = channel_stats(sparse, task, candidates, split, n, at=at)
    if not stats:
        raise ValueError("no candidate channels given")
    return max(stats, key=lambda ch: abs(ch.score))


@torch.no_grad()
def flip_rates(dense: GPT, sparse: GPT, bridge: Bridge, task, channel: Channel | list[Channel],
               strengths=(0.25, 0.5, 1.0), split: str = "test", n: int | None = None, seed: int = 0,
               batch_size: int = 64) -> dict:
    """Steer every prompt of the task toward the other class (class-A prompts by +delta, class-B
    by -delta, delta = channel.delta) and count how often the dense model's preferred candidate
    flips to the other class's answer, among the prompts it answered right unsteered;
    ``logit_shift`` is the mean change of their other-minus-own candidate logit gap (positive:
    toward the other class). The control adds a random direction of the same norm at every token
    (one per prompt, seeded). ``channel`` may be a list of channels of one site (``site_channels``):
    all are steered at once, each by its own delta; the result's node, delta, means and score are
    then lists.

    >>> from cspkit import bridges, paths
    >>> dense, sparse, bridge = bridges.load(paths.models_dir() / "small-bridge")
    >>> task = "single_double_quote"
    >>> channel = bridges.channel_stats(sparse, task, ["3.attn.in[112]"], n=4, at="diff")[0]
    >>> r = bridges.flip_rates(dense, sparse, bridge, task, channel, [0.0, 1.0], n=4)
    >>> r["site"], r["prompts"], [row["strength"] for row in r["rows"]]
    ('3.attn', 8, [0.0, 1.0])
    >>> r["rows"][0]["flip_rate"], r["rows"][1]["logit_shift"] > r["rows"][1]["control_logit_shift"]
    (0.0, True)
    """
    chans = [channel] if isinstance(channel, Channel) else list(channel)
    node = chans[0].node if isinstance(channel, Channel) else [ch.node for ch in chans]
    deltas = torch.tensor([ch.delta for ch in chans])                     # (k,)
    t = tasks_mod.get(task)
    block = min(dense.config.block_size, sparse.config.block_size)
    batch = tasks_mod.encode_pairs(t.pairs(split, n=n, seed=seed), block)
    label = batch["label"]
    sign = 1.0 - 2.0 * label.float()                                      # +1 class A, -1 class B
    N = label.shape[0]

    i = read_channels(sparse, node)[0]
    # the steering vector is linear in strength: compute it (and the control's) once per batch at
    # strength 1, then run only the dense suffix per strength
    two = {st: [] for st in dict.fromkeys([0.0] + [float(st) for st in strengths])}
    control = {float(st): [] for st in strengths}
    for b in range(0, N, batch_size):
        sl = slice(b, b + batch_size)
        toks = batch["tokens"][sl].to(dense.device)
        d = sign[sl, None] * deltas
        rd = run_sublayers(dense, toks, stop=i)
        vs = {rand: steering_vector(dense, sparse, bridge, node, d, 1.0, toks, seed + b if rand else None)
              for rand in (False, True)}
        sub = {"last": batch["last"][sl], "cands": batch["cands"][sl]}
        for runs, rand in ((two, False), (control, True)):
            for st, out in runs.items():
                logits = run_sublayers(dense, toks, rd + st * vs[rand] if st else rd, start=i)
                out.append(candidate_logprobs(logits, sub))

    right, rows = _flip_table(two, label, strengths, control)
    return {**_steered(t, split, channel), "site": bridge.sites[i], "prompts": N,
            "dense_right": int(right.sum()), "rows": rows}


@torch.no_grad()
def own_flip_rates(sparse: GPT, task, channel: Channel | list[Channel], strengths=(0.25, 0.5, 1.0),
                   split: str = "test", n: int | None = None, seed: int = 0, batch_size: int = 64) -> dict:
    """``flip_rates`` without the bridge: the same change of the read channel(s), made in the
    sparse model itself at every token (a hook on the read location), and how often the sparse
    model's own answer flips. Beside ``flip_rates`` it tells a channel the sparse model does not
    act on from a bridge that does not carry it to the dense model. No random control."""
    chans = [channel] if isinstance(channel, Channel) else list(channel)
    idx = torch.tensor(read_channels(sparse, [ch.node for ch in chans])[1])   # one site's channels
    loc = parse_node(chans[0].node)[0]
    deltas = torch.tensor([ch.delta for ch in chans])                     # (k,)
    t = tasks_mod.get(task)
    batch = tasks_mod.encode_pairs(t.pairs(split, n=n, seed=seed), sparse.config.block_size)
    label = batch["label"]
    sign = 1.0 - 2.0 * label.float()                                      # +1 class A, -1 class B
    two = {st: [] for st in dict.fromkeys([0.0] + [float(st) for st in strengths])}
    for b in range(0, label.shape[0], batch_size):
        sl = slice(b, b + batch_size)
        toks = batch["tokens"][sl].to(sparse.device)
        d = (sign[sl, None] * deltas).to(toks.device)                     # (B, k)
        sub = {"last": batch["last"][sl], "cands": batch["cands"][sl]}
        for st in two:
            def steer(act, name, st=st, d=d):
                act = act.clone()
                act[..., idx] += st * d[:, None, :].to(act.dtype)         # (B, T, k): every token
                return act
            logits = sparse.run_with_hooks(toks, {loc: steer}) if st else sparse(toks)
            two[st].append(candidate_logprobs(logits, sub))
    right, rows = _flip_table(two, label, strengths)
    return {**_steered(t, split, channel), "prompts": label.shape[0], "sparse_right": int(right.sum()),
            "rows": rows}


@torch.no_grad()
def steering_fidelity(dense: GPT, sparse: GPT, bridge: Bridge, task, channel: Channel | list[Channel],
                      split: str = "test", n: int | None = None, seed: int = 0) -> dict:
    """How much of a steering change the decoder carries into the dense model: at the first token
    where each pair's two prompts differ, the change ``steering_vector`` adds to the dense residual
    of the class-A prompt at strength 1, against the dense model's own class difference there (the
    class-B prompt's residual minus its twin's). Means over pairs of the size ratio, the cosine and
    the coefficient of the change projected on the true difference (1: a faithful translation)."""
    chans = [channel] if isinstance(channel, Channel) else list(channel)
    nodes = [ch.node for ch in chans]
    batch = tasks_mod.encode_pairs(tasks_mod.get(task).pairs(split, n=n, seed=seed), dense.config.block_size)
    tokens = batch["tokens"].to(dense.device)
    k = tokens.shape[0] // 2                                              # pairs
    pos = diff_positions(batch)[:k].to(dense.device)
    at = lambda x: x[torch.arange(k, device=x.device), pos]               # (k, T, d) -> (k, d)
    resid = run_sublayers(dense, tokens, stop=read_channels(sparse, nodes)[0])
    true = at(resid[k:]) - at(resid[:k])                                  # class B minus class A
    deltas = torch.tensor([[ch.delta for ch in chans]]).expand(k, -1)
    v = at(steering_vector(dense, sparse, bridge, nodes, deltas, 1.0, tokens[:k]))
    return {"ratio": float((v.norm(dim=-1) / true.norm(dim=-1)).mean()),
            "cosine": float(F.cosine_similarity(v, true, dim=-1).mean()),
            "projection": float(((v * true).sum(-1) / true.norm(dim=-1) ** 2).mean())}


def _steered(t, split: str, channel: Channel | list[Channel]) -> dict:
    """What was steered, for a result: the node(s), their deltas, class means and scores."""
    chans = [channel] if isinstance(channel, Channel) else list(channel)
    one = isinstance(channel, Channel)
    pick = lambda key: getattr(chans[0], key) if one else [getattr(ch, key) for ch in chans]
    return {"task": t.name, "split": split, "node": pick("node"), "delta": pick("delta"),
            "mean_a": pick("mean_a"), "mean_b": pick("mean_b"), "score": pick("score"), "at": chans[0].at}


def format_flips(rows: list[dict]) -> str:
    """The rows of ``flip_rates`` or ``own_flip_rates`` as a table under a header, one line per
    strength, with the random control's columns where the rows have them."""
    ctl = bool(rows) and "control_flip_rate" in rows[0]
    cols = [("strength", "strength", 8, ".2f"), ("flip rate", "flip_rate", 10, ".3f")]
    cols += [("random control", "control_flip_rate", 15, ".3f")] if ctl else []
    cols += [("logit shift", "logit_shift", 12, ".3f")]
    cols += [("control", "control_logit_shift", 8, ".3f")] if ctl else []
    if rows and "p_other" in rows[0]:     # results written before P(other) was measured have none
        cols += [("P(other)", "p_other", 9, ".3f")]
        cols += [("control", "control_p_other", 8, ".3f")] if ctl else []
    head = " ".join(f"{title:>{width}s}" for title, _, width, _ in cols)
    lines = [head] + [" ".join(f"{row[key]:>{width}{fmt}}" for _, key, width, fmt in cols)
                      + (" (extrapolation)" if row["strength"] > 1 else "") for row in rows]
    return "\n".join(lines)


def candidate_logprobs(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, vocab) logits -> (B, 2): the log-probabilities of the two candidates at each prompt's
    last token under the softmax over the whole vocabulary (their difference is the logit gap)."""
    at_last = tasks_mod.last_logits(logits, batch["last"]).float().log_softmax(-1)   # (B, vocab)
    return tasks_mod.pair_logits(at_last, batch).cpu()


def flip_rate(before: torch.Tensor, after: torch.Tensor, label: torch.Tensor) -> float:
    """Among the prompts whose preferred candidate was right ``before`` (scores (N, 2), label 0
    for candidate A), the fraction that prefer the other candidate ``after``; 0.0 when none was
    right. A prompt wrong before cannot flip: steering is judged on answers the model had."""
    right = before.argmax(-1) == label
    if not right.any():
        return 0.0
    return float((after.argmax(-1) != label)[right].float().mean())


def _flip_table(two: dict[float, list], label: torch.Tensor, strengths,
                control: dict[float, list] | None = None) -> tuple[torch.Tensor, list[dict]]:
    """From each strength's candidate log-probabilities, ``two[strength]`` (batches of (B, 2);
    strength 0 is the unsteered run): which prompts the unsteered model gets right, and per
    strength, among those, the fraction whose preferred candidate flips, the mean change of their
    other-minus-own logit gap, and the mean probability of the other class's answer (over the
    whole vocabulary); the same for ``control``, the random-direction runs, where given."""
    def prefs(runs: dict[float, list], st: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Preferred candidate (2N,), the other-minus-own gap, the other candidate's probability."""
        t2 = torch.cat(runs[st])
        own = t2.gather(1, label[:, None])[:, 0]
        other = t2.gather(1, 1 - label[:, None])[:, 0]
        return t2.argmax(-1), other - own, other.exp()

    base, base_gap, _ = prefs(two, 0.0)
    right = base == label
    mean = lambda x: float(x[right].float().mean()) if right.any() else 0.0
    rows = []
    for st in strengths:
        row = {"strength": st}
        for name, runs in (("", two), ("control_", control)):
            if runs is None:
                continue
            _, gap, p_other = prefs(runs, float(st))
            row[f"{name}flip_rate"] = flip_rate(torch.cat(two[0.0]), torch.cat(runs[float(st)]), label)
            row[f"{name}logit_shift"] = mean(gap - base_gap)
            row[f"{name}p_other"] = mean(p_other)
        rows.append(row)
    return right, rows
