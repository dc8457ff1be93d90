"""Priors over one adapted module's weight perturbation: p(θ) and p(ΔW_i | θ).

Interface (:class:`TaskPrior`, three methods):

* ``hyperprior(shape, like)`` — p(θ): a dict of distributions, one per global site of the module
  (event shape ``shape`` = ``[out, in]``); empty when θ is not random (fixed prior).
* ``global_values(mean, std)`` — θ's point values (same keys), from the global factors' Gaussian
  (μ_θ, σ_θ); the guide puts a Delta on each, so the ELBO receives log p(θ) (ABML's MAP θ).
* ``task_distribution(theta, shape, like)`` — p(ΔW_i | θ), event shape ``shape``, given the dict of θ
  values (``like`` carries the dtype and device).

The hierarchical model and the meta-SVI loop use only these three methods.

The dense ``[out, in]`` distributions are built with ``validate_args=False``: their parameters come
from the adapter's factors (σ = std_map(·) > 0 by construction) and Pyro's argument and support
checks would add several dense passes per module and ELBO call; a non-finite value still surfaces
as a non-finite loss, which the inner and outer loops reject by name.
"""

from __future__ import annotations

import torch
from torch import Tensor

import pyro.distributions as dist

from ..lora.factored import FactorIndependent, normal

__all__ = ["TaskPrior", "HierarchicalPrior", "FixedPrior", "StudentTPrior"]

Shape = tuple[int, ...]

#: keyword arguments of every dense distribution here: no argument or support checks (module docstring)
UNCHECKED = {"validate_args": False}


def _const(value: float, like: Tensor) -> Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)


class TaskPrior:
    """Base class; see the module docstring for the contract."""

    def hyperprior(self, shape: Shape, like: Tensor) -> dict[str, dist.Distribution]:
        raise NotImplementedError

    def global_values(self, mean: Tensor, std: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def task_distribution(self, theta: dict[str, Tensor], shape: Shape, like: Tensor) -> dist.Distribution:
        raise NotImplementedError


class HierarchicalPrior(TaskPrior):
    """The paper's prior (docs/method.md): ΔW_i ~ N(μ_θ, 1/τ_θ) elementwise, with hyperprior
    μ_θ ~ N(0, ``mean_scale``²) and precision τ_θ = 1/σ_θ² ~ Gamma(``a0``, ``b0``) (rate b0).

    **Default: centred on the starting scale.** With ``b0=None`` the rate is derived,

        b0 = (a0 − 1) · init_std²,   so   mode(τ) = (a0 − 1) / b0 = 1 / init_std²,

    the *mode* (not the mean, which is a0/b0): θ is a MAP point estimate and its precision enters
    as a density on τ without a Jacobian (ABML's MAP θ), so the hyperprior alone holds σ_θ at
    ``init_std`` instead of pushing it anywhere. ``init_std`` comes from the argument, else from
    ``adapter.config.init_std`` (the registry passes the adapter), else AdapterConfig's default 1e-3.

    **Width** (``a0``, default 2): as a function of u = log τ the log density is
    (a0 − 1)·u − b0·e^u + const, with curvature −(a0 − 1) at the mode, so (Laplace) the prior's
    standard deviation of log τ is 1/√(a0 − 1) and of log σ_θ is 1/(2√(a0 − 1)): a0 = 2 lets σ_θ
    range over about ×e^±0.5 at one standard deviation; larger a0 tightens it.

    **ABML's prior** (N(0, 1), Gamma(1, 0.01); mode at τ = 0, so its MAP inflates σ_θ without bound):
    pass ``b0`` explicitly, or use :meth:`abml` (registered as ``"hierarchical-abml"``).
    """

    DEFAULT_A0 = 2.0
    DEFAULT_INIT_STD = 1e-3  # AdapterConfig.init_std's default

    def __init__(self, mean_scale: float = 1.0, a0: float = DEFAULT_A0, b0: float | None = None,
                 init_std: float | None = None, adapter=None):
        if not mean_scale > 0:
            raise ValueError(f"mean_scale must be > 0, got {mean_scale!r}")
        # centred on AdapterConfig's default scale only because nothing said otherwise: MetaSVI re-centres
        # it on its adapter's init_std (:meth:`for_adapter`)
        self.centre_defaulted = b0 is None and init_std is None and getattr(adapter, "config", None) is None
        self._args = dict(mean_scale=mean_scale, a0=a0)
        if b0 is None:
            if not a0 > 1:
                raise ValueError(f"a0 must be > 1 for a prior centred on init_std (b0 derived), got {a0!r}; "
                                 f"pass b0 explicitly for a0 <= 1")
            if init_std is None:
                config = getattr(adapter, "config", None)
                init_std = getattr(config, "init_std", self.DEFAULT_INIT_STD)
            if not init_std > 0:
                raise ValueError(f"init_std must be > 0, got {init_std!r}")
            b0 = (a0 - 1.0) * float(init_std) ** 2
        for name, v in (("a0", a0), ("b0", b0)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")
        self.mean_scale, self.a0, self.b0 = float(mean_scale), float(a0), float(b0)

    def for_adapter(self, adapter) -> "HierarchicalPrior":
        """This prior, or, when it was built without ``init_std``, ``b0`` or an adapter (so centred on
        AdapterConfig's default scale), the same prior centred on ``adapter``'s ``init_std``."""
        if not self.centre_defaulted:
            return self
        return type(self)(**self._args, adapter=adapter)

    @classmethod
    def abml(cls, mean_scale: float = 1.0) -> "HierarchicalPrior":
        """ABML re-implementations' hyperprior: μ_θ ~ N(0, mean_scale²), τ_θ ~ Gamma(1, 0.01)."""
        return cls(mean_scale=mean_scale, a0=1.0, b0=0.01)

    @property
    def precision_mode(self) -> float:
        """argmax of the Gamma(a0, b0) density: (a0 − 1)/b0 (0 when a0 <= 1)."""
        return max(self.a0 - 1.0, 0.0) / self.b0

    def hyperprior(self, shape: Shape, like: Tensor) -> dict[str, dist.Distribution]:
        event = len(shape)  # FactorIndependent: ``.to_event(event)`` that also scores θ's factor-backed values
        return {
            "mean": FactorIndependent(dist.Normal(_const(0.0, like), _const(self.mean_scale, like), **UNCHECKED).expand(shape),
                                      event),
            "precision": FactorIndependent(dist.Gamma(_const(self.a0, like), _const(self.b0, like), **UNCHECKED).expand(shape),
                                           event),
        }

    def global_values(self, mean: Tensor, std: Tensor) -> dict[str, Tensor]:
        return {"mean": mean, "precision": std.pow(-2)}

    def task_distribution(self, theta: dict[str, Tensor], shape: Shape, like: Tensor) -> dist.Distribution:
        # a FactorNormal when θ's values are factor-backed (lora/factored.py): the same ops, made on demand
        return normal(theta["mean"], theta["precision"].rsqrt(), **UNCHECKED).to_event(len(shape))

    def __repr__(self) -> str:
        return f"HierarchicalPrior(mean_scale={self.mean_scale:g}, a0={self.a0:g}, b0={self.b0:g})"


class FixedPrior(TaskPrior):
    """ΔW_i ~ N(0, ``scale``²) elementwise; θ is not random (no hyperprior, no learned prior scale).

    The ablation of the hierarchy: the global factors still give every task its starting point.
    """

    def __init__(self, scale: float = 1e-2):
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.scale = float(scale)

    def hyperprior(self, shape: Shape, like: Tensor) -> dict[str, dist.Distribution]:
        return {}

    def global_values(self, mean: Tensor, std: Tensor) -> dict[str, Tensor]:
        return {}

    def task_distribution(self, theta: dict[str, Tensor], shape: Shape, like: Tensor) -> dist.Distribution:
        zero = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return dist.Normal(zero, _const(self.scale, like), **UNCHECKED).to_event(len(shape))

    def __repr__(self) -> str:
        return f"FixedPrior(scale={self.scale:g})"


class StudentTPrior(HierarchicalPrior):
    """Heavy-tailed: ΔW_i ~ StudentT(``df``, μ_θ, 1/√τ_θ) elementwise, same hyperprior as the
    hierarchical prior. KL(Normal ‖ StudentT) has no closed form, so TraceMeanField_ELBO falls back
    to its Monte Carlo estimate (as Trace_ELBO does)."""

    def __init__(self, df: float = 3.0, adapter=None, **kwargs: float):
        super().__init__(adapter=adapter, **kwargs)
        if not df > 0:
            raise ValueError(f"df must be > 0, got {df!r}")
        self.df = float(df)
        self._args = {**self._args, "df": df}

    def task_distribution(self, theta: dict[str, Tensor], shape: Shape, like: Tensor) -> dist.Distribution:
        loc = theta["mean"]
        return dist.StudentT(_const(self.df, loc), loc, theta["precision"].rsqrt(), **UNCHECKED).to_event(len(shape))

    def __repr__(self) -> str:
        return f"StudentTPrior(df={self.df:g}, mean_scale={self.mean_scale:g}, a0={self.a0:g}, b0={self.b0:g})"
