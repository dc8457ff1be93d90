"""Where ABMLL's outer gradient points: signal, noise and direction of θ's mean-factor gradients.

For ``num_batches`` batches of training episodes, at θ's current value (no optimizer step), the
first-order outer gradient on the mean factors (``*:mu_A``, ``*:mu_B``) is split into

* ``nll`` — the query likelihood's part, −∂E_q log p(Q_i | φ_i)/∂θ through the pass-through;
* ``kl_prior`` — β·∂KL(q_i ‖ p_θ)/∂θ with q_i held fixed (``outer_kl="prior"``, the M-step);
* ``kl_pass_through`` — the same KL with q_i's factors carrying θ's gradient (``outer_kl="pass-through"``);

and compared with Regular LoRA's pooled-loss gradient on the same episodes from the same initial
factors. Per part: the mean gradient's norm over batches, the root-mean-square deviation around it,
their ratio (signal-to-noise: above 1, batches agree on a direction), and cosines between the
parts' mean directions. The same posterior draws are used for every part of a batch (seeded).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import cosine_similarity

from abmll_pyro.infer.inner import pass_through
from abmll_pyro.infer.objective import task_kl_loss, task_loss
from abmll_pyro.models.likelihoods import TaskData
from abmll_pyro.train.config import RunConfig
from abmll_pyro.train.episodes import EpisodeEncoder, EpisodeSampler
from abmll_pyro.train.setup import build

__all__ = ["meta_gradient_probe", "gradient_stats"]

PARTS = ("nll", "kl_prior", "kl_pass_through")


def _mean_keys(params: dict[str, Tensor]) -> list[str]:
    return [k for k in params if k.endswith(":mu_A") or k.endswith(":mu_B")]


def gradient_stats(grads: list[Tensor]) -> dict[str, float]:
    """``{mean_norm, norm_of_mean, rms_deviation, snr}`` of per-batch flat gradients ``[P]``."""
    g = torch.stack([x.double() for x in grads])
    mean = g.mean(0)
    dev = (g - mean).pow(2).sum(1).mean().sqrt()
    return {"mean_norm": float(g.norm(dim=1).mean()), "norm_of_mean": float(mean.norm()),
            "rms_deviation": float(dev), "snr": float(mean.norm() / dev) if dev > 0 else float("inf")}


def _flat(grads, keys, like) -> Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(like[k])).reshape(-1).detach() for k, g in zip(keys, grads)])


def meta_gradient_probe(config: RunConfig, num_batches: int = 6) -> dict:
    """The split above for ABMLL (``config`` with method ``abmll``) and Regular LoRA, as a JSON-able dict."""
    if num_batches < 2:
        raise ValueError(f"num_batches must be >= 2 (the noise is a spread over batches), got {num_batches}")
    abmll_cfg = config.updated(method="abmll")
    built, taskset = build(abmll_cfg)
    svi = built.method.svi
    sampler = EpisodeSampler(taskset.train, config.shots, config.query_size, config.tasks_per_step, config.seed)
    encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(False), config.template, False, torch.device("cpu"))
    batches = [[encoder(s) for s in sampler.draw()] for _ in range(num_batches)]
    theta = svi.theta()
    keys = _mean_keys(theta)
    wrt = [theta[k] for k in keys]
    beta = abmll_cfg.kl_beta
    parts: dict[str, list[Tensor]] = {p: [] for p in PARTS}
    for b, episodes in enumerate(batches):
        acc = {p: torch.zeros(sum(theta[k].numel() for k in keys), dtype=torch.float64) for p in PARTS}
        for j, ep in enumerate(episodes):
            support, query = TaskData(ep.support), TaskData(ep.query)
            torch.manual_seed(10_000 * config.seed + 100 * b + j)
            start = svi.guide.task_guide.init_task_params(svi.adapter, theta, support)
            refined = svi.refine(theta, start, support)
            task = pass_through(refined, start)
            fixed = {k: v.detach() for k, v in refined.items()}
            torch.manual_seed(10_000 * config.seed + 100 * b + j + 1)
            nll = task_loss(svi.elbo, svi.model, svi.guide, theta, [task], [query], 0.0)
            acc["nll"] += _flat(torch.autograd.grad(nll, wrt, allow_unused=True, retain_graph=True), keys, theta).double()
            for name, q in (("kl_prior", fixed), ("kl_pass_through", task)):
                kl = beta * task_kl_loss(svi.model, svi.guide, theta, q)
                acc[name] += _flat(torch.autograd.grad(kl, wrt, allow_unused=True, retain_graph=True), keys, theta).double()
        for p in PARTS:
            parts[p].append(acc[p] / len(episodes))
    # Regular LoRA's pooled gradient from the same initial factors, on the same episodes
    lora_built, _ = build(config.updated(method="lora"), with_tasks=False)
    lora = lora_built.method
    named = lora.lora.params()
    lora_grads = []
    for episodes in batches:
        for p in lora.parameters():
            p.grad = None
        lora.train_step(episodes, lambda loss: loss.backward())
        lora_grads.append(_flat([named[k].grad for k in keys], keys, named).double())
    result = {"num_batches": num_batches, "kl_beta": beta, "num_values": int(lora_grads[0].numel()),
              "same_initial_factors": all(torch.equal(named[k].detach(), theta[k].detach()) for k in keys)}
    means = {}
    for name, grads in [*parts.items(), ("abmll_prior", [a + b for a, b in zip(parts["nll"], parts["kl_prior"])]),
                        ("abmll_pass_through", [a + b for a, b in zip(parts["nll"], parts["kl_pass_through"])]),
                        ("lora", lora_grads)]:
        result[name] = gradient_stats(grads)
        means[name] = torch.stack(grads).mean(0)
    result["cosine_with_lora"] = {n: float(cosine_similarity(means[n], means["lora"], 0)) for n in means if n != "lora"}
    result["cosine_nll_kl_pass_through_per_batch"] = [
        float(cosine_similarity(a, b, 0)) for a, b in zip(parts["nll"], parts["kl_pass_through"])]
    return result
