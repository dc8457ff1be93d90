"""The task subspace on known truth: recovery of the true spread s* and SBC, over spreads and starts.

One :func:`~abmll_pyro.eval.subspace_truth.run_subspace_truth` study per (s*, start): tasks drawn from
the model's own hierarchy with z_i ~ N(0, s*²) along fixed directions of a tiny Llama's output head
(the option tokens' rows), meta-training of the log-scales from ``start`` = s*/3 and 3·s*, then the
learned s / s*, the SBC uniformity test of q(z | support) with its shrunk-q control, the held-out
predictive NLL at k = 0 and k = shots against the oracle's, and the epistemic share at both.

    python scripts/subspace_truth/run.py --out runs/subspace-truth --spreads 3 10 30
    python scripts/subspace_truth/run.py --out runs/subspace-truth --summarize-only

Writes ``OUT/s<s>-start<start>.json`` (one study each; an existing one is reused), ``summary.json``
and ``summary.md``; the last line printed is the worst recovery ratio and the smallest SBC p-value.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: its abmll_pyro

import torch

from abmll_pyro.eval.subspace_truth import SubspaceTruthConfig, run_subspace_truth
from abmll_pyro.lms import tiny_model
from abmll_pyro.train.checkpoint import atomic_write_text


def _study(out: Path, spread: float, start: float, args: argparse.Namespace) -> dict:
    path = out / f"s{spread:g}-start{start:g}.json"
    if path.exists():
        return json.loads(path.read_text())
    if args.summarize_only:
        raise SystemExit(f"{path}: missing (run without --summarize-only first)")
    lm, tok = tiny_model("llama", seed=0)
    cfg = SubspaceTruthConfig(spread=spread, init_scale=start, steps=args.steps, seed=args.seed)
    result = run_subspace_truth(lm.double(), tok, cfg, log=lambda s: print(f"  s*={spread:g} start={start:g}: {s}", flush=True))
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return result


def summarize(rows: list[dict]) -> str:
    lines = ["| s* | start | learned s | s / s* | s / s* per direction | SBC p | control p (q ×0.3) | NLL k = 0 | NLL k = 12 | oracle | epistemic share k = 0 | k = 12 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, rec = r["config"], r["recovery"]
        lines.append(f"| {c['spread']:g} | {c['init_scale']:g} | {rec['scale']:.3g} | {rec['ratio']:.2f} | "
                     f"{rec['ratio_min']:.2f}–{rec['ratio_max']:.2f} | {r['sbc']['p_value']:.2g} | {r['sbc_control']['p_value']:.1g} | "
                     f"{r['nll']['0']:.3f} | {r['nll'][str(c['shots'])]:.3f} | {r['oracle_nll']:.3f} | "
                     f"{r['epistemic_share']['0']:.3f} | {r['epistemic_share'][str(c['shots'])]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--spreads", nargs="+", type=float, default=[3.0, 10.0, 30.0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summarize-only", action="store_true")
    args = ap.parse_args(argv)
    bad = [s for s in args.spreads if not s > 0]
    if bad or args.steps < 1:
        print(f"error: spreads must be > 0 and steps >= 1, got spreads {args.spreads}, steps {args.steps}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [_study(args.out, s, start, args) for s in args.spreads for start in (s / 3, 3 * s)]
    compact = [{k: v for k, v in r.items() if not k.startswith("per_task")} for r in rows]
    atomic_write_text(args.out / "summary.json", json.dumps({"studies": compact}, indent=1) + "\n")
    atomic_write_text(args.out / "summary.md", summarize(rows))
    print(summarize(rows), end="")
    worst = max(rows, key=lambda r: abs(r["recovery"]["ratio"] - 1))
    print(f"worst_ratio={worst['recovery']['ratio']:.3f} min_sbc_p={min(r['sbc']['p_value'] for r in rows):.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
