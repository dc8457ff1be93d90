"""Known truth: meta-train ABMLL on task families drawn from its own hierarchy and compare the learned
prior scale σ_θ with the true spread s; simulation-based calibration of the task posteriors
(abmll_pyro/eval/known_truth.py). One JSON summary on stdout's last line, all numbers in
OUT/known_truth.json, rank histograms in OUT/sbc_ranks.png.

    python scripts/known_truth.py --preset tiny --out /tmp/kt
    python scripts/known_truth.py --preset tiny --out /tmp/kt --spreads 0.1 0.3 1.0
    python scripts/known_truth.py --preset smollm2 --out runs/kt-smollm2 --spreads 0.03 0.1 --threads 1 \
        --set guide=low-rank-precision scalar_scale=true scale_optimizer=sgd scale_lr=0.01 outer_lr=0.005 rank=8 \
        lora_alpha=8 shots=16 examples_per_task=32 test_shots=16 eval_shots=4 start_at_truth=true steps=4 \
        tasks_per_step=2 num_train_tasks=8 num_test_tasks=6 num_projections=8 seed=0   # docs/posterior.md §12
    python scripts/known_truth.py --preset tiny --out /tmp/kt --set freeze_scales=true   # the broken control
    python scripts/known_truth.py --preset tiny --out /tmp/kt --spreads 0.3 --m-step-at-truth 0.5 1 2   # the M-step's fixed point
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import torch

from abmll_pyro.eval.known_truth import KnownTruthConfig, run_known_truth

PRESETS = {
    # the test suite's settings: tiny random Llama in float64, its LM head adapted at full rank (32)
    "tiny": dict(rank=32, lora_alpha=32.0, init_std=0.3, shots=16, examples_per_task=32, test_shots=16),
    "smoke": dict(rank=32, lora_alpha=32.0, init_std=0.3, steps=2, num_train_tasks=4, num_test_tasks=2, tasks_per_step=2,
                  num_inner_steps=2, examples_per_task=12, shots=4, test_shots=4),
    "smollm2": dict(rank=64, lora_alpha=64.0, init_std=0.1, num_inner_steps=8, steps=60, tasks_per_step=4),
}


def _value(field: dataclasses.Field, text: str):
    kind = type(field.default) if field.default is not None else int  # an optional count (cov_rank)
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{field.name} must be true or false, got {text!r}")
        return text.lower() == "true"
    if kind is tuple:
        items = tuple(t for t in text.split(",") if t)
        return tuple(int(t) for t in items) if "int" in str(field.type) else items
    return kind(text)


def config_of(preset: str, items: list[str]) -> KnownTruthConfig:
    fields = {f.name: f for f in dataclasses.fields(KnownTruthConfig)}
    values = dict(PRESETS[preset])
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        values[key] = _value(fields[key], text)
    return KnownTruthConfig(**values)


def load(preset: str):
    if preset == "smollm2":
        from abmll_pyro.lms import load_lm

        return load_lm("smollm2-135m")
    from abmll_pyro.lms import tiny_model

    lm, tok = tiny_model("llama", seed=0)
    return lm.double(), tok


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--spreads", type=float, nargs="+", default=None, help="true spreads s (default: the config's)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a KnownTruthConfig field")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--m-step-at-truth", type=float, nargs="+", default=None, metavar="FACTOR",
                   help="instead of training: the M-step's target at θ = θ* with σ_θ scaled by each FACTOR "
                        "(its fixed point is where the target crosses 1); writes OUT/m_step_targets.json")
    args = p.parse_args(argv)
    try:
        config = config_of(args.preset, args.set)
        spreads = args.spreads or [config.spread]
        if any(not s > 0 for s in spreads):
            raise ValueError(f"every spread must be > 0, got {spreads}")
    except ValueError as err:
        print(f"known_truth.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    if args.m_step_at_truth:
        from abmll_pyro.eval.known_truth import m_step_targets

        out = []
        for s in spreads:
            lm, tok = load(args.preset)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                out.append(m_step_targets(lm, tok, dataclasses.replace(config, spread=s), args.m_step_at_truth))
            log(f"s = {s:g}: " + ", ".join(f"×{f:g}: {t:.3f} ± {e:.3f}" for f, t, e in zip(*(out[-1][k] for k in ("factors", "targets", "stderr")))))
        (args.out / "m_step_targets.json").write_text(json.dumps({"preset": args.preset, "runs": out}, indent=1) + "\n")
        print(json.dumps({f"{o['config']['spread']:g}": dict(zip([f"{f:g}" for f in o["factors"]], o["targets"])) for o in out}))
        return
    results = []
    for s in spreads:
        lm, tok = load(args.preset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            results.append(run_known_truth(lm, tok, dataclasses.replace(config, spread=s), log=log))
        (args.out / "known_truth.json").write_text(json.dumps({"preset": args.preset, "runs": results}, indent=1) + "\n")
    try:
        from abmll_pyro.eval.plots import plot_rank_histograms

        plot_rank_histograms({f"s = {r['spread']:g} (p = {r['sbc']['p_value']:.2g})": r["sbc"]["histogram"] for r in results},
                             args.out / "sbc_ranks.png")
    except ImportError as err:
        warnings.warn(str(err))
    summary = {f"{r['spread']:g}": {"sigma_theta": r["sigma_theta"], "ratio": r["ratio"], "sbc_p": r["sbc"]["p_value"],
                                    "nll": r["nll"]} for r in results}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
