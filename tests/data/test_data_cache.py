"""Cache entries are built once, even by several processes started together on an empty cache."""

from __future__ import annotations

import json
import multiprocessing
import time

import pytest

from abmll_pyro.data.cache import build_task_folder
from abmll_pyro.data.fingerprint import folder_fingerprint


def _builders(tmp_path, fail: bool = False):
    log = tmp_path / "builds.txt"

    def fetch(staging):
        staging.mkdir(parents=True)
        (staging / "source.txt").write_text("fetched")
        time.sleep(0.3)  # long enough for the other processes to arrive while this one builds
        if fail:
            raise OSError("network down")
        return staging / "source.txt"

    def convert(source, out):
        out.mkdir(parents=True)
        (out / "task.jsonl").write_text(source.read_text())
        with open(log, "a") as handle:
            handle.write("built\n")
        return {"tasks": 1}

    return fetch, convert, log


def test_concurrent_builders_build_once(tmp_path):
    fetch, convert, log = _builders(tmp_path)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=build_task_folder, args=(tmp_path / "entry", fetch, convert)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text() == "built\n"  # one process built it; the others waited and found it finished
    out = tmp_path / "entry" / "tasks"
    assert json.loads((out / "manifest.json").read_text()) == {"tasks": 1, "fingerprint": folder_fingerprint(out)}
    assert (out / "task.jsonl").read_text() == "fetched" and not (tmp_path / "entry" / "staging").exists()
    assert build_task_folder(tmp_path / "entry", fetch, convert) == out and log.read_text() == "built\n"
    build_task_folder(tmp_path / "entry", fetch, convert, force=True)
    assert log.read_text() == "built\nbuilt\n"


def test_a_failed_build_leaves_no_finished_marker(tmp_path):
    fetch, convert, _ = _builders(tmp_path, fail=True)
    with pytest.raises(OSError, match="network down"):
        build_task_folder(tmp_path / "entry", fetch, convert)
    assert not (tmp_path / "entry" / "tasks" / "manifest.json").exists()
    assert not (tmp_path / "entry" / "staging").exists()


def test_smollm2_is_converted_once_by_concurrent_loaders(tmp_path, monkeypatch):
    """Two runs starting together on an empty cache: one converts the GGUF file, the other waits."""
    import torch

    from abmll_pyro.lms import smollm2

    log = tmp_path / "conversions.txt"

    def fake_convert(target):
        time.sleep(0.3)
        (target / "model.bin").write_text("weights")
        with open(log, "a") as handle:
            handle.write("converted\n")
        (target / smollm2.DONE).write_text("fake")

    class Loaded:
        def to(self, device):
            return self

        def eval(self):
            return self

    monkeypatch.setattr(smollm2, "_convert", fake_convert)
    monkeypatch.setattr(smollm2.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Loaded())
    monkeypatch.setattr(smollm2.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    ctx = multiprocessing.get_context("fork")  # the patches travel with the forked processes
    procs = [ctx.Process(target=smollm2.load_smollm2, args=(torch.float32, "cpu", tmp_path / "smollm2-135m"))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text() == "converted\n"
