"""Bad input, table-driven (issue 11, items 7-17): every row exits 2 with exactly one ``abmll: error:``
line on stderr that names the file, line, key or value, and never a traceback. Items whose right
answer is not an error (a clipped max_length, null flags, absolute paths, the checkpoint's step,
metrics after resume, preset texts, the truncation summary) are tested after the table."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from abmll_pyro.cli import build_parser, main
from abmll_pyro.train.config import RunConfig

HANDWRITTEN = Path(__file__).parents[1] / "cli" / "handwritten"
TINY = ["--model", "tiny-llama", "--rank", "2", "--lora-alpha", "4", "--shots", "2", "--query-size", "2",
        "--eval-query-size", "3", "--num-inner-steps", "2", "--inner-lr", "0.01", "--outer-lr", "0.01",
        "--num-samples", "2", "--num-threads", "1", "--max-length", "96"]
NOT_A_PRIOR = "class NotAPrior:\n    pass\n"
BOOM = "raise RuntimeError('boom at import')\n"
LINE = {"input": "Which animal barks?", "options": ["dog", "cat"], "output": "dog"}


def _jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _folder(root: Path, splits: object = None, files: dict | None = None) -> Path:
    """A copy of the hand-written folder with some files replaced (``bytes`` or ``str``)."""
    shutil.copytree(HANDWRITTEN, root)
    if splits is None:
        (root / "splits.json").unlink()
    elif splits != "keep":
        (root / "splits.json").write_text(splits if isinstance(splits, str) else json.dumps(splits))
    for name, content in (files or {}).items():
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def _run_dir(root: Path, **config) -> Path:
    """A run directory with only its config (enough for every check that comes before loading a model)."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps(RunConfig(**{"tasks": str(HANDWRITTEN), **config}).to_dict()))
    return root


def _predict(tmp: Path, support: str, query: str) -> list[str]:
    run = _run_dir(tmp / "run", method="abmll")
    (tmp / "support.jsonl").write_text(support)
    (tmp / "query.jsonl").write_text(query)
    return ["predict", "--run", str(run), "--support", str(tmp / "support.jsonl"), "--query", str(tmp / "query.jsonl")]


def _train(tmp: Path, *extra: str) -> list[str]:
    return ["train", "--method", "abmll", "--out", str(tmp / "out"), *TINY, *extra]


def _file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _yaml(tmp: Path, text: str) -> str:
    (tmp / "c.yaml").write_text(text)
    return str(tmp / "c.yaml")


# (id, build argv from tmp_path, regex the one error line must match); {tmp} in the regex is tmp_path
CASES = [
    # 7. task folders
    ("non-utf8 task file",
     lambda t: _train(t, "--tasks", str(_folder(t / "f", "keep", {"animals.jsonl": _jsonl(LINE).encode() + b"\xff\xfe oops\n"})),
                      "--steps", "1"),
     r"{tmp}/f/animals\.jsonl:2: not valid UTF-8 \(byte 0xff at column 1\)"),
    ("splits.json not JSON", lambda t: _train(t, "--tasks", str(_folder(t / "f", "{'train': [")), "--steps", "1"),
     r"{tmp}/f/splits\.json:1: malformed JSON"),
    ("splits.json not a mapping", lambda t: _train(t, "--tasks", str(_folder(t / "f", "[1, 2]")), "--steps", "1"),
     r"{tmp}/f/splits\.json: expected a JSON object"),
    ("folder without splits.json", lambda t: _train(t, "--tasks", str(_folder(t / "f")), "--steps", "1"),
     r"{tmp}/f has no splits\.json; name the train and test tasks with --train-tasks and --test-tasks"),
    ("unknown task in --test-tasks",
     lambda t: _train(t, "--tasks", str(_folder(t / "f")), "--train-tasks", "animals", "--test-tasks", "ghost"),
     r"test task\(s\) \['ghost'\] not found"),
    ("no test split", lambda t: _train(t, "--tasks", str(_folder(t / "f", {"train": ["animals", "opposites"]})),
                                       "--steps", "1"),
     r"task source '{tmp}/f' has no test tasks.*--test-tasks"),
    # 8. unknown model, offline (a subprocess: the hub's offline switch is read at import)
    ("unknown model offline", lambda t: ["evaluate", "--method", "pretrained", "--model", "no-such-org/no-such-model",
                                         "--tasks", str(HANDWRITTEN)],
     r"model 'no-such-org/no-such-model' is not a known name .*not a local path, and no access to the Hugging Face hub"),
    # 9. plug-ins of the wrong kind
    ("plug-in not a prior", lambda t: _train(t, "--tasks", str(HANDWRITTEN), "--prior",
                                             str(_file(t / "plug.py", NOT_A_PRIOR)) + ":NotAPrior"),
     r"NotAPrior \(from '{tmp}/plug\.py:NotAPrior'\) is not a prior: it does not implement hyperprior"),
    ("guide where a prior goes", lambda t: _train(t, "--tasks", str(HANDWRITTEN), "--prior",
                                                  "abmll_pyro.guides:MeanFieldGuide", "--steps", "1"),
     r"MeanFieldGuide .* is not a prior"),
    ("plug-in file raises", lambda t: _train(t, "--tasks", str(HANDWRITTEN), "--prior",
                                             str(_file(t / "boom.py", BOOM)) + ":P"),
     r"plug-in file '{tmp}/boom\.py' fails to load: RuntimeError: boom at import"),
    # 10. config values: type and range, key named, file named
    ("yaml word for a number", lambda t: _train(t, "--tasks", str(HANDWRITTEN), "--config", _yaml(t, "outer_lr: fast\n")),
     r"{tmp}/c\.yaml: outer_lr must be a number, got 'fast' \(a string\)"),
    ("yaml .inf", lambda t: _train(t, "--tasks", str(HANDWRITTEN), "--config", _yaml(t, "outer_lr: .inf\n")),
     r"{tmp}/c\.yaml: outer_lr must be finite, got inf"),
    ("yaml steps: true", lambda t: _train(t, "--tasks", str(HANDWRITTEN), "--config", _yaml(t, "steps: true\n")),
     r"{tmp}/c\.yaml: steps must be an integer, got True"),
    ("yaml list for a number", lambda t: _train(t, "--tasks", str(HANDWRITTEN), "--config", _yaml(t, "kl_beta: [1]\n")),
     r"{tmp}/c\.yaml: kl_beta must be a number, got \[1\]"),
    ("flag nan", lambda t: _train(t, "--tasks", str(HANDWRITTEN), "--inner-lr", "nan"), r"inner_lr must be finite, got nan"),
    ("flag steps not a number", lambda t: _train(t, "--tasks", str(HANDWRITTEN), "--steps", "true"),
     r"argument --steps: invalid int value: 'true'"),
    # 12. predict files are validated like task files; duplicate options are rejected everywhere
    ("predict options a string", lambda t: _predict(t, _jsonl(LINE, LINE), _jsonl({"input": "q", "options": "yes"})),
     r"{tmp}/query\.jsonl:1: 'options' must be a list of strings, got 'yes'"),
    ("predict input a number", lambda t: _predict(t, _jsonl(LINE), _jsonl(LINE, {"input": 5, "options": ["a", "b"]})),
     r"{tmp}/query\.jsonl:2: 'input' must be a string, got 5"),
    ("predict options null", lambda t: _predict(t, _jsonl(LINE), _jsonl({"input": "q", "options": None})),
     r"{tmp}/query\.jsonl:1: 'options' must be a list of strings, got None"),
    ("predict duplicate options", lambda t: _predict(t, _jsonl(LINE), _jsonl({"input": "q", "options": ["yes", " yes "]})),
     r"{tmp}/query\.jsonl:1: options 0 and 1 are the same \('yes'\) after whitespace normalisation"),
    ("predict support duplicate", lambda t: _predict(t, _jsonl(LINE, {**LINE, "options": ["a  b", "a b"], "output": "a b"}),
                                                     _jsonl({"input": "q", "options": ["x", "y"]})),
     r"{tmp}/support\.jsonl:2: options 0 and 1 are the same \('a b'\)"),
    ("predict non-utf8 query", lambda t: _predict_bytes(t, b'{"input": "q", "options": ["a", "b"]}\n\xc3\x28\n'),
     r"{tmp}/query\.jsonl:2: not valid UTF-8"),
    ("task file duplicate options",
     lambda t: _train(t, "--tasks", str(_folder(t / "f", "keep", {"animals.jsonl": _jsonl(LINE, LINE, {**LINE, "options": ["dog", "Dog", "dog\t"]})})),
                      "--steps", "1"),
     r"{tmp}/f/animals\.jsonl:3: options 0 and 2 are the same \('dog'\)"),
    ("task file blank option",
     lambda t: _train(t, "--tasks", str(_folder(t / "f", "keep", {"animals.jsonl": _jsonl({**LINE, "options": ["dog", " "]})})),
                      "--steps", "1"),
     r"{tmp}/f/animals\.jsonl:1: option 1 is blank"),
    # 13. resume accepts safe flags only
    ("resume changes kl_beta", lambda t: ["train", "--resume", str(_run_dir(t / "run", kl_beta=1e-8)), "--kl-beta", "0.1"],
     r"--kl-beta cannot change on --resume \(the run has kl_beta=1e-08, asked 0\.1\)"),
    ("resume changes model", lambda t: ["train", "--resume", str(_run_dir(t / "run")), "--model", "tiny-gpt2"],
     r"--model cannot change on --resume \(the run has model='tiny-llama', asked 'tiny-gpt2'\)"),
    ("resume with --out", lambda t: ["train", "--resume", str(_run_dir(t / "run")), "--out", str(t / "x")],
     r"--resume continues the run in its own directory; drop --out"),
    ("resume of no run", lambda t: ["train", "--resume", str(t / "nothing")], r"run directory {tmp}/nothing does not exist"),
]


def _predict_bytes(tmp: Path, query: bytes) -> list[str]:
    argv = _predict(tmp, _jsonl(LINE), "")
    (tmp / "query.jsonl").write_bytes(query)
    return argv


@pytest.mark.parametrize("case, argv_of, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case, argv_of, pattern):
    argv = ["--quiet", *argv_of(tmp_path)]
    if case == "unknown model offline":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONPATH": str(Path(__file__).parents[2])}
        proc = subprocess.run([sys.executable, "-m", "abmll_pyro.cli", *argv], env=env, capture_output=True, text=True,
                              timeout=300)
        code, err = proc.returncode, proc.stderr
    else:
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
        err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("abmll: error: "), err
    assert re.search(pattern.replace("{tmp}", re.escape(str(tmp_path))), lines[0]), lines[0]


def test_no_test_split_fails_before_training(tmp_path):
    argv = CASES[[c[0] for c in CASES].index("no test split")][1](tmp_path)
    assert main(["--quiet", *argv]) == 2
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "metrics.jsonl").read_text()


# ----------------------------------------------------------------------------- not errors: the right behaviour
def test_train_tasks_and_test_tasks_name_a_folder_without_splits_json(tmp_path, capsys):
    folder = _folder(tmp_path / "f")
    out = tmp_path / "r.json"
    assert main(["--quiet", "evaluate", "--method", "pretrained", "--tasks", str(folder), "--train-tasks", "animals",
                 "--test-tasks", "opposites", "capitals", "--out", str(out), *TINY]) == 0
    assert set(json.loads(out.read_text())["per_task"]) == {"opposites", "capitals"}


def test_max_length_beyond_the_context_is_clipped_with_one_line(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--quiet", "evaluate", "--method", "pretrained", "--tasks", str(HANDWRITTEN), "--out", str(out), *TINY]
    argv[argv.index("tiny-llama")] = "tiny-gpt2"
    argv[argv.index("--max-length") + 1] = "4096"
    assert main(argv) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "max_length" in x]
    assert lines == ["abmll: warning: max_length=4096 exceeds the context of tiny-gpt2 (1024 tokens); using max_length=1024"]
    assert json.loads(out.read_text())["config"]["max_length"] == 1024


def test_null_on_the_command_line_means_null(tmp_path):
    from abmll_pyro.cli import _config

    args = build_parser().parse_args(["train", "--method", "abmll", "--out", "x", "--max-length", "null",
                                      "--kl-gamma", "none", "--max-test-tasks", "null"])
    config = _config(args, {"method": "abmll"})
    assert config.max_length is None and config.kl_gamma is None and config.max_test_tasks is None
    default = _config(build_parser().parse_args(["train", "--method", "abmll", "--out", "x"]), {"method": "abmll"})
    assert default.max_length == RunConfig().max_length  # an absent flag keeps the default
    # null max_length means "no limit of ours": the model's context window
    out = tmp_path / "r.json"
    argv = ["--quiet", "evaluate", "--method", "pretrained", "--tasks", str(HANDWRITTEN), "--out", str(out), *TINY]
    argv[argv.index("--max-length") + 1] = "null"
    assert main(argv) == 0
    assert json.loads(out.read_text())["config"]["max_length"] == 1024  # tiny-llama's max_position_embeddings


def test_relative_tasks_are_stored_absolute_predict_needs_no_tasks_and_truncation_is_one_line(tmp_path, capsys,
                                                                                              monkeypatch):
    shutil.copytree(HANDWRITTEN, tmp_path / "hw")
    monkeypatch.chdir(tmp_path)
    argv = ["--quiet", "train", "--method", "abmll", "--tasks", "hw", "--out", "run", *TINY, "--steps", "2",
            "--checkpoint-every", "2"]
    argv[argv.index("--max-length") + 1] = "20"  # short enough to cut most prompts
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["tasks"] == str(tmp_path / "hw")
    summary = [x for x in err.splitlines() if "truncated" in x]
    assert len(summary) == 1 and re.match(r"abmll: warning: \d+ example encodings of \d+ tasks were truncated from "
                                          r"the left to fit max_length=20 \(.*\); details in .*log\.txt", summary[0])
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count("truncated: ") > 1  # the per-episode details
    # predict from elsewhere, with the training tasks gone: it never loads them
    shutil.move(str(tmp_path / "hw"), str(tmp_path / "moved"))
    monkeypatch.chdir(tmp_path / "moved")
    (tmp_path / "q.jsonl").write_text(_jsonl({"input": "Which animal purrs?", "options": ["cat", "cow"]}))
    assert main(["--quiet", "predict", "--run", str(tmp_path / "run"), "--support", "animals.jsonl",
                 "--query", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "p.jsonl")]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 1


def test_preset_and_cli_texts_name_only_flags_that_exist():
    from abmll_pyro import presets

    parser = build_parser()
    known = set()
    for action in parser._subparsers._group_actions[0].choices.values():
        known |= {s for a in action._actions for s in a.option_strings}
    texts = [presets.__doc__] + [p.description for p in presets.PRESETS.values()]
    named = {m for t in texts for m in re.findall(r"--[a-z][a-z-]*", t)}
    assert named and named <= known, named - known
