"""Bad input, one case of each kind at the public entry points: the error names what is wrong
and how to fix it, and no file is left half-written."""
import pytest

import cspkit
from cspkit import cli


@pytest.fixture(scope="module")
def model():
    return cspkit.load("small-hour")


def test_a_wrong_path_says_what_a_checkpoint_is():
    with pytest.raises(FileNotFoundError, match="does not exist; pass a directory written by `cspkit train`"):
        cspkit.load("no/such/dir")


def test_a_missing_model_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="no model named 'small-sparce'.*small-sparse"):
        cspkit.load("small-sparce")


def test_an_unknown_task_lists_the_known_ones(model):
    with pytest.raises(KeyError, match="unknown task 'quote'; known tasks: single_double_quote"):
        cspkit.evaluate(model, "quote")


def test_an_unknown_node_name_shows_the_form_of_one(model):
    with pytest.raises(ValueError, match=r"is not LOCATION\[INDEX\], e.g. '1.attn.in\[12\]'"):
        cspkit.token_heatmap(model, "x = 1\n", "attn.in 3")
    with pytest.raises(ValueError, match="9.attn.in"):
        cspkit.token_heatmap(model, "x = 1\n", "9.attn.in[3]")


def test_an_unknown_config_key_gets_a_suggestion():
    with pytest.raises(ValueError, match="'d_modle' \\(did you mean 'd_model'\\?\\)"):
        cspkit.config_for("tiny", d_modle=32)


def test_the_command_line_refuses_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "circuit.json"
    assert cli.main(["prune", "--model", "small-hour", "--task", "quote", "--out", str(out)]) == 2
    assert "unknown task 'quote'" in capsys.readouterr().err
    run = tmp_path / "run"
    assert cli.main(["train", "--profile", "tiny", "--out", str(run), "lrr=0.1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
