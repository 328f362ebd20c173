"""The public API: every name of ``cspkit.__all__`` has a docstring whose example runs and gives
what it shows (on the shipped models), and ``help(cspkit)`` shows the pipeline."""
import doctest
import inspect
import pydoc

import pytest

import cspkit


def test_all_is_the_main_api_of_about_fifteen_names():
    assert 12 <= len(cspkit.__all__) <= 18
    assert cspkit.__all__[0] == "load" and cspkit.__all__[-2:] == ["bridges", "course"]
    assert all(hasattr(cspkit, name) for name in cspkit.__all__)


def test_help_shows_the_pipeline_in_a_few_lines():
    text = pydoc.render_doc(cspkit, renderer=pydoc.plaintext)
    head = text[:text.index("PACKAGE CONTENTS")]
    for step in ("cspkit.load", "cspkit.evaluate", "cspkit.prune", "cspkit.validate", "cspkit.circuit_graph",
                 "cspkit.bridges"):
        assert step in head, step
    assert len(cspkit.__doc__.splitlines()) <= 25


@pytest.mark.parametrize("name", cspkit.__all__)
def test_each_name_has_a_docstring_with_an_example_that_runs(name):
    obj = getattr(cspkit, name)
    doc = inspect.getdoc(obj) or ""
    assert ">>> " in doc, f"cspkit.{name} has no example in its docstring"
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(obj, f"cspkit.{name}", globs={"cspkit": cspkit}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0, f"cspkit.{name}: {result}"
