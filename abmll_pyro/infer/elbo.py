"""TraceMeanField_ELBO without the log-densities it never reads.

Pyro's ``TraceMeanField_ELBO`` runs the guide and the model (``get_importance_trace``), evaluates
``log_prob`` at *every* model site and the score parts (``log_prob`` again) at *every* guide site,
and only then forms the loss

    −ELBO = −Σ_observed log p(x | z) + Σ_latent KL(q(z) ‖ p(z))        (KL where registered)
          + Σ_latent without a registered KL (log q(z) − log p(z))       (Monte Carlo fallback)

For ABMLL's task sites ΔW_{i,m} the KL is registered (:func:`~abmll_pyro.lora.noise.normal_kl`),
so the two dense ``[out, in]`` log-densities per adapted module and call — the prior's and the
guide's, each with its support check — are computed and thrown away.

:class:`LeanMeanFieldELBO` forms the same loss, term by term in the same order, but evaluates a
site's log-density only where the loss reads it: observed sites always, a latent site's model
log-density and guide entropy term only when its KL is not registered (e.g. the Student-t prior).
One reordering: a KL weighted by a scalar (β) is summed, then scaled, ``β·Σ KL`` instead of
``Σ β·KL`` (one dense pass fewer each way; equal to float round-off). Validation (when Pyro's is on) checks the same things: model/guide
match, mean-field site order, full reparameterization, and every site's batch shape against its
plates (a latent site's from its distribution's batch shape instead of its log-density's).
"""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled, torch_item
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape

__all__ = ["LeanMeanFieldELBO"]


def _observed(name: str, site: dict) -> bool:
    return site["is_observed"]


def _only(name: str):
    return lambda n, site: n == name


def _log_prob_shape(site: dict) -> torch.Size:
    """The shape ``site["fn"].log_prob(site["value"])`` would have, without evaluating it."""
    fn, value = site["fn"], site["value"]
    batch = value.shape[: value.dim() - len(fn.event_shape)]
    return torch.broadcast_shapes(fn.batch_shape, batch)


def _scalar(scale) -> bool:
    return not torch.is_tensor(scale) or scale.dim() == 0


def _check_shape(site: dict, max_plate_nesting: int) -> None:
    if "log_prob" in site:
        check_site_shape(site, max_plate_nesting)
    else:  # a latent site whose density was not evaluated: check the shape it would have
        check_site_shape({**site, "log_prob": torch.empty(_log_prob_shape(site), device="meta")}, max_plate_nesting)


def _check_reparametrized(site: dict) -> None:
    """Pyro's ``check_fully_reparametrized``; for a distribution with the stock ``score_parts`` (score
    function 0 exactly when it has rsample) from ``has_rsample`` alone, without evaluating it."""
    fn = site["fn"]
    if fn.has_rsample and type(fn).score_parts is TorchDistributionMixin.score_parts:
        return
    _entropy_term(site)
    check_fully_reparametrized(site)


def _entropy_term(site: dict) -> torch.Tensor:
    """The guide site's scaled, masked entropy term (its log-density for a reparameterized site)."""
    if "score_parts" not in site:
        parts = site["fn"].score_parts(site["value"], *site["args"], **site["kwargs"])
        site["unscaled_log_prob"] = parts.log_prob
        parts = parts.scale_and_mask(site["scale"], site["mask"])
        site["score_parts"], site["log_prob"] = parts, parts.log_prob
        site["log_prob_sum"] = parts.log_prob.sum()
    return site["score_parts"].entropy_term


class LeanMeanFieldELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` evaluating log-densities only where its loss reads them (module docstring).

    Same constructor arguments and estimates (sequential or vectorized particles)."""

    def _get_trace(self, model, guide, args, kwargs):
        if isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):  # a GuideMessenger: the stock path
            return super()._get_trace(model, guide, args, kwargs)
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace), graph_type="flat").get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        model_trace.compute_log_prob(site_filter=_observed)
        if is_validation_enabled():
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        _check_shape(site, self.max_plate_nesting)
            _check_mean_field_requirement(model_trace, guide_trace)
        return model_trace, guide_trace

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        # TraceMeanField_ELBO._differentiable_loss_particle, with the log-densities computed lazily
        elbo_particle = 0
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo_particle = elbo_particle + model_site["log_prob_sum"]
                continue
            guide_site = guide_trace.nodes[name]
            if is_validation_enabled():
                _check_reparametrized(guide_site)
            try:
                kl_qp = kl_divergence(guide_site["fn"], model_site["fn"])
            except NotImplementedError:
                model_trace.compute_log_prob(site_filter=_only(name))
                elbo_particle = elbo_particle + model_site["log_prob_sum"] - _entropy_term(guide_site).sum()
                continue
            scale, mask = guide_site["scale"], guide_site["mask"]
            if torch.is_tensor(kl_qp) and mask is None and _scalar(scale):
                # a scalar weight (β): sum first, then scale (one dense pass fewer, forward and backward)
                assert torch._C._get_tracing_state() or kl_qp.shape == guide_site["fn"].batch_shape
                kl_qp_sum = kl_qp.sum() * scale
            else:
                kl_qp = scale_and_mask(kl_qp, scale=scale, mask=mask)
                if torch.is_tensor(kl_qp):
                    assert torch._C._get_tracing_state() or kl_qp.shape == guide_site["fn"].batch_shape
                    kl_qp_sum = kl_qp.sum()
                else:
                    kl_qp_sum = kl_qp * torch.Size(guide_site["fn"].batch_shape).numel()
            elbo_particle = elbo_particle - kl_qp_sum
        for name, guide_site in guide_trace.nodes.items():  # auxiliary guide sites
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                assert guide_site["infer"].get("is_auxiliary")
                if is_validation_enabled():
                    _check_reparametrized(guide_site)
                elbo_particle = elbo_particle - _entropy_term(guide_site).sum()
        loss = -(elbo_particle.detach() if torch._C._get_tracing_state() else torch_item(elbo_particle))
        return loss, -elbo_particle
