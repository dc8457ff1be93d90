"""Cost probe, run in a fresh process: time per meta-step and peak memory of one method.

``python -m abmll_pyro.train.probe CONFIG_JSON`` builds the run of ``CONFIG_JSON`` (a RunConfig as
JSON), runs ``warmup`` untimed steps, then ``steps`` timed ones, and prints one JSON line:
``{"method", "seconds_per_step", "peak_memory_mb", "num_train_tasks", "device"}``. Peak memory is
``torch.cuda.max_memory_allocated`` on GPU, else ``ru_maxrss`` of this process (which is why the
probe runs alone in its own process).
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


def probe(config: RunConfig, warmup: int = 1) -> dict:
    accelerator = make_accelerator(config)
    built, taskset = build(config, accelerator.device)
    method = built.method
    sampler = EpisodeSampler(taskset.train, config.shots, config.query_size, config.tasks_per_step, config.seed)
    encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(method.in_context), config.template, method.in_context, accelerator.device)
    optimizer = accelerator.prepare_optimizer(method.make_optimizer())
    batches = [[encoder(s) for s in sampler.draw()] for _ in range(warmup + config.steps)]  # encode outside the clock
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    elapsed = 0.0
    for i, episodes in enumerate(batches):
        t0 = time.perf_counter()
        with accelerator.autocast():
            method.train_step(episodes, accelerator.backward)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            elapsed += time.perf_counter() - t0
    return {"method": config.method, "seconds_per_step": elapsed / config.steps,
            "peak_memory_mb": peak_memory_mb(accelerator.device), "num_train_tasks": len(taskset.train),
            "device": str(accelerator.device)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = RunConfig.from_dict(json.loads(argv[0]), where="probe config")
    warmup = int(argv[1]) if len(argv) > 1 else 1
    print(json.dumps(probe(config, warmup)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
