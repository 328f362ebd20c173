import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cspkit.config import LOCATION_TYPES, ModelConfig
from cspkit.model import GPT, abs_topk, sink_attention


def make(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def tokens(cfg: ModelConfig, B: int = 2, T: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T or cfg.block_size), generator=g)


def test_abs_topk_keeps_k_largest_magnitudes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 40, generator=g)
    y = abs_topk(x, 7)
    assert torch.equal((y != 0).sum(-1), torch.full((3, 5), 7))
    kept = y != 0
    assert torch.equal(y[kept], x[kept])
    # the kept ones are exactly the top 7 by magnitude of each token
    ref = torch.zeros_like(x).scatter(-1, x.abs().sort(-1, descending=True).indices[..., :7], 1.0).bool()
    assert torch.equal(kept, ref)
    # a large negative value is kept over small positive ones
    v = torch.tensor([[0.1, -5.0, 0.2, 0.3]])
    assert torch.equal(abs_topk(v, 1), torch.tensor([[0.0, -5.0, 0.0, 0.0]]))
    assert torch.equal(abs_topk(x, 40), x)


def widths(cfg: ModelConfig) -> dict[str, int]:
    inner = cfg.n_head * cfg.d_head
    return {"attn.in": cfg.d_model, "attn.q": inner, "attn.k": inner, "attn.v": inner,
            "attn.out": cfg.d_model, "mlp.in": cfg.d_model, "mlp.neuron": cfg.d_mlp, "mlp.out": cfg.d_model}


def test_activation_sparsity_at_every_location(tiny_cfg):
    cfg = replace(tiny_cfg, afrac=0.25)
    model = make(cfg)
    _, cache = model.run_with_cache(tokens(cfg))
    for layer in range(cfg.n_layer):
        for loc, width in widths(cfg).items():
            act = cache[f"{layer}.{loc}"]
            assert act.shape[-1] == width
            k = math.floor(0.25 * width)
            # random weights have no exact zeros: exactly k per token (q/k/v over all heads jointly)
            assert torch.equal((act != 0).sum(-1), torch.full(act.shape[:-1], k)), f"{layer}.{loc}"
    # the residual stream itself is not top-k'd
    assert bool((cache["embed"] != 0).all())
    assert bool((cache["unembed"] != 0).all())


def test_topk_selects_largest_of_the_preactivation(tiny_cfg):
    cfg = replace(tiny_cfg, afrac=0.25)
    model = make(cfg)
    _, cache = model.run_with_cache(tokens(cfg))
    blk = model.h[0]
    inner = cfg.n_head * cfg.d_head
    with torch.no_grad():
        q, k, v = blk.attn.c_attn(cache["0.attn.in"]).split(inner, dim=-1)
        neuron = F.gelu(blk.mlp.c_fc(cache["0.mlp.in"]))
    for name, pre in (("0.attn.q", q), ("0.attn.k", k), ("0.attn.v", v), ("0.mlp.neuron", neuron)):
        assert torch.allclose(cache[name], abs_topk(pre, int(0.25 * pre.shape[-1])), atol=1e-6), name


def test_no_activation_sparsity_when_disabled(tiny_cfg):
    cfg = replace(tiny_cfg, afrac=None)
    _, cache = make(cfg).run_with_cache(tokens(cfg))
    for loc in LOCATION_TYPES:
        assert bool((cache[f"1.{loc}"] != 0).all()), loc
    cfg = replace(tiny_cfg, afrac=0.25, afrac_locations=("mlp.neuron",))
    _, cache = make(cfg).run_with_cache(tokens(cfg))
    assert int((cache["0.mlp.neuron"] != 0).sum(-1).max()) == cfg.d_mlp // 4
    assert bool((cache["0.attn.q"] != 0).all())


def brute_sink_attention(q, k, v, sink_logit, scale):
    B, H, T, D = q.shape
    scores = (q @ k.transpose(-1, -2)) * scale                                    # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    sink = sink_logit.view(1, H, 1, 1).expand(B, H, T, 1)
    w = torch.cat([sink, scores], dim=-1).softmax(-1)                             # (B, H, T, T+1)
    v0 = torch.cat([torch.zeros(B, H, 1, D), v], dim=2)                           # the slot's value is 0
    return w @ v0


def test_sink_attention_matches_bruteforce():
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 3, 7, 16
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    sink_logit = torch.tensor([-1.0, 0.0, 2.5])
    for scale in (0.25, 1 / math.sqrt(D)):
        out = sink_attention(q, k, v, sink_logit, scale)
        assert out.shape == (B, H, T, D)
        assert torch.allclose(out, brute_sink_attention(q, k, v, sink_logit, scale), atol=1e-5)
    # a very negative sink logit gives plain causal attention; a very large one gives zero output
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    assert torch.allclose(sink_attention(q, k, v, torch.full((H,), -1e4), 0.25), plain, atol=1e-5)
    assert sink_attention(q, k, v, torch.full((H,), 1e4), 0.25).abs().max() < 1e-6



def test_sink_attention_keeps_the_fused_cpu_kernel():
    """With head sizes that differ between q/k and v, SDPA on CPU silently falls back to its
    unfused path (1.5 to 2.2 times the training step of the small profile); forward and
    backward must both stay fused."""
    q, k, v = (torch.randn(2, 3, 8, 16, requires_grad=True) for _ in range(3))
    sink_logit = torch.zeros(3, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        sink_attention(q, k, v, sink_logit, 0.25).sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in ops
    assert {"aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward"} <= ops

@pytest.mark.parametrize("pos_emb", ["none", "learned"])
@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("bigram", [False, True])
def test_forward_backward_variants(tiny_cfg, pos_emb, sink, bigram):
    cfg = replace(tiny_cfg, pos_emb=pos_emb, sink=sink, bigram_table=bigram)
    model = make(cfg).train()
    x = tokens(cfg, T=cfg.block_size)
    y = tokens(cfg, T=cfg.block_size, seed=1)
    logits, loss = model(x, y)
    assert logits.shape == (2, cfg.block_size, cfg.vocab_size)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(math.log(cfg.vocab_size), abs=0.5)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert bool(torch.isfinite(p.grad).all()), name
    assert (model.wpe is not None) == (pos_emb == "learned")
    assert (model.h[0].attn.sink_logit is not None) == sink
    if sink:
        assert model.h[0].attn.sink_logit.grad.abs().sum() > 0
    if bigram:
        assert model.bigram.grad.abs().sum() > 0


def test_sequence_longer_than_block_size_raises(tiny_cfg):
    model = make(tiny_cfg)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, tiny_cfg.block_size + 1, dtype=torch.long))


def test_bigram_table_adds_row_of_current_token(tiny_cfg):
    cfg = replace(tiny_cfg, bigram_table=True)
    model = make(cfg)
    x = tokens(cfg, T=10)
    with torch.no_grad():
        base = model(x)
        model.bigram.normal_()
        with_table = model(x)
    assert torch.allclose(with_table - base, model.bigram[x], atol=1e-5)


@pytest.mark.parametrize("pos_emb", ["none", "learned"])
@pytest.mark.parametrize("sink", [False, True])
def test_causal(tiny_cfg, pos_emb, sink):
    cfg = replace(tiny_cfg, pos_emb=pos_emb, sink=sink)
    model = make(cfg)
    x = tokens(cfg, B=1, T=20)
    x2 = x.clone()
    x2[0, 12:] = (x2[0, 12:] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@pytest.mark.parametrize("sink", [False, True])
def test_last_block_at_last_gives_the_same_logits_and_gradients(tiny_cfg, sink):
    """The last block computed only at the read positions: the same logits at those positions,
    the same gradient into an earlier activation, and (B, 1, width) at its later hooks."""
    model = make(replace(tiny_cfg, sink=sink))
    x, last = tokens(tiny_cfg, B=3, T=20), torch.tensor([19, 4, 11])
    L = tiny_cfg.n_layer - 1
    seen, grads = {}, []
    for at_last in (False, True):
        scale = torch.ones(tiny_cfg.d_model, requires_grad=True)
        hooks = {"0.attn.out": lambda a, name, scale=scale: a * scale,
                 f"{L}.mlp.neuron": lambda a, name, k=at_last: seen.setdefault(k, a.shape) and a}
        logits = model.run_with_hooks(x, hooks, last=last, last_block_at_last=at_last)
        logits[:, :7].sum().backward()
        grads.append((logits.detach(), scale.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-4)
    assert seen == {False: (3, 20, tiny_cfg.d_mlp), True: (3, 1, tiny_cfg.d_mlp)}


def test_init_statistics():
    cfg = ModelConfig(n_layer=4, d_model=64, n_head=4, d_head=16, d_mlp=256, block_size=64, bigram_table=True)
    model = make(cfg)
    params = dict(model.named_parameters())
    proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in params.items():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(proj_std, rel=0.1), name
            assert abs(p.mean().item()) < proj_std / 5, name
        elif name in ("wte.weight", "wpe.weight", "lm_head.weight") or name.endswith(("c_attn.weight", "c_fc.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name
        elif "ln_" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(".bias") or name in ("bigram",) or name.endswith("sink_logit"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            raise AssertionError(f"unexpected parameter {name}")


def test_sparse_parameters_exclusions(tiny_cfg):
    cfg = replace(tiny_cfg, sink=True, bigram_table=True, final_logits_bias=True)
    model = make(cfg)
    sp = model.sparse_parameters()
    all_names = {n for n, _ in model.named_parameters()}
    excluded = all_names - set(sp)
    assert excluded == {"bigram", "final_logits_bias", "ln_f.weight",
                        *(f"h.{l}.{n}" for l in range(cfg.n_layer)
                          for n in ("ln_1.weight", "ln_2.weight", "attn.sink_logit"))}
    for name, (p, group) in sp.items():
        assert p is dict(model.named_parameters())[name]
        want = "embed" if name.split(".")[0] in ("wte", "wpe", "lm_head") or name.endswith(".bias") else "matrix"
        assert group == want, name
    assert sp["h.0.mlp.c_fc.weight"][1] == "matrix"
    assert sp["wte.weight"][1] == "embed"
    assert sp["h.0.attn.c_attn.bias"][1] == "embed"


def test_generate_greedy_is_argmax(tiny_cfg):
    model = make(tiny_cfg)
    x = tokens(tiny_cfg, B=1, T=5)
    out = model.generate(x, 3)
    assert out.shape == (1, 8)
    assert torch.equal(out[:, :5], x)
    with torch.no_grad():
        assert out[0, 5].item() == model(x)[0, -1].argmax().item()


def test_bf16_autocast_forward_is_close_to_fp32(tiny_cfg):
    """Under CPU bf16 autocast the matmuls run in bfloat16 and attention in fp32: the logits stay
    within bfloat16's rounding of the fp32 ones, and gradients reach the fp32 weights."""
    for sink in (False, True):
        model = make(replace(tiny_cfg, sink=sink, afrac=None))
        x = tokens(tiny_cfg)
        ref, _ = model(x, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, loss = model(x, x)
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters()
                   if p.requires_grad and p.dim() == 2)
