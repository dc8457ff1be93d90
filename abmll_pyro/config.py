"""Validated settings. One name, one meaning: ``kl_beta`` (never a bare ``beta``), ``num_inner_steps``,
``inner_lr``, ``outer_lr``, ``rank``, ``lora_alpha``.

Every check names the offending value. The CLI and config files build these dataclasses; library code
takes them (or plain objects) as arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

__all__ = ["AdapterConfig", "InnerLoopConfig", "MetaConfig", "PAPER_STD_FLOOR", "DTYPE_NAMES", "MIXED_PRECISION_NAMES",
           "dtype_name", "mixed_precision_name"]

PAPER_STD_FLOOR = math.exp(-20.0)
# sanity limits, checked before anything is allocated (far above any useful value)
MAX_RANK = 4096
MAX_INIT_STD = 10.0
MAX_SCALING = 1e6
STD_MAPS = ("softplus", "paper", "log-rowcol", "log-full")
INNER_OPTIMIZERS = ("sgd", "adam", "kl-precond", "adam-precond")


# One vocabulary of floating-point precisions for --dtype, --mixed-precision and their config keys: every
# spelling -> the torch name. ``dtype`` stores the torch name; ``mixed_precision`` stores Accelerate's.
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}
_ACCELERATE = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}  # Accelerator(mixed_precision=...)
#: ``mixed_precision``'s spellings: ``no`` (or ``none``, or a float32 spelling: no autocast) and the half precisions
MIXED_PRECISION_NAMES = ("no", "none", *DTYPE_NAMES)


def dtype_name(value: str, key: str = "dtype") -> str:
    """The torch name (``float32``, ``bfloat16``, ``float16``) of any spelling in :data:`DTYPE_NAMES`;
    another value is a ``ValueError`` naming ``key`` and the spellings allowed."""
    if not isinstance(value, str) or value not in DTYPE_NAMES:
        raise ValueError(f"{key} must be one of {list(DTYPE_NAMES)}, got {value!r}")
    return DTYPE_NAMES[value]


def mixed_precision_name(value: str, key: str = "mixed_precision") -> str:
    """Accelerate's name (``no``, ``bf16``, ``fp16``) of any spelling in :data:`MIXED_PRECISION_NAMES`
    (``fp32``/``float32`` mean no autocast, as ``no`` and ``none`` do)."""
    if not isinstance(value, str) or value not in MIXED_PRECISION_NAMES:
        raise ValueError(f"{key} must be one of {list(MIXED_PRECISION_NAMES)}, got {value!r}")
    return "no" if value in ("no", "none") else _ACCELERATE[DTYPE_NAMES[value]]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class AdapterConfig:
    """Which modules get a Bayesian LoRA adapter and how it is factorized.

    ΔW ~ N(μ, σ²) elementwise with μ = (lora_alpha / rank)·B_μ A_μ and σ = std_map(B_σ A_σ).
    ``target_modules=None`` picks a per-architecture default (``q_proj``, ``v_proj``; GPT-2: ``c_attn``).
    ``std_map`` is ``"softplus"`` (default: σ = floor + softplus(B_σ A_σ + ρ), σ = ``init_std`` at B = 0)
    or ``"paper"`` (σ = |B_σ A_σ| + floor, the paper's "+cI" read elementwise; B_σ starts non-zero so
    the mean σ is ``init_std`` and |·| has a gradient, see :class:`~abmll_pyro.lora.positivity.AbsStd`),
    or a free log-scale (:class:`~abmll_pyro.lora.positivity.LogStd`): ``"log-rowcol"`` (log σ_jk =
    log init_std + s_0 + r_j + c_k) or ``"log-full"`` (one free log σ per element).
    """

    rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] | None = None
    std_map: str = "softplus"
    init_std: float = 1e-3
    std_floor: float = PAPER_STD_FLOOR

    def __post_init__(self) -> None:
        _check(isinstance(self.rank, int) and self.rank >= 1, f"rank must be an integer >= 1, got {self.rank!r}")
        _check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        _check(self.std_map in STD_MAPS, f"std_map must be one of {list(STD_MAPS)}, got {self.std_map!r}")
        _check(self.std_floor > 0, f"std_floor must be > 0, got {self.std_floor!r}")
        _check(self.init_std > self.std_floor, f"init_std must exceed std_floor={self.std_floor:g}, got {self.init_std!r}")
        _check(self.init_std <= MAX_INIT_STD, f"init_std must be <= {MAX_INIT_STD:g} (the limit: a standard deviation "
                                              f"of ΔW's entries), got {self.init_std!r}")
        _check(self.rank <= MAX_RANK, f"rank must be <= {MAX_RANK} (the limit), got {self.rank!r}")
        _check(math.isfinite(self.lora_alpha) and self.lora_alpha / self.rank <= MAX_SCALING,
               f"lora_alpha / rank must be <= {MAX_SCALING:g} (the limit), got {self.lora_alpha!r} / {self.rank}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                object.__setattr__(self, "target_modules", (self.target_modules,))
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            _check(len(self.target_modules) > 0, "target_modules must name at least one module (or be None)")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank


@dataclass(frozen=True)
class InnerLoopConfig:
    """The inner loop: ``num_inner_steps`` steps of ``optimizer`` on a task's β-ELBO, θ fixed.

    ``order``: ``"first"`` (default; no second-order terms, nothing kept after a task) or ``"second"``
    (differentiate through the inner loop; small models only). ``pass_through``: in first order, let the
    task factors' gradient reach θ (FOMAML style); off, θ learns only through the KL and hyperprior.
    ``subsample_size``: support examples per inner step (None: all).
    ``optimizer``: ``"adam"`` (default), ``"sgd"``, ``"kl-precond"`` — SGD preconditioned by the
    β-KL's Gauss–Newton curvature (block-diagonal over the rank) — or ``"adam-precond"`` — Adam
    preconditioned the same way: Adam where the KL is flat, the KL's Newton step where it is stiff
    (plain Adam's ~lr-sized steps put a floor of about n·(step/σ)²/2 under the KL that β cannot lower;
    docs/posterior.md). Methods without a KL (LoRA, Reptile, Structured LoRA) run them as SGD / Adam.
    ``adam_eps``: Adam's ε (:func:`~abmll_pyro.infer.inner.inner_loop`); elements whose gradient is
    below it take SGD-like steps instead of full ±lr ones (docs/RESULTS.md, "round-off").
    """

    num_inner_steps: int = 5
    inner_lr: float = 1e-3
    optimizer: str = "adam"
    order: str = "first"
    pass_through: bool = True
    subsample_size: int | None = None
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        _check(self.adam_eps > 0 and math.isfinite(self.adam_eps), f"inner adam_eps must be finite and > 0, got {self.adam_eps!r}")
        _check(isinstance(self.num_inner_steps, int) and self.num_inner_steps >= 0,
               f"num_inner_steps must be an integer >= 0, got {self.num_inner_steps!r}")
        _check(self.inner_lr >= 0 and math.isfinite(self.inner_lr), f"inner_lr must be finite and >= 0, got {self.inner_lr!r}")
        _check(self.optimizer in INNER_OPTIMIZERS,
               f"optimizer must be one of {list(INNER_OPTIMIZERS)}, got {self.optimizer!r}")
        _check(self.order in ("first", "second"), f"order must be 'first' or 'second', got {self.order!r}")
        _check(self.subsample_size is None or self.subsample_size >= 1,
               f"subsample_size must be >= 1 or None, got {self.subsample_size!r}")


OUTER_KL = ("prior", "pass-through")


@dataclass(frozen=True)
class MetaConfig:
    """The outer (meta) loop and the tempered objective.

    Per task: E_q[log p(D_i | φ_i)] − kl_beta·KL(q(φ_i) || p(φ_i | θ)); globally: + kl_gamma·log p(θ).
    ``kl_gamma=None`` means kl_gamma = kl_beta (docs/method.md). ``query_subsample_size``: query examples
    per outer step and task (None: all). ``grad_clip``: max global grad norm (None: off).

    ``outer_kl`` — how θ's gradient of the query β-ELBO's KL term is taken in first order:

    * ``"prior"`` (default): with the task posterior q(φ_i) held fixed, so θ enters the KL only as
      the prior's parameters: the empirical-Bayes M-step, ∂/∂μ_θ = β(μ_θ − μ_q)/σ_θ² (θ's mean moves
      toward the tasks' posterior means, σ_θ toward their spread); the likelihood term still reaches θ
      through the pass-through (FOMAML).
    * ``"pass-through"``: q's factors carry θ's gradient too (λ' = λᴷ + θ − sg(θ)). For the mean of a
      Gaussian KL this cancels the M-step exactly in ΔW-space, leaving only the bilinear cross term
      β/σ²·(μ_q − μ_θ)(A_q − A_θ)ᵀ of the factorization: measured on SmolLM2 as large as the query
      NLL's gradient and opposed to it (docs/RESULTS.md). The behaviour before this option existed.

    ``scale_optimizer`` — how θ's scale factors (σ_θ) step: ``"adam"`` (default) with the other
    factors, or ``"sgd"``: plain gradient steps of size ``scale_lr`` (default ``outer_lr``), following
    the outer learning rate's schedule. Adam moves every factor by about its learning rate per step
    whatever the gradient's size, so a small consistent bias in the M-step's target (the tasks'
    E_q(ΔW − μ_θ)² against σ_θ²) drives σ_θ at full speed; an SGD step is proportional to the gap and
    changes sign at the fixed point (docs/posterior.md).

    Second order differentiates the whole loss through the inner steps and ignores this setting (the
    preconditioned inner steps' curvature is treated as a constant there, so it is exact for SGD and
    Adam only).

    With a task subspace (:class:`~abmll_pyro.models.subspace.TaskSubspace`): ``subspace_beta`` weights
    the KL of its coordinates z_i (default 1: the ELBO's own weight, whatever ``kl_beta`` is for ΔW),
    ``subspace_inner_lr`` is the damping of the inner loop's Newton step for q(z_i)'s parameters
    (:meth:`~abmll_pyro.models.subspace.TaskSubspace.newton_step`; 1 is a full step; default 0.5) — and
    ``subspace_scale_lr`` the outer Adam's for its log-scales (default ``outer_lr``; 0 keeps s at its
    start: a scale chosen on dev tasks instead of by empirical Bayes). Without a subspace they are
    unused.
    """

    kl_beta: float = 1e-8
    kl_gamma: float | None = None
    outer_lr: float = 1e-3
    tasks_per_step: int = 2
    grad_clip: float | None = 1.0
    query_subsample_size: int | None = None
    outer_kl: str = "prior"
    inner: InnerLoopConfig = field(default_factory=InnerLoopConfig)
    scale_optimizer: str = "adam"
    scale_lr: float | None = None
    subspace_beta: float = 1.0
    subspace_inner_lr: float = 0.5
    subspace_scale_lr: float | None = None

    def __post_init__(self) -> None:
        _check(math.isfinite(self.kl_beta) and self.kl_beta >= 0, f"kl_beta must be finite and >= 0, got {self.kl_beta!r}")
        if self.kl_gamma is not None:
            _check(math.isfinite(self.kl_gamma) and self.kl_gamma >= 0,
                   f"kl_gamma must be finite and >= 0, got {self.kl_gamma!r}")
        _check(self.outer_lr > 0, f"outer_lr must be > 0, got {self.outer_lr!r}")
        _check(isinstance(self.tasks_per_step, int) and self.tasks_per_step >= 1,
               f"tasks_per_step must be an integer >= 1, got {self.tasks_per_step!r}")
        _check(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        _check(self.query_subsample_size is None or self.query_subsample_size >= 1,
               f"query_subsample_size must be >= 1 or None, got {self.query_subsample_size!r}")
        _check(self.outer_kl in OUTER_KL, f"outer_kl must be one of {list(OUTER_KL)}, got {self.outer_kl!r}")
        _check(self.scale_optimizer in ("adam", "sgd"),
               f"scale_optimizer must be one of ['adam', 'sgd'], got {self.scale_optimizer!r}")
        _check(self.scale_lr is None or (math.isfinite(self.scale_lr) and self.scale_lr > 0),
               f"scale_lr must be > 0 or None, got {self.scale_lr!r}")
        _check(math.isfinite(self.subspace_beta) and self.subspace_beta >= 0,
               f"subspace_beta must be finite and >= 0, got {self.subspace_beta!r}")
        _check(math.isfinite(self.subspace_inner_lr) and self.subspace_inner_lr > 0,
               f"subspace_inner_lr must be finite and > 0, got {self.subspace_inner_lr!r}")
        _check(self.subspace_scale_lr is None or (math.isfinite(self.subspace_scale_lr) and self.subspace_scale_lr >= 0),
               f"subspace_scale_lr must be >= 0 or None, got {self.subspace_scale_lr!r}")

    @property
    def gamma(self) -> float:
        """The effective kl_gamma (kl_beta when unset)."""
        return self.kl_beta if self.kl_gamma is None else self.kl_gamma

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}
