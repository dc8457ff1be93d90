"""Starting θ from a PEFT LoRA adapter (the ``init_from_peft`` config key), and the PEFT file format.

A PEFT LoRA folder holds ``adapter_config.json`` (``peft_type`` LORA, ``r``, ``lora_alpha``,
``target_modules``, ...) and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and ``.lora_B.weight`` (``[out, r]``); its
ΔW = (lora_alpha / r) · lora_B @ lora_A is our mean μ = (α/r)·B_μ A_μ (:meth:`BayesLoRA.mean`). The
runtime reads such a folder here; the exporter (``export/peft.py``, a layer above the runtime) writes one
with these names. peft itself is not needed to read these files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..lora.adapter import BayesLoRA

__all__ = ["read_peft", "init_from_peft", "PeftMismatchError", "CONFIG_FILE", "WEIGHTS_FILE", "PREFIX"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


class PeftMismatchError(ValueError):
    """A PEFT adapter that does not fit the adapter it should initialize; the message names the mismatch."""


def read_peft(peft_dir: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """``(adapter_config, {module: (lora_A [r, in], lora_B [out, r])})`` of a PEFT LoRA folder."""
    root = Path(peft_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(f"PEFT adapter {root} has no {name}")
    try:
        config = json.loads((root / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise PeftMismatchError(f"{root / CONFIG_FILE} does not parse: {err}") from None
    if config.get("peft_type") != "LORA":
        raise PeftMismatchError(f"{root}: peft_type is {config.get('peft_type')!r}, only 'LORA' adapters can start θ")
    for key in ("use_dora", "use_rslora"):
        if config.get(key):
            raise PeftMismatchError(f"{root}: {key}=true adapters are not a plain (α/r)·B A LoRA")
    factors: dict[str, dict[str, Tensor]] = {}
    for key, value in load_file(str(root / WEIGHTS_FILE)).items():
        for part in ("lora_A", "lora_B"):
            tail = f".{part}.weight"
            if key.endswith(tail):
                module = key[: -len(tail)].removeprefix(PREFIX)
                module = module.replace(".default", "")  # tolerate an adapter name left in the key
                factors.setdefault(module, {})[part] = value
    return config, {m: (f.get("lora_A"), f.get("lora_B")) for m, f in factors.items()}


def init_from_peft(adapter: BayesLoRA, peft_dir: str | Path) -> list[str]:
    """Set θ's mean factors (mu_A, mu_B) from a PEFT LoRA adapter; returns the modules set.

    Checks: same rank r, the same set of adapted modules (PEFT's names match ours), every factor's
    shape. B is rescaled by α_peft / α_ours so the mean ΔW equals PEFT's exactly. The scale factors
    (σ) keep their initialization. A mismatch raises :class:`PeftMismatchError` naming it."""
    config, factors = read_peft(peft_dir)
    rank = adapter.config.rank
    if int(config.get("r", -1)) != rank:
        raise PeftMismatchError(f"PEFT adapter {peft_dir} has rank r={config.get('r')}, this run's rank is {rank}")
    ours, theirs = set(adapter.shapes), set(factors)
    if ours != theirs:
        missing, extra = sorted(ours - theirs), sorted(theirs - ours)
        raise PeftMismatchError(
            f"PEFT adapter {peft_dir} targets other modules than this run: "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, extra {extra[:4]}{'...' if len(extra) > 4 else ''}"
            f" (its target_modules {config.get('target_modules')}, ours {list(adapter.targets)})")
    rescale = float(config.get("lora_alpha", rank)) / adapter.config.lora_alpha
    with torch.no_grad():
        for m, (out_f, in_f) in adapter.shapes.items():
            A, B = factors[m]
            if A is None or B is None:
                raise PeftMismatchError(f"PEFT adapter {peft_dir}: module {m} lacks lora_A or lora_B")
            for what, got, want in (("lora_A", A, (rank, in_f)), ("lora_B", B, (out_f, rank))):
                if tuple(got.shape) != want:
                    raise PeftMismatchError(f"PEFT adapter {peft_dir}: {m}.{what} has shape {tuple(got.shape)}, "
                                            f"expected {want}")
            adapter.factors[adapter.key(m, "mu_A")].copy_(A)
            adapter.factors[adapter.key(m, "mu_B")].copy_(B * rescale)
    return sorted(ours)
