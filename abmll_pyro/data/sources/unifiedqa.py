"""UnifiedQA multiple-choice data: ``question \\n (A) option (B) option ...`` -> an :class:`Example`.

Local files are UnifiedQA's ``{split}.tsv`` (``input<TAB>answer`` per line, in
``{root}/{task}/``); :func:`load_unifiedqa_hub` reads the same format through ``datasets`` when a
hub is reachable. A line whose answer is not among its parsed options is an error naming the line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from abmll_pyro.data.tasks import Example, Task

__all__ = ["parse_unifiedqa", "load_unifiedqa_task", "load_unifiedqa_hub"]

_CHOICE = re.compile(r"\(([A-Za-z])\)\s*")


def parse_unifiedqa(text: str, answer: str, where: str = "") -> Example:
    """Split UnifiedQA's ``question \\n (A) opt (B) opt [\\n context]`` into input and options."""
    parts = text.replace("\\n", "\n").split("\n")
    choice_line = next((i for i, p in enumerate(parts) if _CHOICE.search(p)), None)
    if choice_line is None:
        raise ValueError(f"{where}: no '(A) ...' choices in {text[:120]!r}")
    pieces = _CHOICE.split(parts[choice_line])[1:]  # [letter, option, letter, option, ...]
    options = [o.strip() for o in pieces[1::2]]
    context = [p.strip() for i, p in enumerate(parts) if i != choice_line and p.strip()]
    question = "\n".join(context)
    answer = answer.strip()
    if answer not in options:
        lowered = [o.lower() for o in options]
        if answer.lower() not in lowered:
            raise ValueError(f"{where}: answer {answer!r} is not among options {options!r}")
        answer = options[lowered.index(answer.lower())]
    return Example.from_output(question, options, answer, where=where)


def load_unifiedqa_task(root: str | Path, task: str, split: str = "train", max_examples: int | None = None) -> Task:
    """``{root}/{task}/{split}.tsv`` as a task named ``unifiedqa:{task}``."""
    path = Path(root) / task / f"{split}.tsv"
    if not path.exists():
        raise FileNotFoundError(f"UnifiedQA file {path} does not exist")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2:
                raise ValueError(f"{path}:{number}: expected 'input<TAB>answer', got {len(fields)} fields")
            examples.append(parse_unifiedqa(fields[0], fields[1], where=f"{path}:{number}"))
            if max_examples is not None and len(examples) >= max_examples:
                break
    return Task(f"unifiedqa:{task}", examples)


def load_unifiedqa_hub(task: str, split: str = "train", dataset: str = "allenai/unifiedqa",
                       max_examples: int | None = None, **load_kwargs: Any) -> Task:
    """A UnifiedQA task through ``datasets.load_dataset(dataset, task)`` (rows ``input``/``output``)."""
    import datasets

    rows = datasets.load_dataset(dataset, task, split=split, **load_kwargs)
    examples = []
    for i, row in enumerate(rows):
        if max_examples is not None and i >= max_examples:
            break
        examples.append(parse_unifiedqa(row["input"], row["output"], where=f"{dataset}/{task} row {i}"))
    return Task(f"unifiedqa:{task}", examples)
