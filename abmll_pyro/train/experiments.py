"""The experiments behind ``scripts/``: β ablation, pruning robustness, cost, and scaling.

Each function takes a base :class:`RunConfig` (a preset's) and an output folder, writes a JSON of its
numbers and its plots there, and returns the numbers. The scripts only parse arguments and call these.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..eval.metrics import compute_metrics, macro_average
from .checkpoint import atomic_write_text
from .config import RunConfig
from .episodes import EpisodeEncoder, test_splits
from .run import RESULTS, load_trained, make_accelerator, train_run

__all__ = ["beta_ablation", "pruning_robustness", "cost_ratios", "scaling_memory", "neuron_masks"]


def _plot(xs, ys, xlabel, ylabel, path, yerr=None):
    try:
        from ..eval.plots import plot_metric_curve

        return plot_metric_curve(xs, ys, xlabel, ylabel, path, yerr)
    except ImportError as err:
        import warnings

        warnings.warn(f"plot {path} skipped: {err}")


def _trained(config: RunConfig, run_dir: Path, progress: bool) -> dict:
    done = run_dir / RESULTS
    if done.exists():
        return json.loads(done.read_text())
    return train_run(config, run_dir, progress=progress)


# ----------------------------------------------------------------------------- β ablation
def _last_metrics(run_dir: Path) -> dict:
    """The last line of a run's ``metrics.jsonl`` ({} if it has none)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


BETA_METRICS = ("accuracy", "nll", "brier", "ece", "ece_floor", "epistemic", "spread")


def beta_ablation(base: RunConfig, out: Path, log10_betas: Sequence[float] = (0, -4, -8, -12, -16),
                  seeds: Sequence[int] = (0,), progress: bool = True, kl_gamma: float | None = None) -> dict:
    """ABMLL at kl_beta = 10^x, with kl_gamma = kl_beta (``kl_gamma=None``) or fixed: per β and seed the
    pooled accuracy, NLL, Brier, ECE (and its floor), the mean epistemic uncertainty and sample spread
    of the posterior predictive, and the mean σ of θ and of the tasks' q at the last training step;
    means over seeds are plotted against log10 β. Runs already finished under ``out/runs`` are reused."""
    rows = []
    gamma_tag = "" if kl_gamma is None else f"-gamma{kl_gamma:g}"
    for x in log10_betas:
        for seed in seeds:
            config = base.updated(method="abmll", kl_beta=10.0 ** x, kl_gamma=kl_gamma, seed=seed)
            run_dir = out / "runs" / f"beta{x:g}{gamma_tag}-seed{seed}"
            r = _trained(config, run_dir, progress)
            pooled = r.get("pooled", {})
            last = _last_metrics(run_dir)
            rows.append({"log10_kl_beta": x, "seed": seed, **{k: pooled.get(k) for k in BETA_METRICS},
                         "n": pooled.get("n"), "sigma_theta": last.get("sigma_theta"), "sigma_q": last.get("sigma_q"),
                         "task_kl": last.get("task_kl")})
    summary = {}
    gamma_label = "kl_gamma = kl_beta" if kl_gamma is None else f"kl_gamma = {kl_gamma:g}"
    for key in ("accuracy", "nll", "ece", "epistemic", "sigma_q"):
        vals = [[r[key] for r in rows if r["log10_kl_beta"] == x and r[key] is not None] for x in log10_betas]
        summary[key] = [sum(v) / len(v) if v else None for v in vals]
        if all(m is not None for m in summary[key]):
            _plot(list(log10_betas), {"ABMLL": summary[key]}, f"log10 kl_beta ({gamma_label})", f"pooled {key}"
                  if key in ("accuracy", "nll", "ece") else f"mean {key}", out / f"beta_{key}.png")
    result = {"log10_kl_beta": list(log10_betas), "kl_gamma": kl_gamma, "runs": rows, "mean": summary}
    atomic_write_text(out / "beta_ablation.json", json.dumps(result, indent=1) + "\n")
    return result


# ----------------------------------------------------------------------------- pruning
def neuron_masks(adapter, fraction: float) -> dict[str, torch.Tensor]:
    """Per adapted module, a ``[out]`` 0/1 mask zeroing the ``fraction`` of output neurons whose rows of
    the frozen weight W0 have the smallest L2 norm. The masks depend on W0 alone, so every method loses
    the same neurons and the comparison measures how each adapted solution copes."""
    masks = {}
    for name, layer in adapter.layers.items():
        w = layer.base.weight
        rows = w.norm(dim=1) if isinstance(layer.base, torch.nn.Linear) else w.norm(dim=0)  # Conv1D: [in, out]
        k = int(round(fraction * rows.numel()))
        mask = torch.ones_like(rows)
        if k:
            mask[rows.argsort()[:k]] = 0.0
        masks[name] = mask
    return masks


class _Pruned:
    """Forward hooks multiplying each adapted layer's output (base + ΔW) by its neuron mask."""

    def __init__(self, adapter, masks: dict[str, torch.Tensor]):
        self.handles = [layer.register_forward_hook(self._hook(masks[name])) for name, layer in adapter.layers.items()]

    @staticmethod
    def _hook(mask):
        return lambda module, inputs, output: output * mask.to(output.dtype)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def pruning_robustness(base: RunConfig, out: Path, methods: Sequence[str] = ("abmll", "lora", "reptile"),
                       fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3), seed: int = 0, progress: bool = True,
                       runs_from: Path | None = None) -> dict:
    """Adapt each test task as usual, then predict with the smallest-magnitude neurons of the adapted
    layers zeroed; macro accuracy and ECE per method and fraction, and the drop from 0%."""
    accelerator = make_accelerator(base)
    curves: dict[str, dict[str, list[float]]] = {}
    for method in methods:
        config = base.updated(method=method, seed=seed)
        run_dir = (runs_from or out / "runs") / f"{method}-seed{seed}"
        _trained(config, run_dir, progress)
        built, taskset = load_trained(config, run_dir, accelerator)
        encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(built.method.in_context), config.template,
                                 built.method.in_context, accelerator.device)
        masks = {f: neuron_masks(built.adapter, f) for f in fractions}
        per = {f: {} for f in fractions}
        torch.manual_seed(seed)
        for split in test_splits(taskset.test, config.shots, config.eval_query_size, seed):
            episode = encoder(split)
            state = built.method.adapt(episode)
            for f in fractions:
                with _Pruned(built.adapter, masks[f]), torch.no_grad():
                    probs = built.method.predict(state, episode).float().cpu()
                per[f][split.name] = compute_metrics(probs, episode.query.gold.cpu())
        built.adapter.detach()
        macro = {f: macro_average(per[f]) for f in fractions}
        curves[method] = {k: [macro[f][k] for f in fractions] for k in ("accuracy", "ece")}
        curves[method]["accuracy_drop"] = [curves[method]["accuracy"][0] - a for a in curves[method]["accuracy"]]
    pct = [100 * f for f in fractions]
    _plot(pct, {m: c["accuracy"] for m, c in curves.items()}, "neurons pruned (%)", "macro accuracy",
          out / "pruning_accuracy.png")
    _plot(pct, {m: c["ece"] for m, c in curves.items()}, "neurons pruned (%)", "macro ECE", out / "pruning_ece.png")
    result = {"fractions": list(fractions), "seed": seed, "curves": curves}
    atomic_write_text(out / "pruning.json", json.dumps(result, indent=1) + "\n")
    return result


# ----------------------------------------------------------------------------- cost and scaling
def _probe(config: RunConfig, warmup: int = 1, options: dict | None = None, tree: Path | None = None) -> dict:
    """Run :mod:`abmll_pyro.train.probe` in a fresh process (its ru_maxrss is its own peak); ``tree``:
    import ``abmll_pyro`` from that checkout instead (an older version, for old/new ratios)."""
    cmd = [sys.executable, "-m", "abmll_pyro.train.probe", json.dumps(config.to_dict()), str(warmup),
           json.dumps(options or {})]
    env = None
    if tree is not None:  # run from the checkout (``-m`` imports from the working directory first)
        env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
        paths = {k: str(Path(v).resolve()) for k in ("tasks", "data_dir") if (v := getattr(config, k, None)) and Path(v).exists()}
        cmd[3] = json.dumps(config.updated(**paths).to_dict())
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode != 0:
        raise RuntimeError(f"cost probe for {config.method} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# Llama-3-8B's adapted shapes [out, in] per block (GQA: 8 KV heads of 128) and its block count.
LLAMA3_8B_QV = {"q_proj": (4096, 4096), "v_proj": (1024, 4096)}
LLAMA3_8B_BLOCKS = 32


def dense_buffer_counts() -> dict:
    """Dense ``[out, in]`` buffers one adapted module keeps for backward in ABMLL's losses, measured on
    a tiny Llama: an inner step (θ fixed), the outer loss with the β-KL inside (``outer_loss``: second
    order and ``outer_kl="pass-through"``), and the default first-order outer step's two graphs, which
    are back-propagated one after the other (``outer_kl``: KL(q fixed ‖ p_θ) first, then
    ``outer_query``: the query likelihood through the pass-through); the peak of the default outer step
    holds max(outer_kl, outer_query) of them beside the LM's activations only in the second."""
    from ..config import AdapterConfig, MetaConfig
    from ..data.scoring import OptionBatch
    from ..infer.inner import pass_through
    from ..infer.meta import MetaSVI
    from ..infer.objective import task_kl_loss, task_loss
    from ..lms import tiny_model
    from ..lora.adapter import BayesLoRA
    from ..lora.noise import dense_saved_storages
    from ..models.likelihoods import TaskData

    counts = {}
    for where in ("inner_step", "outer_loss", "outer_kl", "outer_query"):
        lm, _ = tiny_model("llama")
        name = "model.layers.1.self_attn.q_proj"
        adapter = BayesLoRA(lm, AdapterConfig(rank=2, target_modules=(name,)))
        svi = MetaSVI(adapter, MetaConfig(kl_beta=0.1))
        theta = svi.theta() if where != "inner_step" else {k: v.detach() for k, v in svi.theta().items()}
        start = svi.guide.task_guide.init_task_params(adapter, theta)
        params = {k: v.detach().requires_grad_() for k, v in start.items()}
        batch = OptionBatch.from_token_ids([[1, 2, 3], [4, 5]], [[[6], [7, 8]], [[9], [10]]], [0, 1])
        if where == "outer_kl":
            loss = task_kl_loss(svi.model, svi.guide, theta, {k: v.detach() for k, v in params.items()})
        elif where == "outer_query":
            loss = task_loss(svi.elbo, svi.model, svi.guide, theta, [pass_through(params, start)], [TaskData(batch)], 0.0)
        else:
            loss = task_loss(svi.elbo, svi.model, svi.guide, theta, [params], [TaskData(batch)], 0.1)
        frozen = {p.untyped_storage().data_ptr() for p in lm.parameters()}
        counts[where] = len(dense_saved_storages(loss, adapter.shapes[name], frozen))
    return counts


def cost_ratios(base: RunConfig, out: Path, steps: int = 2, warmup: int = 1, baseline: Path | None = None,
                cache_off: bool = True, clock: str = "wall") -> dict:
    """Issue 8's cost figures, each probe in its own process, on ``base``'s model, tasks and batch:

    * ``speedup_trunk_cache``: ABMLL seconds per meta-step with the trunk cache off / on (warm), at
      ``base``'s ``last_layers``; with them the adapt time of a test task and its S = 8 posterior
      predictive, cache on and off (``cache_off=False`` skips the uncached probe: no speed-ups);
    * ``time_ratio_abmll_lora``: ABMLL / Regular LoRA seconds per 1k token-passes (forward + backward
      over the same examples), all blocks' targets adapted (``last_layers`` unset);
    * ``memory_ratio_abmll_lora``: peak resident memory above the loaded model, same two runs;
    * the same two ABMLL figures with :class:`~abmll_pyro.infer.elbo.LeanMeanFieldELBO` in place of
      MetaSVI's default ELBO (``*_lean_elbo``);
    * the dense-buffer count per adapted module and its projection to Llama-3-8B's q/v shapes;
    * with ``baseline`` (another checkout of this package): its ABMLL all-blocks and cached probes
      too, run between the new ones, and old/new ratios of their times and memory.

    ``clock="cpu"``: every probe times with its own CPU time instead of the wall clock (a shared machine).
    """
    abmll = base.updated(method="abmll", steps=steps)
    test = {"warm": True, "test_tasks": 1, "clock": clock}
    full = dict(last_layers=None, trunk_cache=False)
    cached, all_blocks = abmll.updated(trunk_cache=True, num_samples=8), abmll.updated(**full)
    runs = [("cache_on", cached, test, None)]  # old (baseline) probes right after their new twins: same load
    runs += [("baseline_cache_on", cached, test, baseline)] if baseline is not None else []
    runs += [("cache_off", abmll.updated(trunk_cache=False, num_samples=8), test, None)] if cache_off else []
    runs += [("abmll_all_blocks", all_blocks, {"clock": clock}, None)]
    runs += [("baseline_abmll_all_blocks", all_blocks, {"clock": clock}, baseline)] if baseline is not None else []
    runs += [("lora_all_blocks", base.updated(method="lora", steps=steps, **full), {"clock": clock}, None),
             ("abmll_all_blocks_lean_elbo", all_blocks, {"elbo": "lean", "clock": clock}, None)]
    result = {name: _probe(config, warmup, options, tree) for name, config, options, tree in runs}
    counts = dense_buffer_counts()
    elements = LLAMA3_8B_BLOCKS * sum(o * i for o, i in LLAMA3_8B_QV.values())
    lora = result["lora_all_blocks"]
    for suffix, key in (("", "abmll_all_blocks"), ("_lean_elbo", "abmll_all_blocks_lean_elbo")):
        result["time_ratio" + suffix] = result[key]["seconds_per_1k_token_passes"] / lora["seconds_per_1k_token_passes"]
        result["memory_ratio" + suffix] = result[key]["peak_above_model_mb"] / max(lora["peak_above_model_mb"], 1e-9)
    if cache_off:
        on, off = result["cache_on"], result["cache_off"]
        result.update({
            "speedup_trunk_cache": off["seconds_per_step"] / on["seconds_per_step"],
            "speedup_trunk_cache_cold": off["cold_seconds_per_step"] / on["cold_seconds_per_step"],
            "speedup_adapt": off["adapt_seconds_per_task"] / on["adapt_seconds_per_task"],
            "speedup_predict_s8": off["predict_seconds_per_task"] / on["predict_seconds_per_task"],
        })
    if baseline is not None:
        old_all, old_on = result["baseline_abmll_all_blocks"], result["baseline_cache_on"]
        result["old_over_new"] = {
            "abmll_all_blocks_seconds_per_step": old_all["seconds_per_step"] / result["abmll_all_blocks"]["seconds_per_step"],
            "abmll_all_blocks_seconds_per_step_lean_elbo":
                old_all["seconds_per_step"] / result["abmll_all_blocks_lean_elbo"]["seconds_per_step"],
            "abmll_all_blocks_peak_above_model": old_all["peak_above_model_mb"] / result["abmll_all_blocks"]["peak_above_model_mb"],
            "cached_meta_step_warm": old_on["seconds_per_step"] / result["cache_on"]["seconds_per_step"],
            "adapt": old_on["adapt_seconds_per_task"] / result["cache_on"]["adapt_seconds_per_task"],
            "predict_s8": old_on["predict_seconds_per_task"] / result["cache_on"]["predict_seconds_per_task"],
        }
    result.update({"dense_buffers_per_module": counts,
                   "llama3_8b_qv_dense_buffer_gb": {k: v * elements * 4 / 1e9 for k, v in counts.items()}})
    atomic_write_text(out / "cost.json", json.dumps(result, indent=1) + "\n")
    return result


def scaling_memory(base: RunConfig, out: Path, task_counts: Sequence[int] = (10, 100), steps: int = 2) -> dict:
    """Peak memory of ABMLL meta-training with 10 vs 100 training tasks (``base.tasks`` must hold enough)."""
    rows = [_probe(base.updated(method="abmll", steps=steps, max_train_tasks=n)) for n in task_counts]
    for n, row in zip(task_counts, rows):
        if row["num_train_tasks"] != n:
            raise ValueError(f"the task source has {row['num_train_tasks']} training tasks, fewer than {n}")
    result = {"task_counts": list(task_counts), "runs": rows,
              "memory_ratio": rows[-1]["peak_memory_mb"] / rows[0]["peak_memory_mb"]}
    atomic_write_text(out / "scaling.json", json.dumps(result, indent=1) + "\n")
    return result
