"""The docs cannot rot: every ```python block under docs/ and every docstring
example in the public modules runs here."""

import doctest
import importlib
import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
DOCTEST_MODULES = [
    "crossbow_jax.transformation.sma",
    "crossbow_jax.transformation.ssgd",
    "crossbow_jax.transformation.local_sgd",
    "crossbow_jax.transformation.diloco",
    "crossbow_jax.transformation.hierarchical",
    "crossbow_jax.transformation._fragments",
]


def doc_blocks():
    for path in sorted(DOCS.glob("*.md")):
        for i, block in enumerate(BLOCK.findall(path.read_text())):
            yield pytest.param(block, id=f"{path.name}[{i}]")


@pytest.mark.parametrize("code", list(doc_blocks()))
def test_docs_python_blocks_run(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """The README's first Python block runs as written (the second trains for an epoch)."""
    readme = (DOCS.parent / "README.md").read_text()
    blocks = BLOCK.findall(readme)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "<README>", "exec"), {"__name__": "__readme__"})
