"""The Bayesian LoRA layer: a frozen base linear map plus an externally supplied perturbation ΔW.

The layer holds no adapter parameters and does no sampling or KL: what it adds is set from outside
(by :class:`~abmll_pyro.lora.adapter.BayesLoRA`) as one of

* ``None`` — off: exactly the base module;
* :class:`LowRankDelta` — mean mode: ``y += scaling · (x Aᵀ) Bᵀ`` without forming ΔW;
* a dense ``[out, in]`` tensor — sampled mode: ``y += x ΔWᵀ`` (a reparameterized sample of ΔW).

Works for ``torch.nn.Linear`` (weight ``[out, in]``) and GPT-2's ``Conv1D`` (weight ``[in, out]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["LowRankDelta", "BayesLoRALayer", "linear_shape", "is_linear"]


@dataclass(frozen=True)
class LowRankDelta:
    """ΔW = scaling · B @ A with ``A: [rank, in]``, ``B: [out, rank]``."""

    A: Tensor
    B: Tensor
    scaling: float

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
    """``y = base(x) + x ΔWᵀ`` with ΔW set through :attr:`delta` (see module docstring)."""

    def __init__(self, base: nn.Module, name: str):
        super().__init__()
        self.base = base
        self.name = name
        self.out_features, self.in_features = linear_shape(base)
        self.delta: LowRankDelta | Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        delta = self.delta
        if delta is None:
            return y
        if isinstance(delta, LowRankDelta):
            A, B = delta.A.to(x.dtype), delta.B.to(x.dtype)
            return y + delta.scaling * ((x @ A.transpose(0, 1)) @ B.transpose(0, 1))
        if delta.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"ΔW for {self.name} must have shape {(self.out_features, self.in_features)}, got {tuple(delta.shape)}"
            )
        return y + x @ delta.to(x.dtype).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, in={self.in_features}, out={self.out_features}"
