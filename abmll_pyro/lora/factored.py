"""Factor-backed Gaussians: q(ΔW) and p(ΔW | θ) that hold a module's low-rank factors, not dense tensors.

A dense ``[out, in]`` tensor per adapted module that lives from the guide's draw to the task's
backward pass — μ, σ, the sample ΔW = μ + σ ⊙ ε, θ's mean and precision in the traces, the KL's and
the layer's saved products — costs, at Llama-3-8B's q/v shapes, 2.7 GB per float32 copy over the
32 blocks. Within :func:`factor_backed` none is kept:

* :class:`FactorValue` — a lazy ``[out, in]`` value: a module's factors (:class:`FactorGaussian`),
  which moment (``"mean"``, ``"std"``, or ``"sample"`` with the generator state its ε is drawn
  from) and the elementwise ops applied to it (``pow``, ``rsqrt``). It is what Pyro's sample sites
  hold (θ's Delta values, the ΔW draw); ``dense()`` materializes it with the same ops as before.
* :class:`FactorNormal` — a real ``Normal`` (``loc``/``scale`` are dense on demand, so log_prob,
  entropy, moments are the stock ones) whose ``rsample`` returns a :class:`FactorValue` (the global
  generator advanced exactly as the stock draw advances it), with the analytic KL against another
  :class:`FactorNormal` registered as one :func:`recomputed` node per module.
* :class:`FactorIndependent` — ``Independent`` whose ``log_prob`` of a :class:`FactorValue` is one
  :func:`recomputed` node (θ's hyperprior density at θ's factor-backed values: Pyro's KL of a Delta
  guide site is ``−log p(v)``).
* :func:`recomputed` — ``fn(*tensors)`` run without autograd in forward, saving only ``tensors``
  (factors, the layer input x); backward runs ``fn`` again with autograd (same autocast state, the
  same ε replayed from the saved generator state) and back-propagates through it. So the values and
  gradients are those of the plain graph (the same ops), and a dense tensor is transient: one
  module at a time, in forward and in backward. Used by the Bayesian LoRA layer for ``x ΔWᵀ``.
* :func:`recomputed_sum` — the same for a sum over row blocks of ``[out, in]``: forward and backward
  each make one block's dense tensors at a time (backward: one block's graph, its gradients, then
  the next), so a module's transient is :data:`ROW_BLOCK_ELEMENTS` elements per dense tensor, not
  ``out × in``. Used by the KL of two :class:`FactorNormal` s (``FactorIndependent`` pairs): it is a
  sum of elementwise terms, each block's μ and σ made from the factors' rows
  (:meth:`FactorGaussian.rows`). A module of at most :data:`ROW_BLOCK_ELEMENTS` elements is one
  block (the value is then the dense path's bit for bit); larger ones sum their blocks' sums (the
  dense sum's value to round-off: another summation order).

Within :func:`~abmll_pyro.lora.prior_cache.cached_prior` (the first-order inner loop) that KL takes a
fixed θ's p moments per block from a cache made once per inner loop (``lora/prior_cache.py``).

First order only (the recomputed backward is not itself differentiable); ``MetaSVI`` turns it on
for the mean-field guide under the hierarchical prior and ``LeanMeanFieldELBO`` (``infer/meta.py``),
and anything else keeps the dense path.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.kl import _kl_independent_independent, register_kl
from torch import Tensor
from torch.distributions.utils import _sum_rightmost

from .noise import LeanNormal, NormalSample, _generator, normal_kl
from .prior_cache import active_prior_cache

__all__ = ["FactorGaussian", "FactorValue", "FactorNormal", "FactorIndependent", "factor_backed",
           "factor_backed_active", "normal", "recomputed", "recomputed_sum", "ROW_BLOCK_ELEMENTS"]

#: the most elements of one row block of :func:`recomputed_sum` (2^20: 4 MiB per float32 block; at
#: Llama-3-8B's q_proj, 4096 × 4096, 16 blocks of 256 rows)
ROW_BLOCK_ELEMENTS = 2**20

_STATE = threading.local()


@contextmanager
def factor_backed(enabled: bool = True) -> Iterator[None]:
    """Within the block, the adapter's moments (:meth:`BayesLoRA.moments`) are :class:`FactorValue`s."""
    previous = getattr(_STATE, "on", False)
    _STATE.on = bool(enabled)
    try:
        yield
    finally:
        _STATE.on = previous


def factor_backed_active() -> bool:
    return getattr(_STATE, "on", False)


def recomputed(fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    """``fn(*tensors)``, keeping only ``tensors`` for backward (module docstring). ``fn`` must be
    deterministic given its arguments (draws replayed from a saved generator state)."""
    return _RecomputedSum.apply(lambda _, *t: fn(*t), (None,), *tensors)  # one "block": the whole of fn


class _RecomputedSum(torch.autograd.Function):
    """Σ_b fn(b, *tensors) saving only ``tensors``; backward one block's graph at a time (``recomputed``
    is the one-block case)."""

    @staticmethod
    def forward(ctx, fn: Callable[..., Tensor], blocks: Sequence[tuple[int, int]], *tensors: Tensor) -> Tensor:
        device = tensors[0].device.type
        ctx.fn, ctx.blocks, ctx.device = fn, blocks, device
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(*tensors)
        total = fn(blocks[0], *tensors)
        for block in blocks[1:]:
            total = total + fn(block, *tensors)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        need = ctx.needs_input_grad[2:]
        leaves = [t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, need)]
        wanted = [leaf for leaf, n in zip(leaves, need) if n]
        if not wanted:
            return (None, None, *(None for _ in need))
        sums: list[Tensor | None] = [None] * len(wanted)
        enabled, dtype = ctx.autocast
        for block in ctx.blocks:  # one block's graph at a time: its dense tensors freed before the next
            with torch.enable_grad(), torch.autocast(ctx.device, dtype=dtype, enabled=enabled):
                out = ctx.fn(block, *leaves)
            for i, g in enumerate(torch.autograd.grad(out, wanted, grad, allow_unused=True)):
                if g is not None:
                    sums[i] = g if sums[i] is None else sums[i] + g
            del out
        grads = iter(sums)
        return (None, None, *(next(grads) if n else None for n in need))


def row_blocks(rows: int, columns: int, limit: int | None = None) -> list[tuple[int, int]]:
    """``[(r0, r1), ...]`` covering ``rows`` rows, each block at most ``limit`` (default
    :data:`ROW_BLOCK_ELEMENTS`) elements of a ``[rows, columns]`` tensor (at least one row)."""
    step = max(1, (ROW_BLOCK_ELEMENTS if limit is None else limit) // max(columns, 1))
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def recomputed_sum(fn: Callable[..., Tensor], blocks: Sequence[tuple[int, int]], *tensors: Tensor) -> Tensor:
    """``Σ_b fn(b, *tensors)`` over ``blocks`` (module docstring), keeping only ``tensors`` for
    backward; ``fn`` must be deterministic given its arguments."""
    return _RecomputedSum.apply(fn, tuple(blocks), *tensors)


class FactorGaussian:
    """One module's factors (``params``: its keys of the adapter's factor dict) and the maps to its
    dense moments, ``mean()`` = :meth:`BayesLoRA.mean`, ``std()`` = :meth:`BayesLoRA.std`."""

    __slots__ = ("adapter", "module", "params")

    def __init__(self, adapter, module: str, params) -> None:
        kinds = adapter.factor_kinds
        self.adapter, self.module = adapter, module
        self.params = {k: params[k] for k in (adapter.key(module, kind) for kind in kinds)}

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.adapter.shapes[self.module])

    def tensors(self) -> list[Tensor]:
        return list(self.params.values())

    def rebuilt(self, tensors) -> "FactorGaussian":
        return FactorGaussian(self.adapter, self.module, dict(zip(self.params, tensors)))

    def rows(self, r0: int, r1: int) -> "FactorGaussian":
        """The same module's factors with the row-indexed ones (:attr:`BayesLoRA.row_kinds`) cut to
        rows ``r0:r1``: its :meth:`mean` and :meth:`std` are rows ``r0:r1`` of this one's."""
        row = {self.adapter.key(self.module, kind) for kind in self.adapter.row_kinds}
        sliced = {k: v[r0:r1] if k in row else v for k, v in self.params.items()}
        return FactorGaussian(self.adapter, self.module, sliced)

    def mean(self) -> Tensor:
        return self.adapter.mean(self.params, self.module)

    def std(self) -> Tensor:
        return self.adapter.std(self.params, self.module)


class FactorValue:
    """A lazy ``[out, in]`` value of a :class:`FactorGaussian` (module docstring). Duck-types the
    little of a tensor that Pyro's sites read (``shape``, ``dim()``, ``dtype``, ``device``,
    ``expand`` to its own shape) and ``pow``/``rsqrt`` (kept as ops, applied by :meth:`dense`)."""

    def __init__(self, gaussian: FactorGaussian, moment: str, ops: tuple = (), state: Tensor | None = None):
        if moment not in ("mean", "std", "sample"):
            raise ValueError(f"moment must be 'mean', 'std' or 'sample', got {moment!r}")
        self.gaussian, self.moment, self.ops, self.state = gaussian, moment, tuple(ops), state
        self._dtype = None

    # ---------------------------------------------------------------- the tensor-like surface
    @property
    def shape(self) -> torch.Size:
        return self.gaussian.shape

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def device(self) -> torch.device:
        return self.gaussian.tensors()[0].device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype :meth:`dense` returns (the mean's, as the current autocast state gives it)."""
        if self._dtype is None:
            with torch.no_grad():
                g = self.gaussian
                B, A = g.params[g.adapter.key(g.module, "mu_B")], g.params[g.adapter.key(g.module, "mu_A")]
                probe = g.adapter.mean({g.adapter.key(g.module, "mu_B"): B[:1], g.adapter.key(g.module, "mu_A"): A[:, :1]},
                                       g.module)
            self._dtype = probe.dtype
        return self._dtype

    def expand(self, *shape) -> "FactorValue":
        shape = torch.Size(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)
        if shape != self.shape:
            raise ValueError(f"a factor-backed value of shape {tuple(self.shape)} cannot be expanded to {tuple(shape)}")
        return self

    def pow(self, exponent: float) -> "FactorValue":
        return FactorValue(self.gaussian, self.moment, self.ops + (("pow", exponent),), self.state)

    def rsqrt(self) -> "FactorValue":
        return FactorValue(self.gaussian, self.moment, self.ops + (("rsqrt", None),), self.state)

    # ---------------------------------------------------------------- values
    def tensors(self) -> list[Tensor]:
        return self.gaussian.tensors()

    def dense(self, gaussian: FactorGaussian | None = None) -> Tensor:
        """The dense value (differentiable in the factors), from ``gaussian`` (default: its own)."""
        g = gaussian or self.gaussian
        if self.moment == "mean":
            value = g.mean()
        elif self.moment == "std":
            value = g.std()
        else:  # ε replayed from the state the draw was made at: the sample NormalSample made, bit for bit
            replay = torch.Generator(device=self.device)
            replay.set_state(self.state)
            mean, std = g.mean(), g.std()
            eps = torch.empty(torch.broadcast_shapes(mean.shape, std.shape), dtype=mean.dtype,
                              device=mean.device).normal_(generator=replay)
            # μ + σ ε (= NormalSample's ε σ + μ: IEEE products and sums commute); within a recomputed
            # backward ε is the product's saved operand (one module's transient), not drawn a second time
            value = mean + std * eps
        for op, arg in self.ops:
            value = value.pow(arg) if op == "pow" else value.rsqrt()
        return value

    def dense_of(self, tensors, rows: tuple[int, int] | None = None) -> Tensor:
        """:meth:`dense` with the factors replaced by ``tensors`` (same order as :meth:`tensors`);
        ``rows=(r0, r1)``: rows ``r0:r1`` only (the mean and std moments)."""
        gaussian = self.gaussian.rebuilt(tensors)
        if rows is not None:
            if self.moment == "sample":
                raise ValueError("a sample's rows cannot be made alone (its ε is drawn for the whole module)")
            gaussian = gaussian.rows(*rows)
        return self.dense(gaussian)

    def __repr__(self) -> str:
        ops = "".join(f".{op}({'' if a is None else a})" for op, a in self.ops)
        return f"FactorValue({self.gaussian.module}: {self.moment}{ops}, shape={tuple(self.shape)})"


class FactorNormal(LeanNormal):
    """``Normal(loc, scale)`` of two :class:`FactorValue`s (module docstring); validation off."""

    def __init__(self, loc: FactorValue, scale: FactorValue):
        if loc.gaussian is not scale.gaussian:
            raise ValueError("a FactorNormal's loc and scale must come from one module's factors")
        self.loc_value, self.scale_value = loc, scale
        torch.distributions.Distribution.__init__(self, loc.shape, validate_args=False)

    @property
    def loc(self) -> Tensor:
        return self.loc_value.dense()

    @property
    def scale(self) -> Tensor:
        return self.scale_value.dense()

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor | FactorValue:
        if len(sample_shape) or torch._C._get_tracing_state():
            return super().rsample(sample_shape)
        loc, scale = self.loc_value, self.scale_value
        if loc.moment != "mean" or loc.ops or scale.moment != "std" or scale.ops:  # not μ + σ ε of the factors
            return LeanNormal(self.loc, self.scale, validate_args=False).rsample()
        # advance the generator exactly as NormalSample's draw does (same shape, dtype, device); keep its state
        gen = _generator(loc.device, None)
        state = gen.get_state()
        torch.empty(self.batch_shape, dtype=loc.dtype, device=loc.device).normal_(generator=gen)
        return FactorValue(loc.gaussian, "sample", (), state)

    def log_prob(self, value):
        return super().log_prob(value.dense() if isinstance(value, FactorValue) else value)

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) == self.batch_shape:  # (Pyro's plates expand every site's distribution)
            return self
        return LeanNormal(self.loc, self.scale, validate_args=False).expand(batch_shape, _instance)

    def to_event(self, reinterpreted_batch_ndims: int | None = None):
        """A :class:`FactorIndependent`, so that the KL of two is the row-blocked sum."""
        n = len(self.batch_shape) if reinterpreted_batch_ndims is None else reinterpreted_batch_ndims
        return FactorIndependent(self, n) if n else self


class FactorIndependent(dist.Independent):
    """``Independent`` (module docstring): ``log_prob`` of a :class:`FactorValue` recomputed in backward;
    the KL of two over :class:`FactorNormal` s, one scalar summed over row blocks."""

    def log_prob(self, value):
        if not isinstance(value, FactorValue) or isinstance(self.base_dist, FactorNormal):
            base, n = self.base_dist, self.reinterpreted_batch_ndims
            if torch.is_tensor(value) and value.shape == base.batch_shape and _sliceable(base, n):
                return _sum_rightmost(_compact(base).log_prob(value), n)  # = Independent.log_prob's ops
            return super().log_prob(value)  # (a FactorNormal scores a FactorValue densely itself)
        base = self.base_dist
        if value.moment == "sample" or not _sliceable(base, self.reinterpreted_batch_ndims):
            density = super().log_prob
            return recomputed(lambda *f: density(value.dense_of(f)), *value.tensors())

        def block_density(block: tuple[int, int], *tensors: Tensor) -> Tensor:
            return _rows_of(base, *block).log_prob(value.dense_of(tensors, block)).sum()

        return recomputed_sum(block_density, row_blocks(*base.batch_shape), *value.tensors())


def _sliceable(d, event_dims: int) -> bool:
    """Whether ``d`` is a 2-D batch of one Normal or Gamma per element, all reinterpreted as events:
    its rows ``r0:r1`` are the same family over its parameters' rows (:func:`_rows_of`)."""
    return (type(d) in (dist.Normal, dist.Gamma) and len(d.batch_shape) == 2 and event_dims == 2
            and all(getattr(d, k).shape == d.batch_shape for k in d.arg_constraints))


def _rows_of(d, r0: int, r1: int):
    compact = _compact(d)
    if compact is not d:  # every row the same parameters: the 0-dim ones broadcast over the block's value
        return compact
    return type(d)(**{k: getattr(d, k)[r0:r1] for k in d.arg_constraints}, validate_args=False)


def _compact(d):
    """``d`` (a :func:`_sliceable` Normal or Gamma) with parameters that are one value expanded (every
    stride 0, as θ's hyperprior's are) as that 0-dim value, else ``d`` itself. Its log-density of an
    ``[out, in]`` value is the same elementwise ops on the same numbers (bit for bit, value and gradient),
    with the parameters' own terms (the Gamma's lgamma(a) and a·log b, the Normal's σ² and log σ) made
    once instead of once per element: about half of the dense passes of θ's hyperprior density."""
    params = {k: getattr(d, k) for k in d.arg_constraints}
    if not all(v.numel() and all(s == 0 for s in v.stride()) for v in params.values()):
        return d
    return type(d)(**{k: v[(0,) * v.dim()] for k, v in params.items()}, validate_args=False)


def normal(loc, scale, cls: type = dist.Normal, **kwargs) -> dist.Normal:
    """``cls(loc, scale, **kwargs)``, or a :class:`FactorNormal` when both are :class:`FactorValue`s."""
    if isinstance(loc, FactorValue) and isinstance(scale, FactorValue):
        return FactorNormal(loc, scale)
    return cls(loc, scale, **kwargs)


@register_kl(FactorIndependent, FactorIndependent)
def _kl_factor_independent(q: FactorIndependent, p: FactorIndependent) -> Tensor:
    bq, bp = q.base_dist, p.base_dist
    whole = (isinstance(bq, FactorNormal) and isinstance(bp, FactorNormal) and bq.batch_shape == bp.batch_shape
             and len(bq.batch_shape) == 2 and q.reinterpreted_batch_ndims == p.reinterpreted_batch_ndims == 2
             and "sample" not in {v.moment for v in (bq.loc_value, bq.scale_value, bp.loc_value, bp.scale_value)})
    if not whole:
        return _kl_independent_independent(q, p)
    gq, gp = bq.loc_value.gaussian, bp.loc_value.gaussian
    n = len(gq.params)
    blocks = row_blocks(*bq.batch_shape)
    cache = active_prior_cache()
    if cache is not None and cache.holds(gp):  # a fixed θ's p: its moments made once (lora/prior_cache.py)
        prior = cache.moments(bp.loc_value, bp.scale_value, blocks)

        def cached_block_kl(block: tuple[int, int], *tensors: Tensor) -> Tensor:
            fq = gq.rebuilt(tensors).rows(*block)
            return normal_kl(bq.loc_value.dense(fq), bq.scale_value.dense(fq), *prior[block]).sum()

        return recomputed_sum(cached_block_kl, blocks, *gq.tensors())

    def block_kl(block: tuple[int, int], *tensors: Tensor) -> Tensor:
        fq, fp = gq.rebuilt(tensors[:n]).rows(*block), gp.rebuilt(tensors[n:]).rows(*block)
        return normal_kl(bq.loc_value.dense(fq), bq.scale_value.dense(fq),
                         bp.loc_value.dense(fp), bp.scale_value.dense(fp)).sum()

    return recomputed_sum(block_kl, blocks, *gq.tensors(), *gp.tensors())


@register_kl(FactorNormal, FactorNormal)
def _kl_factor_normal(q: FactorNormal, p: FactorNormal) -> Tensor:
    gq, gp = q.loc_value.gaussian, p.loc_value.gaussian
    n = len(gq.params)

    def kl(*tensors: Tensor) -> Tensor:
        fq, fp = gq.rebuilt(tensors[:n]), gp.rebuilt(tensors[n:])
        return normal_kl(q.loc_value.dense(fq), q.scale_value.dense(fq), p.loc_value.dense(fp), p.scale_value.dense(fp))

    return recomputed(kl, *gq.tensors(), *gp.tensors())
