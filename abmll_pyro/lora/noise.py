"""Lean weight noise: ΔW = μ + σ ⊙ ε without keeping ε (or σ ⊙ ε) alive for backward.

A reparameterized draw ΔW = μ + σ ⊙ ε, ε ~ N(0, I) of shape ``[out, in]``, through plain autograd
saves ε and the product for backward: dense buffers per adapted module that live until the task's
backward pass. :class:`NormalSample` saves only an integer seed and redraws ε in backward:

    forward:   ΔW = μ + σ ⊙ ε(seed)
    backward:  ∂L/∂μ = g,   ∂L/∂σ = g ⊙ ε(seed)          (g = ∂L/∂ΔW)

ε comes from a private ``torch.Generator`` seeded from the global RNG (so ``pyro.set_rng_seed``
still fixes it). :class:`LeanNormal` is a ``pyro.distributions.Normal`` whose ``rsample`` uses it, so
a Pyro sample site stays a real Normal (log_prob, entropy, analytic KL all unchanged).

:func:`normal_kl` is KL(N(μq, σq²) ‖ N(μp, σp²)) elementwise as one autograd function that saves
the two or three products its gradient needs and nothing else (the plain formula saves ~5 dense
intermediates); it is registered as the KL of (:class:`LeanNormal`, Normal)::

    KL = log σp − log σq + (σq² + (μq − μp)²) / (2 σp²) − 1/2  =  ½ (r² + d² − 1 − log r²),
    r = σq/σp,  d = (μq − μp)/σp   (the ratio form computed: fewer dense passes, no log σ of size ~7
    cancelling at q ≈ p)
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import pyro.distributions as dist
import torch
from pyro.distributions.kl import register_kl
from torch import Tensor

__all__ = ["NormalSample", "LeanNormal", "normal_kl", "differentiable_twice", "dense_saved_storages"]


def _generator(device: torch.device, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class NormalSample(torch.autograd.Function):
    """``μ + ε ⊙ σ`` with ε drawn exactly as ``Normal.rsample`` draws it (``normal_()`` on the default
    or given generator); saves that generator's state, not ε, and redraws ε in backward."""

    @staticmethod
    def forward(ctx, loc: Tensor, scale: Tensor, generator: torch.Generator | None = None) -> Tensor:
        shape = torch.broadcast_shapes(loc.shape, scale.shape)
        gen = _generator(loc.device, generator)
        ctx.state, ctx.spec = gen.get_state(), (shape, loc.dtype, loc.device, loc.shape, scale.shape)
        eps = torch.empty(shape, dtype=loc.dtype, device=loc.device).normal_(generator=gen)
        return eps.mul_(scale).add_(loc)  # = loc + ε σ bit for bit (commutative IEEE ops), no second buffer

    @staticmethod
    def backward(ctx, grad: Tensor):
        shape, dtype, device, loc_shape, scale_shape = ctx.spec
        grad_loc = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_loc = grad.sum_to_size(loc_shape)
        if ctx.needs_input_grad[1]:
            replay = torch.Generator(device=device)
            replay.set_state(ctx.state)
            eps = torch.empty(shape, dtype=dtype, device=device).normal_(generator=replay)
            grad_scale = eps.mul_(grad).sum_to_size(scale_shape)
        return grad_loc, grad_scale, None


class LeanNormal(dist.Normal):
    """A Normal whose reparameterized sample keeps no dense noise for backward (same draws as Normal)."""

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        if len(sample_shape) or torch._C._get_tracing_state():
            return super().rsample(sample_shape)  # several draws at once / tracing: the stock path
        return NormalSample.apply(self.loc, self.scale, None)


_STATE = threading.local()


@contextmanager
def differentiable_twice() -> Iterator[None]:
    """Within the block, :func:`normal_kl` saves its inputs so its backward is itself differentiable
    (second-order inner loops); outside it saves only the two or three products its gradient needs."""
    previous = getattr(_STATE, "twice", False)
    _STATE.twice = True
    try:
        yield
    finally:
        _STATE.twice = previous


class _NormalKL(torch.autograd.Function):
    """Fused KL, in the ratio form ``r = σq/σp``, ``d = (μq − μp)/σp``::

        KL = ½ (r² + d² − 1 − log r²)

    (torch's own formula). First order it saves ``a = d/σp``, ``b = (r² − 1)/σq`` and, when σp needs
    a gradient, ``c = (1 − r² − d²)/σp``: the gradients are ``g·a``, ``g·b``, ``−g·a``, ``g·c``. Under
    :func:`differentiable_twice` it saves the inputs and recomputes those in backward."""

    @staticmethod
    def forward(ctx, mq: Tensor, sq: Tensor, mp: Tensor, sp: Tensor) -> Tensor:
        ctx.shapes = (mq.shape, sq.shape, mp.shape, sp.shape)
        ctx.twice = getattr(_STATE, "twice", False)
        r2, d = _ratios(mq, sq, mp, sp)
        d2 = d * d
        kl = r2 + d2  # ½ (r² + d² − 1 − log r²), in place on fresh buffers (no graph inside forward)
        kl.sub_(1.0).sub_(r2.log()).mul_(0.5)
        if ctx.twice:
            ctx.save_for_backward(mq, sq, mp, sp)
        else:
            ctx.save_for_backward(*_factors(r2, d, d2, sq, sp, ctx.needs_input_grad))
        return kl

    @staticmethod
    def backward(ctx, g: Tensor):
        need = ctx.needs_input_grad
        a, b, c = _kl_factors(*ctx.saved_tensors, need) if ctx.twice else ctx.saved_tensors
        ga = g * a if need[0] or need[2] else None
        out = (ga if need[0] else None, g * b if need[1] else None, -ga if need[2] else None,
               g * c if need[3] else None)
        return tuple(None if o is None else o.sum_to_size(s) for o, s in zip(out, ctx.shapes))


def _ratios(mq: Tensor, sq: Tensor, mp: Tensor, sp: Tensor) -> tuple[Tensor, Tensor]:
    """``(r², d)`` with r = σq/σp and d = (μq − μp)/σp."""
    r = sq / sp
    return r * r, (mq - mp) / sp


def _factors(r2: Tensor, d: Tensor, d2: Tensor, sq: Tensor, sp: Tensor, need) -> tuple[Tensor, Tensor, Tensor]:
    """``(a, b, c)`` of :class:`_NormalKL` (an empty tensor where no gradient needs it); each is
    exactly 0 where q = p (r = 1 and d = 0 exactly: no float32 drift at the prior)."""
    empty = sq.new_empty(0)
    a = d / sp if need[0] or need[2] else empty
    b = (r2 - 1.0) / sq if need[1] else empty
    c = (1.0 - r2 - d2) / sp if need[3] else empty
    return a, b, c


def _kl_factors(mq: Tensor, sq: Tensor, mp: Tensor, sp: Tensor, need) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_factors` from the inputs (differentiable: the second-order path's backward)."""
    r2, d = _ratios(mq, sq, mp, sp)
    return _factors(r2, d, d * d, sq, sp, need)


def normal_kl(mq: Tensor, sq: Tensor, mp: Tensor, sp: Tensor) -> Tensor:
    """Elementwise KL(N(mq, sq²) ‖ N(mp, sp²)), broadcast; one fused autograd node."""
    return _NormalKL.apply(mq, sq, mp, sp)


@register_kl(LeanNormal, dist.Normal)
def _kl_lean_normal(q: LeanNormal, p: dist.Normal) -> Tensor:
    return normal_kl(q.loc, q.scale, p.loc, p.scale)


def dense_saved_storages(loss: Tensor, shape: tuple[int, int], exclude: set[int] = frozenset()) -> set[int]:
    """Distinct storages of ``[out, in]``-sized tensors that the autograd graph of ``loss`` keeps for
    backward (``_saved_*`` of built-in nodes, ``saved_tensors`` of custom functions), minus the
    storages in ``exclude`` (e.g. the frozen weights). A measurement for tests and the cost script."""
    found, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        values = [getattr(fn, a, None) for a in dir(fn) if a.startswith("_saved_")]
        try:
            values += list(getattr(fn, "saved_tensors", ()) or ())
        except RuntimeError:  # already freed
            pass
        for v in values:
            if torch.is_tensor(v) and v.dim() >= 2 and v.numel() == shape[0] * shape[1]:
                ptr = v.untyped_storage().data_ptr()
                if ptr not in exclude:
                    found.add(ptr)
        stack += [n for n, _ in fn.next_functions]
    return found
