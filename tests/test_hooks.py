import threading

import pytest
import torch

from cspkit.config import LOCATION_TYPES
from cspkit.model import GPT, location_names


@pytest.fixture
def model(tiny_cfg):
    torch.manual_seed(0)
    return GPT(tiny_cfg).eval()


@pytest.fixture
def toks(tiny_cfg):
    return torch.randint(0, tiny_cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def test_location_names_cover_method_locations():
    names = location_names(3, extra=True)
    assert names[0] == "embed" and names[-1] == "unembed"
    assert names[1:-1] == location_names(3)
    assert len(names) == len(set(names)) == 3 * 8 + 2
    assert set(LOCATION_TYPES) == {"attn.in", "attn.q", "attn.k", "attn.v", "attn.out",
                                   "mlp.in", "mlp.neuron", "mlp.out"}
    assert "2.mlp.neuron" in names and "0.attn.q" in names


def test_hook_points_are_exactly_the_locations(model, tiny_cfg):
    assert set(model.hook_points) == set(location_names(tiny_cfg.n_layer, extra=True))
    assert len(model.hook_points) == len(location_names(tiny_cfg.n_layer, extra=True))


def test_run_with_cache_names_and_shapes(model, toks, tiny_cfg):
    inner = tiny_cfg.n_head * tiny_cfg.d_head
    want = {"embed": tiny_cfg.d_model, "0.attn.in": tiny_cfg.d_model, "0.attn.q": inner, "1.attn.k": inner,
            "1.attn.v": inner, "0.attn.out": tiny_cfg.d_model, "1.mlp.in": tiny_cfg.d_model,
            "0.mlp.neuron": tiny_cfg.d_mlp, "1.mlp.out": tiny_cfg.d_model, "unembed": tiny_cfg.d_model}
    logits, cache = model.run_with_cache(toks, names=list(want))
    assert set(cache) == set(want)
    for name, width in want.items():
        assert cache[name].shape == (2, 12, width), name
        assert not cache[name].requires_grad
    with torch.no_grad():
        assert torch.equal(logits, model(toks))
    # default: every location
    _, everything = model.run_with_cache(toks)
    assert set(everything) == set(location_names(tiny_cfg.n_layer, extra=True))
    # cached activations are the ones the forward used: the unembedding reads "unembed"
    with torch.no_grad():
        assert torch.allclose(model.lm_head(everything["unembed"]), logits, atol=1e-5)
    assert all(not hp.fns for hp in model.hook_points.values())


def test_run_with_cache_can_stop_once_it_has_recorded(model, toks):
    _, full = model.run_with_cache(toks, names=["0.mlp.neuron", "0.attn.q"])
    seen = []
    with model.hooks({"1.attn.in": lambda x, name: seen.append(name)}):
        out, cache = model.run_with_cache(toks, names=["0.mlp.neuron", "0.attn.q"], stop=True)
    assert out is None and not seen                      # layer 1 never ran
    assert all(torch.equal(cache[n], full[n]) for n in full)
    assert all(not hp.fns for hp in model.hook_points.values())


def test_run_with_cache_keeps_graph_when_not_detached(model, toks):
    _, cache = model.run_with_cache(toks, names=["0.mlp.neuron"], detach=False)
    assert cache["0.mlp.neuron"].requires_grad


def test_run_with_hooks_edits_and_cleans_up(model, toks):
    with torch.no_grad():
        before = model(toks)
        seen = []

        def zero(x, name):
            seen.append(name)
            return torch.zeros_like(x)

        edited = model.run_with_hooks(toks, {"0.mlp.neuron": zero})
        after = model(toks)
    assert seen == ["0.mlp.neuron"]
    assert not torch.allclose(edited, before, atol=1e-4)
    assert torch.equal(after, before)
    assert all(not hp.fns for hp in model.hook_points.values())


def test_zeroing_a_neuron_matches_zeroing_its_weights(model, toks):
    """An edit through a hook equals the same edit made in the weights."""
    def kill(x, name):
        x = x.clone()
        x[..., 5] = 0
        return x

    with torch.no_grad():
        hooked = model.run_with_hooks(toks, {"1.mlp.neuron": kill})
        model.h[1].mlp.c_proj.weight[:, 5] = 0
        direct = model(toks)
    assert torch.allclose(hooked, direct, atol=1e-6)


def test_hook_returning_none_keeps_activation(model, toks):
    with torch.no_grad():
        base = model(toks)
        out = model.run_with_hooks(toks, {"0.attn.q": lambda x, n: None, "embed": [lambda x, n: None]})
    assert torch.equal(out, base)


def test_hook_wrong_shape_raises_and_is_removed(model, toks):
    with pytest.raises(ValueError, match="0.mlp.neuron"):
        model.run_with_hooks(toks, {"0.mlp.neuron": lambda x, n: x[..., :3]})
    assert all(not hp.fns for hp in model.hook_points.values())


def test_unknown_names_raise_keyerror_naming_them(model, toks):
    with pytest.raises(KeyError, match="0.mlp.neurons"):
        model.run_with_cache(toks, names=["0.mlp.neurons", "embed"])
    with pytest.raises(KeyError, match="9.attn.q"):
        model.run_with_hooks(toks, {"9.attn.q": lambda x, n: x})
    assert all(not hp.fns for hp in model.hook_points.values())


def test_hooks_belong_to_the_thread_that_attached_them(model):
    # the explorer computes in a background thread while the notebook runs its own forwards
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    plain = model(x)
    started, release = threading.Event(), threading.Event()

    def hold_hooks():
        with model.hooks({"0.mlp.out": lambda a, name: torch.zeros_like(a)}):
            started.set()
            release.wait(10)

    worker = threading.Thread(target=hold_hooks)
    worker.start()
    started.wait(10)
    try:
        assert torch.equal(model(x), plain)
    finally:
        release.set()
        worker.join()
