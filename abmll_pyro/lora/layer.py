"""The Bayesian LoRA layer: a frozen base linear map plus an externally supplied perturbation ΔW.

The layer holds no adapter parameters and does no sampling or KL: what it adds is set from outside
(by :class:`~abmll_pyro.lora.adapter.BayesLoRA`) as one of

* ``None`` — off: exactly the base module;
* :class:`LowRankDelta` — mean mode: ``y += scaling · (x Aᵀ) Bᵀ`` without forming ΔW (with ``dropout``
  p > 0, x on the adapted path only is replaced by ``dropout(x, p)``, PEFT's ``lora_dropout``: a fresh
  Bernoulli(1 − p) mask per element at every forward pass, kept elements scaled by 1/(1 − p));
* a dense ``[out, in]`` tensor — sampled mode: ``y = x (W0 + ΔW)ᵀ + b`` (a reparameterized sample
  of ΔW), one matmul on the merged weight instead of ``base(x) + x ΔWᵀ`` (two): the forward pass and
  the input gradient each save one ``[T, out, in]`` product per adapted module; ∂L/∂ΔW = ∂L/∂(W0 + ΔW)
  is the same product as before. Merged only where it is exact to float32 round-off: a plain
  ``nn.Linear`` or ``Conv1D`` base with no hooks or patched forward, and x in float32/float64 (a bf16
  or fp16 W0 + ΔW would round ΔW to W0's precision, so those keep the two-matmul form);
* a :class:`~abmll_pyro.lora.factored.FactorValue` sample — the same computation as a dense ΔW, run
  as one :func:`~abmll_pyro.lora.factored.recomputed` node: ΔW is made from the factors and the
  replayed noise in forward and again in backward, and only x and the factors are kept (no dense
  ``[out, in]`` tensor outlives the module's forward or backward).

Beside it, :attr:`BayesLoRALayer.shift` (a :class:`LowRankDelta` or None) adds ``scaling · (x Aᵀ) Bᵀ``
to whatever the delta gives: a task subspace's term (``models/subspace.py``), never formed densely.

Works for ``torch.nn.Linear`` (weight ``[out, in]``) and GPT-2's ``Conv1D`` (weight ``[in, out]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .factored import FactorValue, recomputed

__all__ = ["LowRankDelta", "BayesLoRALayer", "linear_shape", "is_linear"]


@dataclass(frozen=True)
class LowRankDelta:
    """ΔW = scaling · B @ A with ``A: [rank, in]``, ``B: [out, rank]``; ``dropout`` p drops the adapted
    path's inputs (``y = base(x) + scaling · B A dropout_p(x)``; 0: none)."""

    A: Tensor
    B: Tensor
    scaling: float
    dropout: float = 0.0

    def dense(self) -> Tensor:
        return self.scaling * (self.B @ self.A)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_linear(module):  # Conv1D: weight [in, out]
        n_in, n_out = module.weight.shape
        return n_out, n_in
    raise TypeError(f"{type(module).__name__} is not a linear module (nn.Linear or transformers Conv1D)")


class BayesLoRALayer(nn.Module):
    """``y = base(x) + x ΔWᵀ`` with ΔW set through :attr:`delta` (see module docstring; a dense ΔW
    runs as one matmul with the merged weight ``W0 + ΔW`` where that is exact)."""

    def __init__(self, base: nn.Module, name: str):
        super().__init__()
        self.base = base
        self.name = name
        self.out_features, self.in_features = linear_shape(base)
        self.delta: LowRankDelta | Tensor | None = None
        self.shift: LowRankDelta | None = None

    def forward(self, x: Tensor) -> Tensor:
        y = self._forward(x)
        shift = self.shift
        if shift is None:
            return y
        A, B = shift.A.to(x.dtype), shift.B.to(x.dtype)
        return y + shift.scaling * ((x @ A.transpose(0, 1)) @ B.transpose(0, 1))

    def _forward(self, x: Tensor) -> Tensor:
        delta = self.delta
        if delta is None:
            return self.base(x)
        if isinstance(delta, LowRankDelta):
            A, B = delta.A.to(x.dtype), delta.B.to(x.dtype)
            h = nn.functional.dropout(x, delta.dropout, training=True) if delta.dropout > 0 else x
            return self.base(x) + delta.scaling * ((h @ A.transpose(0, 1)) @ B.transpose(0, 1))
        if delta.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"ΔW for {self.name} must have shape {(self.out_features, self.in_features)}, got {tuple(delta.shape)}"
            )
        if isinstance(delta, FactorValue):
            value = delta
            if self._mergeable(x) and not torch.is_autocast_enabled(x.device.type) and not self._base_trains():
                return _MergedFactorLinear.apply(self, value, x, *value.tensors())
            if self._mergeable(x):  # the whole merged matmul recomputed (its input gradient needs W0 + ΔW)
                return recomputed(lambda h, *f: self._dense(h, value.dense_of(f)), x, *value.tensors())
            return self.base(x) + recomputed(lambda h, *f: h @ value.dense_of(f).to(h.dtype).transpose(0, 1),
                                             x, *value.tensors())
        return self._dense(x, delta)

    def _dense(self, x: Tensor, delta: Tensor) -> Tensor:
        """``y`` for a dense ΔW (module docstring)."""
        delta = delta.to(x.dtype)
        if not self._mergeable(x):
            return self.base(x) + x @ delta.transpose(0, 1)
        base = self.base
        if isinstance(base, nn.Linear):
            return nn.functional.linear(x, base.weight + delta, base.bias)
        weight = base.weight + delta.transpose(0, 1)  # Conv1D: y = x W + b with W [in, out]
        flat = x.reshape(-1, x.shape[-1])
        y = flat @ weight if base.bias is None else torch.addmm(base.bias, flat, weight)
        return y.view(*x.shape[:-1], self.out_features)

    def _base_trains(self) -> bool:
        return any(p.requires_grad for p in self.base.parameters(recurse=False))

    def _weight_out_in(self) -> Tensor:
        """W0 as ``[out, in]`` (a Conv1D keeps ``[in, out]``: its transpose, a view)."""
        weight = self.base.weight
        return weight if isinstance(self.base, nn.Linear) else weight.transpose(0, 1)

    def _mergeable(self, x: Tensor) -> bool:
        """Whether ``x (W0 + ΔW)ᵀ`` may replace ``base(x) + x ΔWᵀ`` (see the module docstring)."""
        base = self.base
        if x.dtype not in (torch.float32, torch.float64) or base.weight.dtype != x.dtype:
            return False
        if type(base) is not nn.Linear and type(base) is not _conv1d_type():
            return False  # a subclass (quantized, LoRA-wrapped, ...) may not compute x W0ᵀ + b
        return not (base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, in={self.in_features}, out={self.out_features}"


class _MergedFactorLinear(torch.autograd.Function):
    """``x (W0 + ΔW)ᵀ + b`` for a factor-backed ΔW (:class:`~abmll_pyro.lora.factored.FactorValue`),
    without autocast and with W0, b frozen. Forward runs without autograd and saves ``x`` and the
    factors; backward remakes ΔW from the factors (with autograd, ε replayed) and forms the two
    gradients the matmul has by hand, ``∂x = ȳ (W0 + ΔW)`` and ``∂ΔW = ȳᵀ x``, back-propagating the
    latter into the factors: the forward product is not run again (``recomputed`` would run it to
    differentiate it). Same values and gradients as ``recomputed`` to round-off."""

    @staticmethod
    def forward(ctx, layer: BayesLoRALayer, value: FactorValue, x: Tensor, *factors: Tensor) -> Tensor:
        ctx.layer, ctx.value = layer, value
        ctx.save_for_backward(x, *factors)
        return layer._dense(x, value.dense_of(factors))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, *factors = ctx.saved_tensors
        need_x, need = ctx.needs_input_grad[2], ctx.needs_input_grad[3:]
        leaves = [f.detach().requires_grad_(n) for f, n in zip(factors, need)]
        with torch.enable_grad():
            delta = ctx.value.dense_of(leaves)
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = None
        if need_x:
            weight = ctx.layer._weight_out_in() + delta.detach().to(x.dtype)
            grad_x = g.mm(weight).view(x.shape)
        wanted = [leaf for leaf, n in zip(leaves, need) if n]
        grads = iter(())
        if wanted:
            grad_delta = g.t().mm(x.reshape(-1, x.shape[-1])).to(delta.dtype)
            del g
            grads = iter(torch.autograd.grad(delta, wanted, grad_delta, allow_unused=True))
        return (None, None, grad_x, *(next(grads) if n else None for n in need))

