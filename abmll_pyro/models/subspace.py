"""A learned task subspace: a low-dimensional task latent z_i beside ΔW_i, with its own prior scale.

The elementwise prior p(ΔW_i | θ) = N(μ_θ, σ_θ²) gives every one of a module's out·in directions the
same variance. A σ_θ small enough for its draws to leave the model intact then leaves a few examples
no room to move the posterior along the few directions they inform, and a σ_θ large enough to move it
wrecks the model's predictions (docs/posterior.md, "the subspace"). The subspace adds, per adapted
module m and task i, a d-dimensional latent with a learned basis and a learned prior scale:

    z_{i,m} ~ N(0, diag(s_m²))                             task sites  z[i]/<m>   (event shape [d])
    W_{i,m} = W0 + ΔW_{i,m} + Σ_j z_{i,m,j} b_{m,j} a_{m,j}ᵀ

with b_{m,j} = B_m[:, j]/‖B_m[:, j]‖ and a_{m,j} = A_m[j]/‖A_m[j]‖ (unit directions: the scale of a
direction is s_{m,j} alone, no trade-off between the basis' norm and s). The bases (A_m, B_m) and the
log-scales log s_m are θ's: point estimates trained in the outer loop — the bases through the query
likelihood, s by the empirical-Bayes M-step of the β-KL (s² toward the tasks' E_q z²). The task
guide is q(z_{i,m}) = N(m_{i,m}, diag(v_{i,m}²)), started at the prior (m = 0, v = s) and refined by the
inner loop with the task's other parameters; the KL of two diagonal Gaussians in d dimensions is exact
and cheap, so the z-part of the ELBO can run at β = 1 (``MetaConfig.subspace_beta``) while ΔW's keeps
its own β.

Task parameter keys: ``<module>:z_loc`` and ``<module>:z_log_scale`` (``[d]`` each). The z-part is
applied through :meth:`~abmll_pyro.lora.adapter.BayesLoRA.shifted` (a low-rank term added to the
layer's output; no dense ``[out, in]`` tensor is made).
"""

from __future__ import annotations

import math
from typing import Mapping

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ..lora.adapter import BayesLoRA
from ..lora.layer import LowRankDelta

__all__ = ["TaskSubspace", "LOC", "LOG_SCALE"]

LOC, LOG_SCALE = "z_loc", "z_log_scale"

Params = Mapping[str, Tensor]


class BufferDict(nn.Module):
    """Named buffers (in ``state_dict``, moved with the module), indexed like a dict."""

    def __setitem__(self, name: str, value: Tensor) -> None:
        self.register_buffer(name, value)

    def __getitem__(self, name: str) -> Tensor:
        return getattr(self, name)


class TaskSubspace(nn.Module):
    """Per adapted module: a basis of ``dim`` rank-one directions and their prior scales (module docstring).

    Args:
        adapter: the :class:`BayesLoRA` whose modules get a subspace (sizes the bases).
        dim: d, directions per module (≥ 1).
        init_scale: s at the start, for every direction (> 0).
        generator: for the bases' random start (A rows and B columns drawn standard normal).
    """

    def __init__(self, adapter: BayesLoRA, dim: int = 4, init_scale: float = 0.1,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not (isinstance(dim, int) and dim >= 1):
            raise ValueError(f"subspace dim must be an integer >= 1, got {dim!r}")
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"subspace init_scale must be finite and > 0, got {init_scale!r}")
        self.dim, self.init_scale = dim, float(init_scale)
        self.keys = {m: adapter.key(m, "") for m in adapter.shapes}  # "<module>:" prefixes, as the adapter's keys
        like = next(iter(adapter.parameters()), torch.empty(0))
        device, dtype = like.device, like.dtype
        self.A, self.B, self.log_scale = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.curvature = BufferDict()  # the likelihood's curvature per direction, a running average (newton_step)
        for m, (out_features, in_features) in adapter.shapes.items():
            name = self._name(m)
            self.A[name] = nn.Parameter(torch.randn(dim, in_features, generator=generator).to(device, dtype))
            self.B[name] = nn.Parameter(torch.randn(out_features, dim, generator=generator).to(device, dtype))
            self.log_scale[name] = nn.Parameter(torch.full((dim,), math.log(init_scale), device=device, dtype=dtype))
            self.curvature[name] = torch.zeros(dim, device=device, dtype=dtype)

    @staticmethod
    def _name(module: str) -> str:
        return module.replace(".", "__")

    def key(self, module: str, kind: str) -> str:
        """The task parameter key of ``kind`` (``z_loc``, ``z_log_scale``) for ``module``."""
        return f"{self.keys[module]}{kind}"

    @property
    def modules(self) -> list[str]:
        return list(self.keys)

    # ----------------------------------------------------------------- prior and posterior
    def scale(self, module: str) -> Tensor:
        """s_m, ``[d]`` float32 or wider."""
        return self.log_scale[self._name(module)].exp()

    def prior(self, module: str) -> dist.Distribution:
        """p(z_{i,m} | θ) = N(0, diag(s_m²)), event shape ``[d]``."""
        s = self.scale(module)
        return dist.Normal(torch.zeros_like(s), s, validate_args=False).to_event(1)

    def init_task_params(self) -> dict[str, Tensor]:
        """q's start, the prior: z_loc = 0, z_log_scale = log s_m, both without history: s learns from
        the β-KL's empirical-Bayes M-step alone (s² toward the tasks' E_q z²). With a first-order
        pass-through from the start to log s, the query likelihood's gradient in q's width (wider q,
        noisier draws, worse query NLL) pulled s below the truth: on the known-truth family s* = 10,
        s went 3 → 1.9 in 60 outer steps."""
        out = {}
        for m in self.keys:
            log_s = self.log_scale[self._name(m)].detach()
            out[self.key(m, LOC)] = torch.zeros_like(log_s)
            out[self.key(m, LOG_SCALE)] = log_s.clone()
        return out

    def posterior(self, task_params: Params, module: str) -> dist.Distribution:
        """q(z_{i,m}) = N(z_loc, diag(exp(z_log_scale)²)), event shape ``[d]``."""
        loc, log_scale = task_params[self.key(module, LOC)], task_params[self.key(module, LOG_SCALE)]
        return dist.Normal(loc, log_scale.exp(), validate_args=False).to_event(1)

    def kl(self, task_params: Params) -> Tensor:
        """Σ_m KL(q(z_{i,m}) ‖ p(z_{i,m} | θ)), differentiable in both (float32 or wider)."""
        total = None
        for m in self.keys:
            kl = torch.distributions.kl_divergence(self.posterior(task_params, m), self.prior(m)).sum()
            total = kl if total is None else total + kl
        return total

    def newton_step(self, params: Params, grads: Mapping[str, Tensor], beta: float, lr: float,
                    learn_curvature: bool = False) -> dict[str, Tensor]:
        """q(z_i)'s inner step: a damped Newton step on the β-ELBO per direction (a variational online
        Newton step, Khan et al. 2018) from the loss's gradients in z_loc (g_m) and log v (g_v) at
        q = N(m, v²), with the likelihood's curvature h per direction estimated across tasks:

            ĥ   = (g_v − β(v²/s² − 1)) / v²        one draw of E_q[f''] (Price's theorem:
                                                   ∂/∂log v E_q[f] = v²·E_q[f''])
            h  ← 0.95·h + 0.05·ĥ                   (``learn_curvature``: the running buffer, training only)
            λ   = β/s² + max(h, 0)                  q's target precision
            m  ← m − clip(lr·g_m/λ, ±2v)
            log v ← log v + lr·(−½ log λ − log v)

        The step is the gradient scaled by the inverse curvature: with no evidence (h = 0) q returns
        to the prior (m ← (1 − lr)·m, v → s) whatever s is — no step of fixed size scatters q's mean,
        which the empirical-Bayes M-step would read as task spread (Adam's does) — and where the
        likelihood is curved it does not diverge (plain SGD's lr·s²·g does where s²·h ≫ 1). One draw's ĥ
        is too noisy to divide by, hence the running average over steps and tasks, and the clip (at
        most two posterior standard deviations per step) while it is still settling."""
        out = {}
        for m in self.keys:
            k_loc, k_log = self.key(m, LOC), self.key(m, LOG_SCALE)
            g_loc, g_log = grads.get(k_loc), grads.get(k_log)
            if g_loc is None or g_log is None:
                continue
            loc, log_v = params[k_loc], params[k_log]
            name = self._name(m)
            s2 = self.scale(m).detach().to(loc.dtype) ** 2
            v2 = (2 * log_v).exp().detach()
            if learn_curvature:
                with torch.no_grad():
                    estimate = (g_log.detach() - beta * (v2 / s2 - 1)) / v2
                    self.curvature[name].mul_(0.95).add_(0.05 * estimate.to(self.curvature[name].dtype))
            h = self.curvature[name].to(loc.dtype).clamp_min(0.0)
            precision = (beta / s2 + h).clamp_min(1e-12 / s2)
            step = lr * g_loc / precision
            bound = 2 * v2.sqrt()
            out[k_loc] = loc - torch.maximum(torch.minimum(step, bound), -bound)
            out[k_log] = log_v + lr * (-0.5 * precision.log() - log_v)
        return out

    # ----------------------------------------------------------------- the weight shift
    def directions(self, module: str) -> tuple[Tensor, Tensor]:
        """``(a, b)``: unit rows ``[d, in]`` and unit columns ``[out, d]`` of the module's basis."""
        name = self._name(module)
        A, B = self.A[name], self.B[name]
        return A / A.norm(dim=1, keepdim=True), B / B.norm(dim=0, keepdim=True)

    def shift(self, module: str, z: Tensor) -> LowRankDelta:
        """Σ_j z_j b_j a_jᵀ in low-rank form (``B·diag(z)``, ``A``; never formed densely)."""
        a, b = self.directions(module)
        return LowRankDelta(a, b * z.to(b.dtype)[None, :], 1.0)

    def shifts(self, zs: Mapping[str, Tensor]) -> dict[str, LowRankDelta]:
        return {m: self.shift(m, z) for m, z in zs.items()}

    def mean_shifts(self, task_params: Params) -> dict[str, LowRankDelta]:
        """The shift at q's mean (z = z_loc) of every module."""
        return {m: self.shift(m, task_params[self.key(m, LOC)]) for m in self.keys}

    @torch.no_grad()
    def mean_scale(self) -> float:
        """The mean of s over every direction of every module (for logging)."""
        values = torch.cat([p.detach().exp().flatten() for p in self.log_scale.values()])
        return float(values.double().mean())

    def extra_repr(self) -> str:
        return f"dim={self.dim}, init_scale={self.init_scale}, modules={len(self.keys)}"
