"""docs/generation.md stays true: its Python example runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = (Path(__file__).resolve().parents[1] / "docs" / "generation.md").read_text()


def test_generation_example_runs_as_written(tmp_path):
    match = re.search(r"<!-- generation-example -->\s*```python\n(.*?)```", DOC, re.S)
    assert match, "docs/generation.md has no python block after <!-- generation-example -->"
    script = tmp_path / "example.py"
    script.write_text(match.group(1))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "generated ids (4, 2, 6)" in out.stdout and "per-draw (8, 1, 2)" in out.stdout
    assert "entropy" in out.stdout and (tmp_path / "adapted-peft" / "adapter_config.json").exists()
