"""Known truth for the task subspace: tasks drawn with z_i ~ N(0, s*²), recovery of s* and SBC of q(z_i).

:func:`run_subspace_truth` builds ABMLL with a :class:`~abmll_pyro.models.subspace.TaskSubspace` over
``lm``, fixes the subspace's directions and θ's ΔW prior at their start (μ_θ = 0, σ_θ = init_std: the
dense part carries no task signal), and draws every task from the model itself
(:func:`~abmll_pyro.data.sources.known_truth.sample_task`) with the subspace's scales set to the true
spread s*: z_{i,m} ~ N(0, s*² I), inputs from a real text pool, labels sampled from the LM shifted by
Σ_j z_{i,m,j} b_{m,j} a_{m,j}ᵀ. It then sets every scale to ``init_scale`` and meta-trains the log-scales
alone (the empirical-Bayes M-step plus the query likelihood), and reports

* **recovery**: the learned s (geometric mean over all directions, and the range over directions)
  against s*;
* **prediction** on held-out tasks: the posterior-predictive NLL of the query at k = 0 (the prior
  predictive) and k = ``shots`` against the oracle's (the true z_i), with the epistemic share
  (mutual information / predictive entropy) at both;
* **simulation-based calibration** (:mod:`abmll_pyro.eval.sbc`): the rank of each true z_{i,m,j}
  among S draws of q(z_{i,m} | support) (each coordinate's marginal), the rank histogram and the χ² uniformity test.

Controls that break on purpose: ``freeze_scales=True`` never trains s (it stays at ``init_scale``);
the SBC is run a second time on the same draws with q's standard deviations multiplied by
``control_scale_factor`` (0.3: an overconfident posterior, whose ranks pile up at both ends).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import pyro
import torch

from ..config import AdapterConfig, InnerLoopConfig, MetaConfig
from ..data.sources.known_truth import KnownTask, default_text_pool, family_inputs, sample_task
from ..data.templates import DirectTemplate
from ..data.trunk import attach_trunk_cache
from ..infer.meta import Episode, MetaSVI
from ..infer.predictive import predictive_samples, uncertainty_split
from ..lora.adapter import BayesLoRA
from ..models.priors import HierarchicalPrior
from ..models.subspace import TaskSubspace
from .known_truth import identified_mask
from .sbc import rank_uniformity, sbc_ranks

__all__ = ["SubspaceTruthConfig", "run_subspace_truth"]


@dataclass(frozen=True)
class SubspaceTruthConfig:
    """One study (defaults: the tiny test's settings)."""

    spread: float = 10.0  # s*, the true scale of every direction (in units of its gain)
    init_scale: float = 3.3  # s at the start of meta-training
    dim: int = 2  # directions per adapted module
    target_modules: tuple[str, ...] = ("lm_head",)
    rank: int = 2  # ΔW's factors (fixed at their start: μ_θ = 0, σ_θ = init_std)
    init_std: float = 1e-3
    separator: str = " "
    kl_beta: float = 1.0
    subspace_beta: float = 1.0
    subspace_inner_lr: float = 0.5
    subspace_scale_lr: float = 0.1
    num_inner_steps: int = 10
    num_train_tasks: int = 32
    num_test_tasks: int = 24
    examples_per_task: int = 24
    shots: int = 12
    steps: int = 40
    tasks_per_step: int = 4
    num_samples: int = 16  # predictive draws
    sbc_samples: int = 19
    sbc_bins: int = 5
    seed: int = 0
    freeze_scales: bool = False  # control: s never trains
    control_scale_factor: float = 0.3  # the SBC control: q's standard deviations shrunk by this before its draws
    option_rows: bool = True  # an adapted output head's directions restricted to the option tokens' rows

    def __post_init__(self) -> None:
        if not (self.spread > 0 and self.init_scale > 0 and math.isfinite(self.spread) and math.isfinite(self.init_scale)):
            raise ValueError(f"spread and init_scale must be finite and > 0, got {self.spread!r}, {self.init_scale!r}")
        if not 0 < self.shots < self.examples_per_task:
            raise ValueError(f"shots must be in 1..{self.examples_per_task - 1}, got {self.shots}")
        if (self.sbc_samples + 1) % self.sbc_bins:
            raise ValueError(f"sbc_bins must divide sbc_samples + 1 = {self.sbc_samples + 1}, got {self.sbc_bins}")
        if not self.control_scale_factor > 0:
            raise ValueError(f"control_scale_factor must be > 0, got {self.control_scale_factor!r}")


def _build(lm, cfg: SubspaceTruthConfig, generator: torch.Generator) -> MetaSVI:
    dtype = next(lm.parameters()).dtype
    adapter = BayesLoRA(lm, AdapterConfig(rank=cfg.rank, target_modules=cfg.target_modules, init_std=cfg.init_std),
                        generator=generator).to(dtype)
    subspace = TaskSubspace(adapter, cfg.dim, cfg.spread, init="random", generator=generator)
    for p in list(adapter.parameters()) + list(subspace.A.values()) + list(subspace.B.values()):
        p.requires_grad_(False)
    inner = InnerLoopConfig(num_inner_steps=cfg.num_inner_steps, inner_lr=1e-2, optimizer="kl-precond")  # ΔW: held at its prior
    meta = MetaConfig(kl_beta=cfg.kl_beta, kl_gamma=0.0, outer_lr=cfg.subspace_scale_lr, tasks_per_step=cfg.tasks_per_step,
                      inner=inner, grad_clip=None, subspace_beta=cfg.subspace_beta,
                      subspace_inner_lr=cfg.subspace_inner_lr, subspace_scale_lr=cfg.subspace_scale_lr)
    return MetaSVI(adapter, meta, prior=HierarchicalPrior(init_std=cfg.init_std), num_tasks=cfg.num_train_tasks,
                   subspace=subspace)


def _scales(subspace: TaskSubspace) -> torch.Tensor:
    return torch.cat([p.detach().exp().flatten() for p in subspace.log_scale.values()]).double()


def _set_scales(subspace: TaskSubspace, value: float) -> None:
    with torch.no_grad():
        for p in subspace.log_scale.values():
            p.fill_(math.log(value))


def _evaluate(svi: MetaSVI, tasks: list[KnownTask], cfg: SubspaceTruthConfig, generator: torch.Generator) -> dict:
    sub = svi.subspace
    ranks, control, nll = [], [], {0: [], cfg.shots: []}
    share = {0: [], cfg.shots: []}
    oracle = []
    for task in tasks:
        support, query = task.split(cfg.shots)
        prior_params = {k: v.detach() for k, v in svi.init_task_params(svi.theta(), support).items()}
        posterior = svi.adapt(support)
        gold = query.batch.gold
        for k, params in ((0, prior_params), (cfg.shots, posterior)):
            samples = predictive_samples(svi, params, query, cfg.num_samples)
            split = uncertainty_split(samples)
            p = split.probs.gather(-1, gold[:, None]).squeeze(-1)
            nll[k].append(float(-p.log().mean()))
            share[k].append(float(split.epistemic.sum() / split.entropy.sum()))
        oracle.append(task.oracle_nll(cfg.shots))
        with torch.no_grad():
            for m in sub.modules:
                q = sub.posterior(posterior, m)
                eps = torch.randn((cfg.sbc_samples, *q.loc.shape), generator=generator, dtype=q.loc.dtype)
                offsets = eps @ q.scale_tril.transpose(0, 1)
                truth = task.latent[m].double()
                ranks.append(sbc_ranks(truth, (q.loc + offsets).double(), generator))
                control.append(sbc_ranks(truth, (q.loc + cfg.control_scale_factor * offsets).double(), generator))
    test = rank_uniformity(torch.cat(ranks), cfg.sbc_samples, cfg.sbc_bins)
    broken = rank_uniformity(torch.cat(control), cfg.sbc_samples, cfg.sbc_bins)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"nll": {str(k): mean(v) for k, v in nll.items()}, "oracle_nll": mean(oracle),
            "epistemic_share": {str(k): mean(v) for k, v in share.items()},
            "per_task_nll": {str(k): v for k, v in nll.items()}, "per_task_oracle": oracle,
            "sbc": {"histogram": test.histogram, "chi2": test.chi2, "p_value": test.p_value, "n": int(torch.cat(ranks).numel())},
            "sbc_control": {"scale_factor": cfg.control_scale_factor, "histogram": broken.histogram, "chi2": broken.chi2,
                            "p_value": broken.p_value}}


def run_subspace_truth(lm, tokenizer, config: SubspaceTruthConfig, pool: Sequence[str] | None = None,
                       log: Callable[[str], None] = lambda s: None) -> dict:
    """The study of the module docstring on ``lm``; a JSON-ready summary."""
    cfg = config
    start = time.perf_counter()
    attach_trunk_cache(lm)  # the frozen layers below the lowest adapted one run once per input
    pyro.set_rng_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    svi = _build(lm, cfg, g)
    pool = list(pool) if pool is not None else default_text_pool()
    template = DirectTemplate(sep=cfg.separator)
    if cfg.option_rows:  # an output head's directions on the option tokens' rows: every direction identified
        masks = identified_mask(svi.adapter, tokenizer, template=template)
        with torch.no_grad():
            for m in svi.subspace.modules:
                if m in masks:
                    rows = masks[m].any(dim=1)
                    svi.subspace.B[svi.subspace._name(m)][~rows] = 0.0
    theta_star = {k: v.detach() for k, v in svi.theta().items()}
    tasks = [sample_task(svi.model, theta_star, family_inputs(tokenizer, pool, cfg.examples_per_task, g, template=template),
                         cfg.seed * 100003 + i) for i in range(cfg.num_train_tasks + cfg.num_test_tasks)]
    train, test = tasks[:cfg.num_train_tasks], tasks[cfg.num_train_tasks:]
    _set_scales(svi.subspace, cfg.init_scale)
    if cfg.freeze_scales:
        for p in svi.subspace.log_scale.values():
            p.requires_grad_(False)
    episodes = [Episode(f"task{i}", *t.split(cfg.shots)) for i, t in enumerate(train)]
    history = []
    n = len(episodes)
    order = torch.randperm(n * (cfg.steps * cfg.tasks_per_step // n + 1), generator=g) % n
    for step in range(cfg.steps):
        batch = [episodes[int(i)] for i in order[step * cfg.tasks_per_step:(step + 1) * cfg.tasks_per_step]]
        for group in svi.optimizer.param_groups:  # decaying linearly to 10%: the last steps average the task noise
            group["lr"] = cfg.subspace_scale_lr * (1.0 - 0.9 * step / max(cfg.steps - 1, 1))
        result = svi.step(batch, cfg.num_train_tasks)
        if step % 10 == 0 or step == cfg.steps - 1:
            s = _scales(svi.subspace)
            history.append({"step": step, "loss": result.loss, "scale": float(s.log().mean().exp())})
            log(f"step {step}: loss {result.loss:.4g}, s (geometric mean) {history[-1]['scale']:.4g} (s* = {cfg.spread:g})")
    s = _scales(svi.subspace)
    evaluation = _evaluate(svi, test, cfg, g)
    return {"config": asdict(cfg),
            "recovery": {"scale": float(s.log().mean().exp()), "ratio": float(s.log().mean().exp()) / cfg.spread,
                         "ratio_min": float(s.min()) / cfg.spread, "ratio_max": float(s.max()) / cfg.spread},
            "history": history, **evaluation, "seconds": time.perf_counter() - start}
