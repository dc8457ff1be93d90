"""The CLI surface: --version, --quiet after the command, a closed pipe, and abmll_pyro.load_run."""

from __future__ import annotations

import subprocess
import sys

import abmll_pyro
from abmll_pyro.cli import build_parser, main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as done:
        assert done.code == 0
    assert capsys.readouterr().out.strip() == f"abmll {abmll_pyro.__version__}"


def test_quiet_before_or_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["--quiet", "compare", "x"]).quiet is True
    assert parser.parse_args(["compare", "x", "--quiet"]).quiet is True
    assert parser.parse_args(["data", "prepare", "debian-cls", "--quiet"]).quiet is True
    assert parser.parse_args(["compare", "x"]).quiet is False


def test_a_closed_pipe_is_not_an_error(tmp_path):
    """`abmll ... | head`: the reader goes away mid-output; the command stops quietly (exit 0), with no
    'Broken pipe' error line and no traceback at exit."""
    script = tmp_path / "many.py"
    script.write_text("import sys\nfrom abmll_pyro import cli\n\n"
                      "def many(args):\n    for i in range(200000):\n        print('| row', i, '|')\n    return 0\n\n"
                      "cli.COMMANDS['compare'] = many\nsys.exit(cli.main(['compare', 'x']))\n")
    piped = subprocess.run(f"'{sys.executable}' '{script}' | head -n 1; echo \"rc=${{PIPESTATUS[0]}}\"", shell=True,
                           executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert piped.stdout.splitlines() == ["| row 0 |", "rc=0"]
    assert "Broken pipe" not in piped.stderr and "Traceback" not in piped.stderr and "Exception" not in piped.stderr


def test_load_run_from_the_top_level(tmp_path):
    assert main(["--quiet", "train", "--method", "lora", "--model", "tiny-llama", "--tasks",
                 str(abmll_pyro.presets.synthetic_task_folder(tmp_path / "tasks")), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--rank", "2", "--max-test-tasks", "1", "--eval-query-size", "2"]) == 0
    loaded = abmll_pyro.load_run(tmp_path / "run")
    assert loaded.config.method == "lora" and loaded.state is None and loaded.built.method is not None
