"""A LoRA mean as a standard PEFT LoRA adapter, and back.

PEFT's LoRA adds, for every target module with weight W0 ``[out, in]``,

    ΔW = (lora_alpha / r) · lora_B.weight @ lora_A.weight,     lora_A: [r, in],  lora_B: [out, r]

which is exactly our mean μ = (α/r)·B_μ A_μ (:meth:`BayesLoRA.mean`). So θ's mean factors, or a task's
adapted posterior mean factors (the mean-field and point-mass guides keep the mean low rank), are a PEFT
adapter as they stand: ``lora_A.weight = mu_A``, ``lora_B.weight = mu_B``, same r and α. GPT-2's
``Conv1D`` stores its weight ``[in, out]``; PEFT's factors keep the Linear shapes and the config says
``fan_in_fan_out: true`` (only merging transposes).

Reading such a folder back (``init_from_peft``) is the runtime's: :mod:`abmll_pyro.train.peft_init`.

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
from torch import Tensor

from ..lora.adapter import BayesLoRA
from ..lora.layer import is_linear
from ..train.checkpoint import save_tensors
from ..train.peft_init import CONFIG_FILE, PREFIX, WEIGHTS_FILE

__all__ = ["export_peft", "peft_target_modules"]


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
    save_tensors(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out
