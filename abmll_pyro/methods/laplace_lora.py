"""Laplace-LoRA per task (``laplace-lora``): Yang, Robeyns, Wang & Aitchison (ICLR 2024), "Bayesian
low-rank adaptation for large language models" — a Laplace approximation over the LoRA factors after
fine-tuning, its linearized predictive, the prior precision chosen by the Laplace marginal likelihood.

Training and the task's fine-tuning are Regular LoRA's (a benchmark reuses ``lora``'s checkpoint): θ*
is the trained factors θ0 after K inner steps on the support set S (all adapted factors, P of them).
Around θ*, with the prior N(θ0, δ⁻¹ I) centred at the start the inner loop refines (see below):

    Σ = (G + δ I)⁻¹,   G = Σ_{(x,y) ∈ S} J_xᵀ Λ_x J_x,   Λ_x = diag(p_x) − p_x p_xᵀ,

J_x = ∂f(x; θ)/∂θ at θ* (``[M_x, P]``, f the option scores, the softmax's logits) and p_x = softmax f(x):
G is the generalized Gauss–Newton matrix of the support cross-entropy, exact (not diagonal or
Kronecker-factored). Linearized predictive for a query x*: f* ~ N(f(x*; θ*), C*), C* = J* Σ J*ᵀ, and
p(y | x*) = E[softmax f*] by ``laplace_logit_samples`` draws of f* (cheap: no forward pass each).

**Curvature in function space, by hand.** S holds N = Σ_x M_x ≤ a few hundred logits, so with
U = L J (``[N, P]``, L the block-diagonal Λ^{1/2}) and the kernel K = U Uᵀ (``[N, N]``), Woodbury gives
everything exactly without a P × P matrix:

    C* = (1/δ) [ J* J*ᵀ − (J* Uᵀ) (δ I + K)⁻¹ (U J*ᵀ) ],
    log Z(δ) = Σ_S log p(y | x; θ*) − (δ/2) ‖θ* − θ0‖² − ½ Σ_k log(1 + κ_k / δ),

κ_k the eigenvalues of K (the P log δ of the prior's normalizer cancels the one in log det(G + δI)).
δ maximizes log Z on a log grid (:data:`PRECISIONS`), as Laplace-LoRA tunes its prior precision by the
marginal likelihood (their post-hoc variant). ``laplace-torch`` (which Laplace-LoRA used, with a
Kronecker-factored GGN) is not used (nor installed, nor tried): its curvature backends differentiate a
``model(X) -> logits`` forward over a data loader, with a fixed class count, while this harness's logits
are option scores (summed or normalized token log-probs of ragged option sets, −inf padded) computed
under the adapter's context, so it would need a wrapper model; its exact ('full') GGN is a P × P
matrix (61,440² for cpu-long's adapter, 15 GB) and its diagonal / Kronecker structures approximate what
the support set's few logits make exact and cheap here, in function space (its own function-space
option approximates the same kernel by Nyström or variational inducing points). The Jacobian costs one
forward pass per example and one backward pass per option, for the support set and the query set.

**Prior mean.** Laplace-LoRA's prior is N(0, δ⁻¹ I) over LoRA weights fine-tuned from LoRA's init.
Here the per-task fine-tuning starts from trained factors (A nowhere near 0), so the prior is centred at
that start θ0: a zero mean would make ‖θ*‖², mostly the start's A, which no task's data speaks to,
decide δ. With zero inner steps θ* = θ0, log Z increases with δ and the grid's largest δ is chosen: the
predictive is then Regular LoRA's, up to the logit draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from ..config import InnerLoopConfig
from ..data.scoring import OptionBatch, TokenBatch
from ..lora.adapter import BayesLoRA
from .base import option_logits
from .lora import RegularLoRA, finetune

__all__ = ["LaplaceLoRA", "LaplaceFit", "example_jacobians", "option_jacobian", "softmax_hessian_sqrt", "fit_laplace",
           "predictive_cov", "log_marginal_likelihood", "PRECISIONS"]

#: candidate prior precisions δ, log-spaced over 14 decades
PRECISIONS = torch.logspace(-6, 8, 141, dtype=torch.float64)


def example_jacobians(adapter: BayesLoRA, params: dict[str, Tensor], batch: OptionBatch, likelihood=None
                      ) -> Iterator[tuple[Tensor, Tensor]]:
    """Per example of ``batch``: ``(scores [M_j] float64, J [M_j, P] float64)``, the option scores under
    the LoRA ``params`` and their Jacobian in the flattened factors (``params``' key order); zero rows in
    padded (−inf) slots. One forward pass per example, one backward pass per option."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    order = list(leaves.values())
    size = sum(p.numel() for p in order)
    with torch.enable_grad():
        for j in range(len(batch)):
            f = option_logits(adapter, leaves, batch.select([j]), likelihood)[0]  # [M_j] (-inf padded)
            jac = torch.zeros(f.shape[0], size, dtype=torch.float64, device=f.device)
            for o in range(f.shape[0]):
                if torch.isfinite(f[o]):
                    grads = torch.autograd.grad(f[o], order, retain_graph=True, allow_unused=True)
                    jac[o] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                        for g, p in zip(grads, order)]).double()
            yield f.detach().double(), jac


def option_jacobian(adapter: BayesLoRA, params: dict[str, Tensor], batch: OptionBatch, likelihood=None
                    ) -> tuple[Tensor, Tensor]:
    """``(scores [n, M] float64, J [n, M, P] float64)``: :func:`example_jacobians` stacked, M the
    batch's option width (−inf scores and zero rows in padded slots)."""
    scores, rows = zip(*example_jacobians(adapter, params, batch, likelihood))
    width = max([batch.max_options] + [s.shape[0] for s in scores])
    pad = torch.nn.functional.pad
    return (torch.stack([pad(s, (0, width - s.shape[0]), value=float("-inf")) for s in scores]),
            torch.stack([pad(r, (0, 0, 0, width - r.shape[0])) for r in rows]))


def softmax_hessian_sqrt(scores: Tensor) -> Tensor:
    """``[n, M, M]``: the symmetric square root of Λ = diag(p) − p pᵀ, p = softmax(scores) (−inf slots: 0)."""
    p = torch.softmax(scores.double(), -1)
    lam = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    w, v = torch.linalg.eigh(lam)
    return (v * w.clamp_min(0).sqrt()[..., None, :]) @ v.transpose(-1, -2)


def log_marginal_likelihood(kernel_eigs: Tensor, log_lik: float, sq_dist: float, precisions: Tensor = PRECISIONS
                            ) -> Tensor:
    """``log Z(δ)`` for each δ in ``precisions`` (the module docstring's formula; eigenvalues of K)."""
    kappa = kernel_eigs.double().clamp_min(0)
    return log_lik - 0.5 * precisions * sq_dist - 0.5 * torch.log1p(kappa[None, :] / precisions[:, None]).sum(1)


@dataclass(frozen=True)
class LaplaceFit:
    """The Laplace approximation of one task: what the predictive needs, and how δ was chosen."""

    params: dict[str, Tensor]  # θ*
    U: Tensor  # [N, P] L J on the support set
    inverse: Tensor  # [N, N] (δ I + U Uᵀ)⁻¹
    prior_precision: float  # δ
    log_marglik: float  # log Z(δ)


def fit_laplace(jac: Tensor, scores: Tensor, gold: Tensor, sq_dist: float, params: dict[str, Tensor] | None = None,
                precisions: Tensor = PRECISIONS) -> LaplaceFit:
    """The Laplace fit from the support set's Jacobian ``[n, M, P]``, scores ``[n, M]`` and labels ``[n]``
    at θ*, and ‖θ* − θ0‖²; δ by the largest log Z on ``precisions`` (ties: the larger δ)."""
    n, m, p = jac.shape
    root = softmax_hessian_sqrt(scores)  # [n, M, M]
    U = (root @ jac.double()).reshape(n * m, p)  # [N, P]
    kernel = U @ U.T
    log_lik = float(torch.log_softmax(scores.double(), -1).gather(1, gold.view(-1, 1).to(scores.device)).sum())
    log_z = log_marginal_likelihood(torch.linalg.eigvalsh(kernel), log_lik, sq_dist, precisions)
    best = int(torch.nonzero(log_z >= log_z.max() - 1e-12).max())
    delta = float(precisions[best])
    inverse = torch.linalg.inv(delta * torch.eye(n * m, dtype=kernel.dtype, device=kernel.device) + kernel)
    return LaplaceFit(params or {}, U, inverse, delta, float(log_z[best]))


def predictive_cov(fit: LaplaceFit, jac: Tensor) -> Tensor:
    """``[n*, M, M]``: C* = J* Σ J*ᵀ for query Jacobians ``jac: [n*, M, P]`` (Woodbury, module docstring)."""
    jq = jac.double()
    cross = jq @ fit.U.T  # [n*, M, N]
    return (jq @ jq.transpose(-1, -2) - cross @ fit.inverse @ cross.transpose(-1, -2)) / fit.prior_precision


def sample_logits(mean: Tensor, cov: Tensor, num_samples: int) -> Tensor:
    """``[S, n, M]`` draws of N(mean, cov) per example (−inf slots stay −inf), torch's generator."""
    w, v = torch.linalg.eigh(cov)
    root = v * w.clamp_min(0).sqrt()[..., None, :]  # [n, M, M], root rootᵀ = cov
    z = torch.randn(num_samples, *mean.shape, dtype=mean.dtype, device=mean.device)  # [S, n, M]
    return mean[None] + torch.einsum("nij,snj->sni", root, z)


class LaplaceLoRA(RegularLoRA):
    name = "laplace-lora"

    def __init__(self, adapter: BayesLoRA, inner: InnerLoopConfig, outer_lr: float, logit_samples: int):
        if not (isinstance(logit_samples, int) and logit_samples >= 1):
            raise ValueError(f"laplace_logit_samples must be an integer >= 1, got {logit_samples!r}")
        super().__init__(adapter, inner, outer_lr)
        self.logit_samples = logit_samples

    def adapt(self, episode) -> LaplaceFit:
        if isinstance(episode.support, TokenBatch):
            raise ValueError("laplace-lora linearizes option scores: it has no generative (token-level) evaluation")
        start = {k: v.detach() for k, v in self.lora.params().items()}
        params = finetune(self.adapter, start, episode.support, self.inner, self.likelihood)
        scores, jac = option_jacobian(self.adapter, params, episode.support, self.likelihood)
        sq_dist = float(sum(((params[k].double() - start[k].double()) ** 2).sum() for k in params))
        return fit_laplace(jac, scores, episode.support.gold, sq_dist, params)

    def adapt_diagnostics(self, state: LaplaceFit) -> dict[str, float]:
        return {"log10_prior_precision": float(torch.tensor(state.prior_precision).log10()),
                "log_marglik": state.log_marglik}

    def predict_samples(self, state: LaplaceFit, episode) -> Tensor:
        """``[S, n, max_options]`` float64: softmax of each draw of the linearized predictive's logits."""
        # one query example at a time: its [M, P] Jacobian is dropped once its covariance is formed
        means, covs = [], []
        for scores, jac in example_jacobians(self.adapter, state.params, episode.query, self.likelihood):
            means.append(scores)
            covs.append(predictive_cov(state, jac[None])[0])
        width = max([episode.query.max_options] + [m.shape[0] for m in means])
        pad = torch.nn.functional.pad
        mean = torch.stack([pad(m, (0, width - m.shape[0]), value=float("-inf")) for m in means])
        cov = torch.stack([pad(c, (0, width - c.shape[0], 0, width - c.shape[0])) for c in covs])
        return torch.softmax(sample_logits(mean, cov, self.logit_samples), -1)

    def predict(self, state, episode) -> Tensor:
        return self.predict_samples(state, episode).mean(0).float()
