"""BLoB per task (``blob``): Wang, Shi, Han, Metaxas & Wang (NeurIPS 2024), "BLoB: Bayesian Low-Rank
Adaptation by Backpropagation for Large Language Models", Sec. 3, as its reference implementation
(github.com/Wang-ML-Lab/bayesian-peft, ``modelwrappers/blob.py``) computes it; adapted per task from
the start every per-task method shares (Regular LoRA's trained factors).

Asymmetric Bayesian LoRA: per adapted module ΔW = (α/r) B A, B deterministic, A Gaussian elementwise,

    q(A) = N(M, Ω²),   Ω = G ⊙ G                      (BLoB's parameterization of A's std, ε > 0 branch)
    p(A) = N(0, σ_p²)                                  (σ_p = ``blob_prior_std``, BLoB's β = 0.2)
    KL(q ‖ p) = Σ_ij [ log(σ_p / Ω_ij) + (Ω_ij² + M_ij²) / (2 σ_p²) − 1/2 ]    (closed form, on A alone:
                 BLoB's theorem that, with its low-rank full-weight prior, the full-weight KL reduces to it)

Initialization (BLoB's): G ~ U(ε/√2, ε) with ε = ``blob_init_eps`` (0.05), so Ω starts in [ε²/2, ε²];
M and B start where LoRA's factors do — here the trained pooled LoRA's (A, B) (in BLoB's fine-tuning
from scratch, M Kaiming-uniform and B = 0; B's zero start is what makes the noise harmless at first,
and a trained B does not vanish, so the noise matters from the first step here).

Objective: Bayes by Backprop (Blundell et al. 2015) with BLoB's KL re-weighting over the M minibatches
of an epoch, π_i = 2^{M−i} / (2^M − 1) (Blundell et al. eq. 9; BLoB's ``--bayes-klreweighting``). The
support set is one minibatch (M = 1, π_1 = 1), so each of the K inner steps (``num_inner_steps`` at
``inner_lr``, every adapting method's budget) descends the negative ELBO per support example,

    L(M, G, B) = −(1/n) Σ_{(x,y) ∈ S} log softmax_y(score(x; W0 + (α/r) B (M + Ω ⊙ ε))) + KL(q ‖ p) / n,

one draw ε ~ N(0, I) per step, shared by the support examples (BLoB decorrelates examples with Flipout,
a variance reduction of the same expected gradient; here n ≤ 16 examples share one draw), M, G and B
updated together by the inner optimizer (BLoB steps the KL's gradient with a separate SGD optimizer).
Prediction: S = ``num_samples`` draws of A, p(y | x) = (1/S) Σ_s softmax(score(x; A_s)); the draws are
the samples of the uncertainty split.
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

__all__ = ["BLoB", "blob_kl"]

_G = "blob_G"


def blob_kl(mean: Tensor, scale_factor: Tensor, prior_std: float) -> Tensor:
    """KL(N(M, Ω²) ‖ N(0, σ_p²)) summed over elements, Ω = G ⊙ G (float64)."""
    mean, omega = mean.double(), scale_factor.double() ** 2
    return (math.log(prior_std) - omega.log() + (omega**2 + mean**2) / (2 * prior_std**2) - 0.5).sum()


class BLoB(RegularLoRA):
    name = "blob"

    def __init__(self, adapter: BayesLoRA, inner: InnerLoopConfig, outer_lr: float, prior_std: float,
                 init_eps: float, num_samples: int):
        for name, value in (("blob_prior_std", prior_std), ("blob_init_eps", init_eps)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
        super().__init__(adapter, inner, outer_lr)
        self.prior_std, self.init_eps, self.num_samples = prior_std, init_eps, num_samples

    def variational_start(self) -> dict[str, Tensor]:
        """M, B: the trained factors; G ~ U(ε/√2, ε) per element of A (torch's generator, seeded per task)."""
        start = {k: v.detach().clone() for k, v in self.lora.params().items()}
        for m in self.adapter.module_names:
            a = start[self.adapter.key(m, "mu_A")]
            start[self.adapter.key(m, _G)] = torch.empty_like(a).uniform_(self.init_eps / math.sqrt(2), self.init_eps)
        return start

    def sample_deltas(self, params: dict[str, Tensor]) -> dict[str, LowRankDelta]:
        """One draw A = M + Ω ⊙ ε per module (reparameterized), B as is."""
        out = {}
        for m, d in self.adapter.mean_deltas(params).items():
            omega = params[self.adapter.key(m, _G)] ** 2
            out[m] = LowRankDelta(d.A + omega * torch.randn_like(d.A), d.B, d.scaling)
        return out

    def kl(self, params: dict[str, Tensor]) -> Tensor:
        key = self.adapter.key
        return sum(blob_kl(params[key(m, "mu_A")], params[key(m, _G)], self.prior_std) for m in self.adapter.module_names)

    def scores(self, params: dict[str, Tensor], batch: OptionBatch) -> Tensor:
        with self.adapter.use(self.sample_deltas(params)):
            return self.likelihood.scores(self.adapter.lm, batch)

    def negative_elbo(self, params: dict[str, Tensor], support: OptionBatch) -> Tensor:
        """One-draw estimate of −ELBO / n on the support set (see the module docstring)."""
        logp = torch.log_softmax(self.scores(params, support).float(), -1)
        nll = -logp.gather(1, support.gold.to(logp.device)[:, None]).mean()
        return nll + self.kl(params).to(nll.dtype) / len(support)

    def adapt(self, episode) -> dict[str, Tensor]:
        if isinstance(episode.support, TokenBatch):
            raise ValueError("blob scores options: it has no generative (token-level) evaluation")
        inner = self.inner
        refined = inner_loop(lambda p: self.negative_elbo(p, episode.support), self.variational_start(),
                             inner.num_inner_steps, inner.inner_lr, inner.optimizer, adam_eps=inner.adam_eps)
        return {k: v.detach() for k, v in refined.items()}

    def adapt_diagnostics(self, state) -> dict[str, float]:
        """The mean posterior std Ω of A's elements after adaptation."""
        omegas = [state[self.adapter.key(m, _G)].double() ** 2 for m in self.adapter.module_names]
        return {"blob_mean_std": float(torch.cat([o.flatten() for o in omegas]).mean())}

    @torch.no_grad()
    def predict_samples(self, state: dict[str, Tensor], episode) -> Tensor:
        """``[S, n, max_options]`` float64: each draw of A's option probabilities."""
        return torch.stack([torch.softmax(self.scores(state, episode.query).double(), -1)
                            for _ in range(self.num_samples)])

    def predict(self, state, episode) -> Tensor:
        return self.predict_samples(state, episode).mean(0).float()
