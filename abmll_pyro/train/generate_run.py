"""``abmll generate``: adapt a trained run to a support set, then sample S answers per prompt.

Support lines are task-folder lines: generative ``{"input", "target"}`` (adapted with the token
likelihood) or multiple choice ``{"input", "options", "output"}`` (the option likelihood). Prompt lines
are ``{"input"[, "target"]}``. Each output line::

    {"input", "answers": [S strings], "majority", "agreement", "entropy"[, "target", "exact_match"]}

ABMLL draws S weight perturbations ΔW_s ~ q(φ | support) through the Pyro guide
(:func:`~abmll_pyro.infer.generate.sample_answers`); a deterministic method (LoRA, Reptile, the
pretrained model) has one adapted weight, so its S answers differ only when ``do_sample`` is on.
``seed`` (default: the run's) fixes adaptation, draws and sampling: two runs give identical files.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch

from ..data.sources.folder import iter_jsonl, read_jsonl_examples
from ..data.tasks import TaskSplit
from ..infer.generate import (GenerationConfig, continuations, decode_answers, encode_prompts, sample_answers,
                              summarize_answers)
from ..methods import ABMLL
from .config import MAX_SEED, RunConfig
from .episodes import EpisodeEncoder
from .generative import adapted_draws
from .outputs import check_output_file, first_record_has
from .run import load_trained, make_accelerator, open_run

__all__ = ["Adapted", "load_adapted", "read_prompts", "generate_file"]


@dataclass
class Adapted:
    """A trained run's method with its state adapted to a support set (``state`` None: not adapted)."""

    config: RunConfig
    built: Any
    state: Any
    device: torch.device


def load_adapted(run_dir: Path, support: Path | None, seed: int | None = None, trust_plugins: bool = False) -> Adapted:
    """Load the run's trained method; with ``support``, adapt it (seeded by ``seed`` or the run's). A
    plug-in file named by the run's config is refused unless ``trust_plugins`` (:func:`~.run.open_run`)."""
    config = open_run(run_dir, trust_plugins)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be in [0, {MAX_SEED}], got {seed}")  # built with the run's own seed (a tiny random LM's weights depend on it)
    if support is not None and not Path(support).exists():
        raise FileNotFoundError(f"{support} does not exist")
    accelerator = make_accelerator(config)
    built, _ = load_trained(config, run_dir, accelerator)
    pyro.set_rng_seed(config.seed if seed is None else seed)
    if support is None:
        return Adapted(config, built, None, accelerator.device)
    examples = read_jsonl_examples(Path(support))
    if not examples:
        raise ValueError(f"support file {support} has no examples")
    method = built.method
    encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(method.in_context), config.template,
                             method.in_context, accelerator.device)
    episode = encoder(TaskSplit(Path(support).stem, tuple(examples), tuple(examples)))
    with accelerator.autocast():
        state = method.adapt(episode)
    return Adapted(config, built, state, accelerator.device)


def read_prompts(path: Path) -> tuple[list[str], list[str | None]]:
    """Prompt inputs and their optional targets; a bad line is an error naming file and line."""
    inputs, targets = [], []
    for where, rec in iter_jsonl(path):
        if not isinstance(rec.get("input"), str):
            raise ValueError(f"{where}: a prompt line needs a string 'input'")
        if "target" in rec and not isinstance(rec["target"], str):
            raise ValueError(f"{where}: 'target' must be a string, got {rec['target']!r}")
        inputs.append(rec["input"])
        targets.append(rec.get("target"))
    if not inputs:
        raise ValueError(f"prompt file {path} has no prompts")
    return inputs, targets


def generate_file(run_dir: Path, support: Path, prompts: Path, out: str | None, num_samples: int,
                  gen: GenerationConfig | None = None, seed: int | None = None, trust_plugins: bool = False,
                  overwrite: bool = False) -> list[dict]:
    """Write one JSON line per prompt (see the module docstring); returns the rows. ``out`` must not be an
    input, nor an existing file of another kind unless ``overwrite``."""
    check_output_file(out, overwrite, {"--prompts": prompts, "--support": support}, first_record_has("input", "answers"))
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    if not Path(prompts).exists():
        raise FileNotFoundError(f"{prompts} does not exist")
    inputs, targets = read_prompts(Path(prompts))
    gen = gen or GenerationConfig()
    adapted = load_adapted(Path(run_dir), Path(support), seed, trust_plugins)
    method, tok = adapted.built.method, adapted.built.tokenizer
    batch = encode_prompts(tok, inputs, adapted.config.template, adapted.config.max_length).to(adapted.device)
    if isinstance(method, ABMLL):
        answers = sample_answers(method.svi, adapted.state, batch, tok, num_samples, gen)
    else:  # one adapted weight: S decodes of it
        adapter = adapted.built.adapter
        (deltas,) = adapted_draws(method, adapted.state, batch, 1, "mean")
        per_draw = []
        with adapter.use(deltas):
            for _ in range(num_samples):
                per_draw.append(decode_answers(tok, continuations(adapter.lm, batch, tok, gen), batch.pad_id,
                                               gen.stop_strings))
        answers = [[d[p] for d in per_draw] for p in range(len(inputs))]
    rows = []
    for text, target, samples in zip(inputs, targets, answers):
        row = {"input": text, "answers": samples, **summarize_answers(samples, target)}
        if target is not None:
            row = {**row, "target": target}
        rows.append(row)
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(payload)
    else:
        sys.stdout.write(payload)
    return rows
