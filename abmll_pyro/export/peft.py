"""A LoRA mean as a standard PEFT LoRA adapter, and back.

PEFT's LoRA adds, for every target module with weight W0 ``[out, in]``,

    ΔW = (lora_alpha / r) · lora_B.weight @ lora_A.weight,     lora_A: [r, in],  lora_B: [out, r]

which is exactly our mean μ = (α/r)·B_μ A_μ (:meth:`BayesLoRA.mean`). So θ's mean factors, or a task's
adapted posterior mean factors (the mean-field and point-mass guides keep the mean low rank), are a PEFT
adapter as they stand: ``lora_A.weight = mu_A``, ``lora_B.weight = mu_B``, same r and α. GPT-2's
``Conv1D`` stores its weight ``[in, out]``; PEFT's factors keep the Linear shapes and the config says
``fan_in_fan_out: true`` (only merging transposes).

Files (what ``PeftModel.from_pretrained(base, DIR)`` reads): ``adapter_config.json`` (``peft_type``
LORA, ``r``, ``lora_alpha``, ``target_modules``, ``base_model_name_or_path``, ...) and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` /
``.lora_B.weight`` (PEFT's saved names: the adapter name is left out). ``target_modules`` lists the
module-name suffixes (``q_proj``) when every such module is adapted, else the full module names
(e.g. only the last blocks). peft itself is not needed to write or read these files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..lora.adapter import BayesLoRA
from ..lora.layer import is_linear

__all__ = ["export_peft", "read_peft", "init_from_peft", "peft_target_modules", "PeftMismatchError",
           "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


class PeftMismatchError(ValueError):
    """A PEFT adapter that does not fit the adapter it should initialize; the message names the mismatch."""


def _suffix(name: str) -> str:
    return name.split(".")[-1]


def peft_target_modules(adapter: BayesLoRA) -> list[str]:
    """The suffixes of the adapted modules when every linear module with such a suffix is adapted,
    else the full names of the adapted modules (PEFT matches a key equal to, or ending in, a target)."""
    adapted = list(adapter.shapes)
    suffixes = sorted({_suffix(n) for n in adapted})
    everyone = [n for n, m in adapter.lm.named_modules() if n and _suffix(n) in suffixes
                and (is_linear(m) or n in adapter.layers)]
    # the adapted modules are BayesLoRALayers now; their wrapped `.base` children also end in the suffix
    everyone = [n for n in everyone if not n.endswith(".base")]
    return suffixes if sorted(everyone) == sorted(adapted) else adapted


def _is_conv1d(adapter: BayesLoRA, module: str) -> bool:
    return not isinstance(adapter.layers[module].base, torch.nn.Linear)


def _mean_factors(adapter: BayesLoRA, params: Mapping[str, Tensor], module: str) -> tuple[Tensor, Tensor]:
    return params[adapter.key(module, "mu_A")], params[adapter.key(module, "mu_B")]


def export_peft(adapter: BayesLoRA, params: Mapping[str, Tensor], out_dir: str | Path,
                base_model_name_or_path: str) -> Path:
    """Write ``params``' mean factors (θ's, or a task's adapted ones) as a PEFT LoRA adapter in ``out_dir``.

    The written adapter's ΔW_m = (α/r)·mu_B @ mu_A for every adapted module m (float32)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for m in adapter.shapes:
        A, B = _mean_factors(adapter, params, m)
        tensors[f"{PREFIX}{m}.lora_A.weight"] = A.detach().float().cpu().contiguous()
        tensors[f"{PREFIX}{m}.lora_B.weight"] = B.detach().float().cpu().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": adapter.config.rank,
        "lora_alpha": adapter.config.lora_alpha,
        "target_modules": peft_target_modules(adapter),
        "fan_in_fan_out": any(_is_conv1d(adapter, m) for m in adapter.shapes),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


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
