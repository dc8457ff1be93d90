"""Cost probe, run in a fresh process: time per meta-step and peak memory of one method.

``python -m abmll_pyro.train.probe CONFIG_JSON [WARMUP [OPTIONS_JSON]]`` builds the run of
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
"""

from __future__ import annotations

import json
import sys
import time

import torch

from .config import RunConfig
from .episodes import EpisodeEncoder, EpisodeSampler
from .run import make_accelerator, peak_memory_mb
from .setup import build

__all__ = ["probe"]


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def rss_mb(field: str = "VmRSS") -> float:
    """The current (``VmRSS``) or peak (``VmHWM``) resident set of this process (Linux /proc), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux >= 4.0: ``5`` to /proc/self/clear_refs), so the
    peak measured later excludes transients of loading the model; False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PassCounter:
    """Counts LM passes and the tokens they cover (a hook on the final norm, run once per pass)."""

    def __init__(self, lm) -> None:
        from ..data.decoder import decoder_of

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
    from .episodes import test_splits

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
        from ..infer.elbo import LeanMeanFieldELBO

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
            "clock": options.get("clock", "wall"), "elbo": type(getattr(getattr(method, "svi", None), "elbo", None)).__name__, **extra}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = RunConfig.from_dict(json.loads(argv[0]), where="probe config")
    warmup = int(argv[1]) if len(argv) > 1 else 1
    options = json.loads(argv[2]) if len(argv) > 2 else {}
    print(json.dumps(probe(config, warmup, options)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
