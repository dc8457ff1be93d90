"""Fault injection on run directories (issue 11, items 1-5): two writers, a finished run in --out,
corrupt checkpoints, an unwritable output directory, leftover temporary folders, and Ctrl-C.

Every failure must be one ``abmll:`` line on stderr, exit status 2 (130 for Ctrl-C), and leave the
run directory in a state that resumes to exactly what an uninterrupted run produces."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from abmll_pyro.cli import main
from abmll_pyro.train.checkpoint import CheckpointError, load_latest, save_checkpoint
from _support.helpers import stepped_adam

HANDWRITTEN = Path(__file__).parents[1] / "cli" / "handwritten"
TINY = ["--model", "tiny-llama", "--tasks", str(HANDWRITTEN), "--rank", "2", "--lora-alpha", "4", "--shots", "2",
        "--query-size", "2", "--eval-query-size", "3", "--num-inner-steps", "2", "--inner-lr", "0.01",
        "--outer-lr", "0.01", "--num-samples", "2", "--num-threads", "1", "--max-length", "96"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(Path(__file__).parents[2])}


def _train(out: Path, *extra: str) -> int:
    return main(["--quiet", "train", "--method", "abmll", "--out", str(out), *TINY, *extra])


def _default_sigint() -> None:
    # a shell's background job starts with SIGINT ignored, and Python keeps an ignored SIGINT ignored:
    # give the child the default disposition so that Python installs its KeyboardInterrupt handler
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "abmll_pyro.cli", "--quiet", *argv], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def _one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err, err
    errors = [x for x in lines if x.startswith("abmll: error:")]
    assert len(errors) == 1, err
    return errors[0]


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert path.exists(), proc.communicate()[1][-2000:] if proc.poll() is not None else "timed out"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- 1. one writer per run directory
@pytest.mark.slow
def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    # a first run long enough to still be writing when the second starts (stopped with Ctrl-C below)
    first = _spawn("train", "--method", "abmll", "--out", str(run), *TINY, "--steps", "100000",
                   "--checkpoint-every", "100000")
    _wait_for(run / "metrics.jsonl", first)
    holder = json.loads((run / ".lock").read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    second = _spawn("train", "--method", "abmll", "--out", str(run), *TINY, "--steps", "3", "--overwrite")
    _, err = second.communicate(timeout=120)
    assert first.poll() is None, "the first run must still be writing"
    assert second.returncode == 2, err[-2000:]
    line = _one_error_line(err)
    assert f"in use by process {first.pid} on {socket.gethostname()}" in line and str(run) in line
    first.send_signal(signal.SIGINT)
    try:
        _, err_first = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, err_first[-2000:]
    assert not (run / ".lock").exists()  # released on the way out
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)), "the refused writer must not have touched metrics.jsonl"
    assert json.loads((run / "config.json").read_text())["steps"] == 100000


def test_a_stale_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    pid = _dead_pid()
    (run / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))
    assert _train(run, "--steps", "1") == 0
    err = capsys.readouterr().err
    assert f"stale lock of process {pid}" in err and "taking it over" in err
    assert len([x for x in err.splitlines() if "stale lock" in x]) == 1
    assert not (run / ".lock").exists()


def test_a_lock_from_another_host_is_never_broken(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "earlier"}))
    assert _train(run, "--steps", "1") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "in use by process 1 on elsewhere.example" in line and "delete" in line
    assert (run / ".lock").exists() and not (run / "config.json").exists()


# ----------------------------------------------------------------------------- 2. a finished run is not replaced
def test_a_finished_run_is_refused_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--steps", "2", "--checkpoint-every", "2") == 0
    before = (run / "results.json").read_bytes()
    capsys.readouterr()
    assert _train(run, "--steps", "3") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "already holds a finished run" in line and "--overwrite" in line and "--resume" in line
    assert (run / "results.json").read_bytes() == before
    assert _train(run, "--steps", "3", "--overwrite") == 0
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the old run's lines are gone, not interleaved
    assert json.loads((run / "results.json").read_text())["steps"] == 3


# ----------------------------------------------------------------------------- 3. corrupt checkpoints
def _flip_inside_tensor_data(path: Path) -> None:
    """Flip one bit in the middle of the tensor data of a safetensors file (past its JSON header), so
    the file still parses and only a checksum can tell."""
    raw = bytearray(path.read_bytes())
    header = struct.unpack("<Q", raw[:8])[0]
    start = 8 + header
    assert len(raw) > start + 8
    raw[(start + len(raw)) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    load_file(str(path))  # still a valid safetensors file


@pytest.mark.parametrize("fault", ["flip adapter", "truncate rng", "flip optimizer", "garbage state",
                                   "delete adapter", "broken latest"])
def test_load_falls_back_to_the_newest_intact_checkpoint(tmp_path, fault):
    p, opt = stepped_adam()
    for step in (2, 4):
        save_checkpoint(tmp_path, step, {"w": p.detach() * step}, opt, None, {}, keep=5)
    newest = tmp_path / "checkpoints" / "step-000004"
    name = {"flip adapter": "adapter.safetensors", "truncate rng": "rng.safetensors", "flip optimizer": "optimizer.pt",
            "garbage state": "state.json", "delete adapter": "adapter.safetensors", "broken latest": None}[fault]
    if fault == "flip adapter":
        _flip_inside_tensor_data(newest / name)
    elif fault == "truncate rng":
        (newest / name).write_bytes((newest / name).read_bytes()[:20])
    elif fault == "flip optimizer":
        raw = bytearray((newest / name).read_bytes())
        raw[len(raw) // 2] ^= 0x01
        (newest / name).write_bytes(bytes(raw))
    elif fault == "garbage state":
        (newest / name).write_text("{not json")
    elif fault == "delete adapter":
        (newest / name).unlink()
    else:
        (tmp_path / "checkpoints" / "latest.json").write_text("{\"pa")
    if name is None:  # latest.json broken, every checkpoint intact: the newest folder is used
        assert load_latest(tmp_path).step == 4
        return
    with pytest.warns(UserWarning, match=f"{newest / name}.*falling back"):
        ckpt = load_latest(tmp_path)
    assert ckpt.step == 2 and torch.equal(ckpt.tensors["w"], p.detach() * 2)


def test_no_intact_checkpoint_is_one_error(tmp_path):
    p, opt = stepped_adam()
    save_checkpoint(tmp_path, 2, {"w": p.detach()}, opt, None, {})
    _flip_inside_tensor_data(tmp_path / "checkpoints" / "step-000002" / "adapter.safetensors")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no intact checkpoint in .*adapter.safetensors is corrupt"):
        load_latest(tmp_path)


def test_resume_skips_a_bit_flipped_checkpoint_and_matches_an_uninterrupted_run(tmp_path, capsys):
    reference, run = tmp_path / "reference", tmp_path / "run"
    common = ("--checkpoint-every", "2", "--keep-checkpoints", "50")
    assert _train(reference, "--steps", "6", *common) == 0
    assert _train(run, "--steps", "4", *common) == 0
    bad = run / "checkpoints" / "step-000004" / "adapter.safetensors"
    _flip_inside_tensor_data(bad)
    capsys.readouterr()
    # evaluate never trains: it reports the bad file and uses the newest intact checkpoint
    assert main(["--quiet", "evaluate", "--run", str(run), "--num-samples", "1"]) == 0
    err = capsys.readouterr().err
    assert f"{bad} is corrupt" in err and "Traceback" not in err
    # resume: --steps may extend a run; the corrupt checkpoint is moved aside, training continues from step 2
    assert main(["--quiet", "train", "--resume", str(run), "--steps", "6"]) == 0
    err = capsys.readouterr().err
    assert len([x for x in err.splitlines() if "is corrupt" in x]) == 1
    assert (run / "checkpoints" / "corrupt-step-000004").is_dir()
    assert "resumed from step 2" in (run / "log.txt").read_text()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # cut back to the checkpoint, then continued: no step twice
    assert json.loads((run / "config.json").read_text())["steps"] == 6
    ref = load_latest(reference).tensors
    got = load_latest(run).tensors
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # bit for bit, as if nothing had happened


# ----------------------------------------------------------------------------- 4. unwritable output, leftovers
def test_an_unwritable_output_directory_is_one_line_naming_path_and_cause(capsys):
    """/sys refuses new entries even to root (the chmod test below covers ordinary users)."""
    target = Path("/sys/abmll-reliability-test/run")
    try:
        target.parent.mkdir()
    except OSError:
        pass
    else:
        target.parent.rmdir()
        pytest.skip("/sys accepts new directories here")
    assert _train(target, "--steps", "1") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "/sys/abmll-reliability-test" in line and ("not permitted" in line or "denied" in line or "Read-only" in line)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_directory_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert _train(ro / "run", "--steps", "1") == 2
    finally:
        ro.chmod(0o755)
    line = _one_error_line(capsys.readouterr().err)
    assert str(ro / "run") in line and "Permission denied" in line


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    import abmll_pyro.train.checkpoint as checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_file", full)
    run = tmp_path / "run"
    assert _train(run, "--steps", "2", "--checkpoint-every", "2") == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot write checkpoint {run / 'checkpoints' / 'step-000002'}: No space left on device" in line
    assert not list((run / "checkpoints").glob(".step-*")) and not (run / ".lock").exists()


def test_leftover_temporary_folders_are_removed_at_the_next_start(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "--steps", "2", "--checkpoint-every", "2") == 0
    leftovers = [run / "checkpoints" / ".step-000004.tmp-99999", run / ".config.json.tmp-99999"]
    leftovers[0].mkdir()
    (leftovers[0] / "adapter.safetensors").write_bytes(b"half")
    leftovers[1].write_text("{")
    assert main(["--quiet", "train", "--resume", str(run), "--steps", "3"]) == 0
    assert not any(p.exists() for p in leftovers)


# ----------------------------------------------------------------------------- 5. Ctrl-C
@pytest.mark.slow
def test_sigint_exits_130_keeps_the_checkpoint_and_resumes_to_the_uninterrupted_run(tmp_path, capsys):
    full, run = tmp_path / "full", tmp_path / "run"
    args = [*TINY, "--steps", "16", "--checkpoint-every", "4", "--keep-checkpoints", "50"]
    reference = _spawn("train", "--method", "abmll", "--out", str(full), *args)
    victim = _spawn("train", "--method", "abmll", "--out", str(run), *args)
    _wait_for(run / "checkpoints" / "latest.json", victim)
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and f"resume with: abmll train --resume {run}" in lines[0], err
    step = json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
    assert f"last checkpoint is step {step}" in lines[0]
    assert 0 < step < 16 and not (run / "results.json").exists() and not (run / ".lock").exists()
    # a partially trained run evaluates at its checkpoint's step (item 15)
    out = tmp_path / "partial.json"
    assert main(["--quiet", "evaluate", "--run", str(run), "--num-samples", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["steps"] == step
    capsys.readouterr()
    assert main(["--quiet", "train", "--resume", str(run)]) == 0
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    ref, got = (json.loads((d / "results.json").read_text()) for d in (full, run))
    drop = {"adapt_time_s_per_task"}  # seconds: not deterministic
    assert {k: v for k, v in ref["macro"].items() if k not in drop} == {k: v for k, v in got["macro"].items() if k not in drop}
    a, b = load_latest(full).tensors, load_latest(run).tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))


def test_under_a_launcher_rank_0_holds_the_lock_for_every_rank(tmp_path, monkeypatch):
    from abmll_pyro.train.lock import RunLock

    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").exists()
        monkeypatch.setenv("RANK", "1")
        with RunLock(tmp_path / "run"):  # another rank of the same launch: no second lock, no error
            pass
        assert (tmp_path / "run" / ".lock").exists()
        monkeypatch.setenv("RANK", "0")
    assert not (tmp_path / "run" / ".lock").exists()


def test_ctrl_c_while_a_checkpoint_is_written_waits_for_it(tmp_path, monkeypatch):
    import abmll_pyro.train.checkpoint as checkpoint

    p, opt = stepped_adam()
    real = checkpoint.save_file
    calls = []

    def interrupted_save(tensors, path, **kwargs):  # Ctrl-C arrives in the middle of writing the checkpoint
        calls.append(path)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(tensors, path, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", interrupted_save)
    # Python's own Ctrl-C handler, even when the suite runs as a background job (which starts with
    # SIGINT ignored, so no KeyboardInterrupt would ever be raised)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(tmp_path, 2, {"w": p.detach()}, opt, None, {})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(calls) == 2  # both safetensors files were written after the signal
    assert load_latest(tmp_path).step == 2  # and latest.json names the complete checkpoint
