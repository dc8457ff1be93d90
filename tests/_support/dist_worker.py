"""One rank of a traced training run, for tests/train/test_distributed.py.

Usage (one process, or under ``torchrun --nproc_per_node W``):
    python dist_worker.py CONFIG_JSON RUN_DIR TRACE_DIR [--resume]

Runs :func:`abmll_pyro.train.run.train_run` and writes, outside the run directory,
``TRACE_DIR/rank<r>.json`` (the episodes this rank trained on and the test tasks it adapted to) and
``TRACE_DIR/rank<r>.safetensors`` (this rank's trained state): what the test compares across ranks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from abmll_pyro.train import run
from abmll_pyro.train.config import RunConfig


def main(argv: list[str]) -> None:
    config = RunConfig.from_dict(json.loads(Path(argv[0]).read_text()))
    run_dir, trace = Path(argv[1]), Path(argv[2])
    resume = "--resume" in argv
    rank = int(os.environ.get("RANK", "0"))
    trained, adapted, built_box = [], [], []

    micro_batch, build = run._micro_batch, run.build

    def traced_micro_batch(method, sampler, encoder, ranks, draw, seed, backward):
        def encode(split):
            trained.append([draw, split.name, [ex.input for ex in split.support]])
            return encoder(split)

        return micro_batch(method, sampler, encode, ranks, draw, seed, backward)

    def traced_build(*args, **kwargs):
        built, taskset = build(*args, **kwargs)
        adapt = built.method.adapt

        def traced_adapt(episode):
            adapted.append(episode.name)
            return adapt(episode)

        built.method.adapt = traced_adapt
        built_box.append(built)
        return built, taskset

    run._micro_batch, run.build = traced_micro_batch, traced_build
    run.train_run(config, run_dir, resume=resume, progress=False)
    trace.mkdir(parents=True, exist_ok=True)
    (trace / f"rank{rank}.json").write_text(json.dumps({"trained": trained, "adapted": adapted}))
    state = {k: v.detach().cpu().contiguous() for k, v in built_box[0].method.state_tensors().items()}
    save_file(state, str(trace / f"rank{rank}.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
