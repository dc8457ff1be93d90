"""Nothing silently wrong, no traceback, every error one line naming the thing (issue 29).

The table holds each case that must stop: exit status 2 and one ``abmll: error:`` line matching the
row's pattern (the file, line, key, step or limit). Cases whose right answer is not an error (a
checkpoint without checksums falls back to an older one with a warning, numeric step order, an
explicit ``--allow-config-change``, a diverged run's checkpoints) are tested after the table."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from abmll_pyro.cli import main
from abmll_pyro.data.fingerprint import file_sha256
from abmll_pyro.train.checkpoint import CHECKSUMS, atomic_write_text, load_latest, save_checkpoint

HANDWRITTEN = Path(__file__).parents[1] / "cli" / "handwritten"
TINY = ["--model", "tiny-llama", "--rank", "2", "--lora-alpha", "4", "--shots", "2", "--query-size", "2",
        "--eval-query-size", "3", "--num-inner-steps", "2", "--inner-lr", "0.01", "--outer-lr", "0.01",
        "--num-samples", "2", "--num-threads", "1", "--max-length", "96"]
LINE = {"input": "Which animal barks?", "options": ["dog", "cat"], "output": "dog"}
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def _train(t: Path, *extra: str) -> list[str]:
    return ["train", "--method", "abmll", "--tasks", str(HANDWRITTEN), "--out", str(t / "d"), *TINY, "--steps", "2",
            *extra]


def _file(path: Path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _fifo(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return str(path)


def _copy(run: Path, t: Path, **config_changes) -> str:
    shutil.copytree(run, t / "run")
    if config_changes:
        path = t / "run" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}, indent=1))
    return str(t / "run")


def _folder(t: Path, **files: str | None) -> str:
    """A copy of the hand-written tasks with files replaced (None: a FIFO in its place)."""
    shutil.copytree(HANDWRITTEN, t / "f")
    for name, content in files.items():
        name = name.replace("_json", ".json")
        (t / "f" / name).unlink()
        _fifo(t / "f" / name) if content is None else _file(t / "f" / name, content)
    return str(t / "f")


def _preds(t: Path, *records: dict, name: str = "p.jsonl") -> str:
    rows = [{"method": "abmll", "seed": 0, "task": "t", "index": i, "gold": 0, "probs": [0.6, 0.4], **r}
            for i, r in enumerate(records)]
    return _file(t / name, "".join(json.dumps(r) + "\n" for r in rows))


def _predict(run: Path, t: Path, query: str) -> list[str]:
    return ["predict", "--run", str(run), "--support", str(HANDWRITTEN / "animals.jsonl"), "--query", query]


def _evil_model(t: Path) -> str:
    """A model folder whose pytorch_model.bin would run a command when unpickled without restriction."""
    from abmll_pyro.lms.tiny import tiny_model

    model, tokenizer = tiny_model("llama", seed=0)
    model.config.save_pretrained(t / "m")
    tokenizer.save_pretrained(t / "m")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {t / 'pwned'}",))

    (t / "m" / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    return str(t / "m")


def _nan_checkpoints(run: Path, t: Path) -> str:
    """A copy of the run whose every checkpoint holds NaN tensors, checksums recomputed."""
    out = _copy(run, t)
    for step in (t / "run" / "checkpoints").glob("step-*"):
        _rewrite(step, lambda tensors: {k: torch.full_like(v, float("nan")) for k, v in tensors.items()})
    return out


def _rewrite(step: Path, change) -> None:
    path = step / "adapter.safetensors"
    save_file(change(load_file(str(path))), str(path))
    sums = json.loads((step / CHECKSUMS).read_text())
    sums["adapter.safetensors"] = file_sha256(path)
    (step / CHECKSUMS).write_text(json.dumps(sums))


# (id, argv of (tmp_path, trained run), regex the one error line must match; {tmp} is tmp_path)
CASES = [
    # silently wrong before
    ("config.json edited then --resume", lambda t, r: ["train", "--resume", _copy(r, t, kl_beta=0.1), "--steps", "3"],
     r"{tmp}/run/config\.json differs from the config its checkpoint step-000002 was saved with \(kl_beta: 1e-08 "
     r"there, now 0\.1\); undo the edit of kl_beta, or pass --allow-config-change"),
    ("compare two runs of one method", lambda t, r: ["compare", str(r), _copy(r, t)],
     r"{r}/predictions\.jsonl and {tmp}/run/predictions\.jsonl both hold method 'abmll' seed 0 task '\w+' example \d+ "
     r".*--names"),
    ("compare gold -1", lambda t, r: ["compare", _preds(t, {}, {"gold": -1}), "--names", "a", "--reference", "a"],
     r"{tmp}/p\.jsonl:2: gold -1 is out of range for 2 options"),
    ("yaml python tag", lambda t, r: _train(t, "--config", _file(t / "c.yaml", f'kl_beta: !!python/object/apply:os.system '
                                                                         f'["touch {t}/pwned"]\n')),
     r"config file {tmp}/c\.yaml does not parse: could not determine a constructor for the tag"),
    ("yaml key twice", lambda t, r: _train(t, "--config", _file(t / "c.yaml", "kl_beta: 0.1\nkl_beta: 0.2\n")),
     r"config file {tmp}/c\.yaml: line 2: key 'kl_beta' given twice \(first on line 1\)"),
    ("json config key twice", lambda t, r: _train(t, "--config", _file(t / "c.json", '{"steps": 1,\n "steps": 2}')),
     r"{tmp}/c\.json: key 'steps' given twice"),
    ("splits.json test twice", lambda t, r: ["train", "--method", "abmll", "--tasks", _folder(
        t, splits_json='{"train": ["capitals"], "test": ["animals"], "test": ["opposites"]}'), "--out", str(t / "d"), *TINY],
     r"{tmp}/f/splits\.json: key 'test' given twice"),
    ("task file a FIFO", lambda t, r: ["train", "--method", "abmll", "--tasks", _folder(t, **{"animals.jsonl": None}),
                                       "--out", str(t / "d"), *TINY],
     r"{tmp}/f/animals\.jsonl: not a regular file"),
    ("splits.json a FIFO", lambda t, r: ["train", "--method", "abmll", "--tasks", _folder(t, splits_json=None),
                                         "--out", str(t / "d"), *TINY],
     r"{tmp}/f/splits\.json: not a regular file"),
    ("config file a FIFO", lambda t, r: _train(t, "--config", _fifo(t / "c.yaml")),
     r"config file {tmp}/c\.yaml is not a regular file"),
    ("predict query a FIFO", lambda t, r: _predict(r, t, _fifo(t / "q.jsonl")), r"{tmp}/q\.jsonl: not a regular file"),
    ("abbreviated flag", lambda t, r: ["train", "--method", "abmll", "--out", str(t / "d"), "--ste", "2"],
     r"unrecognized arguments: --ste 2"),
    ("--device bogus", lambda t, r: _train(t, "--device", "bogus"),
     r"argument --device: invalid choice: 'bogus' \(choose from 'auto', 'cpu', 'cuda'\)"),
    ("--device cuda without a GPU", lambda t, r: _train(t, "--device", "cuda"),
     r"device='cuda' but torch sees no CUDA GPU"),
    # tracebacks before
    ("yaml alias bomb in target_modules", lambda t, r: _train(t, "--config", _file(t / "c.yaml", BOMB + "target_modules: *i\n")),
     r"config file {tmp}/c\.yaml: YAML aliases expand to more than 10000 values \(the limit\)"),
    ("yaml alias bomb in kl_beta", lambda t, r: _train(t, "--config", _file(t / "c.yaml", BOMB + "kl_beta: *i\n")),
     r"config file {tmp}/c\.yaml: YAML aliases expand to more than 10000 values"),
    ("--rank 1000000000", lambda t, r: _train(t, "--rank", "1000000000"), r"rank must be <= 4096 \(the limit\), got 1000000000"),
    ("--rank beyond the model", lambda t, r: _train(t, "--rank", "1000"),
     r"rank=1000 exceeds the smaller dimension \(16\) of adapted module .*v_proj.*the limit for this model is rank <= 16"),
    ("--ece-bins 2000000000", lambda t, r: _train(t, "--ece-bins", "2000000000"),
     r"ece_bins must be <= 10000 \(the limit\), got 2000000000"),
    ("compare --ece-bins 2000000000", lambda t, r: ["compare", str(r), "--ece-bins", "2000000000"],
     r"--ece-bins must be in \[1, 10000\] \(the limit\)"),
    ("--init-std 1e300", lambda t, r: _train(t, "--init-std", "1e300"), r"init_std must be <= 10 \(the limit"),
    ("--lora-alpha 1e308", lambda t, r: _train(t, "--lora-alpha", "1e308"), r"lora_alpha / rank must be <= 1e\+06 \(the limit\)"),
    ("config.json rank changed then --resume", lambda t, r: ["train", "--resume", _copy(r, t, rank=1), "--steps", "3"],
     r"{tmp}/run/config\.json differs from the config its checkpoint step-000002 was saved with \(rank: 2 there, now 1\)"),
    ("predict with 10,000 options", lambda t, r: _predict(r, t, _file(t / "q.jsonl", json.dumps(
        {"input": "q", "options": [f"o{i}" for i in range(10_000)]}) + "\n")),
     r"{tmp}/q\.jsonl:1: 10000 options; the limit is 1000 per example"),
    ("compare gold 5 of 2 options", lambda t, r: ["compare", _preds(t, {"gold": 5}), "--names", "a", "--reference", "a"],
     r"{tmp}/p\.jsonl:1: gold 5 is out of range for 2 options"),
    ("malicious pytorch_model.bin", lambda t, r: ["evaluate", "--method", "pretrained", "--model", _evil_model(t),
                                                  "--tasks", str(HANDWRITTEN)],
     r"cannot load the model in {tmp}/m: Weights only load failed"),
    # unclear before
    ("abmll --outer-lr 1e30: Pyro's dump condensed", lambda t, r: _train(t, "--outer-lr", "1e30", "--steps", "3",
                                                                         "--checkpoint-every", "1"),
     r"training diverged at step 2 \([^;]{10,200}\); nothing of step 2 was saved and the last finite checkpoint, step 1 "
     r"\({tmp}/d/checkpoints/step-000001\), stays the latest"),
    ("all-NaN checkpoints", lambda t, r: ["evaluate", "--run", _nan_checkpoints(r, t)],
     r"no intact checkpoint in {tmp}/run/checkpoints: .*tensor \S+ holds non-finite values"),
    ("test task with 2 examples", lambda t, r: ["train", "--method", "abmll", "--tasks", _folder(
        t, **{"animals.jsonl": json.dumps(LINE) + "\n" + json.dumps({**LINE, "input": "Which barks?"}) + "\n"}),
        "--out", str(t / "d"), *TINY, "--steps", "2"],
     r"test task 'animals' has 2 examples.*\(checked before training\)"),
    ("latin-1 yaml", lambda t, r: _train(t, "--config", _file(t / "c.yaml", "steps: 2\ntemplate: caf\xe9\n".encode("latin-1"))),
     r"config file {tmp}/c\.yaml:2: not valid UTF-8 \(byte 0xe9\)"),
    ("truncated config.json", lambda t, r: ["evaluate", "--run", _truncated_config(r, t)],
     r"{tmp}/run/config\.json:\d+: malformed JSON"),
    ("--seed 2**64", lambda t, r: _train(t, "--seed", str(2**64)), r"seed must be an integer in \[0, 4294967295\]"),
    ("generate --seed 2**64", lambda t, r: ["generate", "--run", str(r), "--support", str(HANDWRITTEN / "animals.jsonl"),
                                            "--prompts", _file(t / "p.jsonl", '{"input": "x"}\n'), "--seed", str(2**64)],
     r"--seed must be in \[0, 4294967295\]"),
    ("compare NaN probability", lambda t, r: ["compare", _preds(t, {"probs": [float("nan"), 1.0]}), "--names", "a",
                                              "--reference", "a"],
     r"{tmp}/p\.jsonl:1: probability nan is not a number in \[0, 1\]"),
    ("compare negative probability", lambda t, r: ["compare", _preds(t, {}, {}, {"probs": [-0.5, 1.5]}), "--names", "a",
                                                   "--reference", "a"],
     r"{tmp}/p\.jsonl:3: probability -0\.5 is not a number in \[0, 1\]"),
]


def _truncated_config(run: Path, t: Path) -> str:
    out = _copy(run, t)
    path = t / "run" / "config.json"
    path.write_text(path.read_text()[:100])
    return out


@pytest.mark.parametrize("case, argv_of, pattern", CASES, ids=[c[0] for c in CASES])
def test_one_line_exit_2(trained, tmp_path, capsys, case, argv_of, pattern):
    if case == "--device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    argv = ["--quiet", *argv_of(tmp_path, trained)]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [x for x in err.splitlines() if x.startswith("abmll: error: ")]
    assert len(errors) == 1 and len(errors[0]) < 1000, err
    assert all(x.startswith("abmll: ") for x in err.splitlines() if x.strip()), err
    regex = pattern.replace("{tmp}", re.escape(str(tmp_path))).replace("{r}", re.escape(str(trained)))
    assert re.search(regex, errors[0]), errors[0]
    assert not (tmp_path / "pwned").exists()
    if case == "test task with 2 examples":
        assert not (tmp_path / "d" / "checkpoints").exists()


# ----------------------------------------------------------------------------- the right behaviour
def test_a_checkpoint_without_checksums_is_skipped_with_a_warning(trained, tmp_path):
    _copy(trained, tmp_path)
    newest = tmp_path / "run" / "checkpoints" / "step-000002"
    (newest / CHECKSUMS).unlink()
    (newest / "optimizer.pt").unlink()
    with pytest.warns(UserWarning, match=rf"{re.escape(str(newest / CHECKSUMS))} is missing.*falling back"):
        ckpt = load_latest(tmp_path / "run", repair=True)
    assert ckpt.step == 1 and ckpt.optimizer is not None
    assert (tmp_path / "run" / "checkpoints" / "corrupt-step-000002").is_dir()


def test_a_wrong_shape_checkpoint_falls_back_to_an_older_one(trained, tmp_path, capsys):
    _copy(trained, tmp_path)
    _rewrite(tmp_path / "run" / "checkpoints" / "step-000002",
             lambda tensors: {k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if i == 0 else v
                              for i, (k, v) in enumerate(sorted(tensors.items()))})
    assert main(["--quiet", "evaluate", "--run", str(tmp_path / "run"), "--num-samples", "1"]) == 0
    warning = [x for x in capsys.readouterr().err.splitlines() if "falling back" in x]
    assert len(warning) == 1 and "has shape" in warning[0] and "the run's config builds" in warning[0]


def test_a_checkpoint_set_aside_twice_keeps_both(tmp_path):
    tensors = {"w": torch.ones(2)}
    for _ in range(2):
        save_checkpoint(tmp_path, 1, tensors, None, None, {}, keep=2)
        save_checkpoint(tmp_path, 2, tensors, None, None, {}, keep=2)
        (tmp_path / "checkpoints" / "step-000002" / "state.json").write_text("{}")  # corrupt the newest
        with pytest.warns(UserWarning, match="falling back"):
            assert load_latest(tmp_path, repair=True).step == 1
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("corrupt-*"))
    assert names == ["corrupt-step-000002", "corrupt-step-000002-2"]


def test_checkpoints_are_ordered_by_step_number(tmp_path):
    tensors = {"w": torch.ones(2)}
    for step in (999_998, 999_999, 1_000_000):
        save_checkpoint(tmp_path, step, tensors, None, None, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-1000000", "step-999999"]
    assert load_latest(tmp_path).step == 1_000_000


def test_allow_config_change_continues_and_records_it(trained, tmp_path):
    run = Path(_copy(trained, tmp_path, kl_beta=0.1))
    assert main(["--quiet", "train", "--resume", str(run), "--steps", "3", "--allow-config-change"]) == 0
    assert "config changed on resume (--allow-config-change): kl_beta: 1e-08 -> 0.1" in (run / "log.txt").read_text()
    assert json.loads((run / "checkpoints" / "step-000003" / "state.json").read_text())["config"]["kl_beta"] == 0.1


@pytest.mark.parametrize("method", ["lora", "abmll"])
def test_a_diverging_run_keeps_its_last_finite_checkpoint(tmp_path, capsys, method):
    out = tmp_path / "d"
    argv = ["--quiet", "train", "--method", method, "--tasks", str(HANDWRITTEN), "--out", str(out), *TINY, "--steps", "4",
            "--checkpoint-every", "1", "--outer-lr", "1e30"]
    assert main(argv) == 2
    assert "training diverged at step 2" in capsys.readouterr().err
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 1
    assert load_latest(out).step == 1  # (load_latest refuses non-finite tensors)
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as err:
        atomic_write_text(tmp_path / "results.json", "{}")
    assert err.value.filename == str(tmp_path / "results.json") and err.value.strerror == "No space left on device"
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


def test_a_full_disk_while_logging_names_log_txt(tmp_path):
    """log.txt's handler on a full disk: an OSError naming the file (one line at the CLI), not logging's
    printed traceback block."""
    import errno

    import pytest

    from abmll_pyro.train.runlog import RunLog

    log = RunLog(tmp_path / "run")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    log.handler.stream.write = full
    with pytest.raises(OSError) as caught:
        log.info("a line")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "run" / "log.txt")
    log.handler.stream = None  # nothing to flush on close
    log.metrics.close()
