"""Circuit graphs (offline HTML, escaping, counts, GraphML), heatmaps, ablation effects and the
explorer's callbacks driven from Python, on the tiny trained checkpoint."""
from __future__ import annotations

import json
import re
from pathlib import Path

import networkx as nx
import pytest
import torch

import cspkit
from cspkit import viz
from cspkit.ablation import fingerprint
from cspkit.circuit import Circuit, compute_edges
from cspkit.model import parse_node

HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "&amp;", "</div>'"]


@pytest.fixture(scope="module")
def model(trained):
    return cspkit.load(trained.dir)


def _connected_nodes(model) -> dict[str, list[int]]:
    """A small circuit whose nodes are joined by nonzero weights: two layer-0 MLP neurons with
    their reads and writes, and two layer-1 attention channels with their q/k/v, reads and writes."""
    def cols(W, rows, k=2):
        return sorted({int(c) for r in rows for c in (W[r] != 0).nonzero().flatten()[:k]})

    b0, b1 = model.h
    inner = model.config.n_head * model.config.d_head
    neurons = [int(i) for i in (b0.mlp.c_fc.weight != 0).sum(1).topk(2).indices]
    ch = [int(i) for i in (b1.attn.c_attn.weight[:inner] != 0).sum(1).topk(2).indices]
    nodes = {"0.mlp.in": cols(b0.mlp.c_fc.weight, neurons), "0.mlp.neuron": neurons,
             "0.mlp.out": cols(b0.mlp.c_proj.weight.T, neurons), "1.attn.q": ch, "1.attn.k": ch, "1.attn.v": ch,
             "1.attn.out": cols(b1.attn.c_proj.weight.T, ch)}
    nodes["1.attn.in"] = sorted(set(cols(b1.attn.c_attn.weight, ch)) | set(nodes["0.mlp.out"][:1]))
    return nodes


def _circuit(model, task="single_double_quote", nodes=None, target=0.15) -> Circuit:
    nodes = nodes or _connected_nodes(model)
    return Circuit(task, nodes, compute_edges(model, nodes), target, 0.5, model=model,
                   model_fingerprint=fingerprint(model))


@pytest.fixture(scope="module")
def circuit(model):
    c = _circuit(model)
    assert c.n_edges > 0 and c.n_nodes > 8
    return c


def _data(page: str, name: str):
    """The JSON array the page's script holds in ``const name = [...]``."""
    return json.loads(re.search(rf"^const {name} = (.*);$", page, re.M).group(1))


def test_html_is_offline_and_self_contained(circuit):
    page = viz.circuit_graph(circuit, n_pairs=4).generate_html()
    assert viz.VIS_JS.read_text(encoding="utf-8") in page  # vis-network inlined, not linked
    # the inlined library mentions URLs in its licence comments; nothing else may name one
    ours = page.replace(viz.VIS_JS.read_text(encoding="utf-8"), "")
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}|\b(?:src|href)\s*=|@import|url\(", ours, re.I), \
        re.findall(r".{40}(?:https?:|src=|href=|@import|url\().{40}", ours)
    csp = re.search(r'<meta http-equiv="Content-Security-Policy"\s+content="([^"]*)"', page).group(1)
    assert "default-src 'none'" in csp and "script-src 'nonce-" in csp and "unsafe-inline" not in csp.split(";")[1]
    assert ours.count("<script") == ours.count("<script nonce=") == 2


def test_node_and_edge_counts_equal_the_circuits(circuit):
    page = viz.circuit_graph(circuit, n_pairs=4).generate_html()
    nodes, edges = _data(page, "nodes"), _data(page, "edges")
    assert len(nodes) == circuit.n_nodes and {n["id"] for n in nodes} == set(circuit.node_names())
    weight_edges = [e for e in edges if e["kind"] == "weight"]
    assert len(weight_edges) == circuit.n_edges
    assert {(e["from"], e["to"]) for e in weight_edges} == {(s, t) for s, t, _ in circuit.edges}
    assert len(edges) == circuit.to_networkx().number_of_edges()
    assert f'data-nodes="{circuit.n_nodes}" data-edges="{circuit.n_edges}"' in page
    # layered: attention reads left of MLP reads in layer 0 < layer 1; bands top to bottom
    pos = {n["id"]: (n["x"], n["y"]) for n in nodes}
    assert max(x for n, (x, _) in pos.items() if n.startswith("0.")) < min(x for n, (x, _) in pos.items()
                                                                          if n.startswith("1."))
    assert max(y for n, (_, y) in pos.items() if ".in[" in n) < min(y for n, (_, y) in pos.items() if "attn.q" in n)
    assert max(y for n, (_, y) in pos.items() if "attn.v" in n) < min(y for n, (_, y) in pos.items() if "out[" in n)


def test_corpus_extremes_point_at_the_activations(model, circuit):
    stats = viz.corpus_stats(model)
    for name in circuit.node_names()[::5]:
        loc, i = parse_node(name)
        for sign in (1, -1):
            found = stats.extremes(name, sign, n=3)
            for w, t, v in found:
                _, cache = model.run_with_cache(stats.tokens[w:w + 1], names=[loc])
                assert float(cache[loc][0, t, i]) == pytest.approx(v, abs=1e-5), (name, w, t)
            if found:   # strongest first, and nothing stronger anywhere in the windows
                _, cache = model.run_with_cache(stats.tokens, names=[loc])
                assert sign * found[0][2] == pytest.approx(float((sign * cache[loc][..., i]).max()), abs=1e-5)


def test_hostile_tokens_are_escaped(model, circuit, monkeypatch):
    stats = viz.corpus_stats(model)
    real = stats.strings
    stats.strings = [[HOSTILE[j % len(HOSTILE)] for j in range(len(row))] for row in real]
    # the node pane's corpus examples decode their windows through decode_window
    monkeypatch.setattr(viz.panes, "decode_window",
                        lambda model, ex, w, lo, hi: [HOSTILE[j % len(HOSTILE)] for j in range(lo, hi)])
    try:
        net = viz.circuit_graph(circuit, n_pairs=4)
        page = net.generate_html()
        frame = net.iframe()
        ex = viz.explore(model, ["single_double_quote"], circuits=[circuit], n_pairs=4, cache=False)
        ex.node.value = circuit.node_names()[0]
        details = ex.details.value
    finally:
        stats.strings = real
    titles = " ".join(n["title"] for n in _data(page, "nodes"))
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in titles and "&lt;img src=x onerror=alert(2)&gt;" in titles
    for text in (page, titles, details):
        assert "<script>alert" not in text and "<img" not in text and "</div>'" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in details  # the corpus contexts show the tokens as text
    # the iframe's srcdoc is the page escaped once more: the page's own tags never appear raw
    assert frame.startswith('<iframe sandbox="allow-scripts"') and frame.count("<") == 2
    # nothing hostile reaches the page's skeleton through the task name either
    weird = _circuit(model)
    weird.task = "</title><script>alert(3)</script>"
    weird.task_obj = cspkit.tasks.get("single_double_quote")
    assert "<script>alert(3)" not in viz.circuit_graph(weird, n_pairs=4).generate_html()


def test_hostile_prompts_are_escaped_in_the_explorer(model, circuit):
    # a user task whose prompts carry markup: the node pane shows them as text, never as tags
    bad = "</script><img src=x onerror=alert(1)>"
    task = cspkit.tasks.Task.from_pairs("hostile_prompts", [(f"x{i} = '{bad}", "'", f'x{i} = "{bad}', '"')
                                                            for i in range(80)])
    c = _circuit(model, "hostile_prompts")
    c.task_obj, c.ranking = task, c.node_names()
    ex = viz.explore(model, [task], circuits=[c], n_pairs=2, cache=False)
    for name in (circuit.node_names()[0], f"1.attn.q[{circuit.nodes['1.attn.q'][0]}]"):
        ex.graph.selected = name
        d = ex.details.value
        assert "&lt;/" in d and "rror" in d, name      # the prompt's markup, shown as text
        assert "<img" not in d and "</script>" not in d
    assert all("<img" not in n["title"] for n in ex.graph.nodes)


def test_quantile_examples_sit_at_their_quantiles_and_are_cached(model, tmp_path, monkeypatch):
    from cspkit.viz import examples as ex_mod
    ex = ex_mod.compute_examples(model, n_tokens=2048, n_examples=2)
    T = ex.tokens.shape[1]
    assert ex.tokens.shape == (2048 // T, T)
    _, cache = model.run_with_cache(ex.tokens.long(), names=["0.mlp.neuron"])
    acts = cache["0.mlp.neuron"].flatten(0, 1)                           # (tokens, width)
    i = int(acts.abs().sum(0).argmax())                                  # a neuron that fires
    col = acts[:, i].sort().values
    for j, (_, q) in enumerate(ex_mod.LEVELS):
        value = float(col[round(q * (len(col) - 1))])
        assert float(ex.values["0.mlp.neuron"][j, i]) == pytest.approx(value, abs=1e-5)
        found = ex.examples(f"0.mlp.neuron[{i}]")[j][2]
        assert found[0][2] == pytest.approx(value, abs=1e-5)             # the nearest example takes that value
        for w, t, a in found:                                           # at the token it points to
            assert float(acts[w * T + t, i]) == pytest.approx(a, abs=1e-5)
    # cached beside the weights, read back as written; a file made for other weights is rebuilt
    import shutil
    d = tmp_path / "m"
    shutil.copytree(model.path, d)
    copy = cspkit.load(d)
    ex_mod._CACHE.clear()
    first = ex_mod.quantile_examples(copy, n_tokens=2048)
    assert (d / ex_mod.EXAMPLES_FILE).is_file()
    ex_mod._CACHE.clear()
    monkeypatch.setattr(ex_mod, "compute_examples", lambda *a, **k: pytest.fail("recomputed a valid cache"))
    again = ex_mod.quantile_examples(copy, n_tokens=2048)
    assert torch.equal(again.values["1.attn.v"], first.values["1.attn.v"]) and torch.equal(again.tokens, first.tokens)
    monkeypatch.undo()
    with torch.no_grad():
        copy.h[0].mlp.c_fc.weight.mul_(2)                                # other weights: another fingerprint
    ex_mod._CACHE.clear()
    other = ex_mod.quantile_examples(copy, n_tokens=2048)
    assert other.meta["fingerprint"] != first.meta["fingerprint"] and not torch.equal(
        other.values["0.mlp.neuron"], first.values["0.mlp.neuron"])


def test_token_heatmap_escapes_and_matches_the_cache(model):
    text = 'x = "<script>alert(1)</script>"\nprint(x)\n'
    hm = viz.token_heatmap(model, text, "0.mlp.neuron[3]")
    enc = model.encoding
    ids = enc.encode_ordinary(text)
    assert hm.tokens == [enc.decode([t]) for t in ids] and "".join(hm.tokens) == text
    _, cache = model.run_with_cache(torch.tensor([ids]), names=["0.mlp.neuron"])
    assert hm.values == pytest.approx(cache["0.mlp.neuron"][0, :, 3].tolist())
    out = hm._repr_html_()
    assert "<script" not in out and "&lt;/" in out and out.count("<span") == len(ids)
    assert viz.token_heatmap(model, text, ("0.mlp.neuron", 3)).values == hm.values
    with pytest.raises(ValueError, match="not a node of this model"):
        viz.token_heatmap(model, text, "0.mlp.neuron[100000]")
    with pytest.raises(ValueError, match="neuron 3"):
        viz.token_heatmap(model, text, "neuron 3")


@pytest.mark.parametrize("ablation", ["mean", "zero", "resample"])
def test_ablation_effects_equal_one_evaluation_per_node(circuit, ablation):
    circuit = Circuit.from_dict({**circuit.to_dict(), "ablation": ablation}, model=circuit.model)
    effects = viz.ablation_effects(circuit, n_pairs=6, chunk=3)
    assert set(effects) == set(circuit.node_names())
    base = circuit.evaluate("test", n=6)["loss"]
    for name in circuit.node_names()[::4]:
        loc, i = parse_node(name)
        rest = {l: [j for j in idx if (l, j) != (loc, i)] for l, idx in circuit.nodes.items()}
        assert effects[name] == pytest.approx(circuit.evaluate("test", n=6, nodes=rest)["loss"] - base, abs=1e-5)
    assert viz.ablation_effects(circuit, n_pairs=6, chunk=3) is effects  # cached


def test_graphml_round_trips_through_networkx(circuit, tmp_path):
    net = viz.circuit_graph(circuit, n_pairs=4)
    path = net.write_graphml(tmp_path / "c.graphml")
    back = nx.read_graphml(path)
    g = net.graph
    assert set(back.nodes) == set(g.nodes) == set(circuit.node_names())
    assert set(back.edges) == set(g.edges) and back.number_of_edges() == g.number_of_edges()
    for n, d in g.nodes(data=True):
        assert set(back.nodes[n]) == set(d)
        for k, v in d.items():
            assert back.nodes[n][k] == (pytest.approx(v) if isinstance(v, float) else v), (n, k)
    for s, t, d in g.edges(data=True):
        assert back.edges[s, t]["weight"] == pytest.approx(d["weight"]) and back.edges[s, t]["kind"] == d["kind"]
    assert back.graph["task"] == circuit.task


def test_graph_files_are_written_whole_or_not_at_all(circuit, tmp_path, monkeypatch):
    net = viz.circuit_graph(circuit, n_pairs=4)
    out = tmp_path / "new" / "dir"
    assert net.write_html(out / "c.html").is_file() and net.write_graphml(out / "c.graphml").is_file()
    before = (out / "c.graphml").read_bytes()

    def crash(g, path):
        Path(path).write_text("<graphml half")
        raise OSError("disk full")

    monkeypatch.setattr(viz.graph.nx, "write_graphml", crash)
    with pytest.raises(OSError, match="disk full"):
        net.write_graphml(out / "c.graphml")
    assert (out / "c.graphml").read_bytes() == before
    assert sorted(f.name for f in out.iterdir()) == ["c.graphml", "c.html"]


def test_filters_and_ablated_nodes(circuit):
    net = viz.circuit_graph(circuit, n_pairs=4, kinds=["attn.q", "attn.k", "attn.v"], layers=[1])
    ids = {n["id"] for n in net.nodes}
    assert ids == {n for n in circuit.node_names() if re.match(r"1\.attn\.[qkv]\[", n)}
    assert all(e["kind"] == "qk" for e in net.edges)  # no weight joins q, k, v among themselves
    off = circuit.node_names()[0]
    grey = {n["id"]: n["color"]["background"] for n in viz.circuit_graph(circuit, n_pairs=4, ablated=[off]).nodes}
    assert grey[off] == "#d9d9d9" and list(grey.values()).count("#d9d9d9") == 1
    with pytest.raises(ValueError, match="unknown location types"):
        viz.circuit_graph(circuit, n_pairs=4, kinds=["mlp.neurons"])
    # one kind or one layer may be given bare; bad layers and unknown ablated nodes are named
    one = viz.circuit_graph(circuit, n_pairs=4, kinds="attn.q", layers=1)
    assert {n["id"] for n in one.nodes} == {n for n in circuit.node_names() if n.startswith("1.attn.q[")}
    with pytest.raises(ValueError, match=r"layers \[5\] are not layers"):
        viz.circuit_graph(circuit, n_pairs=4, layers=[0, 5])
    with pytest.raises(ValueError, match=r"not in the circuit"):
        viz.circuit_graph(circuit, n_pairs=4, ablated=["0.mlp.neuron[99999]"])
    loc, i = parse_node(off)
    tup = {n["id"]: n["color"]["background"] for n in viz.circuit_graph(circuit, n_pairs=4, ablated=[(loc, i)]).nodes}
    assert tup == grey


def test_graph_needs_the_model(circuit):
    bare = Circuit.from_dict(circuit.to_dict())
    with pytest.raises(ValueError, match="no model attached, and drawing it needs"):
        viz.circuit_graph(bare)
    with pytest.raises(ValueError, match="no model attached, and evaluating it needs"):
        bare.evaluate()


def test_cli_writes_html_and_graphml(model, circuit, trained, tmp_path, capsys):
    from cspkit.cli import main
    f = circuit.save(tmp_path / "c.json")
    out, gml = tmp_path / "out" / "c.html", tmp_path / "out" / "c.graphml"
    assert main(["viz", "--circuit", str(f), "--model", str(trained.dir), "--out", str(out), "--graphml", str(gml),
                 "--pairs", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["nodes"] == circuit.n_nodes and res["edges"] == circuit.n_edges and res["html_bytes"] > 100_000
    assert len(_data(out.read_text(encoding="utf-8"), "nodes")) == circuit.n_nodes
    assert nx.read_graphml(gml).number_of_nodes() == circuit.n_nodes
    assert main(["viz", "--circuit", str(f), "--out", str(out)]) == 2  # no model_path in the file, no --model
    assert "pass --model" in capsys.readouterr().err


# --------------------------------------------------------------------------- the explorer
@pytest.fixture
def explorer(model, circuit):
    other = _circuit(model, "bracket_counting", {k: v for k, v in _connected_nodes(model).items() if "mlp" in k},
                     target=0.6)
    return viz.explore(model, ["single_double_quote", "bracket_counting"], circuits=[circuit, other], n_pairs=4,
                       cache=False)


def _ids(ex) -> list[str]:
    return [n["id"] for n in ex.graph.nodes]


def test_explorer_draws_and_switches_task(explorer, circuit):
    first = _ids(explorer)
    assert sorted(first) == sorted(circuit.node_names()) and "single_double_quote" in explorer.status.value
    assert explorer.circuit is circuit and explorer.shown is circuit
    assert len(explorer.node.options) == circuit.n_nodes + 1 and explorer.load_seconds > 0
    explorer.task.value = "bracket_counting"
    assert explorer.circuit.task == "bracket_counting" and explorer.target.value == 0.6  # the saved circuit's target
    assert _ids(explorer) != first and "bracket_counting" in explorer.graph.net.title
    explorer.target.value = 0.3
    assert explorer.circuit is None and explorer.graph.nodes == [] and "compute circuit" in explorer.status.value
    explorer.task.value = "single_double_quote"
    assert explorer.circuit is circuit and explorer.target.value == 0.15


def test_explorer_filters_redraw(explorer, circuit, monkeypatch):
    def again(*args, **kwargs):
        raise AssertionError("a filter change recomputed the annotated graph")

    # redrawing reuses the explorer's graph: neither the explorer nor circuit_graph recomputes it
    monkeypatch.setattr(viz.explorer, "annotated_graph", again)
    monkeypatch.setattr(viz.graph, "annotated_graph", again)
    explorer.kinds["mlp.neuron"].value = False
    explorer.layers[1].value = False
    assert set(_ids(explorer)) == {n for n in circuit.node_names() if n.startswith("0.") and "neuron" not in n}
    explorer.kinds["mlp.neuron"].value = True
    explorer.layers[1].value = True
    # the edge-strength threshold keeps the weight edges at or above it
    weights = sorted(abs(w) for *_, w in circuit.edges)
    explorer.threshold.value = weights[len(weights) // 2]
    kept = [e for e in explorer.graph.edges if e["kind"] == "weight"]
    assert len(kept) == sum(w >= explorer.threshold.value for w in weights) < len(weights)
    explorer.threshold.value = 0.0
    assert len([e for e in explorer.graph.edges if e["kind"] == "weight"]) == len(weights)


def test_explorer_layers_carry_counts_and_ablation_deltas(explorer, circuit):
    for l, box in explorer.layers.items():
        count = sum(len(idx) for loc, idx in circuit.nodes.items() if loc.startswith(f"{l}."))
        assert box.description.startswith(f"layer {l}: {count} nodes")
        rest = {loc: idx for loc, idx in circuit.nodes.items() if not loc.startswith(f"{l}.")}
        delta = circuit.evaluate("test", n=4, nodes=rest)["loss"] - explorer.base_loss
        assert explorer.layer_deltas[l] == pytest.approx(delta, abs=1e-6) and f"{delta:+.3f}" in box.description
    # query, key and value channels are labelled by head and channel
    d_head = circuit.model.config.d_head
    q = circuit.nodes["1.attn.q"][0]
    label = next(n["label"] for n in explorer.graph.nodes if n["id"] == f"1.attn.q[{q}]")
    assert label == f"q h{q // d_head}.ch{q % d_head}"


def test_explorer_node_click_details_and_toggle(explorer, circuit):
    name = f"0.mlp.neuron[{circuit.nodes['0.mlp.neuron'][0]}]"
    explorer.graph.selected = name          # what a click in the drawing sends back
    assert explorer.node.value == name
    d = explorer.details.value
    assert name in d and "incoming edges" in d and "outgoing edges" in d
    assert "On the task&#x27;s test prompts" in d or "On the task's test prompts" in d
    assert "class A" in d and "class B" in d and "difference" in d
    assert "Corpus examples at quantiles" in d and "top 0.1%" in d and "bottom 0.1%" in d and d.count("<span") > 20
    ins = [s for s, t, _ in circuit.edges if t == name]
    assert ins and all(s in d for s in ins)
    # a read or write channel shows the tokens the embedding puts highest and lowest in it
    read = f"0.mlp.in[{circuit.nodes['0.mlp.in'][0]}]"
    explorer.node.value = read
    top, bottom = viz.embedding_tokens(circuit.model, circuit.nodes["0.mlp.in"][0], 8)
    col = circuit.model.wte.weight.detach()[:, circuit.nodes["0.mlp.in"][0]]
    assert top[0][1] == pytest.approx(float(col.max())) and bottom[0][1] == pytest.approx(float(col.min()))
    assert "Embedding, residual channel" in explorer.details.value
    explorer.node.value = name
    assert "Embedding, residual channel" not in explorer.details.value   # a neuron is not a residual channel
    explorer.graph.selected = "not a node"  # ignored
    assert explorer.node.value == name

    base = explorer.current_loss
    explorer.node_off.value = True
    assert name in explorer.off and name in explorer.loss.value
    loc, i = parse_node(name)
    rest = {l: [j for j in idx if (l, j) != (loc, i)] for l, idx in circuit.nodes.items()}
    assert explorer.current_loss == pytest.approx(circuit.evaluate("test", n=4, nodes=rest)["loss"])
    assert explorer.current_loss - base == pytest.approx(viz.ablation_effects(circuit, 4)[name], abs=1e-5)
    assert any(n["color"]["background"] == "#d9d9d9" for n in explorer.graph.nodes if n["id"] == name)
    explorer.node.value = circuit.node_names()[0]
    assert explorer.node_off.value is False and explorer.graph.selected == circuit.node_names()[0]
    explorer.node.value = name
    assert explorer.node_off.value is True
    explorer.node_off.value = False
    assert not explorer.off and explorer.current_loss == base


def test_explorer_attention_node_shows_its_heads_pattern(explorer, circuit, model):
    name = f"1.attn.q[{circuit.nodes['1.attn.q'][0]}]"
    explorer.node.value = name
    head = circuit.nodes["1.attn.q"][0] // model.config.d_head
    assert f"Attention of layer 1, head {head}" in explorer.details.value
    tokens = torch.tensor([model.encoding.encode("x = ('a', \"b\")\n")])
    p = viz.attention_pattern(model, tokens, 1, head)
    assert p.shape == (1, tokens.shape[1], tokens.shape[1]) and bool((p.triu(1) == 0).all())   # causal
    # rows sum to 1, less the sink's share where the model has one
    assert bool((p.sum(-1) <= 1 + 1e-6).all()) and (model.config.sink or torch.allclose(p.sum(-1), torch.ones(1, 8)))
    # the pattern times the head's values is the head's output, as the model computes it (the
    # slider's background prefetch runs forwards of its own: let it finish before hooking the model)
    explorer.ranked.wait()
    seen = {}
    hook = model.h[1].attn.c_proj.register_forward_hook(lambda mod, inp, out: seen.update(y=inp[0]))
    try:
        _, cache = model.run_with_cache(tokens, names=["1.attn.v"])
    finally:
        hook.remove()
    d = model.config.d_head
    heads = slice(head * d, (head + 1) * d)
    assert torch.allclose(p @ cache["1.attn.v"][..., heads].float(), seen["y"][..., heads].float(), atol=1e-5)


def test_explorer_k_slider_moves_over_the_ranking(model, circuit, monkeypatch, tmp_path):
    from cspkit import pruning
    calls = []

    def fake_prune(m, task, target, ablation, seed):
        calls.append((task.name, target, ablation))
        c = _circuit(m, task.name, target=target)
        c.ablation = ablation
        c.taus = {loc: torch.full((w,), -1.0) for loc, w in cspkit.ablation.node_widths(m.config).items()}
        c.taus["0.attn.in"] = torch.linspace(1, 0.5, len(c.taus["0.attn.in"]))
        c.mean_taus = c.taus
        return c

    monkeypatch.setattr(pruning, "prune", fake_prune)
    monkeypatch.setenv("CSPKIT_CACHE", str(tmp_path))
    ex = viz.explore(model, "single_double_quote", n_pairs=4, target=0.2, ablation="zero")
    assert ex.circuit is None and "compute circuit" in ex.status.value and ex.k.disabled
    ex.compute.click()
    assert calls == [("single_double_quote", 0.2, "zero")] and ex.circuit.target == 0.2
    assert ex.graph.nodes and not ex.k.disabled and ex.k.value == ex.circuit.n_nodes
    saved = list((tmp_path / "circuits").rglob("*.json"))
    assert len(saved) == 1
    again = viz.explore(model, "single_double_quote", n_pairs=4, target=0.2, ablation="zero")
    assert again.circuit is not None and again.circuit.nodes == ex.circuit.nodes and len(calls) == 1  # from disk
    other_seed = viz.explore(model, "single_double_quote", n_pairs=4, target=0.2, ablation="zero", seed=1)
    assert other_seed.circuit is None   # a circuit pruned with seed 0 is not another seed's

    marker = re.search(r'class="marker" cx="([\d.]+)"', ex.curve.value)
    ex.k.value = 5   # the top 5 of the masks' ranking, without pruning or training again
    assert ex.shown.n_nodes == 5 and ex.shown.nodes == {"0.attn.in": [0, 1, 2, 3, 4]} and len(calls) == 1
    assert len(ex.graph.nodes) == 5 and ex.circuit.n_nodes != 5 and "top 5 of its ranking" in ex.status.value
    assert re.search(r'class="marker" cx="([\d.]+)"', ex.curve.value).group(1) != marker.group(1)
    # scored on n_pairs test pairs, calibrated on the train pairs the pruner calibrates on
    from cspkit.ablation import keep_gates
    from cspkit.circuit import fit_calibration, masked_pair_logits, score, split_pairs
    from cspkit.config import PruneConfig
    cfg = PruneConfig()
    calib = split_pairs(cspkit.tasks.get("single_double_quote"), cfg)[0][:cfg.calib_pairs]
    gates = keep_gates(model.config, ex.shown.nodes, model.device)
    cal = fit_calibration(*masked_pair_logits(model, calib, gates, "zero"), cfg.calib_steps)
    test = cspkit.tasks.get("single_double_quote").pairs("test", n=4)
    two, label = masked_pair_logits(model, test, gates, "zero")
    assert score(two, label, cal)["loss"] == pytest.approx(ex.base_loss, abs=1e-5) and f"{ex.base_loss:.4f}" in \
        ex.loss.value
    ex.k.value = ex.circuit.n_nodes           # back to the chosen circuit itself
    assert ex.shown is ex.circuit

    # a circuit with neither a saved ranking nor masks: its masks are trained once for the slider
    fresh = viz.explore(model, "single_double_quote", circuits=[circuit], n_pairs=4, cache=False)
    assert fresh.order and fresh.k.max >= circuit.n_nodes and len(calls) == 1
    # a saved circuit carries its ranking: loaded, it needs no masks
    c = fake_prune(model, cspkit.tasks.get("single_double_quote"), 0.15, "mean", 0)
    c.ranking = [f"0.attn.in[{i}]" for i in range(8)]
    path = c.save(tmp_path / "ranked.json")
    assert json.loads(path.read_text())["ranking"] == c.ranking
    shown = viz.explore(model, "single_double_quote", circuits=[path], n_pairs=4, cache=False)
    assert shown.order == [("0.attn.in", i) for i in range(8)] and shown.k.max == 8
    # an empty circuit that meets its target: no masks are trained, the slider has nothing to add
    empty = Circuit("single_double_quote", {}, [], 0.15, 0.1, model=model, model_fingerprint=fingerprint(model))
    trained_masks = []
    monkeypatch.setattr(pruning, "train_masks", lambda *a, **k: trained_masks.append(a))
    bare = viz.explore(model, "single_double_quote", circuits=[empty], n_pairs=4, cache=False)
    assert bare.circuit is empty and bare.order == [] and bare.k.disabled and not trained_masks


def test_explorer_switches_models_and_draws_two_side_by_side(model, circuit, tmp_path):
    import shutil
    shutil.copytree(model.path, tmp_path / "other")
    other = cspkit.load(tmp_path / "other")
    with torch.no_grad():
        other.h[1].attn.c_proj.weight.mul_(-1)                            # other weights, same shape
    theirs = _circuit(other, nodes={k: v for k, v in _connected_nodes(other).items() if k.startswith("0.")})
    ex = viz.explore({"mine": model, "theirs": other}, ["single_double_quote"], circuits=[theirs, circuit],
                     n_pairs=4, cache=False)
    assert ex.model_choice.options == ("mine", "theirs") and ex.circuit is circuit and ex.other.layout.display == "none"
    ex.model_choice.value = "theirs"
    assert ex.model is other and ex.circuit is theirs and sorted(_ids(ex)) == sorted(theirs.node_names())
    ex.compare.value = "mine"                                            # the other model's circuit beside it
    assert ex.other.layout.display == "flex" and sorted(n["id"] for n in ex.other_graph.nodes) == \
        sorted(circuit.node_names())
    assert f"{circuit.n_nodes} nodes, {circuit.n_edges} edges" in ex.other_status.value
    ex.target.value = 0.3                                                # no circuit there in either model
    assert ex.other_graph.nodes == [] and "no single_double_quote circuit" in ex.other_status.value
    ex.target.value = 0.15
    ex.model_choice.value = "mine"
    ex.compare.value = "theirs"
    assert ex.circuit is circuit and sorted(n["id"] for n in ex.other_graph.nodes) == sorted(theirs.node_names())
    ex.compare.value = None
    assert ex.other.layout.display == "none"
    with pytest.raises(ValueError, match="none of mine"):
        stranger = _circuit(cspkit.load(tmp_path / "other"))
        stranger.model_fingerprint, stranger.model = "0" * 16, None
        viz.explore({"mine": model, "theirs": other}, ["single_double_quote"], circuits=[stranger], cache=False)


def test_explorer_falls_back_to_a_picture(explorer):
    from IPython.core.formatters import DisplayFormatter
    data, _ = DisplayFormatter().format(explorer)
    assert "application/vnd.jupyter.widget-view+json" in data
    assert data["image/png"].startswith("iVBORw0KGgo")       # base64 of the PNG signature
    png = viz.graph_png(explorer.graph.net)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_explorer_loads_a_directory_and_reports_errors(model, circuit, tmp_path, monkeypatch):
    circuit.save(tmp_path / "quote.json")
    _circuit(model, "for_while").save(tmp_path / "other.json")   # a task the explorer does not show: skipped
    ex = viz.explore(model, ["single_double_quote"], circuits=[tmp_path], n_pairs=4, cache=False)
    assert list(ex.circuits) == [("single_double_quote", "target", 0.15, "mean")] and ex.circuit.nodes == circuit.nodes
    with pytest.raises(FileNotFoundError, match="cspkit prune"):
        viz.explore(model, ["single_double_quote"], circuits=[tmp_path / "missing.json"], cache=False)
    with pytest.raises(ValueError, match="holds no circuit files of with_as"):
        viz.explore(model, ["with_as"], circuits=[tmp_path], cache=False)
    with pytest.raises(ValueError, match="unknown ablation 'Mean'"):
        viz.explore(model, ["single_double_quote"], ablation="Mean", cache=False)
    with pytest.raises(ValueError, match="target 20"):
        viz.explore(model, ["single_double_quote"], target=20, cache=False)
    # a circuit file cannot carry markup into the explorer's status line through its size or ablation
    hostile = json.loads((tmp_path / "quote.json").read_text())
    hostile.update(target="<img src=x onerror=alert(1)>", config={**hostile["config"], "k": 5})
    (tmp_path / "hostile.json").write_text(json.dumps(hostile))
    with pytest.raises(ValueError, match="malformed target"):
        viz.explore(model, ["single_double_quote"], circuits=[tmp_path / "hostile.json"], cache=False)

    from cspkit import pruning

    def failing(*args, **kwargs):
        raise ValueError("the full model's own held-out task loss is 0.65, above the target 0.2")

    monkeypatch.setattr(pruning, "prune", failing)
    ex.target.value = 0.2
    ex.compute.click()   # the button reports the error instead of raising it
    assert ex.circuit is None and "above the target 0.2" in ex.status.value


# --------------------------------------------------------------------------- figures
def test_figures_display_in_jupyter_and_still_save(tmp_path):
    from IPython.core.formatters import DisplayFormatter

    rows = [{"task": t, "accuracy": a} for t, a in (("single_double_quote", 0.95), ("bracket_counting", 0.7))]
    fig = viz.plot_task_scores({"sparse": rows, "dense": rows})
    assert isinstance(fig, viz.NotebookFigure)
    # what a notebook cell ending in the figure shows: a PNG, not "<Figure size ... with 1 Axes>"
    data, _ = DisplayFormatter().format(fig)
    assert data["image/png"][:8] == b"\x89PNG\r\n\x1a\n" and len(data["image/png"]) > 1000
    assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.canvas.manager is None      # made without pyplot: nothing keeps it once unreferenced
    fig.savefig(tmp_path / "scores.png")
    fig.savefig(tmp_path / "scores.svg")
    assert (tmp_path / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (tmp_path / "scores.svg").read_bytes()


def test_window_activations_match_whole_rows(model):
    # the quantile view runs rows cut at the last position it shows; causal attention makes that exact
    tokens = torch.randint(0, model.config.vocab_size, (5, 32))
    spots = [(0, 5), (3, 32), (1, 17), (4, 1), (2, 20)]
    for name in ("0.attn.q[3]", "1.mlp.neuron[7]"):
        whole = viz.panes.activations(model, tokens, name)
        for (w, hi), got in zip(spots, viz.panes.window_activations(model, tokens, spots, name)):
            assert got.shape == (hi,) and torch.allclose(got, whole[w, :hi], atol=1e-5), (name, w, hi)
