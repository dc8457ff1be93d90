"""Recovery on known truth: meta-train ABMLL on tasks drawn from its own hierarchy, compare.

:func:`run_known_truth` draws θ* and a spread s (:mod:`abmll_pyro.data.sources.known_truth`), M
training tasks and held-out tasks, meta-trains from the adapter's initialization (σ_θ = init_std,
μ_θ = 0), and reports

* **recovery**: the learned σ_θ (geometric mean over the *identified* elements: for an adapted output
  head, the rows of the option tokens — no label depends on any other row, so the others keep their
  prior; for any other module, all elements) against s, as the ratio σ_θ / s;
* **prediction** on held-out tasks: the posterior predictive NLL at k = 0 (the prior predictive) and
  k = ``test_shots`` against the oracle's (the true φ_i), and the pooled ECE with its floor;
* **simulation-based calibration** (:mod:`abmll_pyro.eval.sbc`): for every held-out task the rank of P
  fixed projections of the true ΔW_i (random directions over the identified elements) among S draws
  of q(φ | support), their histogram and the χ² uniformity test.

``freeze_scales=True`` is the deliberately broken control: θ's scale factors never train, so σ_θ
stays at init_std whatever s is.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import pyro
import torch

from ..config import AdapterConfig, InnerLoopConfig, MetaConfig
from ..data.sources.known_truth import OPTIONS, KnownTask, default_text_pool, family_inputs, sample_task, true_theta
from ..data.templates import DirectTemplate, Template, make_template
from ..data.trunk import attach_trunk_cache
from ..guides.low_rank import LowRankPrecisionGuide
from ..infer.meta import Episode, MetaSVI
from ..infer.predictive import mean_probs, posterior_predictive
from ..lora.adapter import BayesLoRA
from ..models.likelihoods import TaskData
from ..models.priors import HierarchicalPrior
from .metrics import ece_floor, expected_calibration_error
from .sbc import posterior_draws, projections, rank_uniformity, sbc_ranks

__all__ = ["KnownTruthConfig", "run_known_truth", "identified_mask", "m_step_targets"]


@dataclass(frozen=True)
class KnownTruthConfig:
    """One known-truth study (defaults: the tiny test's settings)."""

    spread: float = 0.3  # s, the true task spread
    init_std: float = 0.1  # σ_θ's start (the same for every s)
    mean_rms: float = 0.1  # RMS of the true mean μ*
    rank: int = 2
    lora_alpha: float = 4.0
    target_modules: tuple[str, ...] = ("lm_head",)
    separator: str = ""  # between input and option; "" makes the input's last token the option's context
    std_map: str = "log-rowcol"
    kl_beta: float = 1.0
    kl_gamma: float = 0.0  # the hyperprior's weight: 0 is empirical Bayes (maximum marginal likelihood)
    prior_a0: float = 1.1  # the hyperprior on σ_θ: centred on init_std, log σ_θ's sd ≈ 1/(2√(a0 − 1))
    num_train_tasks: int = 16
    examples_per_task: int = 24
    shots: int = 8
    steps: int = 60
    tasks_per_step: int = 4
    outer_lr: float = 5e-2
    num_inner_steps: int = 8
    inner_lr: float = 5e-2
    inner_optimizer: str = "adam-precond"
    pass_through: bool = False
    guide: str = "mean-field"  # or "low-rank-precision" (q with R correlated directions per module)
    cov_rank: int | None = None  # R of the low-rank-precision guide (None: every GGN direction of the support set)
    free_scale: bool = False  # the low-rank-precision guide's per-element task log-scale
    refine_columns: bool = False  # the low-rank-precision guide's columns refined by the inner loop
    whiten: bool = False  # the low-rank-precision guide's mean offset in units of θ's σ
    freeze_scales: bool = False
    scale_optimizer: str = "adam"  # or "sgd": θ's scales by plain gradient steps of scale_lr
    scale_lr: float = 1e-3
    start_at_truth: bool = False  # θ starts at θ* (is the truth a fixed point of training?)
    start_scale: float = 1.0  # with start_at_truth: σ_θ starts at start_scale·s (a broken control: != 1, frozen)
    scalar_scale: bool = False  # train only the per-module log-scale s_0 (the family's spread is uniform)
    num_test_tasks: int = 16
    test_shots: int = 8
    num_samples: int = 19
    num_projections: int = 4
    rank_bins: int = 5
    evaluate_nll: bool = True  # the held-out posterior-predictive NLLs (k = 0, test_shots, oracle)
    eval_shots: tuple[int, ...] = ()  # further k < test_shots, each on the first k support examples, same query set
    fine_tune: bool = False  # also a point estimate at every k: μ fine-tuned by maximum likelihood from μ_θ
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.shots < self.examples_per_task or not 0 < self.test_shots < self.examples_per_task:
            raise ValueError(f"shots and test_shots must be in 1..{self.examples_per_task - 1}, got {self.shots}, {self.test_shots}")
        if (self.num_samples + 1) % self.rank_bins:
            raise ValueError(f"rank_bins must divide num_samples + 1 = {self.num_samples + 1}, got {self.rank_bins}")
        if any(not 0 < k < self.test_shots for k in self.eval_shots):
            raise ValueError(f"eval_shots must lie in 1..{self.test_shots - 1} (test_shots), got {self.eval_shots}")

    @property
    def shots_curve(self) -> tuple[int, ...]:
        """Every k the held-out NLL is measured at: 0 (the prior predictive), ``eval_shots``, ``test_shots``."""
        return tuple(sorted({0, *self.eval_shots, self.test_shots}))


def identified_mask(adapter: BayesLoRA, tokenizer, options: Sequence[str] = OPTIONS, template: Template | str = "direct") -> dict[str, torch.Tensor]:
    """``{module: [out, in] bool}``: the elements the labels depend on. For a module whose output is
    the vocabulary (the LM head) only the rows of the options' last tokens differ between options
    (a shared prefix token's row cancels in the softmax over options); other modules: everything."""
    vocab = getattr(getattr(adapter.lm, "config", None), "vocab_size", None)
    cont = make_template(template, tokenizer)
    rows = sorted({tokenizer(cont.continuation(o), add_special_tokens=False)["input_ids"][-1] for o in options})
    out = {}
    for m, (n_out, n_in) in adapter.shapes.items():
        mask = torch.ones(n_out, n_in, dtype=torch.bool)
        if n_out == vocab:
            mask = torch.zeros(n_out, n_in, dtype=torch.bool)
            mask[rows] = True
        out[m] = mask
    return out


def _geo_mean(adapter: BayesLoRA, theta, masks) -> float:
    with torch.no_grad():
        logs = torch.cat([adapter.std(theta, m).double().log()[masks[m]] for m in adapter.shapes])
    return float(logs.mean().exp())


def _build(lm, cfg: KnownTruthConfig, generator: torch.Generator) -> MetaSVI:
    """ABMLL over ``lm`` as ``cfg`` says (θ's scale factors frozen for the control)."""
    adapter_cfg = AdapterConfig(rank=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
                                std_map=cfg.std_map, init_std=cfg.init_std)
    adapter = BayesLoRA(lm, adapter_cfg, generator=generator).to(next(lm.parameters()).dtype)
    inner = InnerLoopConfig(num_inner_steps=cfg.num_inner_steps, inner_lr=cfg.inner_lr, optimizer=cfg.inner_optimizer,
                            pass_through=cfg.pass_through)
    meta = MetaConfig(kl_beta=cfg.kl_beta, kl_gamma=cfg.kl_gamma, outer_lr=cfg.outer_lr, tasks_per_step=cfg.tasks_per_step,
                      inner=inner, scale_optimizer=cfg.scale_optimizer, scale_lr=cfg.scale_lr)
    task_guide = LowRankPrecisionGuide(cov_rank=cfg.cov_rank, free_scale=cfg.free_scale,
                                                refine_columns=cfg.refine_columns, whiten=cfg.whiten) if cfg.guide == "low-rank-precision" else None
    if cfg.guide not in ("mean-field", "low-rank-precision"):
        raise ValueError(f"guide must be 'mean-field' or 'low-rank-precision', got {cfg.guide!r}")
    svi = MetaSVI(adapter, meta, prior=HierarchicalPrior(a0=cfg.prior_a0, init_std=cfg.init_std), task_guide=task_guide,
                  num_tasks=cfg.num_train_tasks)
    for k, p in adapter.global_params().items():
        if ":sigma" in k and (cfg.freeze_scales or (cfg.scalar_scale and not k.endswith(":sigma_log0"))):
            p.requires_grad_(False)
    return svi


def _meta_train(svi: MetaSVI, episodes: list[Episode], cfg: KnownTruthConfig, masks, generator: torch.Generator,
                log: Callable[[str], None]) -> list[dict]:
    """``cfg.steps`` outer steps over random batches of ``episodes``, the outer lr decaying linearly to
    10% (the last steps average out the task noise); σ_θ logged every 10 steps."""
    history = []
    n = len(episodes)
    order = torch.randperm(n * (cfg.steps * cfg.tasks_per_step // n + 1), generator=generator) % n
    for step in range(cfg.steps):
        batch = [episodes[int(i)] for i in order[step * cfg.tasks_per_step:(step + 1) * cfg.tasks_per_step]]
        for group in svi.optimizer.param_groups:
            group["lr"] = cfg.outer_lr * (1.0 - 0.9 * step / max(cfg.steps - 1, 1))
        result = svi.step(batch, cfg.num_train_tasks)
        if step % 10 == 0 or step == cfg.steps - 1:
            sigma = _geo_mean(svi.adapter, svi.theta(), masks)
            history.append({"step": step, "loss": result.loss, "sigma_theta": sigma})
            log(f"step {step}: loss {result.loss:.4g}, σ_θ (identified) {sigma:.4g} (s = {cfg.spread:g})")
    return history


def _fine_tune(svi: MetaSVI, support: TaskData, cfg: KnownTruthConfig) -> dict[str, torch.Tensor]:
    """A point estimate from the same start as the posterior: q's mean fitted by maximum likelihood on
    ``support`` (no KL, no sampling; Adam at ``inner_lr`` for ``num_inner_steps``; the guide's frozen
    keys stay frozen) — a non-Bayesian fine-tune from the meta-learned mean μ_θ."""
    task_guide = svi.guide.task_guide
    with torch.no_grad():
        start = task_guide.init_task_params(svi.adapter, svi.theta(), support)
    frozen = set(getattr(task_guide, "frozen_keys", lambda p: ())(start))
    params = {k: v.detach().clone().requires_grad_(k not in frozen) for k, v in start.items()}
    optimizer = torch.optim.Adam([p for p in params.values() if p.requires_grad], lr=cfg.inner_lr)
    gold = support.batch.gold
    for _ in range(cfg.num_inner_steps):
        optimizer.zero_grad()
        probs = mean_probs(svi, params, support)
        loss = -probs.double().gather(-1, gold[:, None]).clamp_min(1e-300).log().mean()
        loss.backward()
        optimizer.step()
    return {k: v.detach() for k, v in params.items()}


def _evaluate(svi: MetaSVI, test: list[KnownTask], cfg: KnownTruthConfig, masks, generator: torch.Generator) -> dict:
    """SBC ranks of P projections of the true ΔW_i among S draws of q(φ | support) per held-out task;
    with ``evaluate_nll`` the posterior-predictive NLL and pooled ECE at every k of ``cfg.shots_curve``
    (the first k of the task's ``test_shots`` support examples; one query set for every k), and with
    ``fine_tune`` the maximum-likelihood point estimate's (``mle_k<k>``). ``per_task``: each held-out
    task's mean NLL per entry, for paired comparisons."""
    directions = {m: torch.randn((cfg.num_projections,) + mask.shape, generator=generator, dtype=torch.float64) * mask
                  for m, mask in masks.items()}
    names = [f"k{k}" for k in cfg.shots_curve]
    if cfg.fine_tune:
        names += [f"mle_k{k}" for k in cfg.shots_curve if k]
    ranks, nll = [], {name: [] for name in names + ["oracle"]}
    pooled = {name: [] for name in names + ["gold"]}
    for i, task in enumerate(test):
        support, query = task.split(cfg.test_shots)
        post = svi.adapt(support)
        torch.manual_seed(cfg.seed * 7919 + i)
        draws = projections(posterior_draws(svi, post, support, cfg.num_samples), directions)  # [S, P]
        ranks.append(sbc_ranks(projections(task.delta, directions), draws, generator))
        nll["oracle"].append(task.oracle_nll(cfg.test_shots))
        if not cfg.evaluate_nll:
            continue
        gold = query.batch.gold
        predictions = {}
        for k in cfg.shots_curve:
            if k == 0:  # the prior predictive
                predictions["k0"] = ({key: v.detach() for key, v in svi.theta().items()}, "sample")
                continue
            sub = support if k == cfg.test_shots else TaskData(support.batch.select(torch.arange(k)))
            predictions[f"k{k}"] = (post if k == cfg.test_shots else svi.adapt(sub), "sample")
            if cfg.fine_tune:
                predictions[f"mle_k{k}"] = (_fine_tune(svi, sub, cfg), "mean")
        with torch.no_grad():
            for name, (params, mode) in predictions.items():
                probs = posterior_predictive(svi, params, query, cfg.num_samples, mode)
                nll[name].append(float(-probs.double().gather(-1, gold[:, None]).clamp_min(1e-300).log().mean()))
                pooled[name].append(probs)
        pooled["gold"].append(gold)
    calibration = {}
    if cfg.evaluate_nll:  # pooled over the held-out query examples: ECE (15 bins, a fraction) and its floor
        gold = torch.cat(pooled["gold"])
        for name in names:
            probs = torch.cat(pooled[name])
            calibration[name] = {"ece": expected_calibration_error(probs, gold), "ece_floor": ece_floor(probs)}
    all_ranks = torch.cat(ranks)
    uniform = rank_uniformity(all_ranks, cfg.num_samples, cfg.rank_bins)
    return {"nll": {key: sum(v) / len(v) for key, v in nll.items() if v}, "calibration": calibration,
            "per_task": {key: v for key, v in nll.items() if v},
            "sbc": {"histogram": uniform.histogram, "chi2": uniform.chi2, "p_value": uniform.p_value,
                    "num_ranks": int(all_ranks.numel()), "num_samples": cfg.num_samples}}


def _family(lm, tokenizer, cfg: KnownTruthConfig, pool: Sequence[str] | None):
    """ABMLL over ``lm`` as ``cfg`` says, the family's θ*, the identified elements and a task drawer
    ``draw(n, offset)`` (one generator seeded by ``cfg.seed``, used in this order: the adapter's
    initialization, θ*, then the tasks' inputs; the global generators seeded by ``cfg.seed`` too, so a
    study is repeatable on one machine and thread count)."""
    attach_trunk_cache(lm)
    pyro.set_rng_seed(cfg.seed)  # the ELBO's and the predictive's draws use the global generators
    g = torch.Generator().manual_seed(cfg.seed)
    svi = _build(lm, cfg, g)
    template = DirectTemplate(sep=cfg.separator)
    masks = identified_mask(svi.adapter, tokenizer, template=template)
    dtype = next(lm.parameters()).dtype
    theta_star = {k: v.to(dtype) for k, v in true_theta(svi.adapter, cfg.spread, cfg.mean_rms, g).items()}
    pool = list(pool) if pool is not None else default_text_pool()

    def draw(n_tasks: int, offset: int) -> list[KnownTask]:
        return [sample_task(svi.model, theta_star, family_inputs(tokenizer, pool, cfg.examples_per_task, g, template=template),
                            cfg.seed * 100003 + offset + i) for i in range(n_tasks)]

    return svi, g, masks, theta_star, draw

def run_known_truth(lm, tokenizer, config: KnownTruthConfig, pool: Sequence[str] | None = None,
                    log: Callable[[str], None] = lambda s: None) -> dict:
    """Meta-train on a family with known θ*, s (module docstring); returns the measurements (JSON-able)."""
    cfg = config
    started = time.time()
    svi, g, masks, theta_star, draw = _family(lm, tokenizer, cfg, pool)
    adapter = svi.adapter

    train, test = draw(cfg.num_train_tasks, 0), draw(cfg.num_test_tasks, 50000)
    episodes = [Episode(f"train{i}", *t.split(cfg.shots)) for i, t in enumerate(train)]
    if cfg.start_at_truth:
        with torch.no_grad():
            for key, p in adapter.global_params().items():
                p.copy_(theta_star[key])
                if key.endswith(":sigma_log0"):
                    p.add_(math.log(cfg.start_scale))
    sigma_start = _geo_mean(adapter, svi.theta(), masks)
    history = _meta_train(svi, episodes, cfg, masks, g, log)
    sigma_theta = _geo_mean(adapter, svi.theta(), masks)
    return {
        "config": asdict(cfg),
        "spread": cfg.spread,
        "sigma_theta_start": sigma_start,
        "sigma_theta": sigma_theta,
        "ratio": sigma_theta / cfg.spread,
        "sigma_theta_all": _geo_mean(adapter, svi.theta(), {m: torch.ones_like(v) for m, v in masks.items()}),
        "history": history,
        **_evaluate(svi, test, cfg, masks, g),
        "seconds": time.time() - started,
    }


def m_step_targets(lm, tokenizer, config: KnownTruthConfig, factors: Sequence[float] = (0.5, 1.0, 2.0),
                   num_tasks: int = 24, pool: Sequence[str] | None = None) -> dict:
    """The empirical-Bayes M-step's target at θ = θ* with σ_θ scaled by each factor f: over ``num_tasks``
    tasks drawn from the family and the identified elements, mean((Var_q + (E_q ΔW − μ*)²)/σ_θ²) after the
    inner loop on each task's ``shots`` support examples. For the exact posterior its expectation is
    exactly 1 at f = 1, above 1 for f < 1 and below for f > 1: σ_θ's fixed point is where it crosses 1.
    A guide whose curve crosses below f = 1 settles σ_θ below the true spread (mean field, whose q
    underestimates variance where the data inform it). Returns ``{"factors", "targets", "stderr"}``."""
    cfg = config
    svi, g, masks, theta_star, draw = _family(lm, tokenizer, cfg, pool)
    adapter = svi.adapter
    tasks = draw(num_tasks, 90000)
    means, errors = [], []
    for f in factors:
        with torch.no_grad():
            for key, p in adapter.global_params().items():
                p.copy_(theta_star[key])
            for m in adapter.shapes:  # every scale factor's log shifts σ by the same factor: the module's s_0
                log0 = adapter.global_params().get(adapter.key(m, "sigma_log0"))
                if log0 is None:
                    raise ValueError("m_step_targets needs std_map 'log-rowcol' (a module log-scale s_0)")
                log0.add_(math.log(f))
        theta = svi.theta()
        values = []
        for t in tasks:
            support, _ = t.split(cfg.shots)
            post = svi.adapt(support)
            with torch.no_grad():
                num = den = 0.0
                for m, mask in masks.items():
                    q = svi.guide.task_guide.task_distribution(adapter, post, m)
                    mu, sd = adapter.mean(theta, m), adapter.std(theta, m)
                    ratio = ((q.variance + (q.mean - mu) ** 2) / sd ** 2)[mask]
                    num, den = num + float(ratio.sum()), den + int(mask.sum())
            values.append(num / den)
        v = torch.tensor(values, dtype=torch.float64)
        means.append(float(v.mean()))
        errors.append(float(v.std() / math.sqrt(len(values))))
    return {"factors": list(factors), "targets": means, "stderr": errors, "num_tasks": num_tasks, "config": asdict(cfg)}
