"""A ratio claim checked on paired predictions, and whether it is reachable at this n.

The claim (by default a sharp form of the paper's "better calibration at equal accuracy",
arXiv 2508.14285): the reference method's pooled NLL is at most ``nll_ratio`` times the
baseline's and its pooled ECE at most ``ece_ratio`` times the baseline's, with accuracy not lower by
more than one standard error, both improvements resolved (their 95% paired intervals exclude
0). :func:`target_check` evaluates each condition on the examples both methods predicted, with the
two-level bootstrap of :mod:`~abmll_pyro.eval.compare`.

It also says whether the ECE condition can be met at this ``n`` at all. A perfectly calibrated
predictor does not score ECE 0 on a finite sample: with the reference's confidences it scores the
draws of :func:`~abmll_pyro.eval.metrics.ece_floor_draws` (mean = the ECE floor). When the ECE the
claim asks for (``ece_ratio`` × the baseline's ECE) lies below that floor, the claim asks the reference
to beat a perfectly calibrated predictor; ``p_calibrated_meets`` is the fraction of draws that do —
the chance that perfect calibration alone passes the ECE condition (before its interval must also
exclude 0). Likewise for NLL: were the reference's predictions perfectly calibrated, their expected NLL
would be their mean entropy (``nll_if_calibrated``); when the NLL asked is below it, making these
predictions calibrated cannot meet the condition — only sharper ones can (better discrimination, or a
recalibration that sharpens an under-confident predictor).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .compare import Predictions, PredictionsError, paired_comparison, summarize
from .metrics import ece_floor_draws

__all__ = ["target_check", "format_target"]


def _restrict(p: Predictions, keys: Sequence[tuple[int, str, int]]) -> Predictions:
    index = p.index()
    rows = np.array([index[k] for k in keys])
    return Predictions(p.method, list(keys), p.gold[rows], p.probs[rows])


def target_check(preds: dict[str, Predictions], reference: str, baseline: str, nll_ratio: float = 0.7,
                 ece_ratio: float = 0.5, num_bins: int = 15, num_resamples: int = 1000, draws: int = 2000,
                 seed: int = 0) -> dict:
    """Each condition of the claim, its figures, and the ECE condition's reachability (module docstring)."""
    for name, flag in ((reference, "reference"), (baseline, "baseline")):
        if name not in preds:
            raise PredictionsError(f"{flag} method {name!r} has no predictions; found {sorted(preds)}")
    if reference == baseline:
        raise PredictionsError(f"the reference and the baseline are both {reference!r}: name two methods")
    for value, flag in ((nll_ratio, "nll_ratio"), (ece_ratio, "ece_ratio")):
        if not value > 0:
            raise PredictionsError(f"{flag} must be > 0, got {value!r}")
    ref_index = preds[reference].index()
    common = [k for k in preds[baseline].keys if k in ref_index]
    if not common:
        raise PredictionsError(f"{reference} and {baseline} share no (seed, task, example): different splits")
    pair = {reference: _restrict(preds[reference], common), baseline: _restrict(preds[baseline], common)}
    diff = paired_comparison(pair, reference, num_bins, num_resamples, seed)[0]
    own = {r["method"]: r for r in summarize(pair, num_bins, num_resamples, seed)}
    ref, base = own[reference], own[baseline]

    nll_r = ref["nll"]["value"] / base["nll"]["value"]
    ece_r = ref["ece"]["value"] / base["ece"]["value"] if base["ece"]["value"] > 0 else float("inf")
    acc = diff["accuracy"]
    conditions = {
        "nll": {"ratio": nll_r, "limit": nll_ratio, "diff": diff["nll"]["diff"], "ci95": diff["nll"]["ci95"],
                "met": bool(nll_r <= nll_ratio and diff["nll"]["ci95"][1] < 0)},
        "ece": {"ratio": ece_r, "limit": ece_ratio, "diff": diff["ece"]["diff"], "ci95": diff["ece"]["ci95"],
                "met": bool(ece_r <= ece_ratio and diff["ece"]["ci95"][1] < 0)},
        "accuracy": {"diff": acc["diff"], "se": acc["se"], "ci95": acc["ci95"],
                     "met": bool(acc["diff"] >= -acc["se"])},
    }
    threshold = ece_ratio * base["ece"]["value"]
    floor = ece_floor_draws(torch.from_numpy(pair[reference].probs), num_bins, draws, seed).numpy()
    reach = {"ece_asked": float(threshold), "floor_mean": float(floor.mean()),
             "floor_q05": float(np.quantile(floor, 0.05)), "floor_q95": float(np.quantile(floor, 0.95)),
             "p_calibrated_meets": float((floor <= threshold).mean()), "draws": int(draws),
             "baseline_ece_above_floor": float(base["ece"]["value"] - base["ece_floor"]),
             "below_floor": bool(threshold < floor.mean())}
    probs = pair[reference].probs
    entropy = float(-(probs * np.log(np.clip(probs, np.finfo(np.float64).tiny, None))).sum(1).mean())
    nll_reach = {"nll_asked": float(nll_ratio * base["nll"]["value"]), "nll_if_calibrated": entropy,
                 "needs_sharper": bool(nll_ratio * base["nll"]["value"] < entropy)}
    return {"reference": reference, "baseline": baseline, "n": len(common),
            "num_tasks": len({k[1] for k in common}), "seeds": sorted({k[0] for k in common}),
            "pooled": {m: {"accuracy": own[m]["accuracy"], "nll": own[m]["nll"], "ece": own[m]["ece"],
                           "ece_floor": own[m]["ece_floor"]} for m in (reference, baseline)},
            "conditions": conditions, "ece_reachability": reach, "nll_reachability": nll_reach,
            "met": bool(all(c["met"] for c in conditions.values()))}


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def format_target(t: dict) -> str:
    """Markdown of one :func:`target_check` result."""
    ref, base, c, r = t["reference"], t["baseline"], t["conditions"], t["ece_reachability"]
    pr, pb = t["pooled"][ref], t["pooled"][base]
    lines = [f"Target: {ref} against {base} on n = {t['n']} paired examples ({t['num_tasks']} tasks, "
             f"{len(t['seeds'])} seed(s)) — **{'met' if t['met'] else 'not met'}**", "",
             "| condition | asked | measured | 95% interval of the difference | holds |", "|---|---|---|---|---|"]
    n, e, a = c["nll"], c["ece"], c["accuracy"]
    lines.append(f"| NLL ratio, difference resolved | ≤ {n['limit']:g}× | {n['ratio']:.2f}× ({pr['nll']['value']:.3f} vs "
                 f"{pb['nll']['value']:.3f}) | {n['diff']:+.3f} [{n['ci95'][0]:+.3f}, {n['ci95'][1]:+.3f}] | {_yes(n['met'])} |")
    lines.append(f"| ECE ratio, difference resolved | ≤ {e['limit']:g}× | {e['ratio']:.2f}× ({pr['ece']['value']:.3f} vs "
                 f"{pb['ece']['value']:.3f}) | {e['diff']:+.3f} [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}] | {_yes(e['met'])} |")
    lines.append(f"| accuracy not lower by more than 1 SE | Δ ≥ −{a['se']:.3f} | {pr['accuracy']['value']:.3f} vs "
                 f"{pb['accuracy']['value']:.3f} | {a['diff']:+.3f} [{a['ci95'][0]:+.3f}, {a['ci95'][1]:+.3f}] | {_yes(a['met'])} |")
    lines += ["", f"Reachability of the ECE condition: it asks {ref} for ECE ≤ {r['ece_asked']:.4f}; a perfectly calibrated "
              f"predictor with {ref}'s confidences scores {r['floor_mean']:.4f} on average at this n (5–95%: "
              f"{r['floor_q05']:.4f}–{r['floor_q95']:.4f}, {r['draws']} draws) and meets the ECE asked in "
              f"{100 * r['p_calibrated_meets']:.1f}% of draws. {base}'s ECE sits {r['baseline_ece_above_floor']:+.4f} "
              f"above its own floor ({pb['ece_floor']:.4f})."]
    if r["below_floor"]:
        lines.append(f"The ECE asked is below the noise floor: meeting it needs {ref} to score better than perfect "
                     "calibration usually does at this n, so the ECE condition cannot be a test of calibration here.")
    q = t["nll_reachability"]
    lines += ["", f"NLL: it asks {ref} for NLL ≤ {q['nll_asked']:.3f}; were {ref}'s predictions perfectly calibrated at "
              f"their present confidences, their NLL would be their mean entropy, {q['nll_if_calibrated']:.3f}."]
    if q["needs_sharper"]:
        lines.append(f"So calibrating these predictions cannot meet the NLL condition: it needs {ref} to be sharper "
                     "and still calibrated (to separate right from wrong answers better), or, where it is "
                     "under-confident, a recalibration that sharpens it.")
    lines += ["", "Paired differences (reference − baseline) on identical examples, 95% two-level bootstrap "
                  "(tasks, then examples); SE: the bootstrap standard error of the accuracy difference."]
    return "\n".join(lines) + "\n"
