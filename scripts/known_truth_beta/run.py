"""β on known truth: at which KL weight is the held-out posterior predictive calibrated and best?

On the known-truth family (data drawn from ABMLL's own hierarchy, so β = 1 is the exact ELBO), one
``scripts/known_truth.py`` study per (s, β) — the low-rank-precision guide with the settings of
docs/posterior.md section 10, the held-out shots curve k = 0, 1, 2, 4, 8, 16 and the maximum-likelihood
point estimate — then a summary: per s and β, σ_θ / s, the SBC p-value, the NLL and ECE (with its floor)
at every k, and the paired difference of each β's NLL from β = 1's on the same held-out tasks (mean
over 16 tasks with a 95% t-interval).

    python scripts/known_truth_beta/run.py --out runs/kt-beta --spreads 0.1 0.3 1.0 --betas 0.1 0.3 1 3
    python scripts/known_truth_beta/run.py --out runs/kt-beta --summarize-only      # existing studies

Writes ``OUT/s<s>-beta<β>/known_truth.json`` (one study each; a finished one is reused), ``beta.json``
and ``beta.md``; the last line printed is the best β per s by the held-out NLL at the smallest k > 0 and the largest.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: scripts.* and its abmll_pyro

from abmll_pyro.eval.compare import t975
from abmll_pyro.train.checkpoint import atomic_write_text

#: docs/posterior.md section 10's training, plus the shots curve and the point estimate
SETTINGS = ("guide=low-rank-precision", "scalar_scale=true", "scale_optimizer=sgd", "scale_lr=0.01", "outer_lr=0.005",
            "fine_tune=true")
SCRIPT = Path(__file__).resolve().parents[1] / "known_truth.py"


def _folder(out: Path, s: float, beta: float) -> Path:
    return out / f"s{s:g}-beta{beta:g}"


def run_study(out: Path, s: float, beta: float, args: argparse.Namespace) -> Path:
    """One known-truth study (skipped when its ``known_truth.json`` exists)."""
    folder = _folder(out, s, beta)
    if not (folder / "known_truth.json").exists():
        cmd = [sys.executable, str(SCRIPT), "--preset", args.preset, "--out", str(folder), "--spreads", f"{s:g}", "--threads",
               str(args.threads), "--quiet", "--set", *SETTINGS, f"steps={args.steps}", f"eval_shots={args.eval_shots}",
               f"seed={args.seed}", f"kl_beta={beta:g}", *args.set]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return folder / "known_truth.json"


def _paired(a: list[float], b: list[float]) -> dict:
    """Mean of a − b over paired tasks with a 95% t-interval."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"diff": mean, "ci95": [mean - half, mean + half], "excludes_zero": bool(abs(mean) > half), "n": n}


def summarize(out: Path, spreads: list[float], betas: list[float]) -> dict:
    """The summary of the module docstring from the studies under ``out``."""
    result: dict = {"spreads": spreads, "betas": betas, "settings": list(SETTINGS), "runs": []}
    for s in spreads:
        studies = {}
        for beta in betas:
            path = _folder(out, s, beta) / "known_truth.json"
            if path.exists():
                studies[beta] = json.loads(path.read_text())["runs"][0]
        ref = studies.get(1.0)
        for beta, r in studies.items():
            shots = sorted(int(k[1:]) for k in r["nll"] if k.startswith("k"))
            row = {"spread": s, "kl_beta": beta, "ratio": r["ratio"], "sigma_theta": r["sigma_theta"],
                   "sbc_p": r["sbc"]["p_value"], "oracle": r["nll"]["oracle"], "shots": shots,
                   "nll": {f"k{k}": r["nll"][f"k{k}"] for k in shots},
                   "mle": {f"k{k}": r["nll"][f"mle_k{k}"] for k in shots if f"mle_k{k}" in r["nll"]},
                   "ece": {f"k{k}": r["calibration"][f"k{k}"]["ece"] for k in shots},
                   "ece_floor": {f"k{k}": r["calibration"][f"k{k}"]["ece_floor"] for k in shots}}
            tasks = r.get("per_task", {})
            row["vs_k0"] = {f"k{k}": _paired(tasks[f"k{k}"], tasks["k0"]) for k in shots if k and "k0" in tasks}
            if ref is not None and beta != 1.0 and "per_task" in ref:
                row["vs_beta1"] = {f"k{k}": _paired(tasks[f"k{k}"], ref["per_task"][f"k{k}"]) for k in shots}
            result["runs"].append(row)
    return result


def _cell(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (" *" if d["excludes_zero"] else "")


def format_summary(result: dict) -> str:
    lines = []
    for s in result["spreads"]:
        rows = [r for r in result["runs"] if r["spread"] == s]
        if not rows:
            continue
        shots = rows[0]["shots"]
        lo, hi = f"k{shots[1]}", f"k{shots[-1]}"
        lines += [f"s = {s:g} (oracle NLL {rows[0]['oracle']:.3f}): held-out NLL by k; ECE (its floor) at the smallest "
                  "and largest k; the maximum-likelihood point estimate's NLL at the largest k", "",
                  "| β | σ_θ / s | SBC p | " + " | ".join(f"k = {k}" for k in shots)
                  + f" | ECE k = {shots[1]} | ECE k = {shots[-1]} | MLE k = {shots[-1]} |",
                  "|---|---|---|" + "---|" * (len(shots) + 3)]
        for r in sorted(rows, key=lambda r: r["kl_beta"]):
            nll = " | ".join(f"{r['nll'][f'k{k}']:.3f}" for k in shots)
            lines.append(f"| {r['kl_beta']:g} | {r['ratio']:.2f} | {r['sbc_p']:.2g} | {nll} | "
                         f"{r['ece'][lo]:.3f} ({r['ece_floor'][lo]:.3f}) | {r['ece'][hi]:.3f} ({r['ece_floor'][hi]:.3f}) | "
                         f"{r['mle'].get(hi, float('nan')):.3f} |")
        lines += ["", "NLL(β) − NLL(β = 1) on the same held-out tasks, 95% t-interval (* excludes 0):", "",
                  "| β | " + " | ".join(f"k = {k}" for k in shots) + " |", "|---|" + "---|" * len(shots)]
        for r in sorted(rows, key=lambda r: r["kl_beta"]):
            if "vs_beta1" in r:
                lines.append(f"| {r['kl_beta']:g} | " + " | ".join(_cell(r["vs_beta1"][f"k{k}"]) for k in shots) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="scripts/known_truth_beta/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--spreads", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    p.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=["tiny", "smoke"], default="tiny", help="scripts/known_truth.py's preset")
    p.add_argument("--steps", type=int, default=120, help="outer steps of each study")
    p.add_argument("--eval-shots", default="1,2,4,8", help="held-out k below the preset's test_shots, comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summarize-only", action="store_true", help="summarize the studies already under --out")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further KnownTruthConfig overrides")
    args = p.parse_args(argv)
    if any(not b > 0 for b in args.betas) or any(not s > 0 for s in args.spreads):
        p.error("every β and every spread must be > 0")
    if not args.summarize_only:
        for s in args.spreads:
            for beta in args.betas:
                run_study(args.out, s, beta, args)
    result = summarize(args.out, args.spreads, args.betas)
    if not result["runs"]:
        print(f"{p.prog}: error: no known_truth.json under {args.out}/s<s>-beta<β>/", file=sys.stderr)
        raise SystemExit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "beta.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / "beta.md", format_summary(result))
    print(format_summary(result))
    best = {}
    for s in args.spreads:
        rows = [r for r in result["runs"] if r["spread"] == s]
        if rows:
            ks = (f"k{rows[0]['shots'][1]}", f"k{rows[0]['shots'][-1]}")
            best[f"{s:g}"] = {k: min(rows, key=lambda r: r["nll"][k])["kl_beta"] for k in ks}
    print(json.dumps(best))


if __name__ == "__main__":
    main()
