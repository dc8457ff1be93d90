"""Device check: does the GPU path run, and at what speed and memory? (README.md beside this file.)

    python scripts/device_check/run.py --device cuda [--out DIR] [--quick]
    python scripts/device_check/run.py --device cpu --quick        # the same code path, the test's run

Stages, each in its own process (its peak memory is its own):

1. ``tests``: the tests marked ``device`` (tests/device/) with ``ABMLL_TEST_DEVICE=<device>``;
2. ``smoke``: ``abmll benchmark --preset smoke --device <device>`` (every method on a tiny Llama);
3. ``cpu`` and ``paper``: one outer step (the cost study's probe, ``scripts/cost/probe.py``) per
   method in bf16 (bfloat16 weights, bf16 autocast) and fp32 — the ``cpu`` preset as it is (SmolLM2 on
   debian-cls; skipped, with the reason, when the embedded model or the prepared suite is missing) and
   the ``paper`` preset on the Llama-3-8B shape proxy (``llama3-8b-proxy``, one block) with generated
   cls-45 data.

Prints one table (per stage, method and dtype: tokens per second, peak memory, seconds) and writes it
to ``OUT/device_check.json``. Tokens per second: the tokens of every LM pass of one timed outer step
(padding included) over its seconds. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the
peak resident set on the CPU (model included). ``--quick``: the least that exercises every stage —
one test, two smoke methods for two steps, the ``cpu`` preset skipped, ABMLL with the ``paper``
settings on the tiny Llama at 2 shots. Exit 0 when no stage failed (skips allowed), 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the checkout's package, run from anywhere

from abmll_pyro.presets import CORE_METHODS, get_preset  # noqa: E402
from abmll_pyro.train.config import RunConfig  # noqa: E402
from scripts.cost.probe import run_probe as _probe  # noqa: E402

DTYPES = {"bf16": dict(dtype="bfloat16", mixed_precision="bf16"), "fp32": dict(dtype="float32", mixed_precision="no")}
QUICK_PAPER = dict(model="tiny-llama", shots=2, query_size=2, num_inner_steps=1, num_samples=2, max_length=128)


def row(stage: str, model: str, method: str, dtype: str, status: str, **values) -> dict:
    return {"stage": stage, "model": model, "method": method, "dtype": dtype, "status": status,
            "tokens_per_s": None, "peak_memory_mb": None, "seconds": None, "note": "", **values}


def run_tests(device: str, quick: bool) -> list[dict]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "device", "-p", "no:cacheprovider", "tests/device"]
    if quick:
        cmd += ["-k", "zero_B"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "ABMLL_TEST_DEVICE": device})
    last = (done.stdout.strip().splitlines() or [""])[-1]
    status = "ok" if done.returncode == 0 else "FAILED"
    return [row("tests", "tiny-llama", "tests/device -m device", "fp32", status, seconds=time.perf_counter() - t0,
                note=last if status == "ok" else (done.stdout + done.stderr)[-2000:])]


def run_smoke(device: str, out: Path, quick: bool) -> list[dict]:
    cmd = [sys.executable, "-m", "abmll_pyro.cli", "--quiet", "benchmark", "--preset", "smoke", "--device", device,
           "--out", str(out / "smoke"), "--overwrite"]
    if quick:
        cmd += ["--methods", "lora", "abmll", "--steps", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return [row("smoke", "tiny-llama", "benchmark", "fp32", "FAILED", note=done.stderr[-2000:])]
    results = json.loads((out / "smoke" / "results.json").read_text())
    return [row("smoke", r["model"], r["method"], "fp32", "ok", seconds=r["wall_time_s"],
                peak_memory_mb=r["peak_memory_mb"], note="whole run (train + evaluate); peak: the benchmark process's")
            for r in results]


def cpu_preset_missing() -> str | None:
    """Why the ``cpu`` preset cannot run here (None when it can): the embedded model or the suite."""
    from abmll_pyro.data.cache import cache_dir
    from abmll_pyro.data.sources.debian_cls import SUITE_VERSION
    from abmll_pyro.lms import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except ModuleNotFoundError as err:
        return f"the embedded extra is not installed ({err})"
    suite = cache_dir(f"debian-cls-{SUITE_VERSION}", create=False) / "tasks" / "manifest.json"
    if not suite.exists():
        return f"debian-cls is not prepared ({suite} missing): run `abmll data prepare debian-cls` first"
    return None


def probe_configs(stage: str, device: str, out: Path, quick: bool) -> tuple[str, list[RunConfig]] | str:
    """``(model, configs)`` of one probe stage, or the reason it is skipped."""
    if stage == "cpu":
        if quick:
            return "skipped by --quick"
        missing = cpu_preset_missing()
        if missing:
            return missing
        base = dict(get_preset("cpu").config)
        methods = [m for m in CORE_METHODS if m in ("lora", "reptile", "abmll")]  # the trained ones
    else:
        from abmll_pyro.data.sources import write_metaicl_sample

        base = {**get_preset("paper").config, "model": "llama3-8b-proxy", "trunk_cache": False,
                **(QUICK_PAPER if quick else {})}
        data = write_metaicl_sample(out / "metaicl", "cls-45", examples=base["shots"] + base["query_size"] + 8)
        base.update(tasks="cls-45", data_dir=str(data))
        methods = ["abmll"] if quick else ["abmll", "lora"]
    configs = [RunConfig.from_dict({**base, **DTYPES[d], "method": m, "steps": 1, "device": device},
                                   where=f"{stage} preset") for m in methods for d in DTYPES]
    return base["model"], configs


def run_probes(stage: str, device: str, out: Path, quick: bool) -> list[dict]:
    plan = probe_configs(stage, device, out, quick)
    if isinstance(plan, str):
        return [row(stage, "-", "-", "-", "skipped", note=plan)]
    model, configs = plan
    rows = []
    warmup = 1 if device == "cuda" else 0  # CUDA: the first step pays for kernel selection and the allocator
    for config in configs:
        dtype = "bf16" if config.dtype == "bfloat16" else "fp32"
        try:
            r = _probe(config, warmup)
        except RuntimeError as err:
            rows.append(row(stage, model, config.method, dtype, "FAILED", note=str(err)[-2000:]))
            continue
        rows.append(row(stage, model, config.method, dtype, "ok", tokens_per_s=r["tokens_per_step"] / r["seconds_per_step"],
                        peak_memory_mb=r["peak_memory_mb"], seconds=r["seconds_per_step"],
                        note=f"one outer step after {warmup} warm-up; {r['tokens_per_step']:.0f} tokens"))
    return rows


def _cell(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict]) -> str:
    lines = ["| stage | model | method | dtype | status | tokens/s | peak MiB | seconds |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['model']} | {r['method']} | {r['dtype']} | {r['status']} | "
                     f"{_cell(r['tokens_per_s'], '.0f')} | {_cell(r['peak_memory_mb'], '.0f')} | "
                     f"{_cell(r['seconds'], '.2f')} |")
    notes = [f"- {r['stage']} {r['method']} {r['dtype']}: {' '.join(r['note'].split())[:300]}"
             for r in rows if r["status"] != "ok"]
    return "\n".join(lines + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], required=True)
    p.add_argument("--out", type=Path, default=Path("runs/device-check"))
    p.add_argument("--quick", action="store_true", help="the least that runs every stage (the test's run)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("device_check: error: --device cuda but torch sees no CUDA GPU (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)  # every stage's process imports this checkout's package (``-m`` reads the working directory first)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    rows = run_tests(args.device, args.quick) + run_smoke(args.device, out, args.quick)
    for stage in ("cpu", "paper"):
        rows += run_probes(stage, args.device, out, args.quick)
    text = table(rows)
    summary = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
               "torch": torch.__version__, "python": platform.python_version(), "quick": args.quick,
               "wall_time_s": time.perf_counter() - t0, "rows": rows}
    (out / "device_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(text + f"\nwall time {summary['wall_time_s']:.0f} s; written to {out / 'device_check.json'}")
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
