"""The CLI's option surface: one dtype vocabulary, help and choices on every flag, ``train --config``
without ``--method``, an explicit benchmark preset, file modes of what a run and an export write, and
``--report-to`` trackers."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import stat

import pytest
import torch

from abmll_pyro.cli import build_parser, main
from abmll_pyro.config import DTYPE_NAMES, MIXED_PRECISION_NAMES, dtype_name, mixed_precision_name
from abmll_pyro.lms.hf import resolve_dtype
from abmll_pyro.train.config import CHOICES, ConfigError, RunConfig

SPELLINGS = {"float32": ("fp32", "float32"), "bfloat16": ("bf16", "bfloat16"), "float16": ("fp16", "float16")}
ACCELERATE = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("abmll: error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- 1. one dtype vocabulary
@pytest.mark.parametrize("torch_name", sorted(SPELLINGS))
def test_dtype_and_mixed_precision_share_their_spellings(torch_name):
    for spelling in SPELLINGS[torch_name]:
        config = RunConfig(dtype=spelling, mixed_precision=spelling)
        assert config.dtype == torch_name  # stored as torch names its dtypes
        assert config.mixed_precision == ACCELERATE[torch_name]  # stored as Accelerator(mixed_precision=) takes it
        assert resolve_dtype(spelling) is getattr(torch, torch_name)  # the LM loader reads the same vocabulary
        assert RunConfig.from_dict(config.to_dict()) == config  # canonical values read back unchanged
    assert set(DTYPE_NAMES) == {s for pair in SPELLINGS.values() for s in pair}
    assert mixed_precision_name("no") == mixed_precision_name("none") == "no"


@pytest.mark.parametrize("key,flag", [("dtype", "--dtype"), ("mixed_precision", "--mixed-precision")])
def test_an_unknown_precision_is_one_line_naming_the_key_and_the_spellings(key, flag, tmp_path, capsys):
    allowed = MIXED_PRECISION_NAMES if key == "mixed_precision" else tuple(DTYPE_NAMES)
    with pytest.raises(ConfigError, match=rf"^{key} must be one of .*'bf16', 'bfloat16'.*got 'fp64'$"):
        RunConfig(**{key: "fp64"})
    assert set(CHOICES[key]) == set(allowed)  # the flag offers what the config accepts
    with pytest.raises(SystemExit) as done:  # the flag: argparse's one line with the choices
        main(["train", "--method", "lora", "--out", str(tmp_path / "run"), flag, "fp64"])
    assert done.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert flag in line and all(repr(s) in line for s in allowed)
    config = tmp_path / "config.json"  # the config file: the file, the key and the spellings
    config.write_text(json.dumps({key: "fp64"}))
    assert main(["train", "--method", "lora", "--out", str(tmp_path / "run"), "--config", str(config)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(config) in line and f"{key} must be one of" in line and "'fp16', 'float16'" in line
    assert not (tmp_path / "run").exists()


def test_the_core_names_any_spelling():
    assert [dtype_name(s) for s in ("fp32", "bf16", "float16")] == ["float32", "bfloat16", "float16"]
    with pytest.raises(ValueError, match="dtype must be one of"):
        dtype_name("BF16")  # the spellings are exact (as the flag's choices)


# ----------------------------------------------------------------------------- 3. help and choices
def _commands(parser: argparse.ArgumentParser, prefix: str = "abmll"):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prefix} {name}")


def test_every_flag_of_every_command_has_help():
    missing, commands = [], 0
    for name, parser in _commands(build_parser()):
        commands += 1
        for action in parser._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert commands >= 11 and not missing, missing  # abmll, data (prepare, synthetic), train, ..., compare


def test_closed_config_keys_offer_their_choices():
    parser = dict(_commands(build_parser()))["abmll train"]
    flags = {a.dest: a for a in parser._actions}
    for key, values in CHOICES.items():
        assert list(flags[key].choices) == list(values), key
    assert flags["method"].choices and flags["drop_long_examples"].metavar == "{true,false}"


# ----------------------------------------------------------------------------- 9. benchmark's preset
def test_benchmark_needs_an_explicit_preset(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["benchmark", "--out", str(tmp_path / "bench")])
    assert done.value.code == 2
    assert "--preset" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "bench").exists()  # nothing started


# ----------------------------------------------------------------------------- 2. train --config RUN/config.json
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step Regular LoRA run and its PEFT export, written under umask 022."""
    from abmll_pyro.presets import synthetic_task_folder

    root = tmp_path_factory.mktemp("trained")
    previous = os.umask(0o022)
    try:
        tasks = synthetic_task_folder(root / "tasks")
        assert main(["--quiet", "train", "--method", "lora", "--model", "tiny-llama", "--tasks", str(tasks),
                     "--out", str(root / "run"), "--steps", "1", "--rank", "2", "--max-test-tasks", "1",
                     "--eval-query-size", "2", "--num-threads", "1"]) == 0
        assert main(["export", "--run", str(root / "run"), "--out", str(root / "adapter")]) == 0
    finally:
        os.umask(previous)
    return root


def test_train_config_sets_the_method(trained, capsys):
    run = trained / "run"
    assert main(["--quiet", "train", "--config", str(run / "config.json"), "--out", str(trained / "again")]) == 0
    again = json.loads((trained / "again" / "config.json").read_text())
    assert again == json.loads((run / "config.json").read_text())  # the file's method and every other key
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["method"] == "lora"


def test_train_method_flag_overrides_the_config_file(trained):
    run = trained / "run"
    assert main(["--quiet", "train", "--config", str(run / "config.json"), "--method", "reptile",
                 "--out", str(trained / "reptile")]) == 0
    assert json.loads((trained / "reptile" / "config.json").read_text())["method"] == "reptile"


def test_train_without_a_method_is_one_line(trained, tmp_path, capsys):
    config = tmp_path / "no-method.json"
    config.write_text(json.dumps({"steps": 1}))
    for extra in ([], ["--config", str(config)]):
        assert main(["train", "--out", str(tmp_path / "run"), *extra]) == 2
        assert "--method" in _one_error_line(capsys.readouterr().err)
    untrained = tmp_path / "icl.json"
    untrained.write_text(json.dumps({"method": "icl"}))
    assert main(["train", "--out", str(tmp_path / "run"), "--config", str(untrained)]) == 2
    assert "'icl' is not trained" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 4. file modes
def test_written_files_have_an_ordinary_files_mode(trained):
    """Under umask 022 every file a run or an export writes is 0644 (as open() makes it), the
    safetensors files included (safetensors itself leaves 0600)."""
    files = [p for d in ("run", "adapter") for p in (trained / d).rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.name == "adapter_config.json" for p in files)
    modes = {str(p.relative_to(trained)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_save_tensors_follows_the_umask(tmp_path):
    from abmll_pyro.train.checkpoint import save_tensors

    previous = os.umask(0o027)
    try:
        save_tensors({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "x.safetensors").stat().st_mode) == 0o640


# ----------------------------------------------------------------------------- 6. --report-to
def test_report_to_defaults_to_none_and_reads_none():
    assert RunConfig().report_to is None and RunConfig(report_to=["none"]).report_to is None
    assert RunConfig(report_to=["tensorboard", "tensorboard"]).report_to == ("tensorboard",)
    with pytest.raises(ConfigError, match="report_to must name trackers among .*got 'tensorbored'"):
        RunConfig(report_to=["tensorbored"])


HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed: the refusal cannot happen")
def test_report_to_a_missing_tracker_names_the_extra(trained, tmp_path, capsys):
    assert main(["train", "--config", str(trained / "run" / "config.json"), "--out", str(tmp_path / "run"),
                 "--report-to", "tensorboard"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "report_to tensorboard" in line and "pip install 'abmll-pyro[tensorboard]'" in line
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (the refusal is tested instead)")
def test_report_to_tensorboard_writes_event_files(trained, tmp_path):
    assert main(["--quiet", "train", "--config", str(trained / "run" / "config.json"), "--out", str(tmp_path / "run"),
                 "--steps", "2", "--report-to", "tensorboard"]) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "abmll"))
    events.Reload()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("train/nll")] == pytest.approx([r["nll"] for r in logged])
