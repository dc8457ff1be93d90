"""docs/RESULTS.md is what scripts/results_page/build.py makes of the committed summaries: the page is
current, a changed summary number changes it, a wrong spec is one line and exit 2, and every command the
page names parses with the shipped CLI and scripts and cites files that exist."""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "scripts" / "results_page" / "build.py"
SPEC = ROOT / "scripts" / "results_page" / "sections.yaml"
sys.path.insert(0, str(BUILD.parent))
from page_render import render  # noqa: E402


def _build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BUILD), *args], capture_output=True, text=True, timeout=120)


def _copy(tmp_path: Path) -> Path:
    """The spec, the summaries and the page in a folder of their own (edits there touch nothing here)."""
    (tmp_path / "scripts" / "results_page").mkdir(parents=True)
    shutil.copy(SPEC, tmp_path / "scripts" / "results_page" / "sections.yaml")
    shutil.copytree(ROOT / "docs" / "results", tmp_path / "docs" / "results",
                    ignore=shutil.ignore_patterns("*.jsonl.xz", "*.jsonl.gz"))
    shutil.copy(ROOT / "docs" / "RESULTS.md", tmp_path / "docs" / "RESULTS.md")
    return tmp_path


def test_the_page_is_what_the_summaries_give():
    done = _build("--check")
    assert done.returncode == 0, done.stderr  # stale: run python scripts/results_page/build.py


def test_a_changed_summary_number_changes_the_page(tmp_path):
    root = _copy(tmp_path)
    page = (root / "docs" / "RESULTS.md").read_text()
    table = root / "docs" / "results" / "main-job" / "table.md"
    row = next(line for line in table.read_text().splitlines() if line.startswith("| abmll |"))
    assert row in page
    edited = row.replace("| abmll | 0.", "| abmll | 9.", 1)  # accuracy 0.719 -> 9.719: no other cell reads 9.
    table.write_text(table.read_text().replace(row, edited))
    bench = root / "docs" / "results" / "cpu-long-shared-trunk" / "benchmark.json"
    data = json.loads(bench.read_text())
    minutes = f"{data['wall_time_s'] / 60:.1f}"
    data["wall_time_s"] = 6000.0  # 100.0 minutes
    bench.write_text(json.dumps(data))

    done = _build("--check", "--root", str(root))
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "2 line(s) differ" in done.stderr, done.stderr
    new = render(root)
    assert edited in new and row not in new
    assert "| `cpu-long`, debian-cls | 6 | 3 | 60 | 2 | 1 | 100.0 |" in new
    assert f"| 1 | {minutes} |" in page and f"| 1 | {minutes} |" not in new

    assert _build("--root", str(root)).returncode == 0  # written, the page is current again
    assert _build("--check", "--root", str(root)).returncode == 0


def test_a_number_quoted_in_prose_follows_its_summary(tmp_path):
    root = _copy(tmp_path)
    comparison = root / "docs" / "results" / "main-job" / "comparison.md"
    text = comparison.read_text()
    assert "+0.111 [+0.050, +0.178] *" in text and "accuracy +0.111 [+0.050, +0.178]," in render(root)
    comparison.write_text(text.replace("+0.111 [+0.050, +0.178] *", "+0.222 [+0.050, +0.178] *"))
    assert "accuracy +0.222 [+0.050, +0.178]," in render(root)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace("file: main-job/cost.md", "file: main-job/no-such.md"),
     "docs/results/main-job/no-such.md does not exist"),
    (lambda s: s.replace("kind: markdown", "kind: html", 1), "'html' is not one of"),
    (lambda s: s.replace("    sections:\n", "    sectoins:\n", 1), "unknown key 'sectoins'"),
    (lambda s: s.replace("commit: 4cb10c7", "commit: HEAD", 1), "'HEAD' is not an abbreviated commit id"),
    (lambda s: s.replace("rows: [ts-free,", "rows: [ts-none,", 1), "'ts-none' is not a row"),
])
def test_a_wrong_spec_is_one_line_and_exit_2(tmp_path, edit, message):
    root = _copy(tmp_path)
    spec = root / "scripts" / "results_page" / "sections.yaml"
    spec.write_text(edit(spec.read_text()))
    done = _build("--check", "--root", str(root))
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_tables_render_from_summaries_as_specified(tmp_path):
    """A small spec against its hand-written page: row picking, JSON cells, each-rows, values."""
    results = tmp_path / "docs" / "results" / "x"
    results.mkdir(parents=True)
    (results / "table.md").write_text("| method | acc ↑ | NLL ↓ |\n|---|---|---|\n| a | 0.5 | 1.0 |\n| **b** | 0.7 | 0.9 |\n"
                                      "\nfootnote\n")
    (results / "s.json").write_text(json.dumps({"runs": [{"k": 1, "v": 0.12345}, {"k": 2, "v": 2e-7}], "n": 7}))
    spec = {"title": "T", "summary": "b has {{acc_b}}.", "values": {"acc_b": {"file": "x/table.md", "row": "b", "col": "acc"}},
            "parts": [{"title": "P", "sections": [{
                "title": "S", "question": "Q?", "reading": "R, n = {{n}}.", "command": "abmll benchmark --out o",
                "commit": "abcdef1", "values": {"n": {"file": "x/s.json", "path": "n", "fmt": "d"}},
                "blocks": [{"kind": "markdown", "file": "x/table.md", "rows": ["b", "a"]},
                           {"kind": "json", "rows": [{"file": "x/s.json", "each": "runs", "label": "k={k}"}],
                            "columns": [{"header": "run", "label": True}, {"header": "v", "path": "v", "fmt": ".2g"}]}]}]}]}
    (tmp_path / "scripts" / "results_page").mkdir(parents=True)
    (tmp_path / "scripts" / "results_page" / "sections.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    assert render(tmp_path) == """# T

Contents:

- [1. P](#1-p)
  - [1.1 S](#11-s)

## Summary

b has 0.7.

## 1. P

### 1.1 S

**Question.** Q?

| method | acc ↑ | NLL ↓ |
|---|---|---|
| **b** | 0.7 | 0.9 |
| a | 0.5 | 1.0 |

| run | v |
|---|---|
| k=1 | 0.12 |
| k=2 | 2e-07 |

**Reading.** R, n = 7.

Command (code at `abcdef1`):

```bash
abmll benchmark --out o
```

Summaries: `docs/results/x/{table.md,s.json}`.
"""


def test_no_measured_number_is_typed_into_the_spec():
    """Prose quotes measurements through ``{{name}}``: a number with three or more decimals (how the
    summaries write metrics) typed into a question, reading, caption or summary is a stale number waiting."""
    spec = yaml.safe_load(SPEC.read_text())
    texts = [spec["summary"], spec.get("history", "")]
    for part in spec["parts"]:
        texts.append(part.get("intro", ""))
        for section in part["sections"]:
            texts += [section["question"], section["reading"]]
            texts += [b.get("caption", "") for b in section.get("blocks", [])]
    typed = [m for t in texts for m in re.findall(r"\d\.\d{3,}", str(t))]
    assert not typed, typed


# ---- the commands the page names run as written with shipped files ----

def _commands() -> list[str]:
    """Every command line of the spec (sections and blocks), continuations joined, comments dropped."""
    spec = yaml.safe_load(SPEC.read_text())
    found = []
    for part in spec["parts"]:
        for section in part["sections"]:
            for obj in [section, *section.get("blocks", [])]:
                if "command" in obj:
                    found.extend(obj["command"] if isinstance(obj["command"], list) else [obj["command"]])
    lines = [line.strip() for c in found for line in c.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _braces(arg: str) -> list[str]:
    match = re.search(r"\{([^{}]*,[^{}]*)\}", arg)
    if not match:
        return [arg]
    return [x for alt in match.group(1).split(",") for x in _braces(arg[:match.start()] + alt + arg[match.end():])]


def _repository_paths(args: list[str]) -> list[str]:
    return [a for a in args if re.match(r"(docs|configs|scripts|abmll_pyro)/", a)]


def test_every_cited_repository_path_exists():
    missing = []
    for line in _commands():
        for arg in _repository_paths(shlex.split(line)):
            for path in _braces(arg):
                if not glob.glob(str(ROOT / path)):
                    missing.append((line[:60], path))
    assert not missing, missing


class _Parsed(Exception):
    pass


def test_every_abmll_command_parses_and_its_config_validates():
    from abmll_pyro.cli import _config, build_parser
    from abmll_pyro.presets import get_preset

    lines = [line for line in _commands() if line.startswith("abmll ")]
    assert len(lines) >= 15
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[1:])  # a bad flag exits 2 here
        if args.command == "benchmark":  # the preset with --config FILE and the flags: every key validated
            _config(args, dict(get_preset(args.preset).config))


def test_every_script_command_parses(monkeypatch):
    lines = [line for line in _commands() if line.startswith("python scripts/")]
    assert len(lines) >= 6
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for line in lines:
        argv = shlex.split(line)[1:]
        script = ROOT / argv[0]
        monkeypatch.syspath_prepend(str(script.parent))
        monkeypatch.setattr(sys, "argv", [str(script), *argv[1:]])
        spec = importlib.util.spec_from_file_location(f"_page_cmd_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(_Parsed):  # a bad flag would exit 2 instead
            module.main(argv[1:]) if module.main.__code__.co_argcount else module.main()


def test_every_commit_named_exists():
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    named = set(re.findall(r"commit: ([0-9a-f]{7,40})", SPEC.read_text()))
    missing = [c for c in sorted(named) if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{c}^{{commit}}"],
                                                          capture_output=True).returncode != 0]
    assert named and not missing, missing
