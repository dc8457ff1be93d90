"""``abmll predict``: adapt a trained run to a new task (its support set) and write the posterior
predictive option probabilities of each query example as JSONL.

Query lines need ``input`` and ``options``; ``output`` is optional (when present, it is echoed with
``correct``). Each output line: ``{"input", "options", "probs", "prediction"[, "output", "correct"],
"entropy", "aleatoric", "epistemic"}`` — the last three the predictive entropy (nats) and its split
into expected entropy and mutual information over posterior samples (:mod:`abmll_pyro.eval.uncertainty`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..data.sources.folder import iter_jsonl, read_jsonl_examples
from ..data.tasks import Example, TaskSplit
from ..eval.uncertainty import example_fields, predict_with_uncertainty
from .episodes import EpisodeEncoder
from .run import load_run_config, load_trained, make_accelerator

__all__ = ["predict_file", "read_query"]


def read_query(path: Path) -> tuple[list[Example], list[bool]]:
    """Query examples and whether each came labelled (unlabelled lines get a placeholder gold of 0)."""
    examples, labelled = [], []
    for where, rec in iter_jsonl(path):
        if "input" not in rec or "options" not in rec:
            raise ValueError(f"{where}: a query line needs 'input' and 'options'")
        if "output" in rec:
            examples.append(Example.from_output(rec["input"], rec["options"], rec["output"], where=where))
        else:
            examples.append(Example(rec["input"], tuple(rec["options"]), 0))
        labelled.append("output" in rec)
    if not examples:
        raise ValueError(f"query file {path} has no examples")
    return examples, labelled


def predict_file(run_dir: Path, support: Path, query: Path, out: str | None, num_samples: int | None = None,
                 progress: bool = True) -> list[dict]:
    config = load_run_config(run_dir)
    if num_samples is not None:
        config = config.updated(num_samples=num_samples)
    for path in (support, query):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
    support_examples = read_jsonl_examples(support)
    if not support_examples:
        raise ValueError(f"support file {support} has no examples")
    query_examples, labelled = read_query(query)
    accelerator = make_accelerator(config)
    built, _ = load_trained(config, run_dir, accelerator)
    encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(built.method.in_context), config.template, built.method.in_context, accelerator.device)
    episode = encoder(TaskSplit(query.stem, tuple(support_examples), tuple(query_examples)))
    torch.manual_seed(config.seed)
    with accelerator.autocast():
        state = built.method.adapt(episode)
        with torch.no_grad():
            split = predict_with_uncertainty(built.method, state, episode)
    probs = split.probs.float()
    rows = []
    for ex, p, has_label, unc in zip(query_examples, probs, labelled, example_fields(split)):
        p = p[: len(ex.options)].tolist()
        row = {"input": ex.input, "options": list(ex.options), "probs": p,
               "prediction": ex.options[max(range(len(p)), key=p.__getitem__)]}
        if has_label:
            row.update(output=ex.answer, correct=row["prediction"] == ex.answer)
        row.update(unc)
        rows.append(row)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out:
        Path(out).write_text(text)
    else:
        sys.stdout.write(text)
    return rows
