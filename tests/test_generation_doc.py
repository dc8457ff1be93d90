"""docs/generation.md stays true: its Python example runs as written and prints exactly the output the
doc shows (seeded; tiny random Llama; numbers rounded to 4 decimals, so thread counts do not matter)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

DOC = (Path(__file__).resolve().parents[1] / "docs" / "generation.md").read_text()


def _blocks() -> tuple[str, list[str]]:
    code = re.search(r"<!-- generation-example -->\s*```python\n(.*?)```", DOC, re.S)
    assert code, "docs/generation.md has no python block after <!-- generation-example -->"
    shown = re.search(r"^Output, exactly.*?```\n(.*?)```", DOC[code.end():], re.S | re.M)
    assert shown, "docs/generation.md has no 'Output, exactly' block after its example"
    return code.group(1), shown.group(1).splitlines()


def test_generation_example_prints_what_the_doc_shows(tmp_path):
    code, expected = _blocks()
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    if importlib.util.find_spec("peft") is None:  # the PEFT round trip (the last line) needs peft
        expected = [line for line in expected if not line.startswith("max |logit difference|")]
    assert out.stdout.splitlines() == expected
    assert (tmp_path / "adapted-peft" / "adapter_config.json").exists()
