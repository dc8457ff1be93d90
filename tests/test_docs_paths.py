"""Every `file.py:function` the method map (docs/method.md) names exists, and every repository path
cited in the README and docs/*.md exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "abmll_pyro"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _defined(path: Path) -> set[str]:
    """Top-level functions and classes of a module, and ``Class.method`` for its classes' methods."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef))
    return names


def test_method_map_names_functions_that_exist():
    text = (ROOT / "docs" / "method.md").read_text()
    refs = re.findall(r"`([\w/]+\.py):([\w.]+)", text)
    assert len(refs) >= 25
    missing = [f"{f}:{n}" for f, n in refs if not (PACKAGE / f).is_file() or n not in _defined(PACKAGE / f)]
    assert not missing, missing


def test_paths_cited_in_the_docs_exist():
    cited = set()
    for doc in DOCS:
        for path in re.findall(r"`((?:abmll_pyro|docs|scripts|tests|examples)/[\w./-]+)`", doc.read_text()):
            if not any(c in path for c in "*{<"):
                cited.add((doc.name, path.rstrip("/.")))
    missing = sorted((d, p) for d, p in cited if not (ROOT / p).exists())
    assert not missing, missing
