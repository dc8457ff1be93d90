"""Memory at Llama-3-8B's shapes: ABMLL and Regular LoRA measured on 1- and 2-block shape proxies,
projected to the 32 blocks of the real model.

Each (method, blocks) pair runs the cost probe (``probe.py`` here) in its own process on
``llama3-8b-proxy`` (one block) or ``llama3-8b-proxy-2l`` (two), at the ``paper`` preset's settings
(rank 8, α 16, q/v, K = 5, 2 tasks per step, 16 shots and 16 query examples, bf16 weights and
autocast, first order, every block adapted, no trunk cache) on generated MetaICL-format cls-45 data
(:func:`~abmll_pyro.data.sources.write_metaicl_sample`: short inputs, ~30 byte tokens per example).
A probe reports ``m`` = its peak resident set above the resident set right after the model and
adapter were built (CPU: ``VmHWM`` after a reset; GPU: ``max_memory_allocated``). On the CPU the
probes run with glibc's mmap threshold fixed (``malloc="fixed"``, ``scripts/cost/probe.py``), so the
resident set follows the live tensors as the GPU counter does; with glibc's default settings the
peak also counts freed blocks kept in the heap (``--malloc default`` measures that).

Projection. With L blocks, peak memory above the weights is a fixed part F (embedding output, the
vocabulary head's logits and their gradient at the scored positions, optimizer state of nothing
frozen, allocator slack) plus L times a per-block part P (each block's activations kept for backward;
for ABMLL also the dense ``[out, in]`` buffers of its q/v perturbations):

    m(L) = F + L·P          P = m(2) − m(1),   F = m(1) − P = 2·m(1) − m(2)
    M(32) = W₈B + F + 32·P  W₈B = 8,030,261,248 parameters × 2 bytes (bf16) = 16.06 GB
    projected_memory_ratio_8b = M_ABMLL(32) / M_LoRA(32)

The per-block part must scale linearly: ``linear_check`` holds when P > 0 and F ≥ 0 (i.e.
m(1) < m(2) ≤ 2·m(1): the second block added no more than the first block plus the fixed part).
The paper's figure to compare with: 25.6 GB / 23.8 GB = 1.076 (Llama-3-8B on a GPU, real CrossFit
inputs, which are much longer than the generated ones here: their activations make P and F larger
for both methods alike, and the ratio smaller, than measured here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from abmll_pyro.train.checkpoint import atomic_write_text
from abmll_pyro.train.config import RunConfig

__all__ = ["PAPER_RATIO", "LLAMA3_8B_WEIGHT_BYTES", "project_memory", "proxy_memory", "proxy_config"]

PAPER_RATIO = 25.6 / 23.8  # ABMLL / Regular LoRA peak GPU memory on Llama-3-8B (the paper)
LLAMA3_8B_PARAMETERS = 8_030_261_248
LLAMA3_8B_WEIGHT_BYTES = 2 * LLAMA3_8B_PARAMETERS  # bf16
LLAMA3_8B_BLOCKS = 32
PROXY_MODELS = {1: "llama3-8b-proxy", 2: "llama3-8b-proxy-2l"}


def project_memory(m1_mb: float, m2_mb: float, blocks: int = LLAMA3_8B_BLOCKS,
                   weight_bytes: float = LLAMA3_8B_WEIGHT_BYTES) -> dict:
    """The projection of the module docstring from ``m(1)``, ``m(2)`` (MiB above the model): the
    per-block part, the fixed part, the projected total in GB and whether the parts are linear."""
    per_block = m2_mb - m1_mb
    fixed = m1_mb - per_block
    total = weight_bytes + (fixed + blocks * per_block) * 2**20
    return {"m1_mb": m1_mb, "m2_mb": m2_mb, "per_block_mb": per_block, "fixed_mb": fixed,
            "projected_total_gb": total / 1e9, "linear_check": per_block > 0 and fixed >= 0}


def proxy_config(base: RunConfig, method: str, blocks: int, data_dir: str | Path) -> RunConfig:
    """``base`` (the ``paper`` preset's settings) on the ``blocks``-block proxy and generated cls-45
    data: two training tasks (a step draws two), every block adapted, no trunk cache, one step."""
    return base.updated(method=method, model=PROXY_MODELS[blocks], tasks="cls-45", data_dir=str(data_dir),
                        steps=1, max_train_tasks=2, max_test_tasks=1, last_layers=None, trunk_cache=False,
                        device="cpu")


def proxy_memory(base: RunConfig, out: Path, probe: Callable[..., dict], methods: Sequence[str] = ("abmll", "lora"),
                 warmup: int = 0, clock: str = "cpu", malloc: str = "fixed") -> dict:
    """Measure ``methods`` on the 1- and 2-block proxies (``probe(config, warmup, options)`` runs one
    probe in a fresh process) and project each to Llama-3-8B; writes ``out/proxy_memory.json``.

    ``warmup=0``: the probe's one timed step is the first (in first order the peak of a step does not
    depend on earlier steps: nothing but the factors and their Adam state outlives a step).
    ``malloc``: the probes' allocator settings (``scripts/cost/probe.py``; ``"fixed"``: the resident
    set follows the live tensors, the CPU counterpart of a GPU's ``max_memory_allocated``)."""
    from abmll_pyro.data.sources import write_metaicl_sample

    examples = base.shots + base.query_size + 8
    data = write_metaicl_sample(out / "metaicl-sample", "cls-45", examples=examples)
    runs = {f"{m}_{b}": probe(proxy_config(base, m, b, data), warmup, {"clock": clock, "malloc": malloc})
            for m in methods for b in (1, 2)}
    result: dict = {"runs": runs, "malloc": malloc, "paper_ratio": PAPER_RATIO, "weight_gb": LLAMA3_8B_WEIGHT_BYTES / 1e9}
    for m in methods:
        result[m] = project_memory(runs[f"{m}_1"]["peak_above_model_mb"], runs[f"{m}_2"]["peak_above_model_mb"])
    if {"abmll", "lora"} <= set(methods):
        a, lo = result["abmll"], result["lora"]
        result["projected_memory_ratio_8b"] = a["projected_total_gb"] / lo["projected_total_gb"]
        two = runs["abmll_2"], runs["lora_2"]
        result["time_ratio_2_blocks"] = two[0]["seconds_per_1k_token_passes"] / two[1]["seconds_per_1k_token_passes"]
        result["memory_ratio_2_blocks"] = two[0]["peak_above_model_mb"] / max(two[1]["peak_above_model_mb"], 1e-9)
    atomic_write_text(out / "proxy_memory.json", json.dumps(result, indent=1) + "\n")
    return result
