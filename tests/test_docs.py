"""Docstrings: every public name documented, every example runs."""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import jaxclip

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(jaxclip.__path__, prefix="jaxclip.")
    if not name.endswith("__main__")
)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{result.failed} failing example(s) in {module_name}"


@pytest.mark.parametrize("name", jaxclip.__all__)
def test_public_names_are_documented(name):
    obj = getattr(jaxclip, name)
    doc = inspect.getdoc(obj)
    assert doc, f"jaxclip.{name} has no docstring"
    if inspect.isfunction(obj):
        params = inspect.signature(obj).parameters
        if params:
            assert "Args:" in doc, f"jaxclip.{name}: no Args section"
        assert "Returns:" in doc, f"jaxclip.{name}: no Returns section"
        assert "Example:" in doc and ">>>" in doc, f"jaxclip.{name}: no runnable example"
        for param in params:
            assert f"{param}:" in doc, f"jaxclip.{name}: argument {param} undocumented"


def test_examples_exist_somewhere_for_every_module():
    examples = sum(len(doctest.DocTestFinder().find(importlib.import_module(m))) for m in MODULES)
    assert examples >= 8
