"""The inner loop as a pure function of explicit parameters (NumPyro/learn2learn style).

``inner_loop(loss_fn, start, ...)`` runs K steps of SGD or Adam on ``loss_fn(params)`` and returns the
refined parameters. Nothing is stored anywhere: the optimizer state lives in local variables and is
gone when the function returns.

* first order (``create_graph=False``): the start is detached; every step's result is detached; the
  caller decides how gradients reach θ (see :func:`pass_through`).
* second order (``create_graph=True``): the start keeps its history and every update is differentiable,
  so ∂(result)/∂θ is exact (memory grows with K: small models only). The steps then run under
  :func:`twice_differentiable` (attention through the math SDPA kernel, whose backward is itself
  differentiable, unlike the fused CPU/flash kernels; the fused KL keeping its inputs).

Optimizers: ``"sgd"`` (p ← p − lr·g), ``"adam"``, and the two preconditioned by a curvature H(p) ≥ 0
of the stiff part of the loss (the β-KL, block-diagonal over the rank, see
:mod:`abmll_pyro.infer.kl_curvature`), p ← p − (I + D·H)⁻¹·D·d:

* ``"kl-precond"``: SGD's D = lr, d = g: a damped Newton step where H ≫ 1/lr, plain SGD where
  H ≪ 1/lr (H = 0, or no ``curvature``: exactly SGD);
* ``"adam-precond"``: Adam's per-element step size D = lr/√(v̂ + ε²) on the current gradient d = g
  (no momentum: a momentum carried over from the stiff KL's earlier, larger gradients overshoots its
  minimum, measured): where the KL is stiff (D·H ≫ 1) the step is the KL's Newton step (no
  oscillation around its minimum, so the inner loop optimizes the β-ELBO at any β), elsewhere
  RMSprop-like (no curvature: exactly Adam, momentum included).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..lora.noise import differentiable_twice
from .kl_curvature import precondition

__all__ = ["inner_loop", "pass_through", "twice_differentiable", "NonFiniteLossError", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adam", "kl-precond", "adam-precond")
PRECONDITIONED = ("kl-precond", "adam-precond")

Params = dict[str, Tensor]

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names where and the value."""


def _check_finite(loss: Tensor, where: str) -> None:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{where}: loss is {value} (check lr, kl_beta and the data)")


def inner_loop(
    loss_fn: Callable[[Params], Tensor],
    start: Mapping[str, Tensor],
    num_steps: int,
    lr: float,
    optimizer: str = "adam",
    create_graph: bool = False,
    curvature: Callable[[Params], Mapping[str, object]] | None = None,
    adam_eps: float = _ADAM_EPS,
    frozen: frozenset[str] | set[str] = frozenset(),
    custom_step: Callable[[Params, Mapping[str, Tensor]], Mapping[str, Tensor]] | None = None,
) -> Params:
    """Return the parameters after ``num_steps`` steps on ``loss_fn`` from ``start``.

    Adam keeps ε inside the square root, √(v̂ + ε²), so it stays differentiable at v = 0 (second order).
    ``adam_eps`` (ε, default 1e-8): Adam's first step is ``lr · g/√(g² + ε²)``, i.e. a full ±lr step for
    every element with ``|g| ≫ ε`` — also for one whose gradient is round-off around zero. A larger ε
    makes elements with ``|g| ≲ ε`` take proportionally small (SGD-like, lr/ε) steps instead.
    ``curvature(params)`` (``"kl-precond"``, ``"adam-precond"``): per-key curvature (a tensor of the
    factor's shape, or :class:`~abmll_pyro.infer.kl_curvature.RankBlocks`), treated as a constant (no
    gradient through it). Zero steps return ``start`` itself (values unchanged; detached
    in first order). ``frozen``: keys carried through unchanged (with their history, so a first-order
    pass-through still routes their gradient to what produced them), e.g. a guide's copy of θ.
    ``custom_step(params, grads)``: the new values of the keys it returns, from the current parameters
    and the gradients of every key; those keys skip the optimizer (e.g. a task subspace's Newton step,
    :meth:`~abmll_pyro.models.subspace.TaskSubspace.newton_step`).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if not (adam_eps > 0 and math.isfinite(adam_eps)):
        raise ValueError(f"adam_eps must be finite and > 0, got {adam_eps!r}")
    keys = [k for k in start if k not in frozen]
    params = dict(start) if create_graph else {k: (v.detach() if k in frozen else v.detach().requires_grad_(True))
                                               for k, v in start.items()}
    adam = optimizer in ("adam", "adam-precond")
    m = {k: torch.zeros_like(v) for k, v in params.items()} if adam else {}
    v2 = {k: torch.zeros_like(v) for k, v in params.items()} if adam else {}
    b1, b2 = _ADAM_BETAS
    for t in range(1, num_steps + 1):
        curv = curvature(params) if optimizer in PRECONDITIONED and curvature is not None else {}
        with twice_differentiable() if create_graph else nullcontext():
            loss = loss_fn(params)
            _check_finite(loss, f"inner step {t}")
            grads = torch.autograd.grad(loss, [params[k] for k in keys], create_graph=create_graph, allow_unused=True)
        new = {k: params[k] for k in frozen if k in params}
        if custom_step is not None:
            new.update(custom_step(params, {k: g for k, g in zip(keys, grads) if g is not None}))
        for k, g in zip(keys, grads):
            if k in new:
                continue
            p = params[k]
            if g is None:  # the loss does not depend on this factor (e.g. σ under a point-mass guide)
                new[k] = p
                continue
            h = curv.get(k)
            if optimizer == "sgd" or (optimizer == "kl-precond" and h is None):
                new[k] = p - lr * g
            elif optimizer == "kl-precond":
                new[k] = p - precondition(g, lr, h)
            else:
                m[k] = b1 * m[k] + (1 - b1) * g
                v2[k] = b2 * v2[k] + (1 - b2) * g * g
                m_hat, v_hat = m[k] / (1 - b1**t), v2[k] / (1 - b2**t)
                root = (v_hat + adam_eps**2).sqrt()
                new[k] = p - lr * (m_hat / root) if h is None else p - precondition(g, lr / root, h)
        params = new if create_graph else {k: (v if k in frozen else v.detach().requires_grad_(True)) for k, v in new.items()}
    return params


@contextmanager
def twice_differentiable() -> Iterator[None]:
    """Forward passes whose backward can itself be differentiated: the math SDPA backend (the
    default fused kernels implement no double backward) and the fused KL keeping its inputs."""
    with sdpa_kernel([SDPBackend.MATH]), differentiable_twice():
        yield


def pass_through(refined: Mapping[str, Tensor], start: Mapping[str, Tensor]) -> Params:
    """First-order pass-through: the values of ``refined`` with the gradient path of ``start``.

    ``refined.detach() + start − start.detach()``: forward it equals ``refined``; backward,
    ∂L/∂start = ∂L/∂refined (the FOMAML approximation d refined / d start ≈ I).
    """
    return {k: refined[k].detach() + (start[k] - start[k].detach()) for k in refined}
