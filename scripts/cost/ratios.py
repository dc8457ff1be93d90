"""Cost ratios on one preset's model and tasks: the frozen-trunk cache's speed-up, ABMLL's time and memory
against Regular LoRA, the dense-buffer count behind ABMLL's memory, and (with a baseline checkout)
old/new ratios. Every probe runs in its own process (:func:`scripts.cost.probe.run_probe`).
"""

from __future__ import annotations

import json
from pathlib import Path

from abmll_pyro.train.checkpoint import atomic_write_text
from abmll_pyro.train.config import RunConfig
from scripts.cost.probe import run_probe

__all__ = ["cost_ratios", "dense_buffer_counts", "LLAMA3_8B_QV", "LLAMA3_8B_BLOCKS"]


# Llama-3-8B's adapted shapes [out, in] per block (GQA: 8 KV heads of 128) and its block count.
LLAMA3_8B_QV = {"q_proj": (4096, 4096), "v_proj": (1024, 4096)}
LLAMA3_8B_BLOCKS = 32


def dense_buffer_counts(factor_backed: bool = True) -> dict:
    """Dense ``[out, in]`` buffers one adapted module keeps for backward in ABMLL's losses, measured on
    a tiny Llama: an inner step (θ fixed), the outer loss with the β-KL inside (``outer_loss``:
    ``outer_kl="pass-through"``), the default first-order outer step's two graphs, which are
    back-propagated one after the other (``outer_kl``: KL(q fixed ‖ p_θ) first, then ``outer_query``:
    the query likelihood through the pass-through), and the global loss −γ log p(θ). ``factor_backed``:
    as ``MetaSVI`` runs them (lora/factored.py: 0 each), or ``False``: the dense path (3, 7, 5, 1, 7)."""
    from abmll_pyro.lora.factored import factor_backed as backed
    from abmll_pyro.config import AdapterConfig, MetaConfig
    from abmll_pyro.data.scoring import OptionBatch
    from abmll_pyro.infer.inner import pass_through
    from abmll_pyro.infer.meta import MetaSVI
    from abmll_pyro.infer.objective import global_loss, task_kl_loss, task_loss
    from abmll_pyro.lms import tiny_model
    from abmll_pyro.lora.adapter import BayesLoRA
    from abmll_pyro.lora.noise import dense_saved_storages
    from abmll_pyro.models.likelihoods import TaskData

    counts = {}
    for where in ("inner_step", "outer_loss", "outer_kl", "outer_query", "global_loss"):
        lm, _ = tiny_model("llama")
        name = "model.layers.1.self_attn.q_proj"
        adapter = BayesLoRA(lm, AdapterConfig(rank=2, target_modules=(name,)))
        svi = MetaSVI(adapter, MetaConfig(kl_beta=0.1), factor_backed=factor_backed)
        theta = svi.theta() if where != "inner_step" else {k: v.detach() for k, v in svi.theta().items()}
        start = svi.guide.task_guide.init_task_params(adapter, theta)
        params = {k: v.detach().requires_grad_() for k, v in start.items()}
        batch = OptionBatch.from_token_ids([[1, 2, 3], [4, 5]], [[[6], [7, 8]], [[9], [10]]], [0, 1],
                                           option_chars=[[1, 2], [1, 1]])  # (the default char reduction's lengths)
        with backed(svi.factor_backed):
            if where == "outer_kl":
                loss = task_kl_loss(svi.model, svi.guide, theta, {k: v.detach() for k, v in params.items()})
            elif where == "outer_query":
                loss = task_loss(svi.elbo, svi.model, svi.guide, theta, [pass_through(params, start)], [TaskData(batch)], 0.0)
            elif where == "global_loss":
                loss = global_loss(svi.elbo, svi.model, svi.guide, theta, 0.1)
            else:
                loss = task_loss(svi.elbo, svi.model, svi.guide, theta, [params], [TaskData(batch)], 0.1)
        frozen = {p.untyped_storage().data_ptr() for p in lm.parameters()}
        counts[where] = len(dense_saved_storages(loss, adapter.shapes[name], frozen))
    return counts


def cost_ratios(base: RunConfig, out: Path, steps: int = 2, warmup: int = 1, baseline: Path | None = None,
                cache_off: bool = True, clock: str = "wall", malloc: str = "default") -> dict:
    """The cost figures, each probe in its own process, on ``base``'s model, tasks and batch:

    * ``speedup_trunk_cache``: ABMLL seconds per meta-step with the trunk cache off / on (warm), at
      ``base``'s ``last_layers``; with them the adapt time of a test task and its S = 8 posterior
      predictive, cache on and off (``cache_off=False`` skips the uncached probe: no speed-ups);
    * ``time_ratio_abmll_lora``: ABMLL / Regular LoRA seconds per 1k token-passes (forward + backward
      over the same examples), all blocks' targets adapted (``last_layers`` unset);
    * ``memory_ratio_abmll_lora``: peak resident memory above the loaded model, same two runs;
    * the same two ABMLL figures with :class:`~abmll_pyro.infer.elbo.LeanMeanFieldELBO` in place of
      MetaSVI's default ELBO (``*_lean_elbo``);
    * the dense-buffer count per adapted module (as MetaSVI runs, and on the dense path) and its
      projection to Llama-3-8B's q/v shapes;
    * with ``baseline`` (another checkout of this package): its ABMLL all-blocks and cached probes
      too, run between the new ones, and old/new ratios of their times and memory.

    ``clock="cpu"``: every probe times with its own CPU time instead of the wall clock (a shared machine).
    ``malloc``: every probe's allocator settings (``scripts/cost/probe.py``).
    """
    abmll = base.updated(method="abmll", steps=steps)
    test = {"warm": True, "test_tasks": 1, "clock": clock, "malloc": malloc}
    plain = {"clock": clock, "malloc": malloc}
    full = dict(last_layers=None, trunk_cache=False)
    cached, all_blocks = abmll.updated(trunk_cache=True, num_samples=8), abmll.updated(**full)
    runs = [("cache_on", cached, test, None)]  # old (baseline) probes right after their new twins: same load
    runs += [("baseline_cache_on", cached, test, baseline)] if baseline is not None else []
    runs += [("cache_off", abmll.updated(trunk_cache=False, num_samples=8), test, None)] if cache_off else []
    runs += [("abmll_all_blocks", all_blocks, plain, None)]
    runs += [("baseline_abmll_all_blocks", all_blocks, plain, baseline)] if baseline is not None else []
    runs += [("lora_all_blocks", base.updated(method="lora", steps=steps, **full), plain, None),
             ("abmll_all_blocks_lean_elbo", all_blocks, {"elbo": "lean", **plain}, None)]
    result = {name: run_probe(config, warmup, options, tree) for name, config, options, tree in runs}
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
    result.update({"dense_buffers_per_module": counts, "dense_buffers_per_module_dense_path": dense_buffer_counts(False),
                   "llama3_8b_qv_dense_buffer_gb": {k: v * elements * 4 / 1e9 for k, v in counts.items()}})
    result["malloc"] = malloc
    atomic_write_text(out / "cost.json", json.dumps(result, indent=1) + "\n")
    return result
