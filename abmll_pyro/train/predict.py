"""``abmll predict``: adapt a trained run to a new task (its support set) and write the posterior
predictive option probabilities of each query example as JSONL.

Query lines need ``input`` and ``options``; ``output`` is optional (when present, it is echoed with
``correct``). Both files are validated exactly like task files (every fault names ``file:line``).
Each output line: ``{"input", "options", "probs", "prediction"[, "output", "correct"],
"entropy", "aleatoric", "epistemic", "spread"}`` — the predictive entropy (nats), its split into
expected entropy and mutual information over posterior samples, and the std over the samples of the
top option's probability (:mod:`abmll_pyro.eval.uncertainty`).

Prediction loads the run's model and trained state, never its training tasks. A run directory's
config that names a plug-in *file* is refused unless ``trust_plugins`` (it would run that file's code).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..data.sources.folder import iter_jsonl, parse_example, read_jsonl_examples
from ..data.tasks import DataError, Example, TaskSplit
from ..eval.uncertainty import example_fields, predict_with_uncertainty
from .episodes import EpisodeEncoder
from .faults import summarize_truncation
from .outputs import check_output_file, first_record_has
from .run import load_trained, make_accelerator, open_run

__all__ = ["predict_file", "read_query"]


def read_query(path: Path) -> tuple[list[Example], list[bool]]:
    """Query examples and whether each came labelled (unlabelled lines get a placeholder gold of 0)."""
    examples, labelled = [], []
    for where, rec in iter_jsonl(path):
        examples.append(parse_example(where, rec, require_output=False))
        labelled.append("output" in rec)
    if not examples:
        raise DataError(f"query file {path} has no examples")
    return examples, labelled


def predict_file(run_dir: Path, support: Path, query: Path, out: str | None, num_samples: int | None = None,
                 progress: bool = True, trust_plugins: bool = False, overwrite: bool = False) -> list[dict]:
    check_output_file(out, overwrite, {"--query": query, "--support": support}, first_record_has("probs", "prediction"))
    config = open_run(run_dir, trust_plugins)
    if num_samples is not None:
        config = config.updated(num_samples=num_samples)
    for path in (support, query):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    support_examples = read_jsonl_examples(support)
    if not support_examples:
        raise DataError(f"support file {support} has no examples")
    query_examples, labelled = read_query(query)
    accelerator = make_accelerator(config)
    with summarize_truncation():
        built, _ = load_trained(config, run_dir, accelerator, with_tasks=False)
        config = built.config
        encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(built.method.in_context), config.template,
                                 built.method.in_context, accelerator.device)
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
