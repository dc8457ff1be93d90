"""Kill-and-resume equivalence: a run killed with SIGKILL after a checkpoint and resumed ends exactly
where an uninterrupted run with the same seed ends (CPU, deterministic kernels)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

HANDWRITTEN = Path(__file__).parents[1] / "cli" / "handwritten"
ARGS = ["--model", "tiny-llama", "--tasks", str(HANDWRITTEN), "--rank", "2", "--lora-alpha", "4", "--shots", "2",
        "--query-size", "2", "--eval-query-size", "3", "--num-inner-steps", "2", "--inner-lr", "0.01",
        "--outer-lr", "0.01", "--num-samples", "2", "--num-threads", "1", "--max-length", "96",
        "--steps", "16", "--checkpoint-every", "4", "--keep-checkpoints", "50"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _abmll(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "abmll_pyro.cli", "--quiet", *argv], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _final(run: Path) -> tuple[dict, dict]:
    result = json.loads((run / "results.json").read_text())
    ckpt = run / "checkpoints" / json.loads((run / "checkpoints" / "latest.json").read_text())["path"]
    metrics = {k: v for k, v in result["macro"].items() if k != "adapt_time_s_per_task"}  # seconds: not deterministic
    return metrics, load_file(str(ckpt / "adapter.safetensors"))


#: extra flags per case: the task subspace adds its own state (directions, scales, curvature buffer)
EXTRA = {"abmll-subspace": ["--subspace-dim", "2", "--subspace-init", "gradients", "--subspace-scale-lr", "0.05"]}


@pytest.mark.parametrize("method", ["abmll", "abmll-subspace", "reptile", "mc-dropout-lora"])  # the last: dropout masks in training
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, method):
    full, killed = tmp_path / "full", tmp_path / "killed"
    flags = ["--method", method.split("-subspace")[0], *EXTRA.get(method, [])]
    reference = _abmll("train", *flags, "--out", str(full), *ARGS)
    victim = _abmll("train", *flags, "--out", str(killed), *ARGS)
    latest = killed / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 120
    while not latest.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    step = json.loads(latest.read_text())["step"]
    assert 0 < step < 16 and not (killed / "results.json").exists()
    resumed = _abmll("train", "--resume", str(killed))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-2000:]
    macro_full, tensors_full = _final(full)
    macro_resumed, tensors_resumed = _final(killed)
    # exact: the same kernels on the same inputs in the same order, optimizer and RNG states restored bit for bit
    assert macro_resumed == macro_full
    assert tensors_full.keys() == tensors_resumed.keys()
    for k in tensors_full:
        assert (tensors_full[k] == tensors_resumed[k]).all(), k
    assert "resumed from step" in (killed / "log.txt").read_text()
