"""Benchmark presets: the model, tasks, budgets and methods of ``abmll benchmark --preset NAME``.

* ``smoke`` — a tiny random Llama on a generated task set; every method (the Bayesian-LoRA peers
  included), one seed, under 2 minutes on 2 CPU cores (run by a test).
* ``cpu`` — the main job (the README's command): SmolLM2-135M (embedded) on ``debian-cls``, which
  builds from an empty cache with only the package registries reachable; 16 shots, where adaptation
  pays on the held-out families; the six core methods, one seed; budgets measured to finish within
  20 minutes on 2 CPU cores from an empty cache (README, "Set up").
* ``cpu-long`` — what docs/RESULTS.md reports: SmolLM2-135M on the ``debian-cls`` label-word suite
  (real classification tasks with headroom, test families held out), 16 shots, K = 5, 60 outer steps,
  the six core methods and 3 seeds (``--methods all`` adds the other seven; ``--tasks bigbench`` runs
  it on BIG-bench). One thread per run, two runs at once (``jobs=2``: docs/RESULTS.md's runs were
  made that way), every run reading the others' frozen-trunk states (``OUT/trunk-cache``). Measured
  on 2 CPU cores: 72 minutes for the six and 3 seeds (about 2.4 core-hours; 4.3 before the runs
  shared the trunk); in-context learning, Structured LoRA and ABMLL + ICL (its 768-token prompts)
  cost hours more (docs/RESULTS.md, "cpu-long"). Chosen on the suite's dev tasks (docs/RESULTS.md):
  kl_beta 1e-8 over 1e-6 (ABMLL and bayes-lora alike), outer lr 1e-2 over 1e-3 (ABMLL, Regular LoRA
  and Structured LoRA alike) and Reptile's ε 1.0 over 0.5 — one extra setting tried per meta-trained
  method.
* ``paper`` — Llama-3-8B on CrossFit cls-45 with the paper's settings (rank 8, α 16, K = 5,
  kl_beta 1e-8, 2 tasks per step); for GPU users, never run in CI. Needs ``--data-dir DIR``
  (MetaICL-format data) and access to the model.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.sources.folder import write_task_folder
from .data.tasks import Example, Task

__all__ = ["Preset", "PRESETS", "ALL_METHODS", "CORE_METHODS", "PEER_METHODS", "get_preset", "synthetic_task_folder"]

# the Bayesian-LoRA peers and the two simplest uncertainty baselines, per task from Regular LoRA's start
PEER_METHODS = ("laplace-lora", "blob", "ensemble-lora", "mc-dropout-lora")
ALL_METHODS = ("pretrained", "icl", "lora", "lora-ts", "structured-lora", "reptile", "bayes-lora", "abmll", "abmll-icl",
               *PEER_METHODS)
# the comparison of ``cpu`` and ``cpu-long``: what calibration and meta-learning are judged against. In-context
# learning, Structured LoRA and ABMLL + ICL cost 16 of the 36 minutes the first nine took on 2 cores with ``cpu``, and
# ABMLL + ICL alone about 2.5 hours per seed with ``cpu-long`` (docs/RESULTS.md); ``--methods all`` runs them and the
# peers (PEER_METHODS) too, or name them: ``--methods lora abmll laplace-lora blob ensemble-lora mc-dropout-lora``.
CORE_METHODS = ("pretrained", "lora", "lora-ts", "reptile", "bayes-lora", "abmll")


@dataclass(frozen=True)
class Preset:
    name: str
    config: dict[str, Any]
    methods: tuple[str, ...] = ALL_METHODS
    seeds: int = 1
    description: str = ""
    synthetic: dict[str, int] | None = None  # generate a task folder with these sizes (smoke)
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: int = 1  # (method, seed) runs at once (``abmll benchmark --jobs``), each with the config's num_threads


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="tiny random Llama, generated tasks: a wiring check, not a result",
        config=dict(model="tiny-llama", rank=2, lora_alpha=4.0, steps=8, tasks_per_step=2, shots=3, query_size=3,
                    eval_query_size=6, num_inner_steps=2, inner_lr=1e-2, outer_lr=1e-2, kl_beta=1e-4, num_samples=2,
                    max_length=128, checkpoint_every=2, num_threads=1),
        synthetic=dict(num_train=6, num_test=3, examples=16),
    ),
    "cpu": Preset(
        name="cpu",
        description="SmolLM2-135M (dequantized Q4_1) on debian-cls (label-word classification, held-out families), "
                    "16 shots, K = 5, 20 outer steps, 32 query examples per test task, one seed: the main job",
        config=dict(model="smollm2-135m", tasks="debian-cls", rank=8, lora_alpha=16.0, last_layers=4, steps=20,
                    tasks_per_step=2, shots=16, query_size=16, eval_query_size=32, max_length=128,
                    drop_long_examples=True, icl_max_length=768, num_inner_steps=5, inner_lr=1e-2, outer_lr=1e-2,
                    reptile_step_size=1.0, kl_beta=1e-8, num_samples=8, checkpoint_every=10, num_threads=1),
        methods=CORE_METHODS,
        seeds=1,
        jobs=2,  # two one-thread runs at once
    ),
    "cpu-long": Preset(
        name="cpu-long",
        description="SmolLM2-135M on debian-cls (label-word classification, held-out families), 16 shots, K = 5, "
                    "3 seeds: the measured comparison of docs/RESULTS.md",
        config=dict(model="smollm2-135m", tasks="debian-cls", rank=8, lora_alpha=16.0, last_layers=4, steps=60,
                    tasks_per_step=2, shots=16, query_size=16, eval_query_size=64, max_length=128,
                    drop_long_examples=True, icl_max_length=768, num_inner_steps=5, inner_lr=1e-2, outer_lr=1e-2,
                    reptile_step_size=1.0, kl_beta=1e-8, num_samples=8, checkpoint_every=20, num_threads=1),
        methods=CORE_METHODS,
        seeds=3,
        jobs=2,  # two one-thread runs at once, as docs/RESULTS.md's were run
    ),
    "paper": Preset(
        name="paper",
        description="Llama-3-8B on CrossFit cls-45, the paper's settings (GPU; pass --data-dir DIR)",
        config=dict(model="meta-llama/Meta-Llama-3-8B", tasks="cls-45", rank=8, lora_alpha=16.0, num_inner_steps=5,
                    kl_beta=1e-8, tasks_per_step=2, shots=16, query_size=16, eval_query_size=64, steps=5000,
                    inner_lr=1e-3, outer_lr=1e-4, num_samples=10, mixed_precision="bf16", dtype="bfloat16", max_length=1024,
                    checkpoint_every=250, device="auto"),
        seeds=3,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
    return PRESETS[name]


_WORDS = ("red", "blue", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "milk", "salt", "rain", "wind")
_LABELS = (("yes", "no"), ("true", "false"), ("good", "bad"), ("on", "off"), ("up", "down"), ("hot", "cold"))


def _synthetic_task(index: int, examples: int, rng: random.Random) -> Task:
    """Task ``index``: the answer is the label named by whether the cue word ``index`` picks appears.

    Shared structure across tasks (a cue decides the label), task-specific cue and label pair, so a
    meta-learner has something to transfer and each task something to adapt to.
    """
    labels = _LABELS[index % len(_LABELS)]
    cue = _WORDS[index % len(_WORDS)]
    out = []
    for _ in range(examples):
        words = rng.sample([w for w in _WORDS if w != cue], 3)
        positive = rng.random() < 0.5
        if positive:
            words[rng.randrange(3)] = cue
        out.append(Example(f"task {index}: {' '.join(words)}?", labels, 0 if positive else 1))
    return Task(f"synthetic{index:02d}", out)


def _synthetic_readme(root: Path) -> bool:
    """Whether ``root/README.txt`` is the one :func:`synthetic_task_folder` writes (the folder is its own)."""
    try:
        return json.loads((root / "README.txt").read_text(encoding="utf-8")).get("generator") == _GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


_GENERATOR = "abmll_pyro.presets.synthetic_task_folder"


def synthetic_task_folder(root: str | Path, num_train: int = 6, num_test: int = 3, examples: int = 16, seed: int = 0,
                          overwrite: bool = False) -> Path:
    """Write the generated task set (``splits.json`` included) and return its folder: a new or empty one,
    or one this function wrote before (its ``README.txt`` says so); another only with ``overwrite``."""
    from .train.outputs import check_output_dir

    check_output_dir(root, "synthetic", ("*.jsonl", "splits.json", "README.txt"), overwrite, legacy=_synthetic_readme)
    rng = random.Random(seed)
    tasks = [_synthetic_task(i, examples, rng) for i in range(num_train + num_test)]
    names = [t.name for t in tasks]
    root = write_task_folder(tasks, root, {"train": names[:num_train], "test": names[num_train:]})
    (Path(root) / "README.txt").write_text(json.dumps({"generator": _GENERATOR,
                                                       "num_train": num_train, "num_test": num_test,
                                                       "examples": examples, "seed": seed}) + "\n")
    return Path(root)
