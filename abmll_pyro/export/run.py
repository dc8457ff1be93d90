"""``abmll export``: a trained run's LoRA mean (θ's, or a support set's adapted posterior mean) as a
PEFT adapter folder.

Exportable methods: ABMLL (θ's mean factors, or the task's adapted mean factors; the guide's mean must
be the low-rank (α/r)·B_μ A_μ, as for the mean-field and point-mass guides), Regular LoRA and Reptile
(their LoRA, or its fine-tuned copy). Others are an error naming the method.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..methods import ABMLL, Reptile, RegularLoRA
from ..train.generate_run import load_adapted
from ..train.outputs import check_output_dir
from .peft import export_peft

__all__ = ["export_run", "FORMATS"]

FORMATS = ("peft",)


def _base_name(lm, model: str) -> str:
    """The base model as PEFT should load it: the LM's own local folder when it has one (e.g. the
    embedded SmolLM2 copy), else the run's model name."""
    path = getattr(getattr(lm, "config", None), "_name_or_path", "") or ""
    return path if path and Path(path).is_dir() else model


def _check_low_rank(method: ABMLL, params) -> None:
    adapter, guide = method.svi.adapter, method.svi.guide.task_guide
    for m in adapter.shapes:
        mean = guide.task_distribution(adapter, params, m).mean
        if not torch.allclose(mean, adapter.mean(params, m), atol=1e-6, rtol=1e-5):
            raise ValueError(f"the {type(guide).__name__} guide's posterior mean of {m} is not the low-rank "
                             f"(α/r)·B_μ A_μ: it cannot be written as a LoRA adapter")


def export_run(run_dir: Path, out: Path, support: Path | None = None, fmt: str = "peft", seed: int | None = None,
               trust_plugins: bool = False, overwrite: bool = False) -> Path:
    """Write the run's LoRA mean (θ's, or ``support``'s adapted one) into the new or empty folder ``out``
    (a folder that holds anything, another adapter too, only with ``overwrite``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; supported: {list(FORMATS)}")
    check_output_dir(out, (), (), overwrite)
    adapted = load_adapted(Path(run_dir), support, seed, trust_plugins)
    method = adapted.built.method
    if isinstance(method, ABMLL):
        params = adapted.state if adapted.state is not None else method.svi.theta()
        _check_low_rank(method, params)
    elif isinstance(method, (RegularLoRA, Reptile)):
        params = adapted.state if adapted.state is not None else method.lora.params()
    else:
        raise ValueError(f"method {method.name!r} has no single LoRA to export; exportable: abmll, lora, reptile")
    return export_peft(adapted.built.adapter, params, out, _base_name(adapted.built.lm, adapted.config.model))
