"""Per-task Bayesian LoRA without meta-learning (``bayes-lora``): does the meta-learned prior matter?

BLoB-style variational inference on each test task alone: the same model, mean-field guide, K inner
steps of the β-ELBO on the support set and S posterior samples as ABMLL, but θ is never trained — the
prior over a task's ΔW stays the one ABMLL starts from, N(0, init_std²) elementwise (θ's mean factor
B_μ = 0, its scale at the σ map's start), and q starts there. The only difference from ``abmll`` in
one harness is therefore the meta-training of θ (and of any guide network).
"""

from __future__ import annotations

from .abmll import ABMLL

__all__ = ["PerTaskBayesLoRA"]


class PerTaskBayesLoRA(ABMLL):
    name = "bayes-lora"
    trainable = False

    def __init__(self, svi, num_train_tasks: int, num_samples: int, predict_mode: str):
        super().__init__(svi, num_train_tasks, num_samples, predict_mode, in_context=False)
        self.name = "bayes-lora"

    def parameters(self):
        return []

    def train_step(self, episodes, backward):
        raise NotImplementedError("bayes-lora has no training: its prior is fixed (that is the point)")

    def make_optimizer(self):
        return None

    def state_tensors(self):
        return {}

    def load_state_tensors(self, tensors):
        if tensors:
            raise ValueError(f"bayes-lora has no trained state, got tensors {sorted(tensors)[:5]}")
