"""A task posterior with correlated directions: diagonal plus low-rank *precision*.

Why: a mean-field q(ΔW) = N(μ, diag σ²) can only shrink each element's variance. The data of a task
inform a few directions of ΔW (the GGN of n examples with C options has rank ≤ n(C − 1)), and the
exact Gaussian posterior has precision Λ = Λ_prior + GGN: the prior's variance everywhere except in
those directions. Mean field matches Λ's *diagonal*, which shrinks every element those directions
touch: it underestimates the marginal variances, and the empirical-Bayes M-step for σ_θ
(σ_θ² ← E_q (ΔW − μ_θ)²) settles below the true task spread (measured in docs/posterior.md, §8).

The family here represents "prior-like precision plus a few data directions" exactly:

    Λ = D^{1/2} (I + Ŵ Ŵᵀ) D^{1/2},    D = diag(1/σ²),   Ŵ = [vec(u_1 v_1ᵀ), …, vec(u_R v_Rᵀ)]

with σ ``[out, in]`` from the std map, and R dimensionless columns, each a rank-1 ``[out, in]``
matrix u_j v_jᵀ (``U: [out, R]``, ``V: [R, in]``; for a linear layer the GGN of one example and
option contrast is exactly such a matrix when the layer is read at one position, e.g. the LM head).
Everything needs only R×R algebra and a few dense passes (C = I_R + ŴᵀŴ = I + (UᵀU) ⊙ (V Vᵀ)):

    sample     x = μ + σ ⊙ (ε + Ŵ C⁻¹ (z − Ŵᵀε)),   ε ~ N(0, I_{out·in}), z ~ N(0, I_R)
               (the perturbation identity M⁻¹(ε + Ŵz) ~ N(0, M⁻¹) with M = I + ŴŴᵀ, by Woodbury)
    variance   σ² ⊙ (1 − diag(Ŵ C⁻¹ Ŵᵀ))
    log det Σ  Σ log σ² − log det C
    KL(q ‖ N(m, s²) elementwise) = Σ (log s − log σ) + ½ log det C + ½ Σ (var + (μ − m)²)/s² − ½·out·in

References: Rezende & Mohamed / Ong et al. 2018 ("Gaussian variational approximation with a factor
covariance structure") for low-rank-plus-diagonal families; Daxberger et al. 2021 (Laplace Redux)
for the GGN posterior precision the start uses.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import pyro.distributions as dist
import torch
from pyro.distributions.kl import register_kl
from pyro.distributions.torch_distribution import TorchDistribution
from torch import Tensor
from torch.distributions import constraints

from ..lora.adapter import BayesLoRA, full_precision, no_autocast
from ..models.likelihoods import TaskData
from .base import Params
from .mean_field import MeanFieldGuide

__all__ = ["LowRankPrecisionNormal", "LowRankPrecisionGuide", "COV_KINDS"]

COV_KINDS = ("cov_U", "cov_V")
ROUNDOFF = 64  # a column's rows below ROUNDOFF·eps of its largest are round-off (:func:`_rank_one`)


class LowRankPrecisionNormal(TorchDistribution):
    """N(loc, Σ) over ``[out, in]`` with precision Σ⁻¹ = diag(1/σ²) + W Wᵀ (module docstring).

    Args: ``loc``, ``scale`` ``[out, in]`` (σ > 0: the std without the low-rank term); ``U`` ``[out, R]``,
    ``V`` ``[R, in]`` (column j of W is vec(U[:, j] V[j, :]), in units of 1/ΔW). R = 0 is mean field."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, loc: Tensor, scale: Tensor, U: Tensor, V: Tensor, validate_args: bool | None = None):
        if loc.dim() != 2 or scale.shape != loc.shape:
            raise ValueError(f"loc and scale must be [out, in] of one shape, got {tuple(loc.shape)}, {tuple(scale.shape)}")
        out_f, in_f = loc.shape
        if U.dim() != 2 or V.dim() != 2 or U.shape[0] != out_f or V.shape[1] != in_f or U.shape[1] != V.shape[0]:
            raise ValueError(f"U must be [{out_f}, R] and V [R, {in_f}], got {tuple(U.shape)}, {tuple(V.shape)}")
        self.loc, self.scale, self.U, self.V = loc, scale, U, V
        super().__init__(torch.Size(), loc.shape, validate_args=validate_args)

    # ------------------------------------------------------------------ R×R algebra
    def _rows(self) -> Tensor | None:
        """The rows of U with a nonzero entry, the only rows W touches (None: every row). For the LM
        head these are the option rows: the R×R algebra then costs rows·in, not out·in."""
        if not hasattr(self, "_active"):
            active = self.U.detach().ne(0).any(1)
            self._active = None if bool(active.all()) else active.nonzero().squeeze(1)
        return self._active

    def _pairs(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """``([rows, R²], [R², in], rows)``: U_ki U_kj over U's nonzero rows (:meth:`_rows`) and V_il V_jl,
        so that a ``[rows, in]`` weight G gives Σ_kl (u_i u_jᵀ ⊙ G ⊙ …) as ``(left.T @ G) ⊙ right``."""
        R = self.U.shape[1]
        rows = self._rows()
        U = self.U if rows is None else self.U[rows]
        left = (U[:, :, None] * U[:, None, :]).reshape(U.shape[0], R * R)
        right = (self.V[:, None, :] * self.V[None, :, :]).reshape(R * R, self.V.shape[1])
        return left, right, rows

    @property
    def capacitance(self) -> Tensor:
        """C = I_R + Wᵀ diag(σ²) W, ``[R, R]``: C_ij = Σ_kl U_ki U_kj σ²_kl V_il V_jl."""
        R = self.U.shape[1]
        left, right, rows = self._pairs()
        var = self.scale.pow(2) if rows is None else self.scale[rows].pow(2)
        gram = ((left.T @ var) * right).sum(-1).reshape(R, R)
        return torch.eye(R, dtype=self.U.dtype, device=self.U.device) + gram

    def _project(self, e: Tensor) -> Tensor:
        """Wᵀ vec(e) = [u_jᵀ e v_j]_j, ``[..., R]`` for ``e`` ``[..., out, in]``."""
        rows = self._rows()
        if rows is None:
            return ((e @ self.V.T) * self.U).sum(-2)
        return ((e.index_select(-2, rows) @ self.V.T) * self.U[rows]).sum(-2)

    def _expand(self, c: Tensor) -> Tensor:
        """W c = U diag(c) V, ``[..., out, in]`` for ``c`` ``[..., R]``."""
        return (self.U * c.unsqueeze(-2)) @ self.V

    # ------------------------------------------------------------------ distribution interface
    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        """diag Σ = σ² − σ⁴ ⊙ diag(W C⁻¹ Wᵀ) (Woodbury)."""
        var = self.scale.pow(2)
        if not self.U.shape[1]:
            return var
        left, right, rows = self._pairs()
        R = self.U.shape[1]
        cinv = torch.linalg.inv(self.capacitance).reshape(1, R * R)
        if rows is None:
            return var - var.pow(2) * ((left * cinv) @ right)
        return var.index_add(0, rows, -var[rows].pow(2) * ((left * cinv) @ right))  # other rows: σ² exactly

    def log_det_capacitance(self) -> Tensor:
        return torch.linalg.slogdet(self.capacitance)[1] if self.U.shape[1] else self.loc.new_zeros(())

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        """x = μ + Σ (ε/σ + W z): covariance Σ Λ Σ = Σ; Σ y = σ²y − σ² ⊙ W C⁻¹ Wᵀ (σ² y)."""
        shape = torch.Size(sample_shape)
        eps = torch.randn(shape + self.loc.shape, dtype=self.loc.dtype, device=self.loc.device)
        R = self.U.shape[1]
        if not R:
            return self.loc + self.scale * eps
        z = torch.randn(shape + (R,), dtype=self.loc.dtype, device=self.loc.device)
        var = self.scale.pow(2)
        y = var * (eps / self.scale + self._expand(z))  # σ² ⊙ (ε/σ + W z)
        c = torch.linalg.solve(self.capacitance, self._project(y).unsqueeze(-1)).squeeze(-1)
        return self.loc + y - var * self._expand(c)

    def log_prob(self, value: Tensor) -> Tensor:
        d = value - self.loc
        maha = (d / self.scale).pow(2).sum((-2, -1)) + self._project(d).pow(2).sum(-1)
        log_det_precision = self.log_det_capacitance() - 2 * self.scale.log().sum()
        return -0.5 * (maha + self.loc.numel() * math.log(2 * math.pi)) + 0.5 * log_det_precision

    def entropy(self) -> Tensor:
        n = self.loc.numel()
        return 0.5 * n * (1 + math.log(2 * math.pi)) + self.scale.log().sum() - 0.5 * self.log_det_capacitance()

    def expand(self, batch_shape, _instance=None):
        if tuple(batch_shape):
            raise NotImplementedError("LowRankPrecisionNormal has no batch dimensions")
        return self


@register_kl(LowRankPrecisionNormal, dist.Independent)
def _kl_low_rank_normal(q: LowRankPrecisionNormal, p: dist.Independent) -> Tensor:
    base = p.base_dist
    if not isinstance(base, dist.Normal) or p.reinterpreted_batch_ndims != 2 or base.batch_shape != q.loc.shape:
        raise NotImplementedError
    s = base.scale
    quad = (q.variance + (q.loc - base.loc).pow(2)) / s.pow(2)
    return (s.log() - q.scale.log()).sum() + 0.5 * q.log_det_capacitance() + 0.5 * (quad.sum() - q.loc.numel())


class LowRankPrecisionGuide(MeanFieldGuide):
    """q(ΔW_{i,m}) = :class:`LowRankPrecisionNormal` with precision diag(1/σ²) + W Wᵀ: σ is θ's (the
    task's copy of θ's scale factors) and W the likelihood's curvature, so Λ = Λ_prior + GGN — the
    precision condition of the optimal Gaussian q (prior precision plus the expected Hessian of the
    negative log-likelihood), with the Hessian read at q's mean.

    Task parameters (``init_task_params``): θ's factors copied (with history; kept as they are by the
    inner loop: :meth:`frozen_keys`), a mean offset ``res_B`` ``[out, r]`` (0) and ``res_A`` ``[r, in]``
    (θ's A) — q's mean is θ's plus (α/r)·B_Δ A_Δ, so rows no example reaches stay exactly at θ's
    (an offset through θ's own factors would move every row through the shared A) — and the columns
    ``cov_U`` ``[out, R]``, ``cov_V`` ``[R, in]``. The inner loop refines the offset; :meth:`refresh`
    then recomputes the columns at the refined mean.

    The columns (``init="ggn"``): for each support example n the option scores' Hessian
    H_n = diag p − p pᵀ = Σ_c λ_c v_c v_cᵀ gives columns √λ_c · ∂(v_cᵀ scores_n)/∂ΔW (one backward
    each), cut to rank 1 (exact for the LM head, read at one position; a power iteration otherwise).
    ``cov_rank=None`` keeps every (example, contrast) pair, n·(K − 1); a smaller R keeps the largest λ
    and warns: dropped curvature widens q and biases the M-step for σ_θ upward (measured,
    docs/posterior.md). ``init="random"``: small random columns (N(0, ``init_scale``²)), an ablation.

    Options: ``whiten`` (the offset in units of θ's σ, so an inner step of size lr moves the mean by
    about lr·σ whatever σ is: plain SGD and Adam then resolve the posterior at any prior scale);
    ``free_scale`` (a per-element task log-scale on top of θ's σ, refined by the inner loop — its
    one-draw gradients scatter it, measured to bias σ_θ, so off by default); ``refine_columns`` (the
    inner loop also steps the columns; off: Adam's steps on them raised the KL, measured);
    ``residual_mean=False`` (the task's own copy of θ's mean factors is refined instead of an offset).
    Needs the model's likelihood for the GGN: :class:`~abmll_pyro.infer.meta.MetaSVI` binds it
    (:meth:`bind`), or pass ``likelihood=``.
    """

    def __init__(self, cov_rank: int | None = None, init: str = "ggn", init_scale: float = 1e-2, likelihood=None,
                 power_iterations: int = 8, free_scale: bool = False, refine_columns: bool = False,
                 residual_mean: bool = True, whiten: bool = False):
        if cov_rank is not None and cov_rank < 0:
            raise ValueError(f"cov_rank must be >= 0 or None, got {cov_rank!r}")
        if cov_rank is None and init == "random":
            raise ValueError("init='random' needs a cov_rank (the number of columns)")
        self.free_scale, self.refine_columns = bool(free_scale), bool(refine_columns)
        self.residual_mean, self.whiten = bool(residual_mean), bool(whiten)
        if init not in ("ggn", "random"):
            raise ValueError(f"init must be 'ggn' or 'random', got {init!r}")
        self.cov_rank, self.init, self.init_scale = (None if cov_rank is None else int(cov_rank)), init, float(init_scale)
        self.likelihood, self.power_iterations = likelihood, int(power_iterations)

    def bind(self, model) -> None:
        """Take the model's likelihood for the GGN start unless one was given."""
        if self.likelihood is None:
            self.likelihood = model.likelihood

    def init_task_params(self, adapter: BayesLoRA, theta_params: Params, support: TaskData | None = None) -> dict:
        start = super().init_task_params(adapter, theta_params, support)
        if self.init == "ggn":
            if support is None:
                raise ValueError("LowRankPrecisionGuide(init='ggn') needs the task's support set")
            columns = self._ggn_columns(adapter, start, support, {m: adapter.std(theta_params, m) for m in adapter.shapes})
        else:
            g = torch.Generator().manual_seed(0)
            columns = {m: (torch.randn(o, self.cov_rank, generator=g) * self.init_scale,
                           torch.randn(self.cov_rank, i, generator=g) * self.init_scale) for m, (o, i) in adapter.shapes.items()}
        like = next(iter(theta_params.values()))
        dtype = full_precision(like).dtype
        for m, (o, i) in adapter.shapes.items():
            if self.residual_mean:  # the task's own mean offset (α/r)·B_Δ A_Δ, B_Δ = 0: rows no datum reaches stay at θ's
                start[adapter.key(m, "res_B")] = torch.zeros(o, adapter.config.rank, dtype=dtype, device=like.device)
                start[adapter.key(m, "res_A")] = full_precision(theta_params[adapter.key(m, "mu_A")]).detach().clone()
            if self.free_scale:  # the task's own log-scale per element, on top of θ's structured σ
                start[adapter.key(m, "cov_log")] = torch.zeros(o, i, dtype=dtype, device=like.device)
        for m, (U, V) in columns.items():
            start[adapter.key(m, "cov_U")] = U.to(dtype=full_precision(like).dtype, device=like.device)
            start[adapter.key(m, "cov_V")] = V.to(dtype=full_precision(like).dtype, device=like.device)
        return start

    def frozen_keys(self, task_params: Params) -> tuple[str, ...]:
        """With ``residual_mean``: θ's copied factors stay as they are in the inner loop (their change
        would move every row of ΔW through the shared A, also rows no example informs); the task's
        mean moves through its offset and its scale through the per-element log-scale."""
        if not self.residual_mean:
            return ()
        return tuple(k for k in task_params if k.rsplit(":", 1)[-1] not in ("res_A", "res_B", "cov_log", "cov_U", "cov_V"))

    def _mean(self, adapter: BayesLoRA, task_params: Params, module: str) -> Tensor:
        mean = adapter.mean(task_params, module)
        B = task_params.get(adapter.key(module, "res_B"))
        if B is not None:
            with no_autocast(B):
                offset = (adapter.config.scaling * full_precision(B)) @ full_precision(task_params[adapter.key(module, "res_A")])
            # whiten: the offset in units of θ's σ (the frozen copy), so an inner step of size lr moves the
            # mean by about lr·σ, whatever σ is: plain SGD and Adam resolve the posterior at any prior scale
            mean = mean + (adapter.std(task_params, module) * offset if self.whiten else offset)
        return mean

    def task_distribution(self, adapter: BayesLoRA, task_params: Params, module: str) -> dist.Distribution:
        if adapter.key(module, "cov_U") not in task_params:  # θ's own factors (the prior predictive): no columns
            return super().task_distribution(adapter, task_params, module)
        U, V = task_params[adapter.key(module, "cov_U")], task_params[adapter.key(module, "cov_V")]
        if not self.refine_columns:  # the start's data directions kept as they are: the inner loop refines μ and σ
            U, V = U.detach(), V.detach()
        scale = adapter.std(task_params, module)
        free = task_params.get(adapter.key(module, "cov_log"))
        if free is not None:
            scale = scale * full_precision(free).exp()
        return LowRankPrecisionNormal(self._mean(adapter, task_params, module), scale, full_precision(U), full_precision(V))

    # ------------------------------------------------------------------ the GGN start
    def refresh(self, adapter: BayesLoRA, task_params: Params, support: TaskData) -> dict:
        """After the inner loop: the columns recomputed as the GGN at the refined mean, scaled by the
        refined diagonal σ (Λ = D + GGN(μ_q): the Gaussian variational optimum's precision condition,
        prior precision plus the likelihood's curvature at q, read at q's mean). Values only: the
        returned columns carry no history."""
        if self.init != "ggn" or self.cov_rank == 0:
            return dict(task_params)
        sigma = {}
        for m in adapter.shapes:
            scale = adapter.std(task_params, m)
            free = task_params.get(adapter.key(m, "cov_log"))
            sigma[m] = scale if free is None else scale * full_precision(free).exp()
        columns = self._ggn_columns(adapter, task_params, support, sigma)
        out = dict(task_params)
        for m, (U, V) in columns.items():
            like = task_params[adapter.key(m, "cov_U")]
            out[adapter.key(m, "cov_U")] = U.to(like.dtype).requires_grad_(like.requires_grad)
            out[adapter.key(m, "cov_V")] = V.to(like.dtype).requires_grad_(like.requires_grad)
        return out

    def _ggn_columns(self, adapter: BayesLoRA, theta: Params, support: TaskData,
                     sigma: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        scores_fn: Callable | None = getattr(self.likelihood, "scores", None)
        if scores_fn is None:
            raise TypeError("LowRankPrecisionGuide(init='ggn') needs a likelihood with scores(lm, batch) (an OptionLikelihood); "
                            f"got {type(self.likelihood).__name__}; use init='random' for other data")
        with torch.enable_grad():
            deltas = {m: self._mean(adapter, theta, m).detach().requires_grad_(True) for m in adapter.shapes}
            with adapter.use(deltas):
                scores = scores_fn(adapter.lm, support.batch)  # [n, K], -inf in padded slots
            pairs = _score_contrasts(scores.detach().double())  # (λ, n, w) by decreasing λ
            R = len(pairs) if self.cov_rank is None else self.cov_rank
            if len(pairs) > R:
                warnings.warn(f"LowRankPrecisionGuide keeps the {R} largest of the support set's {len(pairs)} GGN directions; "
                              "the rest of the data's curvature is dropped, which widens q and biases σ_θ upward "
                              "(cov_rank=None keeps them all)", stacklevel=3)
            pairs = pairs[:R]
            sigma = {m: v.detach() for m, v in sigma.items()}
            U = {m: torch.zeros(o, R, dtype=sigma[m].dtype, device=sigma[m].device) for m, (o, _) in adapter.shapes.items()}
            V = {m: torch.zeros(R, i, dtype=sigma[m].dtype, device=sigma[m].device) for m, (_, i) in adapter.shapes.items()}
            finite = torch.isfinite(scores)
            for j, (lam, n, w) in enumerate(pairs):
                row = torch.where(finite[n], scores[n], torch.zeros_like(scores[n]))
                target = (row * w.to(row.dtype)).sum() * math.sqrt(lam)
                grads = torch.autograd.grad(target, list(deltas.values()), retain_graph=j + 1 < len(pairs), allow_unused=True)
                for m, g in zip(deltas, grads):
                    if g is None:
                        continue
                    u, v = _rank_one(g.detach().to(sigma[m].dtype), self.power_iterations)
                    U[m][:, j], V[m][j, :] = u, v
        return {m: (U[m], V[m]) for m in adapter.shapes}


def _score_contrasts(scores: Tensor) -> list[tuple[float, int, Tensor]]:
    """The eigenpairs (λ > 0) of every example's softmax Hessian diag p − p pᵀ over its valid options,
    as ``(λ, example, w)`` with ``w`` ``[K]`` (zeros in padded slots), sorted by decreasing λ."""
    out = []
    for n, row in enumerate(scores):
        valid = torch.isfinite(row)
        p = torch.softmax(row[valid], -1)
        lam, vecs = torch.linalg.eigh(torch.diag(p) - torch.outer(p, p))
        for k in range(lam.numel()):
            if lam[k] > 1e-12:
                w = torch.zeros_like(row)
                w[valid] = vecs[:, k]
                out.append((float(lam[k]), n, w))
    return sorted(out, key=lambda t: -t[0])


def _rank_one(G: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """``(u, v)`` with u vᵀ the best rank-1 approximation of ``G`` ``[out, in]`` (power iteration from
    its largest row; |u| = |v| = √s₁). Exact in one step when G has rank 1.

    Rows whose norm is below ``ROUNDOFF``·eps of the largest are round-off, zero in exact arithmetic
    (for the LM head every row but the options': the softmax's shared term cancels in a score
    contrast); they get u = 0 exactly, so the power iteration runs on the other rows and
    :class:`LowRankPrecisionNormal` skips them (out·in → options·in)."""
    norms = G.norm(dim=1)
    if float(norms.max()) == 0.0:
        return G.new_zeros(G.shape[0]), G.new_zeros(G.shape[1])
    keep = (norms > ROUNDOFF * torch.finfo(G.dtype).eps * norms.max()).nonzero().squeeze(1)
    full, G = G, G[keep]
    v = G[int(norms[keep].argmax())].clone()
    v = v / v.norm()
    tiny = torch.finfo(G.dtype).tiny
    for _ in range(max(iterations, 1)):
        v = G.T @ (G @ v)
        size = v.norm()
        if not float(size) > tiny:  # G v = 0: G is (numerically) zero along the start
            return full.new_zeros(full.shape[0]), full.new_zeros(full.shape[1])
        v = v / size
    u = G @ v  # = s₁ u₁
    s = u.norm()
    if not float(s) > tiny:
        return full.new_zeros(full.shape[0]), full.new_zeros(full.shape[1])
    return full.new_zeros(full.shape[0]).index_copy(0, keep, u / s.sqrt()), v * s.sqrt()
