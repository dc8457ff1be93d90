"""Per-step overheads removed without changing the math: the outer KL back-propagated before the
query loss (same gradients, same draws), float64 sums without float64 copies of dense tensors."""

import pyro
import pytest
import torch
from _support.helpers import family_episode, tiny_lm

from abmll_pyro import AdapterConfig, BayesLoRA, MetaConfig, MetaSVI
from abmll_pyro.infer.inner import pass_through
from abmll_pyro.infer.meta import mean_prior_std, mean_task_std
from abmll_pyro.infer.objective import global_loss, log_hyperprior, task_kl_loss, task_loss


def _svi(seed=3):
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    adapter = BayesLoRA(tiny_lm("llama", seed=1), AdapterConfig(rank=2, init_std=0.05),
                        generator=torch.Generator().manual_seed(seed))
    return MetaSVI(adapter, MetaConfig(kl_beta=0.1, kl_gamma=0.01, outer_lr=1e-2))  # a KL large enough to matter


def _episodes():
    g = torch.Generator().manual_seed(5)
    return [family_episode(i, 3, 4, g) for i in range(2)]


def _one_backward_per_task(svi, episodes, M):
    """The outer loss as it was computed before: likelihood + β·KL summed, then one backward per task."""
    theta, b, cfg = svi.theta(), len(episodes), svi.config
    total = 0.0
    for ep in episodes:
        start = svi.guide.task_guide.init_task_params(svi.adapter, theta, ep.support)
        refined = svi.refine(theta, start, ep.support)
        loss = task_loss(svi.elbo, svi.model, svi.guide, theta, [pass_through(refined, start)], [ep.query], 0.0)
        fixed = {k: v.detach() for k, v in refined.items()}
        loss = loss + cfg.kl_beta * task_kl_loss(svi.model, svi.guide, theta, fixed)
        (loss / b).backward()
        total += float(loss.detach()) / b
    g_loss = global_loss(svi.elbo, svi.model, svi.guide, theta, cfg.gamma) / M
    g_loss.backward()
    return total + float(g_loss.detach())


def test_kl_backpropagated_first_gives_the_same_loss_and_gradients():
    new = _svi()
    result = new.loss_and_grads(_episodes(), num_tasks=8)
    old = _svi()
    total = _one_backward_per_task(old, _episodes(), 8)
    assert result.loss == pytest.approx(total, rel=1e-6)
    for (k, p), q in zip(new.theta().items(), old.theta().values()):
        assert p.grad is not None and p.grad.abs().sum() > 0
        # same draws (the analytic KL draws nothing), float32 terms added in another order: round-off
        # only: 1e-5 relative to each entry or to the largest entry (per-task terms cancel in some entries)
        atol = 1e-5 * float(q.grad.abs().max())
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=atol, msg=lambda m: f"{k}: {m}")


@torch.no_grad()
def test_float64_sums_equal_the_float64_copies():
    svi = _svi()
    theta = svi.theta()
    ad = svi.adapter
    task = {k: v.detach() * 1.1 for k, v in theta.items()}
    count = sum(o * i for o, i in ad.shapes.values())
    prior = sum(float(ad.std(theta, m).double().sum()) for m in ad.shapes) / count
    q_std = sum(float(svi.guide.task_guide.task_distribution(ad, task, m).variance.sqrt().double().sum())
                for m in ad.shapes) / count
    hyper = 0.0
    for m, shape in ad.shapes.items():
        mean, std = ad.mean(theta, m), ad.std(theta, m)
        dists = svi.model.prior.hyperprior(shape, mean[:0].sum())
        hyper += sum(float(dists[k].log_prob(v).double().sum())
                     for k, v in svi.model.prior.global_values(mean, std).items())
    # float32 values summed in float64 either way: equal up to the order of the sum (~1e-15 relative)
    assert mean_prior_std(ad, theta) == pytest.approx(prior, rel=1e-12)
    assert mean_task_std(ad, svi.guide.task_guide, task) == pytest.approx(q_std, rel=1e-12)
    assert log_hyperprior(svi.model, theta) == pytest.approx(hyper, rel=1e-12)


def test_pyro_validation_off_changes_no_value():
    with pyro.validation_enabled(True):
        on = _svi()
        r_on = on.step(_episodes(), num_tasks=8)
    with pyro.validation_enabled(False):
        off = _svi()
        r_off = off.step(_episodes(), num_tasks=8)
    assert r_on == r_off  # checks only: every value bit for bit
    for p, q in zip(on.theta().values(), off.theta().values()):
        assert torch.equal(p, q)


def test_training_runs_with_pyro_validation_off(tmp_path, monkeypatch):
    from abmll_pyro.methods.abmll import ABMLL
    from abmll_pyro.train.config import RunConfig
    from abmll_pyro.train.run import train_run
    from abmll_pyro.presets import synthetic_task_folder

    seen = []
    real = ABMLL.train_step
    monkeypatch.setattr(ABMLL, "train_step",
                        lambda self, *a, **k: seen.append(pyro.infer.util.is_validation_enabled()) or real(self, *a, **k))
    tasks = synthetic_task_folder(tmp_path / "tasks", num_train=3, num_test=1, examples=8)
    config = RunConfig(method="abmll", model="tiny-llama", tasks=str(tasks), rank=2, steps=1, shots=2, query_size=2,
                       eval_query_size=2, num_inner_steps=1, num_samples=1, num_threads=1)
    train_run(config, tmp_path / "run", progress=False)
    assert seen and not any(seen) and pyro.infer.util.is_validation_enabled()  # restored afterwards
