"""θ's dense prior moments made once per inner loop, not at every inner step.

In the factor-backed inner loop (``lora/factored.py``) each step's task KL, Σ KL(q_i ‖ p(·|θ)), makes
p's dense moments from θ's factors, row block by row block, in forward and again in backward::

    μ_θ = (α/r)·B_μ A_μ,    σ_θ = (std_map(B_σ A_σ)^−2)^−1/2          (each ``[out, in]``)

In first order θ is detached and fixed for the whole inner loop, so these are the same tensors at
every one of its K steps (2K makings per module, forward and backward). Within :func:`cached_prior`
the KL of a :class:`~abmll_pyro.lora.factored.FactorIndependent` pair whose p is made of the cached
θ's factors (the very tensors, none requiring a gradient) takes p's per-block moments from a cache
filled the first time they are made, with the same ops on the same rows: the values and gradients
are the uncached path's bit for bit (p's factors need no gradient there either).

Memory: the cache keeps p's two dense moments of every adapted module alive for the whole inner loop
(:func:`prior_cache_bytes`: 2 × out × in × 4 bytes per module in float32): 106 MB for SmolLM2-135M's q/v
in all 30 blocks, 5.4 GB for Llama-3-8B's q/v in all 32 blocks. ``MetaSVI(theta_cache=None)`` (the
default) caches only when that total is at most :data:`PRIOR_CACHE_BYTES`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["PRIOR_CACHE_BYTES", "PriorCache", "cached_prior", "active_prior_cache", "prior_cache_bytes"]

#: the automatic bound on :func:`prior_cache_bytes` (512 MiB): a few per cent of the memory a training
#: run holds anyway (the LM's weights and activations), and below one 2 GB float32 copy of the weights
#: of a 0.5B model; it caches the small models' all-block q/v (SmolLM2-135M: 106 MB) and a large one's
#: last few blocks (Llama-3-8B's q/v: 168 MB a block, 3 blocks), never Llama-3-8B's 32 blocks (5.4 GB)
PRIOR_CACHE_BYTES = 512 * 2**20

_STATE = threading.local()


def prior_cache_bytes(adapter, theta: Mapping[str, Tensor]) -> int:
    """Bytes that :class:`PriorCache` holds once filled for ``adapter``'s modules: μ_θ and σ_θ of each,
    ``[out, in]`` in the factors' full precision (float32, or float64 if they are)."""
    total = 0
    for m, (rows, columns) in adapter.shapes.items():
        dtype = torch.promote_types(theta[adapter.key(m, "mu_A")].dtype, torch.float32)
        total += 2 * rows * columns * dtype.itemsize
    return total


class PriorCache:
    """p's dense moments per (module, moment maps, row blocks, autocast state), made from ``theta``."""

    def __init__(self, theta: Mapping[str, Tensor]):
        self.theta = dict(theta)
        self.store: dict[tuple, dict[tuple[int, int], tuple[Tensor, Tensor]]] = {}

    def holds(self, gaussian) -> bool:
        """Whether ``gaussian``'s factors are this cache's θ tensors themselves, none needing a gradient."""
        return all(self.theta.get(k) is v and not v.requires_grad for k, v in gaussian.params.items())

    def moments(self, loc, scale, blocks: Sequence[tuple[int, int]]) -> dict[tuple[int, int], tuple[Tensor, Tensor]]:
        """``{block: (loc rows, scale rows)}`` of two :class:`~abmll_pyro.lora.factored.FactorValue`s of
        one cached gaussian, each block made as the KL makes it (``value.dense(gaussian.rows(*block))``)."""
        g = loc.gaussian
        device = g.tensors()[0].device.type
        key = (g.module, loc.moment, loc.ops, scale.moment, scale.ops, tuple(blocks),
               torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if key not in self.store:
            with torch.no_grad():
                self.store[key] = {b: (loc.dense(g.rows(*b)), scale.dense(g.rows(*b))) for b in blocks}
        return self.store[key]


@contextmanager
def cached_prior(theta: Mapping[str, Tensor] | None) -> Iterator[PriorCache | None]:
    """Within the block, the factor-backed KL against p(·|θ) of these (detached) ``theta`` tensors
    reuses p's dense moments (module docstring); ``None``: no cache (the block runs as without it)."""
    previous = getattr(_STATE, "cache", None)
    cache = None if theta is None else PriorCache(theta)
    _STATE.cache = cache
    try:
        yield cache
    finally:
        _STATE.cache = previous


def active_prior_cache() -> PriorCache | None:
    return getattr(_STATE, "cache", None)
