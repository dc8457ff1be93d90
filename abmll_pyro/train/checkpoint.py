"""Atomic, checksummed checkpoints: tensors as safetensors, optimizer state as ``optimizer.pt`` read
back with ``torch.load(weights_only=True)`` (torch's restricted unpickler: tensors and plain containers
of numbers and strings, never arbitrary objects), RNG and bookkeeping as JSON.

Layout: ``<run>/checkpoints/step-000050/`` holding ``adapter.safetensors`` (the method's state
tensors), ``optimizer.pt``, ``rng.safetensors`` (torch and sampler generator states), ``state.json``
(step, python ``random`` state, config) and ``checksums.json`` (SHA-256 of each of those files);
``<run>/checkpoints/latest.json`` names the newest. Each checkpoint folder is written under a
temporary name (``.step-000050.tmp-<pid>``) and moved into place with ``os.replace``, and
``latest.json`` likewise, so a run killed at any instant leaves the previous checkpoint intact;
leftover temporary folders are removed by :func:`clean_temporaries` at the next start.

Loading verifies every checksum (a checkpoint without ``checksums.json`` is not intact). :func:`load_latest` falls back to the newest intact checkpoint
(with a warning naming the bad file) and stops with a :class:`CheckpointError` if none is intact:
training never continues from corrupt state.
"""

from __future__ import annotations

import json
import os
import random
import contextlib
import shutil
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from ..data.fingerprint import file_sha256

__all__ = ["Checkpoint", "CheckpointError", "save_checkpoint", "load_latest", "load_checkpoint", "atomic_write_text", "save_tensors",
           "clean_temporaries", "checkpoint_folders", "verify", "defer_interrupts"]

LATEST = "latest.json"
CHECKSUMS = "checksums.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read back intact; the message names the file."""


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, torch.Tensor]
    optimizer: dict | None
    torch_rng: torch.Tensor
    sampler_rng: torch.Tensor | None
    python_rng: Any
    config: dict


def _default_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process's umask (read without changing it
    on Linux; elsewhere set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with the file's mode an ordinary new file's (0644 under umask
    022): safetensors writes through a private temporary file and leaves mode 0600."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, _default_mode())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``; a failure (a full disk)
    leaves no temporary behind and is an ``OSError`` naming ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def defer_interrupts() -> Iterator[None]:
    """Hold SIGINT back for the block (a checkpoint being written) and deliver it afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *a: pending.append(a))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending and callable(previous):
            previous(*pending[0])
        elif pending and previous == signal.SIG_DFL:
            raise KeyboardInterrupt


def _py_state_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_json(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], optimizer, sampler_rng: torch.Tensor | None,
                    config: dict, keep: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    with defer_interrupts():  # Ctrl-C waits until the checkpoint and latest.json are consistent
        return _save(root, final, tmp, step, tensors, optimizer, sampler_rng, config, keep)


def _save(root, final, tmp, step, tensors, optimizer, sampler_rng, config, keep) -> Path:
    try:
        tmp.mkdir()
        save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "adapter.safetensors")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state()}
        if sampler_rng is not None:
            rng["sampler"] = sampler_rng
        save_tensors(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "python_rng": _py_state_to_json(random.getstate()),
                                                    "config": config}))
        sums = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1) + "\n")
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        cause = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise CheckpointError(f"cannot write checkpoint {final}: {cause}") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, json.dumps({"step": step, "path": final.name}) + "\n")
    for old in checkpoint_folders(root.parent)[keep:]:  # newest first, by step number (not by name)
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_temporaries(run_dir: Path) -> list[Path]:
    """Remove what an interrupted writer left behind (``checkpoints/.step-*.tmp-*`` folders and
    ``.*.tmp-*`` files); returns the removed paths. Call only while holding the run's lock."""
    run_dir = Path(run_dir)
    removed = []
    for pattern in ("checkpoints/.step-*.tmp-*", "checkpoints/.*.tmp-*", ".*.tmp-*"):
        for path in run_dir.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest first by step number (``step-1000000`` after ``step-999999``)."""
    root = Path(run_dir) / "checkpoints"
    steps = [(int(p.name[5:]), p) for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return [p for _, p in sorted(steps, key=lambda sp: sp[0], reverse=True)]


def verify(path: Path) -> None:
    """Raise :class:`CheckpointError` naming the first file of checkpoint ``path`` that is missing or
    whose SHA-256 differs from ``checksums.json``."""
    sums_path = path / CHECKSUMS
    if not sums_path.exists() and not (path / "adapter.safetensors").exists():
        raise CheckpointError(f"{path / 'adapter.safetensors'} is missing")
    if not sums_path.exists():  # nothing can tell a tampered or half-copied checkpoint from an intact one
        raise CheckpointError(f"{sums_path} is missing: the checkpoint cannot be verified")
    try:
        sums = json.loads(sums_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{sums_path} is missing or unreadable ({type(err).__name__})") from None
    if not isinstance(sums, dict) or not {"adapter.safetensors", "rng.safetensors", "state.json"} <= set(sums) \
            or ((path / "optimizer.pt").exists() and "optimizer.pt" not in sums):
        raise CheckpointError(f"{sums_path} does not list the checkpoint's files")
    for name, expected in sorted(sums.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file_sha256(file) != expected:
            raise CheckpointError(f"{file} is corrupt (its SHA-256 differs from {CHECKSUMS})")


def load_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in folder ``path``, checksums verified; any fault is a :class:`CheckpointError`."""
    verify(path)
    try:
        state = json.loads((path / "state.json").read_text())
        rng = load_file(str(path / "rng.safetensors"))
        opt_path = path / "optimizer.pt"
        optimizer = torch.load(opt_path, weights_only=True, map_location="cpu") if opt_path.exists() else None
        return Checkpoint(step=int(state["step"]), tensors=load_file(str(path / "adapter.safetensors")),
                          optimizer=optimizer, torch_rng=rng["torch"], sampler_rng=rng.get("sampler"),
                          python_rng=_py_state_from_json(state["python_rng"]), config=state["config"])
    except Exception as err:  # checksums matched but the content does not parse: report, never train on it
        raise CheckpointError(f"checkpoint {path} does not load: {type(err).__name__}: {str(err)[:200]}") from None


def _candidates(root: Path) -> list[Path]:
    """Checkpoint folders to try, best first: the one ``latest.json`` names, then the rest newest first."""
    folders = checkpoint_folders(root.parent)
    try:
        named = root / json.loads((root / LATEST).read_text())["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return folders  # a broken latest.json: every folder is still a candidate
    return [named] + [f for f in folders if f != named] if named in folders else folders


def check_tensors(path: Path, tensors: dict[str, torch.Tensor], expect: dict[str, tuple] | None) -> None:
    """:class:`CheckpointError` when a tensor of checkpoint ``path`` holds a non-finite value (a diverged
    run's state is never resumed or evaluated), or, with ``expect`` (name -> shape, what the run's
    config builds), when names or shapes differ."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path / 'adapter.safetensors'}: tensor {name} holds non-finite values")
    if expect is None:
        return
    missing, extra = sorted(set(expect) - set(tensors)), sorted(set(tensors) - set(expect))
    if missing or extra:
        raise CheckpointError(f"{path / 'adapter.safetensors'} holds other tensors than the run's config builds "
                              f"(missing {missing[:2]}, unexpected {extra[:2]})")
    for name, shape in expect.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(f"{path / 'adapter.safetensors'}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                  f"the run's config builds {tuple(shape)}")


def _set_aside(root: Path, path: Path) -> None:
    """Move a corrupt checkpoint to ``corrupt-<name>`` (``-2``, ``-3``... when one is there already)."""
    target, n = root / f"corrupt-{path.name}", 1
    while target.exists():
        n += 1
        target = root / f"corrupt-{path.name}-{n}"
    os.replace(path, target)


def load_latest(run_dir: Path, repair: bool = False, expect: dict[str, tuple] | None = None) -> Checkpoint | None:
    """The newest intact checkpoint of ``run_dir``, or None when it has none.

    Intact: its ``checksums.json`` is there and matches, it parses, its tensors are finite and (with
    ``expect``, name -> shape) have the shapes the run's config builds. A newer checkpoint that is not
    is skipped with a warning naming the bad file; with ``repair`` (a writer holding the run's lock) it
    is also moved aside to ``checkpoints/corrupt-<name>`` (never deleted) and ``latest.json`` rewritten
    to name the one returned. :class:`CheckpointError` when checkpoints exist but none is intact."""
    root = Path(run_dir) / "checkpoints"
    if not (root / LATEST).exists() and not checkpoint_folders(run_dir):
        return None
    bad = []
    for path in _candidates(root):
        try:
            ckpt = load_checkpoint(path)
            check_tensors(path, ckpt.tensors, expect)
        except CheckpointError as err:
            bad.append(str(err))
            warnings.warn(f"{err}; falling back to an older checkpoint")
            if repair:  # kept for inspection, out of the way of pruning and of the next resume
                _set_aside(root, path)
            continue
        if repair and (bad or not (root / LATEST).exists()):
            atomic_write_text(root / LATEST, json.dumps({"step": ckpt.step, "path": path.name}) + "\n")
        return ckpt
    raise CheckpointError(f"no intact checkpoint in {root}: {'; '.join(bad) or 'latest.json names no checkpoint'}")
