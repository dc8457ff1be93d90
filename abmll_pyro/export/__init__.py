"""Taking an adapted posterior to other tools: PEFT LoRA adapters (:mod:`abmll_pyro.export.peft`; reading
one back to start θ is the runtime's, :mod:`abmll_pyro.train.peft_init`, re-exported here)."""

from ..train.peft_init import PeftMismatchError, init_from_peft, read_peft
from .peft import export_peft, peft_target_modules

__all__ = ["export_peft", "init_from_peft", "read_peft", "peft_target_modules", "PeftMismatchError"]
