"""Atomic checkpoints: tensors as safetensors, optimizer state via ``torch.load(weights_only=True)``,
RNG and bookkeeping as JSON. Nothing is ever unpickled beyond plain tensors and containers.

Layout: ``<run>/checkpoints/step-000050/`` holding ``adapter.safetensors`` (the method's state
tensors), ``optimizer.pt``, ``rng.safetensors`` (torch and sampler generator states), ``state.json``
(step, python ``random`` state, config); ``<run>/checkpoints/latest.json`` names the newest. Each
checkpoint folder is written under a temporary name and moved into place with ``os.replace``, and
``latest.json`` likewise, so a run killed at any instant leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["Checkpoint", "save_checkpoint", "load_latest", "atomic_write_text"]

LATEST = "latest.json"


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, torch.Tensor]
    optimizer: dict | None
    torch_rng: torch.Tensor
    sampler_rng: torch.Tensor | None
    python_rng: Any
    config: dict


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "adapter.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state()}
    if sampler_rng is not None:
        rng["sampler"] = sampler_rng
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "python_rng": _py_state_to_json(random.getstate()),
                                                "config": config}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, json.dumps({"step": step, "path": final.name}) + "\n")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of ``run_dir``, or None when it has none."""
    root = Path(run_dir) / "checkpoints"
    if not (root / LATEST).exists():
        return None
    path = root / json.loads((root / LATEST).read_text())["path"]
    state = json.loads((path / "state.json").read_text())
    rng = load_file(str(path / "rng.safetensors"))
    opt_path = path / "optimizer.pt"
    optimizer = torch.load(opt_path, weights_only=True, map_location="cpu") if opt_path.exists() else None
    return Checkpoint(step=int(state["step"]), tensors=load_file(str(path / "adapter.safetensors")), optimizer=optimizer,
                      torch_rng=rng["torch"], sampler_rng=rng.get("sampler"),
                      python_rng=_py_state_from_json(state["python_rng"]), config=state["config"])
