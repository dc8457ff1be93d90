"""A deep ensemble of LoRAs per task (``ensemble-lora``): Lakshminarayanan, Pritzel & Blundell (2017),
"Simple and scalable predictive uncertainty estimation using deep ensembles"; for LoRA, Wang et al.
(2023), "LoRA ensembles for large language model fine-tuning" (members differ by their random init).

Training: Regular LoRA's (a benchmark reuses ``lora``'s checkpoint). Test time: E = ``ensemble_size``
members per task. Member e fine-tunes, K inner steps on the support cross-entropy (the budget of every
adapting method), the trained factors (A, B) together with a LoRA pair of its own, initialised
independently the way LoRA initialises a pair (A_e ~ U(±1/√in) from torch's generator, which the
harness seeds per task; B_e = 0):

    ΔW_e = (α/r) (B A + B_e A_e) = (α/r) [B, B_e] [A; A_e]        (one rank-2r product per module).

Every member therefore starts at the same function as Regular LoRA's adaptation (B_e = 0) and the
members part through their random A_e (B_e's gradient g (A_e x)ᵀ differs per member). Prediction
averages the members' probabilities,

    p(y | x) = (1/E) Σ_e softmax(score(x; W0 + ΔW_e)),

and the E members are the samples of the uncertainty split, so the epistemic part is their mutual
information I(y; e) = H[(1/E) Σ_e p_e] − (1/E) Σ_e H[p_e] (:func:`mutual_information`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import InnerLoopConfig
from ..data.scoring import OptionBatch, TokenBatch
from ..infer.inner import inner_loop
from ..lora.adapter import BayesLoRA
from ..lora.layer import LowRankDelta
from .lora import RegularLoRA
from .tokens import token_nll

__all__ = ["EnsembleLoRA", "mutual_information"]

_MEMBER_A, _MEMBER_B = "member_A", "member_B"


def mutual_information(probs: Tensor) -> Tensor:
    """``[n]`` nats: H[mean_e p_e] − mean_e H[p_e] for member probabilities ``probs: [E, n, K]``
    (zero-probability slots contribute 0)."""
    probs = probs.double()

    def entropy(p: Tensor) -> Tensor:
        return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)

    return entropy(probs.mean(0)) - entropy(probs).mean(0)


class EnsembleLoRA(RegularLoRA):
    name = "ensemble-lora"

    def __init__(self, adapter: BayesLoRA, inner: InnerLoopConfig, outer_lr: float, ensemble_size: int):
        if not (isinstance(ensemble_size, int) and ensemble_size >= 1):
            raise ValueError(f"ensemble_size must be an integer >= 1, got {ensemble_size!r}")
        super().__init__(adapter, inner, outer_lr)
        self.ensemble_size = ensemble_size

    def member_start(self) -> dict[str, Tensor]:
        """The trained factors plus a fresh member pair per module (A_e Kaiming-uniform, B_e = 0)."""
        start = {k: v.detach().clone() for k, v in self.lora.params().items()}
        for m, (out_features, in_features) in self.adapter.shapes.items():
            a = start[self.adapter.key(m, "mu_A")]
            bound = 1.0 / math.sqrt(in_features)
            start[self.adapter.key(m, _MEMBER_A)] = torch.empty_like(a).uniform_(-bound, bound)
            start[self.adapter.key(m, _MEMBER_B)] = torch.zeros(out_features, a.shape[0], dtype=a.dtype, device=a.device)
        return start

    def deltas(self, params: dict[str, Tensor]) -> dict[str, LowRankDelta]:
        """One rank-2r delta per module: [B, B_e] @ [A; A_e] · α/r."""
        key, out = self.adapter.key, {}
        for m, d in self.adapter.mean_deltas(params).items():
            out[m] = LowRankDelta(torch.cat([d.A, params[key(m, _MEMBER_A)]], 0),
                                  torch.cat([d.B, params[key(m, _MEMBER_B)]], 1), d.scaling)
        return out

    def member_loss(self, params: dict[str, Tensor], batch: OptionBatch) -> Tensor:
        if isinstance(batch, TokenBatch):
            return token_nll(self.adapter, self.deltas(params), batch)
        with self.adapter.use(self.deltas(params)):
            scores = self.likelihood.scores(self.adapter.lm, batch)
        logp = torch.log_softmax(scores.float(), -1)
        return -logp.gather(1, batch.gold.to(logp.device)[:, None]).mean()

    def adapt(self, episode) -> list[dict[str, Tensor]]:
        inner, members = self.inner, []
        for _ in range(self.ensemble_size):
            refined = inner_loop(lambda p: self.member_loss(p, episode.support), self.member_start(),
                                 inner.num_inner_steps, inner.inner_lr, inner.optimizer, adam_eps=inner.adam_eps)
            members.append({k: v.detach() for k, v in refined.items()})
        return members

    @torch.no_grad()
    def predict_samples(self, state: list[dict[str, Tensor]], episode) -> Tensor:
        """``[E, n, max_options]`` float64: each member's option probabilities."""
        out = []
        for params in state:
            with self.adapter.use(self.deltas(params)):
                out.append(torch.softmax(self.likelihood.scores(self.adapter.lm, episode.query).double(), -1))
        return torch.stack(out)

    def predict(self, state, episode) -> Tensor:
        return self.predict_samples(state, episode).mean(0).float()
