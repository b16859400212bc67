"""The docstrings' maths: TeX in raw strings, so ``\\beta`` is never a backspace and ``help()`` shows it.

The API page typesets the ``:math:`` roles and ``.. math::`` blocks with MathJax (docs/check_site.py checks
the rendered page); here, without a browser, each module compiles without an invalid escape warning and no
docstring holds a control character an unescaped ``\\b``, ``\\f``, ``\\a`` or ``\\v`` would make.
"""
from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lmm_symbolic"
SOURCES = sorted(PACKAGE.glob("*.py"))
ROLE = re.compile(r":math:`([^`]*)`")


def _docstrings(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                yield getattr(node, "name", "module"), first.value.value


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_docstring_maths_survives_python(path):
    source = path.read_text(encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(source, str(path), "exec")          # an invalid escape such as "\s" is a SyntaxWarning
    for name, doc in _docstrings(ast.parse(source)):
        assert not re.search(r"[\a\b\f\v]", doc), f"{path.name}:{name}: a TeX backslash was read as an escape"
        for tex in ROLE.findall(doc):
            assert tex.count("{") == tex.count("}"), f"{path.name}:{name}: unbalanced braces in :math:`{tex}`"
