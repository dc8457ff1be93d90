"""A run directory must not run code (issue 11, item 6): a stored config naming a plug-in *file* is
refused by ``evaluate --run``, ``predict --run``, ``generate --run``, ``export --run`` and ``train --resume``
(one loader, :func:`~abmll_pyro.train.run.open_run`) unless ``--trust-plugins``;
registered names and importable modules load as before."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from abmll_pyro.cli import main
from abmll_pyro.registry import UntrustedPluginError, check_trusted, is_file_spec

HANDWRITTEN = Path(__file__).parents[1] / "cli" / "handwritten"
TINY = ["--model", "tiny-llama", "--rank", "2", "--lora-alpha", "4", "--shots", "2", "--query-size", "2",
        "--eval-query-size", "3", "--num-inner-steps", "2", "--inner-lr", "0.01", "--outer-lr", "0.01",
        "--num-samples", "2", "--num-threads", "1", "--max-length", "96"]
# importing this file leaves a mark: proof that its code ran
HELPER = """
from pathlib import Path
from abmll_pyro.models.priors import HierarchicalPrior

MARK = Path(__file__).with_name("executed")
MARK.write_text(str(int(MARK.read_text()) + 1) if MARK.exists() else "1")


class P(HierarchicalPrior):
    pass
"""


def _forget(helper: Path) -> None:
    """Drop the registry's cached module so the next load executes the file again."""
    for name in [n for n in sys.modules if n.startswith(f"abmll_plugin_{helper.stem}_")]:
        del sys.modules[name]


@pytest.fixture
def run(tmp_path):
    helper = tmp_path / "plugins" / "helper.py"
    helper.parent.mkdir()
    helper.write_text(HELPER)
    out = tmp_path / "run"
    assert main(["--quiet", "train", "--method", "abmll", "--tasks", str(HANDWRITTEN), "--out", str(out), *TINY,
                 "--steps", "2", "--checkpoint-every", "2", "--prior", f"{helper}:P"]) == 0  # the user asked: it runs
    mark = helper.with_name("executed")
    assert mark.read_text() == "1"
    mark.unlink()
    _forget(helper)
    yield out, helper, mark
    _forget(helper)


def test_evaluate_and_predict_refuse_a_stored_file_plugin_without_trust(run, tmp_path, capsys):
    out, helper, mark = run
    (tmp_path / "q.jsonl").write_text(json.dumps({"input": "Which animal purrs?", "options": ["cat", "cow"]}) + "\n")
    commands = [["evaluate", "--run", str(out)],
                ["predict", "--run", str(out), "--support", str(HANDWRITTEN / "animals.jsonl"), "--query",
                 str(tmp_path / "q.jsonl")],
                ["generate", "--run", str(out), "--support", str(HANDWRITTEN / "animals.jsonl"), "--prompts",
                 str(tmp_path / "q.jsonl")],
                ["export", "--run", str(out), "--out", str(tmp_path / "adapter")],
                ["train", "--resume", str(out), "--steps", "3"]]
    for argv in commands:
        capsys.readouterr()
        assert main(["--quiet", *argv]) == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err
        assert f"{out / 'config.json'} names the plug-in file '{helper}:P' as prior" in lines[0]
        assert f"would import and execute {helper}" in lines[0] and "--trust-plugins" in lines[0]
        assert not mark.exists(), f"{argv[0]} executed the plug-in file"


def test_trust_plugins_loads_and_runs_it(run, tmp_path, capsys):
    out, helper, mark = run
    assert main(["--quiet", "evaluate", "--run", str(out), "--trust-plugins", "--num-samples", "1"]) == 0
    assert mark.read_text() == "1"
    _forget(helper)
    (tmp_path / "q.jsonl").write_text(json.dumps({"input": "Which animal purrs?", "options": ["cat", "cow"]}) + "\n")
    assert main(["--quiet", "predict", "--run", str(out), "--trust-plugins", "--support",
                 str(HANDWRITTEN / "animals.jsonl"), "--query", str(tmp_path / "q.jsonl"),
                 "--out", str(tmp_path / "p.jsonl")]) == 0
    assert mark.read_text() == "2"
    _forget(helper)
    assert main(["--quiet", "export", "--run", str(out), "--trust-plugins", "--out", str(tmp_path / "adapter")]) == 0
    assert mark.read_text() == "3"


def test_a_flag_that_replaces_the_stored_plugin_needs_no_trust(run, capsys):
    out, helper, mark = run
    assert main(["--quiet", "evaluate", "--run", str(out), "--prior", "hierarchical", "--num-samples", "1"]) == 0
    assert not mark.exists()


@pytest.mark.parametrize("spec, is_file", [
    ("hierarchical", False), ("abmll_pyro.models.priors:HierarchicalPrior", False), ("helper.py:P", True),
    ("plugins/helper:P", True), ("/abs/x.py:Outer.Inner", True), (None, False),
])
def test_only_file_specs_need_trust(spec, is_file):
    assert is_file_spec(spec) is is_file
    if is_file:
        with pytest.raises(UntrustedPluginError, match="--trust-plugins"):
            check_trusted({"guide": spec}, "somewhere/config.json", trust=False)
    check_trusted({"guide": spec}, "somewhere/config.json", trust=True)
