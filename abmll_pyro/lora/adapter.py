"""Attach Bayesian LoRA adapters to a Hugging Face causal LM, hold the global factors θ, detach.

For every adapted module m (weight W0: ``[out, in]``, frozen) there are two LoRA pairs of global
factors (θ) — the mean pair (``mu_A: [r, in]``, ``mu_B: [out, r]``) and the scale pair (``sigma_A``,
``sigma_B``) — giving the dense Gaussian

    μ_m = (lora_alpha / r) · mu_B @ mu_A,      σ_m = std_map(sigma_B @ sigma_A).

A task's factors (φ_i's variational parameters) are plain tensors with the same keys and shapes
(two more pairs: four pairs per module in all); they live only while a task is processed.

With a free log-scale map (``std_map: "log-rowcol"`` / ``"log-full"``,
:class:`~abmll_pyro.lora.positivity.LogStd`) the scale pair is replaced by that map's factors
(``sigma_log0``, ``sigma_row``, ``sigma_col``, or ``sigma_log``): :attr:`BayesLoRA.factor_kinds`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from .factored import FactorGaussian, FactorValue, factor_backed_active
from .layer import BayesLoRALayer, LowRankDelta, is_linear
from .noise import NormalSample
from .positivity import AbsStd, LogStd, SoftplusStd, StdMap

__all__ = ["BayesLoRA", "FACTOR_KINDS", "DEFAULT_TARGETS"]

FACTOR_KINDS = ("mu_A", "mu_B", "sigma_A", "sigma_B")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {"gpt2": ("c_attn",)}
FALLBACK_TARGETS = ("q_proj", "v_proj")

Params = Mapping[str, Tensor]
Delta = LowRankDelta | Tensor | None


def full_precision(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it already is: KL and prior terms never run in bf16/fp16."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def no_autocast(x: Tensor):
    """A block in which ``x``'s device runs no autocast: the factor products (μ = B A, σ's B_σ A_σ), the
    KL and prior terms built from them stay in float32/float64 while the LM runs under bf16/fp16
    autocast (autocast would otherwise run their matmuls in the low precision)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _safe(name: str) -> str:
    return name.replace(".", "-")


def _std_map(config: AdapterConfig) -> StdMap:
    if config.std_map == "paper":
        return AbsStd(config.std_floor, init_std=config.init_std)
    if config.std_map.startswith("log-"):
        return LogStd(config.init_std, config.std_floor, structure=config.std_map[len("log-"):])
    return SoftplusStd(config.init_std, config.std_floor)


class BayesLoRA(nn.Module):
    """Bayesian LoRA over the chosen linear modules of ``lm``; its parameters are θ's factors only.

    The LM is not a submodule: ``state_dict()`` holds the adapter factors alone.
    """

    def __init__(self, lm: nn.Module, config: AdapterConfig | None = None, generator: torch.Generator | None = None):
        super().__init__()
        config = config or AdapterConfig()
        self.config = config
        self.__dict__["lm"] = lm
        self.std_map = _std_map(config)
        targets = config.target_modules or DEFAULT_TARGETS.get(getattr(getattr(lm, "config", None), "model_type", ""), FALLBACK_TARGETS)
        self.targets = tuple(targets)
        found = self._find(lm, self.targets)
        for p in lm.parameters():
            p.requires_grad_(False)
        self.layers: dict[str, BayesLoRALayer] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.factors = nn.ParameterDict()
        device = next(lm.parameters()).device
        if found:  # before anything is allocated: a rank beyond a module's size adds nothing
            name, module = min(found, key=lambda nm: min(nm[1].weight.shape))
            smallest = min(module.weight.shape)
            if config.rank > smallest:
                raise ValueError(f"rank={config.rank} exceeds the smaller dimension ({smallest}) of adapted module "
                                 f"{name} {tuple(module.weight.shape)}; the limit for this model is rank <= {smallest}")
        for name, module in found:
            layer = BayesLoRALayer(module, name)
            self._replace(lm, name, layer)
            self.layers[name] = layer
            self.shapes[name] = (layer.out_features, layer.in_features)
            for kind, value in self._init_factors(layer, config.rank, generator, self.std_map).items():
                self.factors[self.key(name, kind)] = nn.Parameter(value.to(device))

    # ----------------------------------------------------------------- discovery and surgery
    @staticmethod
    def _find(lm: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
        linear = [(n, m) for n, m in lm.named_modules() if n and is_linear(m)]
        if any(isinstance(m, BayesLoRALayer) for _, m in lm.named_modules()):
            raise ValueError("this model already carries Bayesian LoRA layers; detach() them first")
        found = [(n, m) for n, m in linear if n.split(".")[-1] in targets or n in targets]
        matched = {t for t in targets for n, _ in found if n.split(".")[-1] == t or n == t}
        missing = [t for t in targets if t not in matched]
        if missing:
            suffixes = sorted({n.split(".")[-1] for n, _ in linear})
            raise ValueError(
                f"target module(s) {missing} match no linear module of {type(lm).__name__}; "
                f"its linear modules are named {suffixes}"
            )
        return found

    @staticmethod
    def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, new)

    @staticmethod
    def _init_factors(layer: BayesLoRALayer, rank: int, generator: torch.Generator | None,
                      std_map: StdMap | None = None) -> dict[str, Tensor]:
        """A_μ ~ U(±1/√in) (LoRA's Kaiming-uniform); B_μ = 0 (μ = 0); the scale factors from
        ``std_map.init_factors`` (the low-rank maps: A_σ drawn like A_μ, B_σ = ``init_B(A_σ)`` — zeros
        for softplus, whose σ(0) = init_std, non-zero for the abs map; the log maps: zeros)."""
        std_map = std_map or SoftplusStd()
        bound = 1.0 / math.sqrt(layer.in_features)
        a = torch.empty(rank, layer.in_features, dtype=torch.float32)
        out = {"mu_A": a.uniform_(-bound, bound, generator=generator),
               "mu_B": torch.zeros(layer.out_features, rank, dtype=torch.float32)}
        out.update(std_map.init_factors(layer.out_features, layer.in_features, rank, generator))
        return out

    def detach(self) -> nn.Module:
        """Put the original modules back and return the LM (this adapter is unusable afterwards)."""
        for name, layer in self.layers.items():
            self._replace(self.lm, name, layer.base)
        self.layers = {}
        return self.lm

    # ----------------------------------------------------------------- factors -> Gaussian
    @property
    def factor_kinds(self) -> tuple[str, ...]:
        """The factor kinds of every module: the mean pair, then the std map's scale factors."""
        return ("mu_A", "mu_B") + tuple(self.std_map.kinds)

    @property
    def row_kinds(self) -> tuple[str, ...]:
        """The factor kinds whose first dimension is the module's output row (``mu_B`` and the std
        map's): rows ``r0:r1`` of μ and σ are :meth:`mean` and :meth:`std` of these sliced."""
        return ("mu_B",) + tuple(self.std_map.row_kinds)

    @property
    def module_names(self) -> list[str]:
        return list(self.shapes)

    @staticmethod
    def key(module: str, kind: str) -> str:
        return f"{_safe(module)}:{kind}"

    def global_params(self) -> dict[str, Tensor]:
        """θ's factors, keyed like task factors (the live ``nn.Parameter`` objects)."""
        return dict(self.factors.items())

    def mean(self, params: Params, module: str) -> Tensor:
        """μ = (α/r)·B_μ A_μ, ``[out, in]``, float32 or float64 (whatever the LM's dtype); the scaling
        multiplies the ``[out, r]`` factor, not the dense product (exact when α/r is a power of 2)."""
        B, A = params[self.key(module, "mu_B")], params[self.key(module, "mu_A")]
        with no_autocast(B):
            return (self.config.scaling * full_precision(B)) @ full_precision(A)

    def std(self, params: Params, module: str) -> Tensor:
        """σ = std_map(B_σ A_σ) (or the log map's σ of its factors), ``[out, in]``, float32 or float64."""
        factors = self.scale_factors(params, module)
        with no_autocast(next(iter(factors.values()))):
            return self.std_map.std_of(factors)

    def moments(self, params: Params, module: str) -> tuple[Tensor | FactorValue, Tensor | FactorValue]:
        """``(μ, σ)`` of :meth:`mean` and :meth:`std`; within
        :func:`~abmll_pyro.lora.factored.factor_backed`, lazy :class:`~abmll_pyro.lora.factored.FactorValue` objects
        over the module's factors (no dense tensor is made)."""
        if factor_backed_active():
            gaussian = FactorGaussian(self, module, params)
            return FactorValue(gaussian, "mean"), FactorValue(gaussian, "std")
        return self.mean(params, module), self.std(params, module)

    def scale_factors(self, params: Params, module: str) -> dict[str, Tensor]:
        """The module's scale factors keyed by kind, in float32 or float64."""
        return {kind: full_precision(params[self.key(module, kind)]) for kind in self.std_map.kinds}

    def mean_deltas(self, params: Params) -> dict[str, LowRankDelta]:
        """Mean-mode perturbations, low rank (ΔW is never formed)."""
        return {
            m: LowRankDelta(params[self.key(m, "mu_A")], params[self.key(m, "mu_B")], self.config.scaling)
            for m in self.shapes
        }

    def sample_deltas(self, params: Params, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One reparameterized draw ΔW = μ + σ ⊙ ε per module (outside Pyro, e.g. for ad-hoc use)."""
        out = {}
        for m, shape in self.shapes.items():
            out[m] = NormalSample.apply(self.mean(params, m), self.std(params, m), generator)
        return out

    # ----------------------------------------------------------------- forward modes
    def use(self, deltas: Mapping[str, Delta]) -> Iterator[None]:
        """Within the block, module m adds ``deltas[m]`` (dense ΔW, :class:`LowRankDelta` or None)."""
        return self._set("delta", deltas)

    def shifted(self, shifts: Mapping[str, LowRankDelta | None]) -> Iterator[None]:
        """Within the block, module m also adds ``shifts[m]`` (a :class:`LowRankDelta` or None) to what
        its delta gives: a task subspace's term (:class:`~abmll_pyro.models.subspace.TaskSubspace`)."""
        return self._set("shift", shifts)

    @contextmanager
    def _set(self, attribute: str, values: Mapping[str, object]) -> Iterator[None]:
        """Within the block, each named layer's ``attribute`` is ``values[m]``; restored afterwards."""
        unknown = set(values) - set(self.layers)
        if unknown:
            raise KeyError(f"no adapted module named {sorted(unknown)}; adapted: {self.module_names}")
        previous = {m: getattr(self.layers[m], attribute) for m in values}
        try:
            for m, value in values.items():
                setattr(self.layers[m], attribute, value)
            yield
        finally:
            for m, value in previous.items():
                setattr(self.layers[m], attribute, value)

    @contextmanager
    def off(self) -> Iterator[None]:
        """The base model: every adapter off (deltas and shifts)."""
        with self.use({m: None for m in self.layers}), self.shifted({m: None for m in self.layers}):
            yield

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
