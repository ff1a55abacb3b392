"""The engine's shape: small modules that say what they import, no service imports, no private reach-ins."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "tiering"
MODULES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_small_documented_and_engine_only(path):
    src = path.read_text()
    tree = ast.parse(src)
    assert len(src.splitlines()) <= 420, "split the module by job (~400 lines at most)"
    assert "mport" in (ast.get_docstring(tree) or ""), "the docstring must say what the module may import"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert "service" not in node.module.split("."), "tiering/ imports nothing from service/"
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            assert isinstance(owner, ast.Name) and owner.id in ("self", "cls"), \
                f"line {node.lineno}: reaches into another object's private {node.attr!r}"
