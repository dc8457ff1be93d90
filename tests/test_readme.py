"""The README stays true: its Python example runs as written, and CI runs its test command."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(marker: str, lang: str) -> str:
    match = re.search(rf"<!-- {marker} -->\s*```{lang}\n(.*?)```", README, re.S)
    assert match, f"README has no ```{lang} block after <!-- {marker} -->"
    return match.group(1)


def test_python_example_runs_as_written(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_block("python-example", "python"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TaskMetrics(accuracy=" in out.stdout and "loss " in out.stdout


def test_exactly_two_setup_commands_and_ci_runs_the_test_command():
    main, test = _block("main-command", "bash"), _block("test-command", "bash")
    assert main.count("\n") == 1 and test.count("\n") == 1  # one line each, copy-paste ready
    assert "pip install torch==2.13.0" in main.split("&&")[2] and "pip install torch==2.13.0" in test.split("&&")[2]
    assert "test-command" in (ROOT / ".ci" / "run").read_text()


def test_readme_is_short_and_its_example_imports_from_the_top_level():
    assert README.count("\n") <= 150
    example = _block("python-example", "python")
    assert example.count("\n") <= 30
    imports = [line for line in example.splitlines() if line.startswith(("import", "from"))]
    assert all(line.startswith(("import torch", "from abmll_pyro import")) for line in imports), imports
