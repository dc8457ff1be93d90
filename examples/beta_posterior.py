"""β, the hyperprior and the inner optimizer on the tiny family (docs/posterior.md, issue 13 item 3).

The synthetic family of ``tests/_support/helpers.py`` (every task's gold option is the token from a
shared set, behind a task-specific marker; a meta-learner can learn the rule into θ). For each
(prior, inner optimizer, kl_beta), kl_gamma = kl_beta (or ``--kl-gamma``, fixed): meta-train a tiny random Llama for ``--steps``
outer steps of 2 tasks, then adapt to 6 held-out tasks (4 shots, 24 queries each) and report pooled
accuracy, NLL, ECE (15 bins), the mean σ of the adapted q, the KL(q‖p) after adaptation and the mean
epistemic uncertainty (mutual information over ``--samples`` posterior samples).

    python examples/beta_posterior.py                       # the table in docs/posterior.md
    python examples/beta_posterior.py --steps 2 --betas 1   # a quick check
    python examples/beta_posterior.py --variants hierarchical:adam hierarchical:kl-precond --kl-gamma 1e-8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyro
import torch

from abmll_pyro import AdapterConfig, BayesLoRA, InnerLoopConfig, MetaConfig, MetaSVI
from abmll_pyro.eval import compute_metrics
from abmll_pyro.infer import predictive_samples, uncertainty_split
from abmll_pyro.infer.meta import mean_task_std
from abmll_pyro.infer.objective import task_kl
from abmll_pyro.registry import resolve_prior

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _support.helpers import family_episode, tiny_lm  # noqa: E402

HELD_OUT = range(100, 106)


def build(prior: str, optimizer: str, kl_beta: float, inner_lr: float, init_std: float,
          kl_gamma: float | None = None) -> MetaSVI:
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    adapter = BayesLoRA(tiny_lm("llama", seed=1), AdapterConfig(rank=4, init_std=init_std),
                        generator=torch.Generator().manual_seed(0))
    inner = InnerLoopConfig(num_inner_steps=3, inner_lr=inner_lr, optimizer=optimizer)
    meta = MetaConfig(kl_beta=kl_beta, kl_gamma=kl_gamma, outer_lr=3e-2, grad_clip=1.0, inner=inner)
    return MetaSVI(adapter, meta, prior=resolve_prior(prior, adapter=adapter), num_tasks=40)


def evaluate(svi: MetaSVI, samples: int) -> dict:
    g = torch.Generator().manual_seed(1234)
    probs, gold, epi, sig, kls = [], [], [], [], []
    for t in HELD_OUT:
        ep = family_episode(t, 4, 24, g)
        post = svi.adapt(ep.support)
        split = uncertainty_split(predictive_samples(svi, post, ep.query, num_samples=samples))
        probs.append(split.probs.float())
        gold.append(ep.query.batch.gold)
        epi.append(split.epistemic)
        sig.append(mean_task_std(svi.adapter, svi.guide.task_guide, post))
        kls.append(task_kl(svi.model, svi.guide, svi.theta(), post))
    m = compute_metrics(torch.cat(probs), torch.cat(gold), 15)
    return {"accuracy": m.accuracy, "nll": m.nll, "ece": m.ece, "sigma_q": sum(sig) / len(sig),
            "kl": sum(kls) / len(kls), "epistemic": float(torch.cat(epi).mean())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--betas", nargs="+", type=float, default=[1e-8, 1e-4, 1e-2, 1.0])
    p.add_argument("--variants", nargs="+", default=["hierarchical-abml:adam", "hierarchical:adam", "hierarchical:kl-precond"],
                   help="PRIOR:INNER_OPTIMIZER pairs")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--inner-lr", type=float, default=1e-2)
    p.add_argument("--init-std", type=float, default=1e-3)
    p.add_argument("--kl-gamma", type=float, default=None, help="a fixed kl_gamma (default: kl_gamma = kl_beta)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print("| prior | inner optimizer | kl_beta | accuracy | NLL | ECE | mean σ_q | KL(q‖p) | epistemic (nats) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant in args.variants:
        prior, optimizer = variant.split(":")
        for beta in args.betas:
            svi = build(prior, optimizer, beta, args.inner_lr, args.init_std, args.kl_gamma)
            g = torch.Generator().manual_seed(0)
            try:
                for _ in range(args.steps):
                    svi.step([family_episode(int(torch.randint(0, 40, (1,), generator=g)), 4, 8, g) for _ in range(2)])
                r = evaluate(svi, args.samples)
                print(f"| {prior} | {optimizer} | {beta:g} | {r['accuracy']:.3f} | {r['nll']:.3f} | {r['ece']:.3f} | "
                      f"{r['sigma_q']:.3g} | {r['kl']:.3g} | {r['epistemic']:.2g} |", flush=True)
            except FloatingPointError as err:  # NonFiniteLossError
                print(f"| {prior} | {optimizer} | {beta:g} | diverged: {str(err)[:60]} |||||", flush=True)


if __name__ == "__main__":
    main()
