"""The 20 tasks: pair structure, single-token candidates, disjoint splits, the pair loss, user tasks."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from conftest import write_modules

from cspkit import tasks
from cspkit.config import ModelConfig
from cspkit.model import GPT
from cspkit.natural import mine
from cspkit.tokenizer import get_encoding

PAPER_TASKS = ["single_double_quote", "bracket_counting", "set_or_string", "set_or_string_fixedvarname",
               "final_kwarg", "class_init", "with_as", "bracket_brace", "with_open", "for_while", "else_elif",
               "fstring_brace", "if_ternary", "var_swap", "indent_for", "lambda_func", "if_equals",
               "enumerate_range", "var_if", "while_return_true"]


def _diff_region(a: str, b: str) -> tuple[str, str]:
    """The parts of a and b left after removing their common prefix and common suffix."""
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    j = 0
    while j < min(len(a), len(b)) - i and a[-1 - j] == b[-1 - j]:
        j += 1
    return a[i:len(a) - j], b[i:len(b) - j]


def test_registry_has_the_paper_tasks_in_order():
    assert tasks.names() == PAPER_TASKS


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_pairs_differ_in_one_place_with_single_token_candidates(name):
    enc = get_encoding()
    t = tasks.get(name)
    pairs = t.pairs("train", n=40) + t.pairs("test", n=40)
    for p in pairs:
        da, db = _diff_region(p.prompt_a, p.prompt_b)
        assert (da or db) and len(da) <= 60 and len(db) <= 60, (name, da, db)
        assert len(enc.encode_ordinary(p.cand_a)) == 1 and len(enc.encode_ordinary(p.cand_b)) == 1
        assert p.cand_a != p.cand_b
        if t.candidates:
            assert (p.cand_a, p.cand_b) == t.candidates
        # the prompt ends on a token boundary: the candidate is the next token
        for prompt, cand in ((p.prompt_a, p.cand_a), (p.prompt_b, p.cand_b)):
            base = enc.encode_ordinary(prompt)
            assert enc.encode_ordinary(prompt + cand)[: len(base) + 1] == base + enc.encode_ordinary(cand)
            assert len(base) <= 200, (name, len(base))


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_splits_are_disjoint_and_deterministic(name):
    t = tasks.get(name)
    train = t.pairs("train", n=60)
    test = t.pairs("test", n=60)
    assert not {(p.prompt_a, p.prompt_b) for p in train} & {(p.prompt_a, p.prompt_b) for p in test}
    assert t.pairs("test", n=60) == test
    assert t.pairs("test", n=60, seed=1) != test


def test_split_pools_share_no_names():
    gen = tasks.generators
    pools = [gen.NAMES, gen.token_names(), gen.WORDS, gen.FUNCS, gen.CALLS, gen.PREAMBLES]
    train = set().union(*(gen.vocab(p, "train") for p in pools))
    test = set().union(*(gen.vocab(p, "test") for p in pools))
    assert train and test and not train & test
    for p in pools:
        assert len(gen.vocab(p, "train")) >= 3 and len(gen.vocab(p, "test")) >= 3
    with pytest.raises(ValueError, match="split"):
        tasks.get("for_while").pairs("validation")


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(KeyError, match="single_double_quote"):
        tasks.get("no_such_task")


def test_multi_token_candidate_is_an_error_naming_it():
    with pytest.raises(ValueError, match="not a single token"):
        tasks.Task.from_pairs("bad", [("x = 1", "y = 2")], candidates=(" supercalifragilistic", " =="))


def test_prompt_not_ending_on_a_token_boundary_is_an_error():
    # "foo" + "(" would tokenize as one chunk "(x"-style only if letters follow; here the prompt
    # ends inside the chunk "):\n", so ")" + ":\n" is not the prompt's tokens then ":\n".
    with pytest.raises(ValueError, match="token boundary|does not tokenize"):
        tasks.Task.from_pairs("bad", [("def f(x)", "def g(y)")], candidates=(":\n", ","))


def test_task_loss_is_binary_cross_entropy_over_two_candidates():
    two = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0], [0.5, 0.5]])
    label = torch.tensor([0, 1, 1, 0])
    manual = [-math.log(1 / (1 + math.exp(-2))), -math.log(1 / (1 + math.exp(-1))),
              -math.log(1 / (1 + math.exp(4))), math.log(2)]
    assert tasks.task_loss(two, label).item() == pytest.approx(sum(manual) / 4, rel=1e-6)


class AlwaysA(nn.Module):
    """Puts a high logit on one fixed token at every position."""

    def __init__(self, token: int, vocab: int = 2048):
        super().__init__()
        self.config = ModelConfig(block_size=256)
        self.token, self.vocab = token, vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.dummy.device

    def forward(self, idx, last=None):
        """As GPT.forward: (B, T) -> (B, T, vocab) logits, or (B, vocab) at the ``last`` positions."""
        logits = torch.zeros(*(idx.shape if last is None else idx.shape[:1]), self.vocab)
        logits[..., self.token] = 5.0
        return logits


def test_score_table_keeps_long_model_names_whole_and_aligned():
    cell = {"task": "for_while", "loss": 0.0151, "accuracy": 1.0}
    res = {"split": "test", "models": [{"model": f"runs/{name}", "results": [cell], "solved": 1}
                                       for name in ("a-model-name-of-twenty-nine-ch", "dense")]}
    lines = tasks.format_scores(res).splitlines()
    assert lines[1].split() == ["task", "a-model-name-of-twenty-nine-ch", "dense"]
    # every row is as wide as the header, so the columns line up under their names
    assert len({len(line) for line in lines[1:]}) == 1
    assert lines[2].split() == ["for_while", "0.015", "/", "1.000", "0.015", "/", "1.000"]


def test_model_that_always_prefers_a_scores_half():
    t = tasks.get("for_while")
    model = AlwaysA(tasks.token_id(t.candidates[0]))
    r = tasks.evaluate(model, t, "test", n=32)
    assert r["accuracy"] == 0.5
    assert r["pair_accuracy"] == 0.0
    expected = (math.log(1 + math.exp(-5)) + math.log(1 + math.exp(5))) / 2
    assert r["loss"] == pytest.approx(expected, rel=1e-5)
    # it is right by 5 logits on the A-prompts and wrong by 5 on the B-prompts; the right candidate
    # has e^5 / (e^5 + 2047) of the vocabulary on A and 1 / (e^5 + 2047) on B
    assert (r["margin_a"], r["margin_b"]) == (pytest.approx(5.0), pytest.approx(-5.0))
    per_prompt = tasks.margins(model, t.pairs("test", n=32))
    assert per_prompt == ([pytest.approx(5.0)] * 32, [pytest.approx(-5.0)] * 32)
    z = math.exp(5) + 2047
    assert r["p_right"] == pytest.approx((math.exp(5) / z + 1 / z) / 2, rel=1e-5)
    top = tasks.next_tokens(model, "for x in", k=3)
    assert top[0] == (t.candidates[0], pytest.approx(math.exp(5) / z)) and len(top) == 3


def test_user_task_from_pairs_and_from_generator_work_end_to_end():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, d_model=32, n_head=2, d_head=16, d_mlp=64, block_size=64)).eval()
    t = tasks.Task.from_pairs("my_task", [("x = [1, 2", "]\n", "x = [[1, 2], [3", "]]"),
                                          ("y = [4, 5", "]\n", "y = [[4, 5], [6", "]]")])
    r = tasks.evaluate(model, t, "test")
    assert r["pairs"] == 2 and 0 <= r["accuracy"] <= 1 and r["loss"] > 0

    def gen(rng, split):
        n = rng.randint(0, 99)
        return f"for i in range({n}", "while i <"
    g = tasks.Task.from_generator("my_gen", gen, candidates=("):\n", " x"), n_pairs={"train": 8, "test": 8})
    assert len(g.pairs("train")) == 8
    r = tasks.evaluate(model, g, "train")
    assert r["pairs"] == 8

    with pytest.raises(ValueError, match="candidates"):
        tasks.Task.from_pairs("x", [("a", "b")])


def test_natural_quote_examples_are_mined_from_validation_files(tmp_path):
    body = "".join(f"def f{i}(x):\n    x = {i}\n    print(\"value is here\")\n    log('done now')\n"
                   for i in range(5))
    src = write_modules(tmp_path / "code", 30, body)
    t = mine("single_double_quote", [str(src)], max_pairs=50)
    pairs = t.pairs("test")
    assert pairs and all(p.cand_a == '")\n' and p.cand_b == "')\n" for p in pairs)
    assert all(p.prompt_a.endswith('"value is here') or p.prompt_a.endswith('"done now') for p in pairs)
    with pytest.raises(KeyError, match="miner"):
        mine("var_swap", [str(src)])


def test_natural_examples_come_from_the_real_code_of_the_models_own_corpus(tmp_path, tiny_cfg):
    """A model trained on code and template-made text is mined in its code's validation files
    only, split as its training split them (its val_percent)."""
    from cspkit.data import load_corpus
    from cspkit.natural import real_code_corpus
    src = write_modules(tmp_path / "code", 30, "x = [1, 2]\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"corpus": [str(src), "tasks:train"], "val_percent": 20}}))
    got, want = real_code_corpus(run), load_corpus([str(src)], 20)
    assert [f.rel for f in got.val] == [f.rel for f in want.val] and len(want.val) > len(load_corpus([str(src)]).val)
    with pytest.raises(ValueError, match="checkpoint directory"):
        real_code_corpus(GPT(tiny_cfg))


def test_count_contexts_counts_each_side_of_a_mined_task(tmp_path):
    from cspkit.data import load_corpus
    from cspkit.natural import count_contexts
    body = "x = [1, 2, 3]\ny = [[1, 2], [3, 4]]\nz = [a, b]\nprint(\"hi there\")\n"
    src = write_modules(tmp_path / "code", 40, body)
    corpus = load_corpus([str(src)])
    n_train, n_val = len(corpus.train), len(corpus.val)
    assert n_train + n_val == 40 and n_train > 0
    assert count_contexts("bracket_counting", "train", corpus) == {"a": 2 * n_train, "b": n_train}
    assert count_contexts("single_double_quote", "val", corpus) == {"a": n_val, "b": 0}
    with pytest.raises(KeyError, match="miner"):
        count_contexts("var_swap", corpus=corpus)
    with pytest.raises(ValueError, match="split"):
        count_contexts("bracket_counting", "test", corpus)


def test_evidence_counts_candidate_tokens_in_the_training_shard(tmp_path, capsys):
    from cspkit import cli
    src = write_modules(tmp_path / "code", 40, "y = [[1, 2], [3, 4]]\nfor k in range(3):\n    pass\n")
    cli.main(["tasks", "--evidence", "--corpus", str(src), "--json"])
    rows = {r["task"]: r for r in json.loads(capsys.readouterr().out)["evidence"]}
    assert set(rows) == set(tasks.names())
    n_train = rows["bracket_counting"]["contexts"]["b"]
    assert n_train > 0 and rows["bracket_counting"]["contexts"]["a"] == 0
    assert rows["bracket_counting"]["tokens_b"] == n_train           # one ']]' per training file
    assert rows["enumerate_range"]["tokens_b"] == n_train and rows["enumerate_range"]["tokens_a"] == 0
    assert rows["var_swap"]["contexts"] is None
