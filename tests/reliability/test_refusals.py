"""Nothing of the user's is lost (issue 29, "data lost"): every writer refuses an output path holding
anything it did not write itself unless ``--overwrite``, never writes onto its own input, never into
``/``; set-aside corrupt checkpoints survive a new run. Each row: exit status 2, one ``abmll: error:``
line naming the path, and every file the user had is still there, byte for byte."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from abmll_pyro.cli import main

HANDWRITTEN = Path(__file__).parents[1] / "cli" / "handwritten"
TINY = ["--model", "tiny-llama", "--rank", "2", "--lora-alpha", "4", "--shots", "2", "--query-size", "2",
        "--eval-query-size", "3", "--num-inner-steps", "2", "--inner-lr", "0.01", "--outer-lr", "0.01",
        "--num-samples", "2", "--num-threads", "1", "--max-length", "96"]
# `trained`: the session's shared tiny run (conftest.py)
QUERY = json.dumps({"input": "Which animal purrs?", "options": ["cat", "cow"]}) + "\n"
USERS = {"config.json": '{"mine": 1}\n', "log.txt": "my notes\n", "metrics.jsonl": '{"step": 1}\n',
         "predictions.jsonl": "{}\n", "checkpoints/step-9/x": "x", "tensorboard/t": "t", ".x.tmp-42": "keep",
         "splits.json": '{"train": []}', "README.txt": "mine", "adapter_config.json": "{}"}


def _user_folder(folder: Path, names=tuple(USERS)) -> dict[str, bytes]:
    """Fill ``folder`` with the user's own files; returns what must survive."""
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(USERS[name])
    return _snapshot(folder)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error(capsys, argv) -> str:
    capsys.readouterr()
    try:
        code = main(["--quiet", *argv])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("abmll: error: "), err
    return lines[0]


def _files(t: Path, run: Path) -> dict[str, bytes]:
    (t / "q.jsonl").write_text(QUERY)
    (t / "p.jsonl").write_text(json.dumps({"input": "Which animal barks?"}) + "\n")
    return {"run": str(run), "support": str(HANDWRITTEN / "animals.jsonl"), "query": str(t / "q.jsonl"),
            "prompts": str(t / "p.jsonl"), "tasks": str(HANDWRITTEN)}


# every command that writes, its --out given as OUT (a folder for those that write folders)
WRITERS = {
    "train": lambda f: ["train", "--method", "abmll", "--tasks", f["tasks"], "--out", "OUT", *TINY, "--steps", "1"],
    "evaluate": lambda f: ["evaluate", "--run", f["run"], "--out", "OUT"],
    "predict": lambda f: ["predict", "--run", f["run"], "--support", f["support"], "--query", f["query"], "--out", "OUT"],
    "generate": lambda f: ["generate", "--run", f["run"], "--support", f["support"], "--prompts", f["prompts"],
                           "--out", "OUT"],
    "export": lambda f: ["export", "--run", f["run"], "--out", "OUT"],
    "data synthetic": lambda f: ["data", "synthetic", "--out", "OUT"],
    "benchmark": lambda f: ["benchmark", "--preset", "smoke", "--out", "OUT"],
    "compare": lambda f: ["compare", f["run"], "--names", "a", "--reference", "a", "--out", "OUT"],
}


@pytest.mark.parametrize("command", list(WRITERS))
@pytest.mark.parametrize("names", [("config.json",), ("README.txt", "splits.json"), ("log.txt", ".x.tmp-42"),
                                   tuple(USERS)], ids=["config", "readme+splits", "log+tmp", "everything"])
def test_every_writer_refuses_a_non_empty_foreign_folder(trained, tmp_path, capsys, command, names):
    """Property: whatever of the user's a folder holds, no command writes into it (or replaces it)."""
    folder = tmp_path / "users"
    folder.mkdir()
    before = _user_folder(folder, names)
    argv = [str(folder) if a == "OUT" else a for a in WRITERS[command](_files(tmp_path, trained))]
    line = _one_error(capsys, argv)
    assert str(folder) in line, line
    assert _snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(
        {n.split("/")[0] for n in names})


def _corrupt_set_aside(t: Path, run: Path) -> tuple[list[str], dict]:
    shutil.copytree(run, t / "run")
    ckpts = t / "run" / "checkpoints"
    for step in ckpts.glob("step-*"):
        step.rename(ckpts / f"corrupt-{step.name}")
    (ckpts / "latest.json").unlink()
    (t / "run" / "results.json").unlink()
    return ["train", "--method", "abmll", "--tasks", str(HANDWRITTEN), "--out", str(t / "run"), *TINY, "--steps", "1"]


def _setup(t: Path, run: Path, case: str):
    """argv and the folder whose files must survive, for each row."""
    f = _files(t, run)
    if case == "train onto user's run-like files":
        (t / "d").mkdir()
        _user_folder(t / "d")
        return [str(t / "d") if a == "OUT" else a for a in WRITERS["train"](f)], t / "d"
    if case == "train --out / ":
        return ["/" if a == "OUT" else a for a in WRITERS["train"](f)], t
    if case == "evaluate --out /":
        return ["evaluate", "--run", str(run), "--out", "/"], t
    if case == "corrupt set-aside kept":
        return _corrupt_set_aside(t, run), t / "run"
    if case == "predict --out is --query":
        return ["predict", "--run", str(run), "--support", f["support"], "--query", f["query"], "--out", f["query"]], t
    if case == "predict --out is --support":
        shutil.copy(f["support"], t / "s.jsonl")
        return ["predict", "--run", str(run), "--support", str(t / "s.jsonl"), "--query", f["query"], "--out",
                str(t / "s.jsonl")], t
    if case == "generate --out is --prompts":
        return ["generate", "--run", str(run), "--support", f["support"], "--prompts", f["prompts"], "--out",
                f["prompts"]], t
    if case == "predict --out a user's file":
        (t / "mine.jsonl").write_text('{"mine": true}\n')
        return ["predict", "--run", str(run), "--support", f["support"], "--query", f["query"], "--out",
                str(t / "mine.jsonl")], t
    if case == "evaluate --out a folder":
        (t / "d").mkdir()
        (t / "d" / "keep").write_text("k")
        return ["evaluate", "--run", str(run), "--out", str(t / "d")], t
    if case == "export onto another adapter":
        (t / "a").mkdir()
        (t / "a" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 64}')
        (t / "a" / "adapter_model.safetensors").write_bytes(b"theirs")
        return ["export", "--run", str(run), "--out", str(t / "a")], t
    if case == "data synthetic onto user's tasks":
        (t / "mytasks").mkdir()
        _user_folder(t / "mytasks", ("splits.json", "README.txt"))
        return ["data", "synthetic", "--out", str(t / "mytasks")], t
    raise KeyError(case)


# (case, regex the one line must match; {tmp} is tmp_path)
CASES = [
    ("train onto user's run-like files", r"--out {tmp}/d holds files abmll did not write there \(\.x\.tmp-42, "
                                         r"README\.txt, adapter_config\.json, checkpoints and 6 more\).*--overwrite"),
    ("train --out / ", r"--out / is the filesystem root"),
    ("evaluate --out /", r"--out / is the filesystem root"),
    ("corrupt set-aside kept", r"{tmp}/run already holds a checkpointed run \(set-aside corrupt checkpoints\)"),
    ("predict --out is --query", r"--out {tmp}/q\.jsonl is the --query file: writing it would replace the input"),
    ("predict --out is --support", r"--out {tmp}/s\.jsonl is the --support file"),
    ("generate --out is --prompts", r"--out {tmp}/p\.jsonl is the --prompts file"),
    ("predict --out a user's file", r"--out {tmp}/mine\.jsonl exists and was not written by this command.*--overwrite"),
    ("evaluate --out a folder", r"--out {tmp}/d is a folder; give the path of a file to write"),
    ("export onto another adapter", r"--out {tmp}/a holds files abmll did not write there \(adapter_config\.json, "
                                    r"adapter_model\.safetensors\)"),
    ("data synthetic onto user's tasks", r"--out {tmp}/mytasks holds files abmll did not write there \(README\.txt, "
                                         r"splits\.json\)"),
]


@pytest.mark.parametrize("case, pattern", CASES, ids=[c[0] for c in CASES])
def test_data_is_never_lost(trained, tmp_path, capsys, case, pattern):
    argv, kept = _setup(tmp_path, trained, case)
    before = _snapshot(kept)
    line = _one_error(capsys, argv)
    assert re.search(pattern.replace("{tmp}", re.escape(str(tmp_path))), line), line
    assert _snapshot(kept) == before


# ----------------------------------------------------------------------------- the right behaviour
def test_a_writer_may_write_again_into_what_it_wrote(trained, tmp_path, capsys):
    f = _files(tmp_path, trained)
    assert main(["--quiet", "data", "synthetic", "--out", str(tmp_path / "syn")]) == 0
    assert main(["--quiet", "data", "synthetic", "--out", str(tmp_path / "syn")]) == 0  # its own README.txt
    out = tmp_path / "p.out.jsonl"
    argv = ["--quiet", "predict", "--run", f["run"], "--support", f["support"], "--query", f["query"], "--out", str(out)]
    assert main(argv) == 0 and main(argv) == 0  # its own earlier predictions
    assert len(out.read_text().splitlines()) == 1


def test_overwrite_keeps_set_aside_corrupt_checkpoints(trained, tmp_path, capsys):
    argv = _corrupt_set_aside(tmp_path, trained)
    assert main(["--quiet", *argv, "--overwrite"]) == 0
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["corrupt-step-000001", "corrupt-step-000002", "latest.json", "step-000001"]


def test_export_overwrite_replaces_the_adapter(trained, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    assert main(["--quiet", "export", "--run", str(trained), "--out", str(tmp_path / "a"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 2
