"""Is the amortized guide worth it? Adaptation quality and time at K inner steps, with and without encoder.

For K in ``ks`` and the task guide "mean-field" (θ's copy as the start: the paper) or "amortized" (the
support-set encoder's start, :mod:`abmll_pyro.guides.amortized`), meta-train a tiny Llama with the
same K for ``steps`` outer steps, then adapt to held-out tasks with the same K and report the query
accuracy, NLL (posterior predictive, ``num_samples`` draws) and wall time per task (start + K steps).

Two task families over raw token ids:

* ``shared`` — tests/_support/helpers.py's family: every task's gold option is a token from one
  shared set; θ can learn the rule, so the encoder has nothing task-specific to infer.
* ``rule`` — each task draws one of two rules (gold from tokens 1-4, or from 5-8) and puts one token of
  the other rule among the distractors; only the labelled support set tells which rule holds, so a
  start that ignores the support set is capped near 50% at K = 0.

    python examples/amortization_benchmark.py                # the table in docs/extending.md
    python examples/amortization_benchmark.py --smoke        # seconds; what the test runs
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

from abmll_pyro import AdapterConfig, BayesLoRA, Episode, InnerLoopConfig, MetaConfig, MetaSVI, TaskData
from abmll_pyro import posterior_predictive
from abmll_pyro.data.scoring import OptionBatch
from abmll_pyro.eval import compute_metrics
from abmll_pyro.registry import resolve_guide

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _support.helpers import VOCAB, family_batch, tiny_lm, toy_option_chars  # noqa: E402

RULES = (list(range(1, 5)), list(range(5, 9)))


def rule_batch(n: int, task_seed: int, generator: torch.Generator, num_options: int = 3) -> OptionBatch:
    """A task of the ``rule`` family: the task's rule is a coin flip fixed by its seed."""
    rule = int(torch.randint(0, 2, (1,), generator=torch.Generator().manual_seed(7919 + task_seed)))
    marker = 20 + task_seed % 20
    prompts, options, gold = [], [], []
    for _ in range(n):
        pick = lambda tokens: tokens[int(torch.randint(0, len(tokens), (1,), generator=generator))]  # noqa: E731
        good, decoy = pick(RULES[rule]), pick(RULES[1 - rule])
        rest = torch.randint(9, VOCAB, (num_options - 2,), generator=generator).tolist()
        opts = [decoy] + rest
        pos = int(torch.randint(0, num_options, (1,), generator=generator))
        opts.insert(pos, good)
        prompts.append([marker] + torch.randint(9, VOCAB, (4,), generator=generator).tolist())
        options.append([[t] for t in opts])
        gold.append(pos)
    return OptionBatch.from_token_ids(prompts, options, gold, option_chars=toy_option_chars(options))


FAMILIES = {"shared": family_batch, "rule": rule_batch}


def episode(family: str, task_seed: int, shots: int, query: int, g: torch.Generator) -> Episode:
    make = FAMILIES[family]
    return Episode(f"{family}{task_seed}", TaskData(make(shots, task_seed, g)), TaskData(make(query, task_seed, g)))


@dataclass(frozen=True)
class Row:
    family: str
    guide: str
    num_inner_steps: int
    accuracy: float
    nll: float
    adapt_ms: float  # per task: the start (incl. the encoder's LM pass) and K inner steps
    train_s: float


def build(guide: str, num_inner_steps: int, inner_lr: float, seed: int) -> MetaSVI:
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    adapter = BayesLoRA(tiny_lm("llama", seed=1), AdapterConfig(rank=4), generator=torch.Generator().manual_seed(seed))
    inner = InnerLoopConfig(num_inner_steps=num_inner_steps, inner_lr=inner_lr)
    config = MetaConfig(kl_beta=1e-6, outer_lr=3e-2, grad_clip=1.0, inner=inner)
    return MetaSVI(adapter, config, task_guide=resolve_guide(guide, adapter=adapter))


def run_one(family: str, guide: str, k: int, steps: int, held_out: int, shots: int, inner_lr: float,
            num_samples: int, seed: int = 0) -> Row:
    svi = build(guide, k, inner_lr, seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        seeds = torch.randint(0, 40, (2,), generator=g).tolist()
        svi.step([episode(family, s, shots, 8, g) for s in seeds], num_tasks=40)
    train_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1234)
    accs, nlls, times = [], [], []
    for t in range(100, 100 + held_out):
        ep = episode(family, t, shots, 24, g)
        t0 = time.perf_counter()
        post = svi.adapt(ep.support)
        times.append(time.perf_counter() - t0)
        m = compute_metrics(posterior_predictive(svi, post, ep.query, num_samples=num_samples), ep.query.batch.gold)
        accs.append(m.accuracy)
        nlls.append(m.nll)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return Row(family, guide, k, mean(accs), mean(nlls), 1e3 * mean(times), train_s)


def measure(families=("shared", "rule"), ks=(0, 1, 5), guides=("mean-field", "amortized"), steps: int = 60,
            held_out: int = 8, shots: int = 4, inner_lr: float = 1e-2, num_samples: int = 4) -> list[Row]:
    """Every (family, K, guide) combination; see the module docstring."""
    return [run_one(f, gd, k, steps, held_out, shots, inner_lr, num_samples)
            for f in families for k in ks for gd in guides]


def table(rows: list[Row]) -> str:
    lines = ["| family | K | guide | accuracy | NLL | adapt ms/task | train s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.family} | {r.num_inner_steps} | {r.guide} | {r.accuracy:.3f} | {r.nll:.3f} | "
                     f"{r.adapt_ms:.1f} | {r.train_s:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 outer steps, 2 held-out tasks, K in {0, 1}")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--held-out", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        rows = measure(families=("rule",), ks=(0, 1), steps=2, held_out=2, num_samples=1)
    else:
        rows = measure(steps=args.steps, held_out=args.held_out)
    print(table(rows))


if __name__ == "__main__":
    main()
