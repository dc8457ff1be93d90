"""β and γ as an effect handler: scale the task and global latent sites, in model and guide alike.

``kl_scale(kl_beta=β, kl_gamma=γ, latent_beta=β_z)`` multiplies the log-density of every ``phi[...]``
site by β, of every task subspace site ``z[...]`` by β_z (β when None) and of every ``theta/...`` site
by γ (observed sites untouched). Applied around an ELBO call it reaches both
the model's and the guide's sites, so with TraceMeanField_ELBO the analytic KL becomes β·KL and with
Trace_ELBO the Monte Carlo KL becomes β·(log q − log p). A weight of 0 masks the site (Pyro's scale
must be positive), which removes its term exactly; its distribution is then wrapped as
``fn.mask(False)``, whose ``log_prob`` (and KL against another masked site) is a zero without
evaluating the density, so a masked site costs nothing (θ's hyperprior in every task loss: dense
Normal and Gamma log-densities per adapted module, otherwise computed by the ELBO and multiplied by 0).
Samples are unchanged (a masked distribution samples its base).
"""

from __future__ import annotations

import math

from pyro.poutine.messenger import Messenger

from .. import sites

__all__ = ["KLScaleMessenger", "kl_scale"]


def _check_weight(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return value


class KLScaleMessenger(Messenger):
    """Scale latent ``phi`` sites by ``kl_beta``, ``z`` sites by ``latent_beta`` (``kl_beta`` when None)
    and ``theta`` sites by ``kl_gamma``."""

    def __init__(self, kl_beta: float = 1.0, kl_gamma: float = 1.0, latent_beta: float | None = None):
        super().__init__()
        self.kl_beta = _check_weight("kl_beta", kl_beta)
        self.kl_gamma = _check_weight("kl_gamma", kl_gamma)
        self.latent_beta = self.kl_beta if latent_beta is None else _check_weight("latent_beta", latent_beta)

    def _process_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        if sites.is_phi(msg["name"]):
            weight = self.kl_beta
        elif sites.is_latent(msg["name"]):
            weight = self.latent_beta
        elif sites.is_theta(msg["name"]):
            weight = self.kl_gamma
        else:
            return
        if weight == 0.0:
            msg["mask"] = False if msg["mask"] is None else msg["mask"] & False
            msg["fn"] = msg["fn"].mask(False)  # its log-density and KL are zeros, never evaluated
        else:
            msg["scale"] = weight * msg["scale"]


def kl_scale(fn=None, kl_beta: float = 1.0, kl_gamma: float = 1.0, latent_beta: float | None = None):
    """Function twin of :class:`KLScaleMessenger` (context manager, or decorator when ``fn`` given)."""
    messenger = KLScaleMessenger(kl_beta=kl_beta, kl_gamma=kl_gamma, latent_beta=latent_beta)
    return messenger(fn) if fn is not None else messenger
