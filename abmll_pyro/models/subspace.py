"""A learned task subspace: a low-dimensional task latent z_i beside ΔW_i, with its own prior scale.

The elementwise prior p(ΔW_i | θ) = N(μ_θ, σ_θ²) gives every one of a module's out·in directions the
same variance. A σ_θ small enough for its draws to leave the model intact then leaves a few examples
no room to move the posterior along the few directions they inform, and a σ_θ large enough to move it
wrecks the model's predictions (docs/posterior.md, "the subspace"). The subspace adds, per adapted
module m and task i, a d-dimensional latent with a learned basis and a learned prior scale:

    z_{i,m} ~ N(0, diag(s_m²))                             task sites  z[i]/<m>   (event shape [d])
    W_{i,m} = W0 + ΔW_{i,m} + Σ_j z_{i,m,j} g_{m,j} b_{m,j} a_{m,j}ᵀ

with b_{m,j} = B_m[:, j]/‖B_m[:, j]‖ and a_{m,j} = A_m[j]/‖A_m[j]‖ (unit directions: the scale of a
direction is s_{m,j}·g_{m,j} alone, no trade-off between the basis' norm and s); g_{m,j} is a fixed
gain in the base weight's units (:class:`TaskSubspace`: W0's singular values for the default start
along its top singular pairs), so s is a relative size. The bases (A_m, B_m) and the
log-scales log s_m are θ's: point estimates trained in the outer loop — the bases through the query
likelihood, s by the empirical-Bayes M-step of the β-KL (s² toward the tasks' E_q z²). The task
guide is q(z_{i,m}) = N(m_{i,m}, L_{i,m}L_{i,m}ᵀ), a full covariance over the module's d directions,
started at the prior (m = 0, L = diag(s)) and refined by the inner loop with a damped Newton step
(:meth:`TaskSubspace.newton_step`); the KL of two Gaussians in d dimensions is exact and cheap, so the
z-part of the ELBO can run at β = 1 (``MetaConfig.subspace_beta``) while ΔW's keeps its own β.

Task parameter keys: ``<module>:z_loc`` (``[d]``) and ``<module>:z_tril`` (``[d, d]``: q's covariance
factor, see :meth:`TaskSubspace.scale_tril`). The z-part is
applied through :meth:`~abmll_pyro.lora.adapter.BayesLoRA.shifted` (a low-rank term added to the
layer's output; no dense ``[out, in]`` tensor is made).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from ..lora.adapter import BayesLoRA
from ..lora.layer import LowRankDelta

__all__ = ["TaskSubspace", "LOC", "TRIL"]

LOC, TRIL = "z_loc", "z_tril"
INITS = ("svd", "random", "gradients")

Params = Mapping[str, Tensor]


def _orthonormal(v: Tensor, basis: list[Tensor]) -> Tensor:
    """``v`` with its components along the (orthonormal) ``basis`` removed, scaled to unit length."""
    for u in basis:
        v = v - (u @ v) * u
    return v / v.norm().clamp_min(1e-30)


class BufferDict(nn.Module):
    """Named buffers (in ``state_dict``, moved with the module), indexed like a dict."""

    def __setitem__(self, name: str, value: Tensor) -> None:
        self.register_buffer(name, value)

    def __getitem__(self, name: str) -> Tensor:
        return getattr(self, name)


class TaskSubspace(nn.Module):
    """Per adapted module: a basis of ``dim`` rank-one directions and their prior scales (module docstring).

    Each direction carries a fixed gain g_{m,j} (a buffer), so that z is in units of the base
    weight's own size: the shift is Σ_j z_j·g_j·b_j a_jᵀ, and z_j = 0.1 moves W0 by a tenth of g_j.

    Args:
        adapter: the :class:`BayesLoRA` whose modules get a subspace (sizes the bases).
        dim: d, directions per module (≥ 1; at most the module's smaller dimension with ``init="svd"``).
        init_scale: s at the start, for every direction (> 0), in units of the gain.
        init: ``"svd"`` (default): the directions start as W0's top singular pairs (a_j, b_j the
            right and left singular vectors) and g_j = σ_j(W0), so z_j is a relative change of the j-th
            singular value — directions along which the model already acts; ``"random"``: standard
            normal directions and g_j = ‖W0‖_F/√min(out, in), the root-mean-square singular value;
            ``"gradients"``: random until :meth:`init_from_gradients` sets them from training tasks
            (the run's setup does, before training), with the random start's gains.
        generator: for the random start.
    """

    def __init__(self, adapter: BayesLoRA, dim: int = 4, init_scale: float = 0.1, init: str = "svd",
                 generator: torch.Generator | None = None):
        super().__init__()
        if not (isinstance(dim, int) and dim >= 1):
            raise ValueError(f"subspace dim must be an integer >= 1, got {dim!r}")
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"subspace init_scale must be finite and > 0, got {init_scale!r}")
        if init not in INITS:
            raise ValueError(f"subspace init must be one of {list(INITS)}, got {init!r}")
        smallest = min((min(shape) for shape in adapter.shapes.values()), default=dim)
        if init == "svd" and dim > smallest:
            raise ValueError(f"subspace dim={dim} exceeds the smaller dimension ({smallest}) of an adapted module; "
                             f"the limit with init='svd' is {smallest}")
        self.dim, self.init_scale, self.init = dim, float(init_scale), init
        self.keys = {m: adapter.key(m, "") for m in adapter.shapes}  # "<module>:" prefixes, as the adapter's keys
        like = next(iter(adapter.parameters()), torch.empty(0))
        device, dtype = like.device, like.dtype
        self.A, self.B, self.log_scale = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.curvature = BufferDict()  # the likelihood's curvature per direction, a running average (newton_step)
        self.gain = BufferDict()  # g_{m,j}: the size of a unit z along each direction
        for m, (out_features, in_features) in adapter.shapes.items():
            name = self._name(m)
            weight = adapter.layers[m]._weight_out_in().detach().double().cpu()
            if init == "svd":  # ("gradients": random until init_from_gradients)
                U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
                A, B, gain = Vh[:dim], U[:, :dim], S[:dim]
            else:
                A = torch.randn(dim, in_features, generator=generator, dtype=torch.float64)
                B = torch.randn(out_features, dim, generator=generator, dtype=torch.float64)
                gain = torch.full((dim,), float(weight.norm() / math.sqrt(min(out_features, in_features))), dtype=torch.float64)
            self.A[name] = nn.Parameter(A.contiguous().to(device, dtype))
            self.B[name] = nn.Parameter(B.contiguous().to(device, dtype))
            self.gain[name] = gain.to(device, dtype)
            self.log_scale[name] = nn.Parameter(torch.full((dim,), math.log(init_scale), device=device, dtype=dtype))
            self.curvature[name] = torch.zeros(dim, dim, device=device, dtype=dtype)

    @staticmethod
    def _name(module: str) -> str:
        return module.replace(".", "__")

    def key(self, module: str, kind: str) -> str:
        """The task parameter key of ``kind`` (``z_loc``, ``z_tril``) for ``module``."""
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
        return dist.MultivariateNormal(torch.zeros_like(s), scale_tril=torch.diag_embed(s), validate_args=False)

    def init_task_params(self) -> dict[str, Tensor]:
        """q's start, the prior: z_loc = 0 and L = diag(s_m), without history: s learns from the β-KL's
        empirical-Bayes M-step alone (s² toward the tasks' E_q z²). With a first-order pass-through
        from the start to log s, the query likelihood's gradient in q's width (wider q, noisier draws,
        worse query NLL) pulled s below the truth: on the known-truth family s* = 10, s went 3 → 1.9 in
        60 outer steps."""
        out = {}
        for m in self.keys:
            log_s = self.log_scale[self._name(m)].detach()
            out[self.key(m, LOC)] = torch.zeros_like(log_s)
            out[self.key(m, TRIL)] = torch.diag_embed(log_s)
        return out

    @staticmethod
    def scale_tril(raw: Tensor) -> Tensor:
        """L of q's covariance LLᵀ from its ``z_tril`` parameter: the strictly lower triangle as it is,
        the diagonal exponentiated (the upper triangle is unused)."""
        return torch.tril(raw, -1) + torch.diag_embed(raw.diagonal().exp())

    def posterior(self, task_params: Params, module: str) -> dist.Distribution:
        """q(z_{i,m}) = N(z_loc, LLᵀ), a full covariance over the module's d directions, event shape ``[d]``.

        Full, not diagonal: the likelihood couples the directions, and a diagonal q underestimates the
        marginal variances it leaves out; the empirical-Bayes M-step (s² toward E_q z²) then shrinks s
        below the truth (measured on the known-truth family: 10% low at s = s*, and s ended at 0.35 s*
        from above and below)."""
        loc, raw = task_params[self.key(module, LOC)], task_params[self.key(module, TRIL)]
        return dist.MultivariateNormal(loc, scale_tril=self.scale_tril(raw), validate_args=False)

    def kl(self, task_params: Params) -> Tensor:
        """Σ_m KL(q(z_{i,m}) ‖ p(z_{i,m} | θ)), differentiable in both (float32 or wider)."""
        total = None
        for m in self.keys:
            kl = torch.distributions.kl_divergence(self.posterior(task_params, m), self.prior(m)).sum()
            total = kl if total is None else total + kl
        return total

    @staticmethod
    def _curvature_from(G: Tensor, L: Tensor) -> Tensor:
        """The symmetric H with tril(H·L) = G (G, L lower triangular, L with a positive diagonal),
        solved column by column from the last: Stein's identity E_q[∇f εᵀ] = E_q[∇²f]·L gives the
        likelihood's gradient in L as tril(H·L), H = E_q[∇²f]."""
        d = L.shape[0]
        H = torch.zeros_like(L)
        for j in range(d - 1, -1, -1):
            below = slice(j + 1, d)
            if j + 1 < d:
                H[below, j] = (G[below, j] - H[below, below] @ L[below, j]) / L[j, j]
                H[j, below] = H[below, j]
            H[j, j] = (G[j, j] - H[j, below] @ L[below, j]) / L[j, j]
        return H

    def newton_step(self, params: Params, grads: Mapping[str, Tensor], beta: float, lr: float,
                    learn_curvature: bool = False) -> dict[str, Tensor]:
        """q(z_i)'s inner step: a damped Newton step on the β-ELBO (a variational online Newton step,
        Khan et al. 2018) from the loss's gradients in z_loc (g_m) and in L (G), at q = N(m, LLᵀ),
        with the likelihood's curvature matrix H per module estimated across tasks:

            Ĥ   from tril(Ĥ·L) = G − β·tril(S⁻¹L − diag(1/L_ii))    one draw of E_q[∇²f] (Stein's
                                                                  identity; the KL's part removed)
            H  ← 0.95·H + 0.05·Ĥ                 (``learn_curvature``: the running buffer, training only)
            Λ   = β·S⁻¹ + H₊                     q's target precision (S = diag(s²); H₊: H's
                                                 eigenvalues clamped at 0)
            m  ← m − clip(lr·Λ⁻¹g_m, ±2·sd_q)
            L  ← L + lr·(chol(Λ⁻¹) − L)          (in the parameterization: log L_ii mixed likewise)

        The step is the gradient scaled by the inverse curvature: with no evidence (H = 0) q returns
        to the prior (m ← (1 − lr)·m, L → diag(s)) whatever s is — no step of fixed size scatters q's
        mean, which the empirical-Bayes M-step would read as task spread (Adam's does) — and where the
        likelihood is curved it does not diverge (plain SGD's lr·s²·g does where s²·h ≫ 1). One draw's Ĥ
        is too noisy to divide by, hence the running average over steps and tasks, and the clip (at
        most two posterior standard deviations per step) while it is still settling."""
        out = {}
        for m in self.keys:
            k_loc, k_tril = self.key(m, LOC), self.key(m, TRIL)
            g_loc, g_raw = grads.get(k_loc), grads.get(k_tril)
            if g_loc is None or g_raw is None:
                continue
            loc, raw = params[k_loc], params[k_tril]
            name = self._name(m)
            inv_s2 = self.scale(m).detach().to(loc.dtype) ** -2
            with torch.no_grad():
                L = self.scale_tril(raw.detach())
                if learn_curvature:
                    G = torch.tril(g_raw.detach(), -1) + torch.diag_embed(g_raw.detach().diagonal() / L.diagonal())
                    G = G - beta * torch.tril(inv_s2[:, None] * L - torch.diag_embed(1 / L.diagonal()))
                    estimate = self._curvature_from(G, L)
                    self.curvature[name].mul_(0.95).add_(0.05 * estimate.to(self.curvature[name].dtype))
                H = self.curvature[name].to(loc.dtype)
                w, V = torch.linalg.eigh(0.5 * (H + H.transpose(0, 1)))
                precision = beta * torch.diag_embed(inv_s2) + (V * w.clamp_min(0.0)) @ V.transpose(0, 1)
                precision = precision + torch.diag_embed(1e-12 * inv_s2)
                covariance = torch.cholesky_inverse(torch.linalg.cholesky(precision))
                target = torch.linalg.cholesky(covariance)
                target_raw = torch.tril(target, -1) + torch.diag_embed(target.diagonal().log())
                bound = 2 * (L @ L.transpose(0, 1)).diagonal().sqrt()
            step = lr * torch.linalg.solve(precision, g_loc)
            out[k_loc] = loc - torch.maximum(torch.minimum(step, bound), -bound)
            out[k_tril] = raw + lr * (target_raw - torch.tril(raw))
        return out

    @torch.no_grad()
    def init_from_gradients(self, adapter: BayesLoRA, scores: Callable[[nn.Module, object], Tensor],
                            supports: Sequence[object], iterations: int = 30,
                            generator: torch.Generator | None = None) -> None:
        """Set every module's directions to where the training tasks disagree most (data, not W0).

        For T support sets (option batches) G_t = ∂NLL_t/∂W at W0 + μ_θ (μ_θ = 0 at the start), the
        negative log-likelihood summed over the set's examples, and its centred copies D_t = G_t − mean_t G_t;
        direction j maximizes Σ_t (b_jᵀ D_t a_j)² over unit a_j, b_j orthogonal to the earlier ones
        (alternating power iteration, ``iterations`` rounds): the rank-one moves of W whose first-order
        effect on the tasks' fit differs most from task to task — what a task's few examples can
        inform and θ's shared mean cannot absorb. ``scores(lm, batch)`` gives ``[n, options]`` scores.
        The gains stay the random start's (W0's root-mean-square singular value)."""
        grads: dict[str, list[Tensor]] = {m: [] for m in self.keys}
        for batch in supports:
            with torch.enable_grad():
                deltas = {m: torch.zeros(adapter.shapes[m], dtype=self.A[self._name(m)].dtype,
                                         device=self.A[self._name(m)].device, requires_grad=True) for m in self.keys}
                with adapter.use(deltas):
                    s = scores(adapter.lm, batch)
                nll = -torch.log_softmax(s.float(), -1).gather(-1, batch.gold.to(s.device)[:, None]).sum()
                values = torch.autograd.grad(nll, list(deltas.values()))
            for m, g in zip(deltas, values):
                grads[m].append(g.detach().double())
        for m, gs in grads.items():
            D = torch.stack(gs)
            D = D - D.mean(0, keepdim=True)
            a_list, b_list = [], []
            for _ in range(self.dim):
                a = torch.randn(D.shape[2], generator=generator, dtype=D.dtype).to(D.device)
                b = torch.randn(D.shape[1], generator=generator, dtype=D.dtype).to(D.device)
                for _ in range(iterations):
                    c = torch.einsum("o,toi,i->t", b, D, a)
                    b = torch.einsum("t,toi,i->o", c, D, a)
                    b = _orthonormal(b, b_list)
                    c = torch.einsum("o,toi,i->t", b, D, a)
                    a = torch.einsum("t,toi,o->i", c, D, b)
                    a = _orthonormal(a, a_list)
                a_list.append(a)
                b_list.append(b)
            name = self._name(m)
            self.A[name].copy_(torch.stack(a_list).to(self.A[name].dtype))
            self.B[name].copy_(torch.stack(b_list, 1).to(self.B[name].dtype))

    # ----------------------------------------------------------------- the weight shift
    def directions(self, module: str) -> tuple[Tensor, Tensor]:
        """``(a, b)``: unit rows ``[d, in]`` and unit columns ``[out, d]`` of the module's basis."""
        name = self._name(module)
        A, B = self.A[name], self.B[name]
        return A / A.norm(dim=1, keepdim=True), B / B.norm(dim=0, keepdim=True)

    def shift(self, module: str, z: Tensor) -> LowRankDelta:
        """Σ_j z_j g_j b_j a_jᵀ in low-rank form (``B·diag(z·g)``, ``A``; never formed densely)."""
        a, b = self.directions(module)
        gain = self.gain[self._name(module)].to(b.dtype)
        return LowRankDelta(a, b * (z.to(b.dtype) * gain)[None, :], 1.0)

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
        return f"dim={self.dim}, init_scale={self.init_scale}, init={self.init!r}, modules={len(self.keys)}"
