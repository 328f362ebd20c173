"""A GPT-2 style decoder in which every node location is a named hook point (docs/method.md, "Model").

Per layer L the hook points are ``L.attn.in``, ``L.attn.q``, ``L.attn.k``, ``L.attn.v``,
``L.attn.out``, ``L.mlp.in``, ``L.mlp.neuron``, ``L.mlp.out``; plus ``embed`` (the residual
after the embeddings) and ``unembed`` (the normalized final residual the unembedding reads).
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LOCATION_TYPES, ModelConfig
from .hooks import HookedMixin, HookPoint


def location_names(n_layer: int, extra: bool = False) -> list[str]:
    """Every node location name in forward order; ``extra`` adds ``embed`` and ``unembed``."""
    names = [f"{l}.{t}" for l in range(n_layer) for t in LOCATION_TYPES]
    return ["embed", *names, "unembed"] if extra else names


def node_name(location: str, index: int) -> str:
    """A node, one channel of a location, is written ``LOCATION[INDEX]``, e.g. ``1.attn.in[12]``."""
    return f"{location}[{index}]"


def parse_node(name: str) -> tuple[str, int]:
    """``"1.attn.in[12]"`` -> ``("1.attn.in", 12)``."""
    m = re.fullmatch(r"(.+)\[(\d+)\]", name.strip())
    if not m:
        raise ValueError(f"node {name!r} is not LOCATION[INDEX], e.g. '1.attn.in[12]'")
    return m.group(1), int(m.group(2))


def abs_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k entries of largest magnitude along the last dim, zero the rest."""
    if k >= x.shape[-1]:
        return x
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    # a 0/1 mask rather than gather + scatter: its backward is one multiply
    keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
    return x * keep


def maybe_topk(cfg: ModelConfig, x: torch.Tensor, loc: str) -> torch.Tensor:
    """AbsTopK with the config's afrac if ``loc`` is one of its activation-sparse locations."""
    if cfg.afrac and loc in cfg.afrac_locations:
        return abs_topk(x, max(1, int(cfg.afrac * x.shape[-1])))
    return x


def at_positions(x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(B, T, d) -> (B, 1, d): each row at its own position ``last[b]``."""
    return x[torch.arange(x.shape[0], device=x.device), last.to(x.device)].unsqueeze(1)


def sink_attention(q, k, v, sink_logit, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention with one extra key/value slot per head whose logit is ``sink_logit[h]``
    for every query and whose value is zero.

    The slot is put first and made a real key by appending a constant 1 to every query and
    sink_logit / scale to the slot's key, so that one fused SDPA call computes it. v gets the
    extra channel too (zero, dropped after): with head sizes that differ, SDPA on CPU falls
    back to its unfused path, 2.7 times slower forward and backward.
    q, k, v: (B, H, T, D) -> (B, H, T, D).
    With ``mask`` (B, 1, Tq, T) for queries that are not the T positions in order (see
    Attention.forward), that mask instead of the causal one; q is then (B, H, Tq, D).
    """
    B, H, T, D = k.shape
    q1 = F.pad(q, (0, 1), value=1.0)                                           # (B, H, Tq, D+1)
    k_sink = torch.cat([q.new_zeros(H, D), (sink_logit / scale).to(q.dtype).unsqueeze(-1)], -1)
    k1 = torch.cat([k_sink.view(1, H, 1, D + 1).expand(B, H, 1, D + 1), F.pad(k, (0, 1))], dim=2)
    v1 = F.pad(v, (0, 1, 1, 0))                                                # (B, H, T+1, D+1)
    if mask is None:
        mask = torch.ones(T, T + 1, dtype=torch.bool, device=q.device).tril(diagonal=1)
    else:
        mask = F.pad(mask, (1, 0), value=True)                                 # the sink slot is always seen
    return F.scaled_dot_product_attention(q1, k1, v1, attn_mask=mask, scale=scale)[..., :D]


class Norm(nn.Module):
    """RMSNorm (gain only, so zero stays zero) or, for openai compat, LayerNorm."""

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Norm:
        return cls(cfg.d_model, cfg.norm, cfg.norm_bias, 1e-5 if cfg.norm_eps is None else cfg.norm_eps)

    def __init__(self, d: int, kind: str = "rms", bias: bool = False, eps: float = 1e-5):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x):
        if self.kind == "layer":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        inner = cfg.n_head * cfg.d_head
        self.c_attn = nn.Linear(cfg.d_model, 3 * inner, bias=cfg.bias)
        self.c_proj = nn.Linear(inner, cfg.d_model, bias=cfg.bias)
        self.sink_logit = nn.Parameter(torch.zeros(cfg.n_head)) if cfg.sink else None
        self.hook_q, self.hook_k, self.hook_v = (HookPoint(f"{layer}.attn.{n}") for n in "qkv")

    def forward(self, x, last: torch.Tensor | None = None):
        """(B, T, d_model) -> (B, T, d_model); with ``last`` (B,) positions, the output at those
        positions only, (B, 1, d_model): every key and value is computed, the query only there."""
        c = self.cfg
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(c.n_head * c.d_head, dim=-1)
        # top-k over all heads together, channel = head * d_head + i
        # L.attn.q / k / v: (B, T, n_head * d_head)
        q = self.hook_q(maybe_topk(self.cfg, q, "attn.q"))
        k = self.hook_k(maybe_topk(self.cfg, k, "attn.k"))
        v = self.hook_v(maybe_topk(self.cfg, v, "attn.v"))
        mask, Tq = None, T
        if last is not None:
            q, Tq = at_positions(q, last), 1
            mask = (torch.arange(T, device=x.device) <= last.to(x.device)[:, None]).view(B, 1, 1, T)
        # (B, T, H*D) -> (B, H, T, D)
        q = q.view(B, Tq, c.n_head, c.d_head).transpose(1, 2)
        k, v = (t.view(B, T, c.n_head, c.d_head).transpose(1, 2) for t in (k, v))
        scale = c.attn_scale if c.attn_scale is not None else 1 / math.sqrt(c.d_head)
        # under bf16 autocast on CPU, attention's backward runs 3x slower in bf16 than in fp32
        fp32 = q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            if fp32:
                q, k, v = q.float(), k.float(), v.float()
            if self.sink_logit is not None:
                y = sink_attention(q, k, v, self.sink_logit, scale, mask)
            elif mask is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        y = y.transpose(1, 2).reshape(B, Tq, c.n_head * c.d_head)    # (B, H, Tq, D) -> (B, Tq, H*D)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)
        self.hook_neuron = HookPoint(f"{layer}.mlp.neuron")

    def forward(self, x):
        c = self.cfg
        h = self.c_fc(x)
        h = F.gelu(h) if c.activation == "gelu" else F.relu(h)
        return self.c_proj(self.hook_neuron(maybe_topk(c, h, "mlp.neuron")))   # L.mlp.neuron: (B, T, d_mlp)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.ln_1 = Norm.from_config(cfg)
        self.attn = Attention(cfg, layer)
        self.ln_2 = Norm.from_config(cfg)
        self.mlp = MLP(cfg, layer)
        names = ("attn.in", "attn.out", "mlp.in", "mlp.out")
        self.hook_attn_in, self.hook_attn_out, self.hook_mlp_in, self.hook_mlp_out = (
            HookPoint(f"{layer}.{n}") for n in names)

    def attn_sublayer(self, x, last: torch.Tensor | None = None):
        """Residual entering the attention -> residual entering the MLP; with ``last`` (B,)
        positions, the latter at those positions only, (B, 1, d_model)."""
        # L.attn.in: (B, T, d_model); L.attn.out: (B, T, d_model), or (B, 1, d_model) with last
        a = self.hook_attn_in(maybe_topk(self.cfg, self.ln_1(x), "attn.in"))
        x = x if last is None else at_positions(x, last)
        return self.resid_act(x + self.hook_attn_out(maybe_topk(self.cfg, self.attn(a, last), "attn.out")))

    def mlp_sublayer(self, x):
        """Residual entering the MLP -> residual leaving the block."""
        # L.mlp.in and L.mlp.out: (B, T, d_model)
        m = self.hook_mlp_in(maybe_topk(self.cfg, self.ln_2(x), "mlp.in"))
        return self.resid_act(x + self.hook_mlp_out(maybe_topk(self.cfg, self.mlp(m), "mlp.out")))

    def forward(self, x, last: torch.Tensor | None = None):
        return self.mlp_sublayer(self.attn_sublayer(x, last))

    def resid_act(self, x):
        return F.relu(x) if self.cfg.residual_activation == "relu" else x


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block no parameter of ``model`` takes a gradient (and the model is in eval
    mode): what pruning and bridges need when only masks or maps learn. Restores both after."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    for p in params:
        p.requires_grad_(False)
    model.eval()
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)


class GPT(HookedMixin, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.encoding = None  # set by cspkit.load / the trainer
        self.path = None      # the checkpoint directory, when loaded from one
        self.checkpoint = {}  # what its config.json records besides the model config, when loaded
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.h = nn.ModuleList(Block(cfg, l) for l in range(cfg.n_layer))
        self.ln_f = Norm.from_config(cfg)
        self.lm_head = None if cfg.tied_unembed else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.bigram = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.vocab_size)) if cfg.bigram_table else None
        self.final_logits_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.final_logits_bias else None
        self.hook_embed, self.hook_unembed = HookPoint("embed"), HookPoint("unembed")
        self._init_weights()

    def _init_weights(self):
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.config.n_layer))
            elif p.dim() == 2 and name != "bigram":
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith(".bias") and "ln_" not in name:
                nn.init.zeros_(p)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> the residual stream entering the first block (B, T, d_model)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        return self.hook_embed(x)   # embed: (B, T, d_model)

    def unembed(self, x: torch.Tensor, idx: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """The final residual (B, T, d_model) -> logits (B, T, vocab); idx feeds the bigram table.
        With ``last`` (B,) positions: only those rows' logits, (B, vocab), which is all a task's
        pair loss reads (the unembedding is the widest matrix of a small model); x may then be
        (B, 1, d_model), the residual at those positions already."""
        x = self.hook_unembed(self.ln_f(x))   # unembed: (B, T, d_model) (or (B, 1, d_model)), normalized
        if last is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            last = last.to(x.device)
            x, idx = (x[:, 0] if x.shape[1] == 1 else x[rows, last]), idx[rows, last]     # (B, d_model), (B,)
        logits = x @ self.wte.weight.T if self.lm_head is None else self.lm_head(x)
        if self.bigram is not None:
            logits = logits + self.bigram[idx]
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias
        return logits

    def sublayers(self) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """The residual stream as a sequence: (site, fn) per sublayer in forward order. The site
        ``L.attn`` / ``L.mlp`` names the residual entering that sublayer (``0.attn`` is the
        embedding); fn maps it to the residual leaving it. forward() is embed, these, unembed."""
        return [(f"{l}.{kind}", getattr(b, f"{kind}_sublayer"))
                for l, b in enumerate(self.h) for kind in ("attn", "mlp")]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, last: torch.Tensor | None = None,
                last_block_at_last: bool = False):
        """idx (B, T) token ids -> logits (B, T, vocab); with targets, also the mean CE loss; with
        ``last`` (B,) positions, only the logits there, (B, vocab). ``last_block_at_last`` (with
        last): the last block computes its queries and all that follows them at those positions
        only, as the logits there read nothing else; its hooks from ``attn.out`` on, and
        ``unembed``, then see (B, 1, width). Mask training and circuit evaluation use it: a
        quarter of a 4-layer model's work (docs/method.md, "Pruning")."""
        if targets is not None and last is not None:
            raise ValueError("forward takes targets (the LM loss at every position) or last (logits at one "
                             "position per row), not both")
        x = self.embed(idx)
        for i, block in enumerate(self.h):
            x = block(x, last if last_block_at_last and i == len(self.h) - 1 else None)
        logits = self.unembed(x, idx, last)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def sparse_parameters(self, dense_too: bool = False) -> dict[str, tuple[nn.Parameter, str]]:
        """Parameters the weight projection applies to: name -> (param, "matrix" | "embed").

        Embeddings, unembedding and biases form the "embed" group (a larger kept fraction);
        norm gains, the sink logits, the bigram table and the logits bias are never sparsified.
        """
        out = {}
        for name, p in self.named_parameters():
            if "ln_" in name or name.startswith(("bigram", "final_logits_bias")) or "sink_logit" in name:
                continue
            group = "embed" if name.startswith(("wte", "wpe", "lm_head")) or name.endswith(".bias") else "matrix"
            out[name] = (p, group)
        return out

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation of idx (B, T)."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, -1, :]
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    v, _ = logits.topk(min(top_k, logits.shape[-1]))
                    logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
