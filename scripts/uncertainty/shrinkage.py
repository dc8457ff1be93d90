"""Few-shot shrinkage: paired comparisons along the shots curve, over one or more seeds.

Reads the ``predictions/<method>-k<k>.predictions.jsonl`` files of uncertainty-study folders (one per
seed: the seed is part of every example's key, so seeds pool), and for every k:

* each method's pooled accuracy, NLL and ECE (± bootstrap SE) and the ECE floor;
* the reference method (ABMLL) at k against itself at k = 0 — its prior predictive — and against every
  other method at k: differences reference − other with paired 95% intervals (tasks, then examples,
  resampled together: :func:`abmll_pyro.eval.compare.paired_comparison`), an interval excluding 0
  resolving the difference;
* the reference's epistemic share (mean mutual information / mean predictive entropy) per seed, from
  each folder's ``uncertainty.json``.

    python scripts/uncertainty/shrinkage.py runs/unc-seed0 runs/unc-seed1 runs/unc-seed2 --out docs/results/shrinkage
    python scripts/uncertainty/shrinkage.py runs/a runs/b --label runs/b abmll abmll-b1 --out OUT   # two ABMLL runs

Writes ``shrinkage.json`` and ``shrinkage.md`` under ``--out``; the last line printed is a JSON object of
the goals' verdicts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: scripts.* and its abmll_pyro

from abmll_pyro.eval.compare import PredictionsError, load_predictions, paired_comparison, summarize
from abmll_pyro.eval.predictions_io import PREDICTION_SUFFIXES
from abmll_pyro.train.checkpoint import atomic_write_text

__all__ = ["shrinkage", "format_shrinkage", "main"]

_NAME = re.compile(r"^(?P<method>.+)-k(?P<k>\d+)\.predictions\.jsonl")


def _files(folders: Sequence[Path], labels: Mapping[tuple[str, str], str] | None = None) -> dict[tuple[str, int], list[Path]]:
    """``{(label, k): [file per folder]}`` from every folder's ``predictions/``; a method is labelled by
    its own name unless ``labels[(folder, method)]`` names it otherwise (two runs of one method)."""
    found: dict[tuple[str, int], list[Path]] = {}
    for folder in folders:
        for f in sorted((Path(folder) / "predictions").glob("*")):
            m = _NAME.match(f.name)
            if m and any(f.name.endswith(s) for s in PREDICTION_SUFFIXES):
                label = (labels or {}).get((str(folder), m["method"]), m["method"])
                found.setdefault((label, int(m["k"])), []).append(f)
    if not found:
        raise PredictionsError(f"no <method>-k<k>.predictions.jsonl files under {[str(Path(f) / 'predictions') for f in folders]}")
    return found


def _share(folders: Sequence[Path], label: str, labels: Mapping[tuple[str, str], str]) -> dict[int, list[float]]:
    """Per k, the labelled method's epistemic share (epistemic / entropy, pooled means) in each folder."""
    out: dict[int, list[float]] = {}
    for folder in folders:
        path = Path(folder) / "uncertainty.json"
        if not path.exists():
            continue
        methods = json.loads(path.read_text()).get("methods", {})
        name = next((m for m in methods if labels.get((str(folder), m), m) == label), None)
        entry = methods.get(name, {}) if name is not None else {}
        for row in entry.get("curve", []):
            if row.get("entropy", 0) > 0:
                out.setdefault(int(row["shots"]), []).append(row["epistemic"] / row["entropy"])
    return out


def shrinkage(folders: Sequence[Path], reference: str = "abmll", num_resamples: int = 1000, seed: int = 0,
              labels: Mapping[tuple[str, str], str] | None = None) -> dict:
    """The measurements of the module docstring (JSON-able). ``labels``: ``{(folder, method): label}``."""
    labels = dict(labels or {})
    files = _files(folders, labels)
    if not any(m == reference for m, _ in files):
        raise PredictionsError(f"reference method {reference!r} has no predictions; found {sorted({m for m, _ in files})}")
    label = lambda m, k: f"{m}@k{k}"  # noqa: E731
    preds = {label(m, k): load_predictions(fs, names=[label(m, k)] * len(fs))[label(m, k)] for (m, k), fs in files.items()}
    shots = sorted({k for _, k in files})
    methods = sorted({m for m, _ in files}, key=lambda m: (m != reference, m))
    share = _share(folders, reference, labels)
    result: dict = {"reference": reference, "shots": shots, "methods": methods, "folders": [str(f) for f in folders],
                    "per_k": {}}
    for k in shots:
        here = {m: preds[label(m, k)] for m in methods if label(m, k) in preds}
        row: dict = {"metrics": {r["method"].split("@")[0]: r for r in summarize(
            {label(m, k): p for m, p in here.items()}, num_resamples=num_resamples, seed=seed)}}
        if reference in here:
            pairs = {label(reference, k): here[reference]}
            pairs.update({label(m, k): p for m, p in here.items() if m != reference})
            if k and label(reference, 0) in preds:
                pairs[label(reference, 0)] = preds[label(reference, 0)]
            row["paired"] = {r["method"]: r for r in paired_comparison(pairs, label(reference, k), num_resamples=num_resamples,
                                                                     seed=seed)}
        if k in share:
            row["epistemic_share"] = share[k]
        result["per_k"][str(k)] = row
    result["goals"] = _goals(result)
    return result


def _goals(result: dict) -> dict:
    """Verdicts of the few-shot goals for the reference: NLL at every k not above its own at k = 0 (no
    interval of reference@k − reference@0 lying above 0), below each other method's at k ≤ 4 (interval excluding 0), and at the largest k within
    0.02 nats of the best method's pooled NLL."""
    ref, out = result["reference"], {}
    for key, row in result["per_k"].items():
        k = int(key)
        paired = row.get("paired", {})
        zero = paired.get(f"{ref}@k0")
        if zero is not None:
            out[f"k{k}_not_above_k0"] = not (zero["nll"]["excludes_zero"] and zero["nll"]["diff"] > 0)
        if 0 < k <= 4:
            for name, r in paired.items():
                if name != f"{ref}@k0":
                    out[f"k{k}_below_{name.split('@')[0]}"] = bool(r["nll"]["excludes_zero"] and r["nll"]["diff"] < 0)
    last = result["per_k"][str(max(result["shots"]))]["metrics"]
    if ref in last:
        best = min(r["nll"]["value"] for r in last.values())
        out[f"k{max(result['shots'])}_within_0.02_of_best"] = last[ref]["nll"]["value"] - best <= 0.02
    return out


def _cell(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (" *" if d["excludes_zero"] else "")


def format_shrinkage(result: dict) -> str:
    """Two Markdown tables: pooled NLL (± SE) per method and k; the reference's paired NLL differences."""
    ref, shots = result["reference"], result["shots"]
    lines = ["| method | " + " | ".join(f"k = {k}" for k in shots) + " |", "|---|" + "---|" * len(shots)]
    for m in result["methods"]:
        cells = []
        for k in shots:
            r = result["per_k"][str(k)]["metrics"].get(m)
            cells.append(f"{r['nll']['value']:.3f} ± {r['nll']['se']:.3f}" if r else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"NLL differences, {ref} − other at the same k (and − itself at k = 0), paired 95% intervals "
              "(* excludes 0):", "", "| against | " + " | ".join(f"k = {k}" for k in shots) + " |",
              "|---|" + "---|" * len(shots)]
    for other in [f"{ref} at k = 0"] + [m for m in result["methods"] if m != ref]:
        cells = []
        for k in shots:
            paired = result["per_k"][str(k)].get("paired", {})
            key = f"{ref}@k0" if other.endswith("k = 0") else f"{other}@k{k}"
            cells.append(_cell(paired[key]["nll"]) if key in paired else "—")
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    shares = [(k, result["per_k"][str(k)].get("epistemic_share")) for k in shots]
    if any(s for _, s in shares):
        lines += ["", f"{ref}'s epistemic share (mutual information / predictive entropy), per seed: "
                  + "; ".join(f"k = {k}: " + ", ".join(f"{v:.2g}" for v in s) for k, s in shares if s)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="scripts/uncertainty/shrinkage.py", description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="uncertainty-study output folders (one per seed)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reference", default="abmll", help="the method (or label) every other is compared with")
    p.add_argument("--label", nargs=3, action="append", default=[], metavar=("FOLDER", "METHOD", "LABEL"),
                   help="call METHOD's predictions in FOLDER LABEL (two runs of one method, e.g. two β)")
    p.add_argument("--resamples", type=int, default=1000)
    args = p.parse_args(argv)
    try:
        unknown = [f for f, _, _ in args.label if Path(f) not in args.folders]
        if unknown:
            raise PredictionsError(f"--label names folder(s) {unknown} that are not among the folders given")
        labels = {(str(Path(f)), m): lab for f, m, lab in args.label}
        result = shrinkage(args.folders, args.reference, args.resamples, labels=labels)
    except PredictionsError as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "shrinkage.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / "shrinkage.md", format_shrinkage(result))
    print(format_shrinkage(result))
    print(json.dumps(result["goals"]))


if __name__ == "__main__":
    main()
