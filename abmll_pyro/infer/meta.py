"""Meta-SVI: the outer loop over batches of tasks, with the inner loop inside (docs/method.md).

One outer step (:meth:`MetaSVI.step`) for a batch of b episodes drawn from M training tasks:

1. for each episode i: λ_i⁰ = guide.init_task_params(θ, S_i) (a copy of θ's factors by default);
2. inner loop: K steps on task_loss(λ; S_i) with θ fixed → λ_i^K (:func:`inner_loop`);
3. outer loss  L = (1/b) Σ_i [−E_q log p(Q_i | φ_i) + β·KL(q_i ‖ p_θ)] + (1/M)·(−γ log p(θ)),  where
   the likelihood term is taken at λ_i' = pass_through(λ_i^K, λ_i⁰) (first order, default),
   λ_i^K.detach() (pass-through off), or λ_i^K with its full history (second order); in first order
   the KL term's q_i is λ_i^K held fixed (``outer_kl="prior"``, default: the empirical-Bayes M-step
   for θ) or λ_i' (``outer_kl="pass-through"``, see :class:`~abmll_pyro.config.MetaConfig`);
4. one optimizer step on θ's factors (and any guide parameters) only, with gradient clipping
   (:meth:`MetaSVI.step`; :meth:`MetaSVI.loss_and_grads` is steps 1–3 alone, for accumulation).

L is the per-task average of the β-tempered negative ELBO over all M tasks. Each episode's query loss
is back-propagated as soon as it is computed, so only one task's LM graph is alive at a time; under
``outer_kl="prior"`` the β-KL (q fixed) is back-propagated before the query's LM graph is built.
Where it applies (first order, mean-field guide, hierarchical prior; ``MetaSVI(factor_backed=...)``)
every loss runs factor-backed (``lora/factored.py``): no dense ``[out, in]`` tensor per adapted module
is kept for backward or held in a trace (the dense path: 3 per module in an inner step, 5 in the
outer KL, 1 in the query loss, 7 in the global loss), and the dense ones are made one module at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..config import MetaConfig
from ..data.scoring import TokenBatch
from ..guides.base import ABMLLGuide, TaskGuide
from ..guides.amortized import AmortizedGuide
from ..guides.mean_field import MeanFieldGuide
from ..lora.factored import factor_backed
from ..lora.prior_cache import PRIOR_CACHE_BYTES, cached_prior, prior_cache_bytes
from ..lora.adapter import BayesLoRA
from ..models.hierarchical import HierarchicalModel
from ..models.likelihoods import Likelihood, OptionLikelihood, TaskData
from ..models.priors import HierarchicalPrior, TaskPrior
from ..models.subspace import TaskSubspace
from .elbo import LeanMeanFieldELBO
from .inner import PRECONDITIONED, NonFiniteLossError, inner_loop, pass_through
from .kl_curvature import kl_curvature
from .objective import global_loss, log_hyperprior, recorded, task_kl, task_kl_loss, task_loss

__all__ = ["Episode", "StepResult", "MetaSVI", "mean_prior_std", "mean_task_std"]


@torch.no_grad()
def mean_prior_std(adapter: BayesLoRA, theta: dict[str, Tensor]) -> float:
    """Mean of σ_θ = std_map(B_σθ A_σθ) over all elements of all adapted modules (float64 sum)."""
    total, count = 0.0, 0
    for m in adapter.shapes:
        sd = adapter.std(theta, m)
        total, count = total + float(sd.sum(dtype=torch.float64)), count + sd.numel()
    return total / count


@torch.no_grad()
def mean_task_std(adapter: BayesLoRA, task_guide: TaskGuide, task: dict[str, Tensor]) -> float | None:
    """Mean standard deviation of q(ΔW_i) over all elements and modules; None if q has none in
    closed form (e.g. a guide whose distribution does not implement ``variance``)."""
    total, count = 0.0, 0
    for m in adapter.shapes:
        try:
            sd = task_guide.task_distribution(adapter, task, m).variance.sqrt()
        except NotImplementedError:
            return None
        total, count = total + float(sd.sum(dtype=torch.float64)), count + sd.numel()
    return total / count


@dataclass(frozen=True)
class Episode:
    """A task's support set (adaptation) and query set (outer loss / evaluation)."""

    name: str
    support: TaskData
    query: TaskData


@dataclass(frozen=True)
class StepResult:
    """The outer loss and its parts (means over the batch's tasks; log p(θ) unscaled). ``nll`` is a
    task's query NLL summed over its examples (the term of the loss); ``nll_per_example`` divides each
    task's by its query size (the unit every method logs).

    ``sigma_theta``: mean σ_θ over every element of every adapted module (the prior's scale);
    ``sigma_q``: the mean over the batch's tasks of each task's mean σ of q after the inner loop
    (None when the guide's q has no closed-form standard deviation).
    """

    loss: float
    nll: float
    task_kl: float
    log_p_theta: float
    grad_norm: float | None = None  # before clipping; set by step(), None from loss_and_grads()
    sigma_theta: float | None = None
    sigma_q: float | None = None
    nll_per_example: float | None = None  # the mean over tasks of −log p(query_i | φ_i) / |query_i| (_scored_units)
    subspace_kl: float | None = None  # with a task subspace: the mean over tasks of KL(q(z_i) ‖ p(z_i | θ))
    subspace_scale: float | None = None  # with a task subspace: the mean prior scale s over its directions


def _scored_units(batch) -> int:
    """What one NLL is averaged over: examples of an option batch, target tokens of a token batch (as
    :func:`~abmll_pyro.methods.base.option_nll` averages)."""
    if isinstance(batch, TokenBatch):  # token t+1 is predicted from <= t
        return max(int(batch.target_mask[:, 1:].sum()), 1)
    return len(batch)


class MetaSVI:
    """The meta-learning loop: ``step(episodes)`` trains θ; ``adapt(support)`` gives a task posterior.

    Pieces are passed in (TyXe style): ``prior`` (default :class:`HierarchicalPrior` centred on the adapter's ``init_std``), ``task_guide``
    (default :class:`MeanFieldGuide`), ``likelihood`` (default :class:`OptionLikelihood`), ``elbo``
    (default :class:`~abmll_pyro.infer.elbo.LeanMeanFieldELBO` ``(max_plate_nesting=1)``: Pyro's
    ``TraceMeanField_ELBO`` — analytic KL — evaluating densities only where its loss reads them). The optimizer covers θ's
    factors and any parameters of the task guide (an amortization network), nothing else.

    ``factor_backed`` (default ``None``: wherever it applies): the task losses and the task KL run
    within :func:`~abmll_pyro.lora.factored.factor_backed`, so no dense ``[out, in]`` tensor per
    adapted module outlives that module's forward or backward (μ, σ, ΔW, θ's values and the KL
    recomputed from the factors; same values and gradients to round-off). It applies to the first
    order inner loop and outer step with the mean-field guide (or the amortized guide over it), the
    hierarchical prior and :class:`~abmll_pyro.infer.elbo.LeanMeanFieldELBO`; elsewhere (second order,
    other guides, priors or ELBOs) the dense path runs. ``False``: the dense path everywhere.

    ``subspace`` (default None): a :class:`~abmll_pyro.models.subspace.TaskSubspace`, whose task
    coordinates z_i join ΔW_i in model and guide (their KL weighted by ``config.subspace_beta``); its
    bases and log-scales are trained with θ (the log-scales at ``config.subspace_scale_lr``).

    ``theta_cache`` (default ``None``: when the cache holds at most
    :data:`~abmll_pyro.lora.prior_cache.PRIOR_CACHE_BYTES`, 512 MiB): a factor-backed first-order inner
    loop makes θ's dense prior moments μ_θ, σ_θ once and reuses them at its K steps
    (:func:`~abmll_pyro.lora.prior_cache.cached_prior`; same values and gradients bit for bit), keeping
    2 dense ``[out, in]`` tensors per adapted module alive during the inner loop (SmolLM2-135M's q/v
    in all blocks: 106 MB; Llama-3-8B's: 5.4 GB, so not cached by default). ``True``: always (needs
    the factor-backed path); ``False``: never.
    """

    def __init__(
        self,
        adapter: BayesLoRA,
        config: MetaConfig | None = None,
        prior: TaskPrior | None = None,
        task_guide: TaskGuide | None = None,
        likelihood: Likelihood | None = None,
        elbo=None,
        num_tasks: int | None = None,
        factor_backed: bool | None = None,
        subspace: TaskSubspace | None = None,
        theta_cache: bool | None = None,
    ):
        self.adapter = adapter
        self.config = config or MetaConfig()
        self.subspace = subspace
        prior = prior.for_adapter(adapter) if hasattr(prior, "for_adapter") else prior  # its init_std, not a default's
        self.model = HierarchicalModel(adapter, prior or HierarchicalPrior(adapter=adapter), likelihood or OptionLikelihood(),
                                       subspace=subspace)
        self.guide = ABMLLGuide(adapter, self.model.prior, task_guide or MeanFieldGuide(), subspace=subspace)
        if hasattr(self.guide.task_guide, "bind"):  # a guide that reads the model (e.g. its likelihood)
            self.guide.task_guide.bind(self.model)
        self.elbo = elbo if elbo is not None else LeanMeanFieldELBO(max_plate_nesting=1)
        applies = self._factor_backed_applies()
        if factor_backed and not applies:
            raise ValueError("factor_backed=True needs first order, the mean-field (or amortized mean-field) guide, "
                             "the hierarchical prior and LeanMeanFieldELBO")
        self.factor_backed = applies if factor_backed is None else bool(factor_backed)
        if theta_cache and not self.factor_backed:
            raise ValueError("theta_cache=True needs the factor-backed path (first order, see factor_backed)")
        self.theta_cache = theta_cache
        if num_tasks is not None and num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks
        scales = {id(p) for k, p in adapter.global_params().items() if ":sigma" in k}
        self.scale_parameters = ([p for p in self.trainable_parameters() if id(p) in scales]
                                 if self.config.scale_optimizer == "sgd" else [])
        stepped = {id(p) for p in self.scale_parameters}
        own = {id(p) for p in subspace.log_scale.values()} if subspace is not None else set()
        groups = [{"params": [p for p in self.trainable_parameters() if id(p) not in stepped | own]}]
        if own and self.config.subspace_scale_lr is not None:
            groups.append({"params": list(subspace.log_scale.values()), "lr": self.config.subspace_scale_lr})
        elif own:
            groups[0]["params"] += list(subspace.log_scale.values())
        self.optimizer = torch.optim.Adam(groups, lr=self.config.outer_lr)

    def _factor_backed_applies(self) -> bool:
        """Whether :func:`~abmll_pyro.lora.factored.factor_backed` gives this setup's losses unchanged."""
        guide, prior = self.guide.task_guide, self.model.prior
        if isinstance(guide, AmortizedGuide):
            guide = guide.base
        return (self.config.inner.order == "first" and type(self.elbo) is LeanMeanFieldELBO
                and type(guide).task_distribution is MeanFieldGuide.task_distribution
                and type(prior).task_distribution is HierarchicalPrior.task_distribution
                and type(prior).global_values is HierarchicalPrior.global_values)

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.adapter.parameters())
        if isinstance(self.guide.task_guide, nn.Module):
            params += [p for p in self.guide.task_guide.parameters() if p.requires_grad]
        if self.subspace is not None:
            params += [p for p in self.subspace.parameters() if p.requires_grad]
        return params

    def theta(self) -> dict[str, Tensor]:
        return self.adapter.global_params()

    def init_task_params(self, theta: dict[str, Tensor], support: TaskData | None = None) -> dict[str, Tensor]:
        """A task's starting variational parameters: the task guide's (from θ and the support set),
        and q(z_i)'s at the prior with a task subspace."""
        start = self.guide.task_guide.init_task_params(self.adapter, theta, support)
        if self.subspace is not None:
            start.update(self.subspace.init_task_params())
        return start

    # ------------------------------------------------------------------ inner loop
    def _support_loss_fn(self, theta: dict[str, Tensor], support: TaskData):
        beta, latent_beta = self.config.kl_beta, self.config.subspace_beta

        def loss_fn(params: dict[str, Tensor]) -> Tensor:
            with factor_backed(self.factor_backed):
                return task_loss(self.elbo, self.model, self.guide, theta, [params], [support], beta, latent_beta)

        return loss_fn

    def refine(self, theta: dict[str, Tensor], start: dict[str, Tensor], support: TaskData,
               num_inner_steps: int | None = None, create_graph: bool = False,
               learn_curvature: bool = False) -> dict[str, Tensor]:
        """Run the inner loop from ``start`` on ``support`` with θ fixed (first order: θ detached).
        ``learn_curvature``: the task subspace's curvature buffer learns from these steps (training's
        inner loops only; adapting a test task reads it and leaves it as it is)."""
        inner = self.config.inner
        if inner.subsample_size is not None:
            support = TaskData(support.batch, inner.subsample_size, support.observed)
        fixed = theta if create_graph else {k: v.detach() for k, v in theta.items()}
        steps = inner.num_inner_steps if num_inner_steps is None else num_inner_steps
        curvature = None
        if inner.optimizer in PRECONDITIONED:
            curvature = kl_curvature(self.adapter, self.model.prior, fixed, self.config.kl_beta, self.guide.task_guide)
        step = None
        if self.subspace is not None:
            beta, lr = self.config.subspace_beta, self.config.subspace_inner_lr
            step = lambda params, grads: self.subspace.newton_step(params, grads, beta, lr, learn_curvature)  # noqa: E731
        cache = not create_graph and self.factor_backed and (  # θ's prior moments made once (theta_cache)
            self.theta_cache if self.theta_cache is not None else prior_cache_bytes(self.adapter, fixed) <= PRIOR_CACHE_BYTES)
        with cached_prior(fixed if cache else None):
            refined = inner_loop(self._support_loss_fn(fixed, support), start, steps, inner.inner_lr,
                                 inner.optimizer, create_graph=create_graph, curvature=curvature, adam_eps=inner.adam_eps,
                                 frozen=frozenset(getattr(self.guide.task_guide, "frozen_keys", lambda p: ())(start)),
                                 custom_step=step)
        refresh = getattr(self.guide.task_guide, "refresh", None)  # e.g. a precision re-read at the refined mean
        return refresh(self.adapter, refined, support) if refresh is not None else refined

    def adapt(self, support: TaskData, num_inner_steps: int | None = None) -> dict[str, Tensor]:
        """The task posterior's parameters after the inner loop from θ on ``support`` (detached)."""
        theta = self.theta()
        with torch.no_grad():
            start = self.init_task_params(theta, support)
        refined = self.refine(theta, start, support, num_inner_steps)
        return {k: v.detach() for k, v in refined.items()}

    # ------------------------------------------------------------------ outer step
    def loss_and_grads(self, episodes: Sequence[Episode], num_tasks: int | None = None,
                       backward: Callable[[Tensor], None] | None = None) -> StepResult:
        """The outer loss of ``episodes`` with its gradients *added* to ``.grad`` (no zeroing, no step).

        ``num_tasks`` (M) weights log p(θ) by 1/M. ``backward`` replaces ``Tensor.backward`` (e.g.
        ``accelerator.backward`` for loss scaling). Call it several times between optimizer steps to
        accumulate gradients over micro-batches; :meth:`step` is zero_grad + this + clip + step.
        """
        if not episodes:
            raise ValueError("a meta step needs at least one episode")
        backward = backward or (lambda loss: loss.backward())
        M = num_tasks or self.num_tasks or len(episodes)
        cfg, inner = self.config, self.config.inner
        second = inner.order == "second"
        theta = self.theta()
        total = nll = kl = per_example = latent_kl = 0.0
        latent_beta = cfg.subspace_beta
        sigma_q: float | None = 0.0
        b = len(episodes)
        for ep in episodes:
            start = self.init_task_params(theta, ep.support)
            refined = self.refine(theta, start, ep.support, create_graph=second, learn_curvature=True)
            if second:
                task = refined
            elif inner.pass_through:
                task = pass_through(refined, start)
            else:
                task = {k: v.detach() for k, v in refined.items()}
            query = ep.query
            if cfg.query_subsample_size is not None:
                query = TaskData(query.batch, cfg.query_subsample_size, query.observed)
            if second or cfg.outer_kl == "pass-through":
                with factor_backed(self.factor_backed):  # (off in second order)
                    loss, loglik = recorded(lambda: task_loss(self.elbo, self.model, self.guide, theta, [task], [query],
                                                              cfg.kl_beta, latent_beta))
                task_kl_value = task_kl(self.model, self.guide, theta, task)
                if self.subspace is not None:
                    latent_kl += float(self.subspace.kl(task).detach().double()) / b
            else:  # likelihood through the pass-through, KL with q held fixed (the M-step for θ)
                fixed = {k: v.detach() for k, v in refined.items()}
                with factor_backed(self.factor_backed):
                    kl_value = task_kl_loss(self.model, self.guide, theta, fixed)  # q's values are task's: the logged KL
                task_kl_value = float(kl_value.detach().double())
                if cfg.kl_beta:
                    kl_term = cfg.kl_beta * kl_value
                    self._check(kl_term, f"KL term of task {ep.name!r}")
                    if kl_term.requires_grad:
                        # back-propagated before the query's LM graph exists: the KL's dense [out, in]
                        # buffers (its gradient factors, σ_θ's softplus input) are freed before the LM's
                        # activations are made (same gradient: a sum's backward is its terms' backwards)
                        backward(kl_term / b)
                    total += float(kl_term.detach()) / b
                    del kl_term
                del kl_value
                if self.subspace is not None:  # q(z_i) fixed too: the M-step for the subspace's scales
                    z_kl = self.subspace.kl(fixed)
                    latent_kl += float(z_kl.detach().double()) / b
                    if latent_beta:
                        z_term = latent_beta * z_kl
                        self._check(z_term, f"subspace KL term of task {ep.name!r}")
                        if z_term.requires_grad:
                            backward(z_term / b)
                        total += float(z_term.detach()) / b
                with factor_backed(self.factor_backed):
                    loss, loglik = recorded(lambda: task_loss(self.elbo, self.model, self.guide, theta, [task], [query],
                                                              0.0, 0.0))
                if not torch.is_tensor(loss):  # Pyro's 0.0 for a model with no scored site (no likelihood)
                    loss = torch.zeros((), device=next(iter(theta.values())).device)
            self._check(loss, f"query loss of task {ep.name!r}")
            if loss.requires_grad:  # not without pass-through under outer_kl="prior": θ's gradient is the KL's
                backward(loss / b)  # one task's LM graph at a time
            total += float(loss.detach()) / b
            nll += -loglik / b
            per_example += -loglik / _scored_units(query.batch) / b  # (a subsampled query's loglik is scaled to all)
            kl += task_kl_value / b
            task_sigma = mean_task_std(self.adapter, self.guide.task_guide, task)
            sigma_q = None if sigma_q is None or task_sigma is None else sigma_q + task_sigma / b
        with factor_backed(self.factor_backed):  # θ's densities recomputed module by module in backward
            g_loss = global_loss(self.elbo, self.model, self.guide, theta, cfg.gamma) / M
        self._check(g_loss, "global loss −γ·log p(θ)/M")
        if g_loss.requires_grad:
            backward(g_loss)
        total += float(g_loss.detach())
        sub = self.subspace
        return StepResult(total, nll, kl, log_hyperprior(self.model, theta),
                          sigma_theta=mean_prior_std(self.adapter, theta), sigma_q=sigma_q, nll_per_example=per_example,
                          subspace_kl=latent_kl if sub is not None else None,
                          subspace_scale=sub.mean_scale() if sub is not None else None)

    def step(self, episodes: Sequence[Episode], num_tasks: int | None = None) -> StepResult:
        """One outer step: zero the gradients, :meth:`loss_and_grads`, clip, optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.scale_parameters:
            p.grad = None
        result = self.loss_and_grads(episodes, num_tasks)
        stepped = {id(p) for p in self.scale_parameters}  # their SGD step is proportional to the gradient: not clipped
        params = [p for p in self.trainable_parameters() if id(p) not in stepped]
        clip = self.config.grad_clip
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip else math.inf))
        if not math.isfinite(norm):
            raise NonFiniteLossError(f"outer gradient norm is {norm} (check outer_lr, kl_beta, kl_gamma)")
        self.optimizer.step()
        self._scale_step()
        return replace(result, grad_norm=norm)

    @torch.no_grad()
    def _scale_step(self) -> None:
        """``scale_optimizer="sgd"``: θ's scale factors take p ← p − lr_s·∂L/∂p, lr_s = ``scale_lr``
        times the outer learning rate's current fraction of ``outer_lr`` (its schedule)."""
        if not self.scale_parameters:
            return
        cfg = self.config
        fraction = self.optimizer.param_groups[0]["lr"] / cfg.outer_lr if self.optimizer.param_groups else 1.0
        lr = (cfg.scale_lr if cfg.scale_lr is not None else cfg.outer_lr) * fraction
        for p in self.scale_parameters:
            if p.grad is not None and p.requires_grad:
                p.add_(p.grad, alpha=-lr)

    @staticmethod
    def _check(loss: Tensor, where: str) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(f"{where} is {value} (check outer_lr, inner_lr, kl_beta and the data)")

    # ------------------------------------------------------------------ convenience
    def fit(self, batches: Iterable[Sequence[Episode]], num_tasks: int | None = None) -> list[StepResult]:
        """Run :meth:`step` on every batch; return the per-step results."""
        return [self.step(batch, num_tasks) for batch in batches]
