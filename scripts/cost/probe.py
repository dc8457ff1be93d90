"""Cost probe, run in a fresh process: time per meta-step and peak memory of one method.

``python scripts/cost/probe.py CONFIG_JSON [WARMUP [OPTIONS_JSON]]`` builds the run of
``CONFIG_JSON`` (a RunConfig as JSON), runs ``warmup`` untimed steps, then ``steps`` timed ones, and
prints one JSON line: ``{"method", "seconds_per_step", "peak_memory_mb", "num_train_tasks", "device",
"rss_after_load_mb", "peak_above_model_mb", "tokens_per_step", "lm_passes_per_step",
"seconds_per_1k_token_passes"}``. Peak memory is ``torch.cuda.max_memory_allocated`` on GPU, else
``ru_maxrss`` of this process (which is why the probe runs alone in its own process);
``peak_above_model_mb`` subtracts the resident set right after the model and adapter are built, so
the model's own weights do not hide the adapter's cost.

Options: ``{"warm": true}`` times a second pass over the same episodes (every example's frozen trunk
already cached; the first pass's time is ``cold_seconds_per_step``); ``{"test_tasks": N}`` also
times adapting each of the first N test tasks and predicting its query set
(``adapt_seconds_per_task``, ``predict_seconds_per_task``); ``{"elbo": "lean"}`` gives a method
built on :class:`~abmll_pyro.infer.meta.MetaSVI` the :class:`~abmll_pyro.infer.elbo.LeanMeanFieldELBO`
in place of its default ``TraceMeanField_ELBO`` (same loss; measures what switching the default buys);
``{"clock": "cpu"}`` times with this process's CPU time (``time.process_time``) instead of the wall
clock: on a shared machine other processes' load then does not count (it still slows memory access).
``{"malloc": "fixed"}`` (:func:`run_probe` only) starts the process with glibc's mmap threshold fixed at
64 KiB and trimming at every free (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``): every
tensor above 64 KiB is its own mapping, returned to the system when freed, so the resident set follows
the live tensors, as ``max_memory_allocated`` does on a GPU. With glibc's default (``"default"``) the
threshold rises to the largest block freed so far, later blocks of that size come from the heap and
stay resident after they are freed: the peak then also counts freed memory not yet reused (measured on
the one-block Llama-3-8B proxy: ABMLL 1,589 MiB above the model by default, 977 MiB fixed).

:func:`run_probe` runs this file in a fresh process and returns its JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: scripts.* and its abmll_pyro

import torch

from abmll_pyro.train.config import RunConfig
from abmll_pyro.train.cost import reset_peak_rss, rss_mb
from abmll_pyro.train.episodes import EpisodeEncoder, EpisodeSampler, test_splits
from abmll_pyro.train.run import make_accelerator, peak_memory_mb
from abmll_pyro.train.setup import build

__all__ = ["probe", "run_probe"]


#: the child's glibc allocator settings for ``{"malloc": ...}`` (module docstring)
MALLOC_MODES = {"default": {}, "fixed": {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}}


def _malloc_mode() -> str:
    """Which of :data:`MALLOC_MODES` this process started under ("custom" for other settings)."""
    names = {n for env in MALLOC_MODES.values() for n in env}
    current = {n: os.environ[n] for n in names if n in os.environ}
    return next((mode for mode, env in MALLOC_MODES.items() if env == current), "custom")


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


class PassCounter:
    """Counts LM passes and the tokens they cover (a hook on the final norm, run once per pass)."""

    def __init__(self, lm) -> None:
        from abmll_pyro.data.decoder import decoder_of

        decoder = decoder_of(lm)
        self.passes = self.tokens = 0
        self.handle = None if decoder is None else decoder.final_norm.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.passes += 1
        self.tokens += output.shape[0] * output.shape[1]


def _time_steps(method, optimizer, accelerator, batches) -> float:
    elapsed = 0.0
    for episodes in batches:
        t0 = _clock()
        with accelerator.autocast():
            method.train_step(episodes, accelerator.backward)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += _clock() - t0
    return elapsed


def _time_test_tasks(built, taskset, config: RunConfig, accelerator, count: int) -> dict:
    method = built.method
    encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(method.in_context), config.template,
                             method.in_context, accelerator.device)
    adapt = predict = 0.0
    splits = test_splits(taskset.test, config.shots, config.eval_query_size, config.seed)[:count]
    for split in splits:
        episode = encoder(split)
        t0 = _clock()
        state = method.adapt(episode)
        t1 = _clock()
        with torch.no_grad():
            method.predict(state, episode)
        adapt, predict = adapt + t1 - t0, predict + _clock() - t1
    return {"adapt_seconds_per_task": adapt / len(splits), "predict_seconds_per_task": predict / len(splits),
            "num_samples": config.num_samples, "test_tasks_timed": len(splits)}


def probe(config: RunConfig, warmup: int = 1, options: dict | None = None) -> dict:
    options = options or {}
    global _clock
    _clock = _CLOCKS[options.get("clock", "wall")]
    accelerator = make_accelerator(config)
    built, taskset = build(config, accelerator.device)
    rss_after_load = rss_mb()
    hwm_reset = reset_peak_rss()
    method = built.method
    if options.get("elbo") == "lean" and getattr(method, "svi", None) is not None:
        from abmll_pyro.infer.elbo import LeanMeanFieldELBO

        method.svi.elbo = LeanMeanFieldELBO(max_plate_nesting=1)
    sampler = EpisodeSampler(taskset.train, config.shots, config.query_size, config.tasks_per_step, config.seed)
    encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(method.in_context), config.template, method.in_context, accelerator.device)
    optimizer = accelerator.prepare_optimizer(method.make_optimizer())
    batches = [[encoder(s) for s in sampler.draw()] for _ in range(warmup + config.steps)]  # encode outside the clock
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    _time_steps(method, optimizer, accelerator, batches[:warmup])
    timed = batches[warmup:]
    extra = {}
    if options.get("warm"):  # a first pass over the same episodes fills the trunk cache
        extra["cold_seconds_per_step"] = _time_steps(method, optimizer, accelerator, timed) / config.steps
    counter = PassCounter(built.lm)
    elapsed = _time_steps(method, optimizer, accelerator, timed)
    if counter.handle is not None:
        counter.handle.remove()
    peak = peak_memory_mb(accelerator.device)
    if accelerator.device.type != "cuda" and hwm_reset:
        peak = rss_mb("VmHWM")  # since the reset: the load's own transients excluded
    if options.get("test_tasks"):
        extra.update(_time_test_tasks(built, taskset, config, accelerator, int(options["test_tasks"])))
    return {"method": config.method, "seconds_per_step": elapsed / config.steps,
            "peak_memory_mb": peak, "num_train_tasks": len(taskset.train),
            "device": str(accelerator.device), "rss_after_load_mb": rss_after_load,
            "peak_above_model_mb": peak - rss_after_load if accelerator.device.type != "cuda" else peak,
            "tokens_per_step": counter.tokens / config.steps, "lm_passes_per_step": counter.passes / config.steps,
            "seconds_per_1k_token_passes": 1000 * elapsed / max(counter.tokens, 1),
            "trunk_cache": config.trunk_cache, "last_layers": config.last_layers,
            "clock": options.get("clock", "wall"), "malloc": _malloc_mode(), "elbo": type(getattr(getattr(method, "svi", None), "elbo", None)).__name__, **extra}


def _command(tree: Path | None) -> list[str]:
    """This file of ``tree`` (default: this checkout); a checkout from before the studies left the
    package has it at ``abmll_pyro/train/probe.py`` instead (run with ``-m`` from that checkout's root)."""
    script = Path(tree).resolve() / "scripts" / "cost" / "probe.py" if tree is not None else Path(__file__).resolve()
    return [sys.executable, str(script)] if script.is_file() else [sys.executable, "-m", "abmll_pyro.train.probe"]


def run_probe(config: RunConfig, warmup: int = 1, options: dict | None = None, tree: Path | None = None) -> dict:
    """:func:`probe` in a fresh process (its peak memory is its own); ``tree``: the probe and
    ``abmll_pyro`` of that checkout instead (an older version, for old/new ratios)."""
    env = dict(os.environ)
    malloc = (options or {}).get("malloc", "default")
    if malloc not in MALLOC_MODES:
        raise ValueError(f"malloc must be one of {list(MALLOC_MODES)}, got {malloc!r}")
    env.update(MALLOC_MODES[malloc])
    if tree is not None:  # its own package, and the task paths made absolute: it runs in that checkout
        env["PYTHONPATH"] = str(Path(tree).resolve())
        paths = {k: str(Path(v).resolve()) for k in ("tasks", "data_dir") if (v := getattr(config, k, None)) and Path(v).exists()}
        config = config.updated(**paths)
    cmd = [*_command(tree), json.dumps(config.to_dict()), str(warmup), json.dumps(options or {})]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode != 0:
        raise RuntimeError(f"cost probe for {config.method} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = RunConfig.from_dict(json.loads(argv[0]), where="probe config")
    warmup = int(argv[1]) if len(argv) > 1 else 1
    options = json.loads(argv[2]) if len(argv) > 2 else {}
    print(json.dumps(probe(config, warmup, options)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
