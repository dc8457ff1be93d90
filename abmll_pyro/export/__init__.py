"""Taking an adapted posterior to other tools: PEFT LoRA adapters (:mod:`abmll_pyro.export.peft`)."""

from .peft import PeftMismatchError, export_peft, init_from_peft, peft_target_modules, read_peft

__all__ = ["export_peft", "init_from_peft", "read_peft", "peft_target_modules", "PeftMismatchError"]
