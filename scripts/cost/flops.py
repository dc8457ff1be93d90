"""Adapting one test task against its FLOP limit: ABMLL's measured ``adapt`` time over the time its
matmuls would take at this machine's measured matmul throughput, both measured in one process with
the same thread count.

Last line, exactly: ``adapt_seconds=A flop_limit_seconds=B ratio_to_limit=C`` (A: mean seconds of
``method.adapt`` per test task with the frozen trunk cached; B: the same tasks' mean needed FLOPs over
the throughput; C = A / B), both sides on ``--clock`` (default ``cpu``: this process's CPU time; the
JSON's ``by_clock`` gives both clocks). Everything else goes to ``OUT/flops.json``.

    python scripts/cost/flops.py --preset cpu --out runs/cost-flops --threads 1
    python scripts/cost/flops.py --preset smoke --out /tmp/flops-smoke --set last_layers=1

**The count** (matmul FLOPs, 2·m·k·n per ``[m, k] @ [k, n]``; norms, RoPE, softmax, SiLU, Adam and the
KL's elementwise work are not matmuls and not counted). One inner step on a support set of ``n``
scored rows (one per example in the packed layout, one per option otherwise) of padded width ``L``,
``t`` real tokens, ``a`` (query, key) pairs the attention mask allows, ``P`` positions the head scores;
the model's D (hidden), D_kv (key/value heads × head size d_h), F (MLP), H (query heads), V (vocabulary);
b adapted blocks (the last ``last_layers``), the lowest of them ``j``; adapted projections m (q: D × D,
v: D_kv × D) of rank r::

    linear forward      2t · b · (2D² + 2D·D_kv + 3DF)                 q, k, v, o, gate, up, down
    input gradients     the same, less 2t · (D² + 2D·D_kv)             weights frozen; block j's q, k, v
                                                                       read the cached trunk: no gradient
    ΔW gradients        Σ_m 2t · out_m · in_m                          ∂L/∂ΔW = ȳᵀ x: q(ΔW) is elementwise
                                                                       N(μ, σ²), so its gradient is dense
    attention           2 · H · d_h · a  per matmul and block          QKᵀ, AV; backward dP, dQ, dK, dV
                                                                       (block j: those its projections need)
    head                2P · D · V  +  2P · D · V                      forward + input gradient, scored
                                                                       positions only
    factors             Σ_m 2 · out_m · r · in_m · 6                   μ = s·B_μA_μ, σ = softplus(B_σA_σ)
                                                                       and their gradients to the 4 factors

``adapt`` = K inner steps of that (``needed``), plus the prior's μ and σ from θ's factors once
(Σ_m 2 · 2·out_m·r·in_m). **Executed** is what the code path runs, and what
``torch.utils.flop_counter.FlopCounterMode`` counts around one inner step (with the math SDPA kernel,
whose matmuls it sees; the default CPU flash kernel it does not count): the blocks run on the padded
rows (t → n·L), attention is dense (a → n·L²) — the merged matmul ``x (W0 + ΔW)ᵀ`` of an adapted
projection is not run again in backward (``abmll_pyro/lora/layer.py:_MergedFactorLinear`` forms ∂x and
∂ΔW from the remade ΔW; under autocast the recomputed path would add Σ_m 2nL · out_m · in_m, not
counted here: these presets run float32) — and the factors cost 20 products per module and step (the layer's μ, σ in forward
and again in backward: 4; the KL's q and p moments in forward and again in backward: 8; the layer's
and the KL's dense gradients of μ and σ, each to two factors: 8). Without the trunk cache the blocks
below ``j`` also run forward (executed only).

**The throughput**: float32 ``torch.mm`` on the shapes one step runs (``[n·L, D] @ [D, D]``,
``[D, D_kv]``, ``[D_kv, D]``, ``[D, F]``, ``[F, D]``, ΔW's ``[D, n·L] @ [n·L, D]``, the head's
``[P, D] @ [D, V]`` and ``[P, V] @ [V, D]``), each the best of ``--repeats`` timings, before and after
the adapt timings (the better kept). The limit uses the fastest shape (``throughput_gflops``): a lower
bound on the time at this machine's matmul speed. ``flop_limit_seconds_shape_rates`` runs each part
of the count at its own shape's rate instead (the head's few rows by a 576 × 49152 weight are
memory-bound: a third to a half of the linear layers' rate where measured), the small rest at the
fastest.

**The time**: one untimed ``adapt`` first (warm-up); every timed task's support rows put in the trunk
cache beforehand by an untimed one-step ``adapt``, so the timed ``adapt`` runs only the adapted blocks
(the JSON's ``trunk_misses_timed`` is 0). ``adapt`` is what ``scripts/cost/probe.py`` times as
``adapt_seconds_per_task``. On a machine shared with other jobs the load slows both sides of the ratio
(same process, same threads); the CPU clock leaves out the time the process waits for a core (a
nice'd process on 2 busy cores measured: wall ≈ 2 × CPU on both sides, ratios within 10%), not the
sharing of caches and memory bandwidth. Only ABMLL's factor-backed mean-field guide on q/k/v
projections, float32, is counted (the cpu and smoke presets); other settings are refused (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: scripts.* and its abmll_pyro

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from abmll_pyro.data.packing import packing_supported
from abmll_pyro.data.scoring import OptionBatch
from abmll_pyro.data.trunk import trunk_cache_of
from abmll_pyro.models.likelihoods import TaskData
from abmll_pyro.train.episodes import EpisodeEncoder, test_splits
from abmll_pyro.train.setup import build
from scripts._common import base_config

__all__ = ["Dims", "layout", "step_flops", "flops_by_shape", "adapt_flops", "counted_step_flops", "model_shapes",
           "matmul_throughput", "time_adapt", "main"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj")
#: factor products (2·out·r·in each) per adapted module and inner step: needed, executed (docstring)
FACTOR_PRODUCTS = {"needed": 6, "executed": 20}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


class Dims:
    """The model's sizes and the adapted projections, by block: ``adapted[block] = {name: (out, in)}``."""

    def __init__(self, config, shapes: dict[str, tuple[int, int]], rank: int, trunk_cache: bool):
        self.D, self.F, self.V = config.hidden_size, config.intermediate_size, config.vocab_size
        self.H = config.num_attention_heads
        self.d_h = getattr(config, "head_dim", None) or self.D // self.H
        self.D_kv = config.num_key_value_heads * self.d_h
        self.rank, self.trunk_cache = rank, trunk_cache
        self.adapted: dict[int, dict[str, tuple[int, int]]] = {}
        for name, shape in shapes.items():
            parts = name.split(".")
            block = next((int(p) for p in parts if p.isdigit()), None)
            if block is None or parts[-1] not in PROJECTIONS:
                raise ValueError(f"adapted module {name!r}: flops.py counts adapters on {list(PROJECTIONS)} only")
            self.adapted.setdefault(block, {})[parts[-1]] = shape
        # every block from the lowest adapted one up runs forward and backward (the gradient passes through)
        self.lowest = min(self.adapted)
        self.blocks = config.num_hidden_layers - self.lowest

    def block_linear(self) -> int:
        """Weights of one block's seven projections: q, o (D·D), k, v (D·D_kv), gate, up, down (D·F)."""
        return 2 * self.D * self.D + 2 * self.D * self.D_kv + 3 * self.D * self.F

    def modules(self):
        return [shape for block in self.adapted.values() for shape in block.values()]


def layout(batch: OptionBatch, lm) -> dict:
    """What one scoring pass over ``batch`` runs: rows, width, real tokens, allowed attention pairs,
    head positions, in the layout :func:`~abmll_pyro.data.scoring.option_scores` picks."""
    if batch.packed is not None and packing_supported(lm):
        packed = batch.packed
        n, width = packed.input_ids.shape
        allowed = packed.attention_mask(torch.float32)[:, 0] == 0  # [n, L, L]; padding rows: self only
        real = packed.segment >= 0
        pairs = int((allowed & real.unsqueeze(2) & real.unsqueeze(1)).sum())
        same = (packed.segment[:, :-1] > 0) & (packed.segment[:, 1:] == packed.segment[:, :-1])
        head = n + int(same.sum())
        tokens = int(real.sum())
    else:
        n, width = batch.input_ids.shape
        lengths = batch.attention_mask.sum(-1)
        tokens = int(lengths.sum())
        pairs = int((lengths * (lengths + 1) // 2).sum())
        head = int(batch.target_mask[:, 1:].sum())
    return {"packed": batch.packed is not None and packing_supported(lm), "rows": int(n), "width": int(width),
            "tokens_run": int(n * width), "tokens_real": tokens, "attention_pairs_run": int(n * width * width),
            "attention_pairs_real": pairs, "head_positions": head}


def _attention_products(dims: Dims, block: int) -> int:
    """Attention matmuls of one block, forward (QKᵀ, AV) and backward (dP, dQ, dK, dV): all above the
    lowest adapted block; in it only those its adapted q, k, v need (its input carries no gradient)."""
    if block > dims.lowest:
        return 6
    have = dims.adapted.get(block, {})
    q, k, v = ("q_proj" in have), ("k_proj" in have), ("v_proj" in have)
    return 2 + int(q or k) + int(q) + int(k) + int(v)


def step_flops(dims: Dims, lay: dict, kind: str = "needed") -> dict[str, int]:
    """Matmul FLOPs of one inner step by part (module docstring); ``kind``: "needed" or "executed"."""
    if kind not in FACTOR_PRODUCTS:
        raise ValueError(f"kind must be one of {list(FACTOR_PRODUCTS)}, got {kind!r}")
    run = kind == "executed"
    t = lay["tokens_run"] if run else lay["tokens_real"]
    pairs = lay["attention_pairs_run"] if run else lay["attention_pairs_real"]
    D, D_kv = dims.D, dims.D_kv
    modules = dims.modules()
    out = {
        "linear_forward": 2 * t * dims.blocks * dims.block_linear(),
        "linear_input_grad": 2 * t * (dims.blocks * dims.block_linear() - (D * D + 2 * D * D_kv)),
        "delta_grad": sum(2 * t * o * i for o, i in modules),
        "attention": sum(2 * dims.H * dims.d_h * pairs * _attention_products(dims, b)
                         for b in range(dims.lowest, dims.lowest + dims.blocks)),
        "head": 2 * 2 * lay["head_positions"] * D * dims.V,
        "factors": sum(2 * o * dims.rank * i for o, i in modules) * FACTOR_PRODUCTS[kind],
    }
    if run:
        if not dims.trunk_cache:  # the frozen blocks below the lowest adapted one, forward
            out["trunk_forward"] = dims.lowest * (2 * t * dims.block_linear() + 4 * dims.H * dims.d_h * pairs)
    out["total"] = sum(out.values())
    return out


def adapt_flops(dims: Dims, lay: dict, num_inner_steps: int, kind: str = "needed") -> int:
    """K inner steps; "needed" adds the prior's μ and σ from θ's factors once (executed: every step)."""
    once = sum(2 * 2 * o * dims.rank * i for o, i in dims.modules()) if kind == "needed" else 0
    return num_inner_steps * step_flops(dims, lay, kind)["total"] + once


def counted_step_flops(svi, support: TaskData) -> dict[str, int]:
    """FlopCounterMode's total for one inner step (the support loss and its gradient, the trunk cached),
    with the math SDPA kernel (attention as bmm, which it counts) and the default one (attention unseen)."""
    theta = {k: v.detach() for k, v in svi.theta().items()}
    with torch.no_grad():
        start = svi.guide.task_guide.init_task_params(svi.adapter, theta, support)
    params = {k: v.detach().requires_grad_(True) for k, v in start.items()}
    loss_fn = svi._support_loss_fn(theta, support)
    with torch.no_grad():  # the support's frozen trunk into the cache first: not part of a step
        loss_fn(params)
    counts = {}
    for name, backends in (("math_sdpa", [SDPBackend.MATH]), ("default_sdpa", None)):
        with sdpa_kernel(backends) if backends else nullcontext():
            with FlopCounterMode(display=False) as counter:
                torch.autograd.grad(loss_fn(params), list(params.values()))
        counts[name] = int(counter.get_total_flops())
    return counts


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _best_seconds(fn, repeats: int, min_seconds: float = 0.05) -> dict[str, float]:
    """Per clock, the best over ``repeats`` of the mean seconds of ``fn()`` (each repeat calls it for at
    least ``min_seconds`` of wall time)."""
    fn()
    best = dict.fromkeys(CLOCKS, float("inf"))
    for _ in range(repeats):
        calls, t0 = 0, {k: c() for k, c in CLOCKS.items()}
        while True:
            fn()
            calls += 1
            if time.perf_counter() - t0["wall"] >= min_seconds:
                break
        for k, c in CLOCKS.items():
            best[k] = min(best[k], (c() - t0[k]) / calls)
    return best


def matmul_throughput(shapes: dict[str, tuple[int, int, int]], repeats: int) -> dict[str, dict[str, float]]:
    """``{clock: {shape: GFLOP/s}}`` of float32 ``[m, k] @ [k, n]`` per shape, each the best of ``repeats``."""
    g = torch.Generator().manual_seed(0)
    rates: dict[str, dict[str, float]] = {k: {} for k in CLOCKS}
    for name, (m, k, n) in shapes.items():
        a, b, c = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g), torch.empty(m, n)
        for clock, seconds in _best_seconds(lambda: torch.mm(a, b, out=c), repeats).items():
            rates[clock][name] = 2 * m * k * n / seconds / 1e9
    return rates


def model_shapes(dims: Dims, lay: dict) -> dict[str, tuple[int, int, int]]:
    """The ``(m, k, n)`` of the step's matmuls, named as :func:`flops_by_shape` names its parts."""
    T, P, D = lay["tokens_run"], max(lay["head_positions"], 1), dims.D
    return {"q_o": (T, D, D), "k_v": (T, D, dims.D_kv), "k_v_input_grad": (T, dims.D_kv, D), "gate_up": (T, D, dims.F),
            "down": (T, dims.F, D), "delta_grad": (D, T, D), "head": (P, D, dims.V), "head_input_grad": (P, dims.V, D)}


def flops_by_shape(dims: Dims, lay: dict, kind: str = "needed") -> dict[str, int]:
    """:func:`step_flops`' total split by the shape each part runs at (``other``: attention, factors,
    and the trunk, small, at no shape of their own)."""
    part = step_flops(dims, lay, kind)
    t = lay["tokens_run"] if kind == "executed" else lay["tokens_real"]
    D, D_kv, F, b = dims.D, dims.D_kv, dims.F, dims.blocks
    out = {"q_o": 2 * t * D * D * (2 * b + 2 * b - 1),  # q, o forward; o's and (above the lowest block) q's input grad
           "k_v": 2 * t * 2 * D * D_kv * b, "k_v_input_grad": 2 * t * 2 * D * D_kv * (b - 1),
           # gate_up: gate, up forward + down's input grad; down: down forward + gate's and up's input grads
           "gate_up": 2 * t * 3 * D * F * b, "down": 2 * t * 3 * D * F * b,
           "delta_grad": part["delta_grad"], "head": part["head"] // 2, "head_input_grad": part["head"] // 2}
    out["other"] = part["total"] - sum(out.values())
    return out


def time_adapt(method, episodes, lm) -> list[dict]:
    """Wall and CPU seconds of ``method.adapt`` per episode: one untimed adapt first (warm-up), and each
    episode's trunk rows cached by an untimed one-step adapt before its timed one."""
    svi, cache = method.svi, trunk_cache_of(lm)
    method.adapt(episodes[0])
    out = []
    for i, episode in enumerate(episodes):
        if i:
            svi.adapt(TaskData(episode.support), num_inner_steps=1)
        misses = cache.misses if cache is not None else 0
        wall, cpu = time.perf_counter(), time.process_time()
        method.adapt(episode)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        out.append({"task": episode.name, "adapt_wall_seconds": wall, "adapt_cpu_seconds": cpu,
                    "trunk_misses": (cache.misses - misses) if cache is not None else None})
    return out


def _check(built) -> None:
    """Refuse what the count does not describe (module docstring), naming it."""
    from abmll_pyro.guides.mean_field import MeanFieldGuide

    svi = getattr(built.method, "svi", None)
    if svi is None or type(svi.guide.task_guide) is not MeanFieldGuide or not svi.factor_backed:
        raise ValueError(f"flops.py counts ABMLL with the factor-backed mean-field guide; got method "
                         f"{built.config.method!r}, guide {built.config.guide!r}")
    if svi.config.inner.subsample_size is not None or built.config.dtype != "float32":
        raise ValueError("flops.py counts float32 inner steps over the whole support set")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="scripts/cost/flops.py", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--preset", choices=["smoke", "cpu", "cpu-long"], default="smoke")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override any config key")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both the adapt and the matmuls")
    p.add_argument("--tasks", type=int, default=5, help="test tasks timed (after one untimed warm-up adapt)")
    p.add_argument("--repeats", type=int, default=5, help="timings per matmul shape (the best is kept)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                   help="the last line's clock, both sides: this process's CPU time (default) or the wall clock")
    p.add_argument("--quiet", action="store_true", help="(accepted; the driver prints only its summary)")
    return p


def _by_clock(dims: Dims, lays: list[dict], timed: list[dict], rates: dict, K: int) -> dict:
    """Per clock: mean adapt seconds, the throughput, the limits and the ratios (module docstring)."""
    once = sum(2 * 2 * o * dims.rank * i for o, i in dims.modules())
    needed = sum(adapt_flops(dims, lay, K, "needed") for lay in lays) / len(lays)
    executed = sum(adapt_flops(dims, lay, K, "executed") for lay in lays) / len(lays)
    out = {}
    for clock, rate in rates.items():
        peak = max(rate.values()) * 1e9
        adapt = sum(r[f"adapt_{clock}_seconds"] for r in timed) / len(timed)
        shaped = sum(K * sum(f / (rate.get(s, max(rate.values())) * 1e9) for s, f in flops_by_shape(dims, lay).items())
                     + once / peak for lay in lays) / len(lays)
        out[clock] = {"adapt_seconds": adapt, "throughput_gflops": peak / 1e9, "flop_limit_seconds": needed / peak,
                      "ratio_to_limit": adapt * peak / needed, "ratio_to_executed_limit": adapt * peak / executed,
                      "flop_limit_seconds_shape_rates": shaped, "ratio_to_limit_shape_rates": adapt / shaped}
    return out


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    for name in ("threads", "tasks", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    try:
        config = base_config(args).updated(method="abmll", num_threads=args.threads, device="cpu")
        built, taskset = build(config, "cpu")
        _check(built)
        dims = Dims(built.lm.config, built.adapter.shapes, config.rank, config.trunk_cache)
    except ValueError as err:
        p.error(str(err))
    method, cfg = built.method, built.config
    encoder = EpisodeEncoder(built.tokenizer, cfg.prompt_length(method.in_context), cfg.template, method.in_context,
                             "cpu")
    episodes = [encoder(s) for s in test_splits(taskset.test, cfg.shots, cfg.eval_query_size, cfg.seed)[: args.tasks]]
    if not episodes or not all(isinstance(e.support, OptionBatch) for e in episodes):
        p.error(f"{cfg.tasks!r}: flops.py needs option-scored test tasks; got {len(episodes)}")
    K, lays = cfg.num_inner_steps, [layout(e.support, built.lm) for e in episodes]
    counted = counted_step_flops(method.svi, TaskData(episodes[0].support))
    step = {kind: step_flops(dims, lays[0], kind) for kind in ("needed", "executed")}
    shapes = model_shapes(dims, lays[0])
    before = matmul_throughput(shapes, args.repeats)
    timed = time_adapt(method, episodes, built.lm)
    after = matmul_throughput(shapes, args.repeats)
    rates = {c: {s: max(before[c][s], after[c][s]) for s in shapes} for c in CLOCKS}
    for row, lay in zip(timed, lays):
        row.update(lay, needed_flops=adapt_flops(dims, lay, K, "needed"),
                   executed_flops=adapt_flops(dims, lay, K, "executed"))
    clocks = _by_clock(dims, lays, timed, rates, K)
    summary = {
        "preset": args.preset, "model": cfg.model, "threads": args.threads, "clock": args.clock,
        "torch": torch.__version__,
        "num_inner_steps": K, "shots": cfg.shots, "rank": cfg.rank, "last_layers": cfg.last_layers,
        "trunk_cache": cfg.trunk_cache, "adapted_blocks": dims.blocks, "lowest_adapted_block": dims.lowest,
        "adapted_modules": list(built.adapter.shapes),
        "dims": {k: getattr(dims, k) for k in ("D", "D_kv", "F", "H", "d_h", "V")},
        "needed_flops": sum(r["needed_flops"] for r in timed) / len(timed),
        "executed_flops": sum(r["executed_flops"] for r in timed) / len(timed),
        "step_flops_task0": step, "step_flops_by_shape_task0": flops_by_shape(dims, lays[0]),
        "counter_step_flops_task0": counted,
        "counter_rel_diff_math_sdpa": counted["math_sdpa"] / step["executed"]["total"] - 1,
        "counter_rel_diff_default_sdpa": (counted["default_sdpa"]
                                          / (step["executed"]["total"] - step["executed"]["attention"]) - 1),
        "matmul_shapes": {k: list(v) for k, v in shapes.items()},
        "matmul_gflops": {"before": before, "after": after, "best": rates},
        "tasks": timed, "trunk_misses_timed": sum(r["trunk_misses"] or 0 for r in timed), "by_clock": clocks,
        **clocks[args.clock],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flops.json").write_text(json.dumps(summary, indent=1) + "\n")
    _report(summary, len(timed))
    return 0


def _report(s: dict, tasks: int) -> None:
    print(f"per adapt (mean of {tasks} tasks, K = {s['num_inner_steps']}): needed {s['needed_flops'] / 1e9:.2f} GFLOP, "
          f"executed {s['executed_flops'] / 1e9:.2f} GFLOP; one step's executed count vs FlopCounterMode "
          f"(math SDPA): {s['counter_rel_diff_math_sdpa']:+.1e}")
    for clock, c in s["by_clock"].items():
        print(f"{clock} clock, {s['threads']} thread(s): adapt {c['adapt_seconds']:.3f} s, matmul best "
              f"{c['throughput_gflops']:.1f} GFLOP/s, limit {c['flop_limit_seconds']:.3f} s (ratio "
              f"{c['ratio_to_limit']:.2f}); at each shape's own rate {c['flop_limit_seconds_shape_rates']:.3f} s "
              f"(ratio {c['ratio_to_limit_shape_rates']:.2f})")
    print(f"adapt_seconds={s['adapt_seconds']:.6g} flop_limit_seconds={s['flop_limit_seconds']:.6g} "
          f"ratio_to_limit={s['ratio_to_limit']:.2f}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
