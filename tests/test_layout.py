"""The package holds the library and the runtime; every study lives in a folder of its own under scripts/.

* Nothing under abmll_pyro/ imports a study: no import of ``scripts`` or of any module or folder name
  found under scripts/ (an AST scan of every module, so a docstring that names a study does not count).
* The runtime (abmll_pyro/train) does not import the export layer above it (abmll_pyro/export).
* Every study folder scripts/<study>/ has a README.md with a ``python scripts/....py`` command whose
  script exists (one of them its own) and a link into docs/ that resolves (file, and heading anchor);
  loose scripts at the top of scripts/ are the shared helpers and the tools listed here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "abmll_pyro"
SCRIPTS = ROOT / "scripts"
# top-level files of scripts/ that are not a study folder: the package marker, the shared helpers, a
# maintenance tool, and the known-truth study (still a single file)
LOOSE = {"__init__.py", "_common.py", "compact_predictions.py", "known_truth.py"}


def _study_folders() -> list[Path]:
    return sorted(p for p in SCRIPTS.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def _script_names() -> set[str]:
    """``scripts`` and every module and folder name under scripts/ (each could be imported bare where
    scripts/<study>/ is on sys.path, as it is while a driver runs)."""
    names = {"scripts"}
    for path in SCRIPTS.rglob("*"):
        if "__pycache__" in path.parts:
            continue
        if path.is_dir():
            names.add(path.name)
        elif path.suffix == ".py" and path.stem != "__init__":
            names.add(path.stem)
    return names


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (a file under ``root``): relative imports
    resolved against its package, plus ``import_module("...")`` / ``__import__("...")`` of a literal."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def _package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_package_imports_no_study():
    studies = _script_names()
    assert {"scripts", "_common", "regimes"} <= studies  # the scan sees the studies at all
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in _package_modules() for line, name in _imports(p)
           if name.split(".")[0] in studies]
    assert not bad, bad


def test_the_scan_sees_relative_bare_and_dynamic_imports(tmp_path):
    """The scanner itself, on a planted module: a relative import resolves into the package; a bare and
    a dynamic import of a study are seen, and flagged."""
    planted = tmp_path / "abmll_pyro" / "train" / "planted.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("from ..eval import metrics\nimport regimes\nimportlib.import_module('scripts.cost.probe')\n")
    names = [n for _, n in _imports(planted, tmp_path)]
    assert names[:2] == ["abmll_pyro.eval", "abmll_pyro.eval.metrics"]
    assert [n for n in names if n.split(".")[0] in _script_names()] == ["regimes", "scripts.cost.probe"]


def test_the_runtime_does_not_import_the_export_layer():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in sorted((PACKAGE / "train").rglob("*.py"))
           for line, name in _imports(p) if name.startswith("abmll_pyro.export")]
    assert not bad, bad


def test_loose_scripts_are_only_helpers_and_tools():
    loose = {p.name for p in SCRIPTS.iterdir() if p.is_file() and p.suffix == ".py"}
    assert loose <= LOOSE, f"a study belongs in scripts/<study>/ with a README: {sorted(loose - LOOSE)}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", doc.read_text(), flags=re.M)}


@pytest.mark.parametrize("study", _study_folders(), ids=lambda p: p.name)
def test_every_study_has_a_readme_with_a_command_and_a_result(study):
    readme = study / "README.md"
    assert readme.is_file(), f"{study.relative_to(ROOT)} has no README.md"
    text = readme.read_text()
    commands = re.findall(r"python (scripts/[\w./-]+\.py)", text)
    assert commands, f"{readme.relative_to(ROOT)} names no `python scripts/....py` command"
    missing = [c for c in commands if not (ROOT / c).is_file()]
    assert not missing, f"{readme.relative_to(ROOT)}: {missing} do not exist"
    assert any(Path(c).parent == study.relative_to(ROOT) for c in commands), "no command runs this study's own driver"
    links = [link for link in re.findall(r"\]\(([^)\s]+)\)", text) if "docs/" in link]
    assert links, f"{readme.relative_to(ROOT)} links to no result in docs/"
    for link in links:
        target, _, anchor = link.partition("#")
        path = (study / target).resolve()
        where = f"{readme.relative_to(ROOT)}: {link}"
        assert path.exists() and path.is_relative_to(ROOT / "docs"), f"{where} does not resolve into docs/"
        if anchor:
            assert anchor in _anchors(path), f"{where}: no heading with that anchor"
