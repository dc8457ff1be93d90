"""CrossFit / MetaICL task splits, read from a MetaICL-format data directory or a hub dataset.

The split task-name lists live in ``abmll_pyro/data/crossfit_splits.json`` (copied as facts from
CrossFit's ``custom_tasks_splits`` and MetaICL's ``config``): ``cls-45``, ``cls-23``,
``class-to-class``, ``non-nli-to-nli``, ``non-paraphrase-to-paraphrase``, ``qa-to-mc``.

MetaICL's data layout is ``{data_dir}/{task}/{task}_{k}_{seed}_{split}.jsonl`` with lines
``{"input", "options", "output"}``. Meta-train tasks read ``{task}_{train_k}_{seed}_train.jsonl``
(MetaICL uses ``train_k=16384``); dev/test tasks read ``{task}_{k}_{seed}_train.jsonl`` (the k
demonstrations) followed by ``{task}_{k}_{seed}_test.jsonl``, in that order. Generative tasks (empty
``options``) are an error naming file and line: this loader is multiple-choice only.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from abmll_pyro.data.sources.folder import read_jsonl_examples
from abmll_pyro.data.sources.taskset import TaskSet
from abmll_pyro.data.tasks import Example, Task

__all__ = ["crossfit_splits", "load_metaicl_split", "load_hub_task", "write_metaicl_sample"]


def crossfit_splits() -> dict[str, dict[str, list[str]]]:
    """``{split name: {"train": [...], "dev": [...], "test": [...]}}``."""
    data = json.loads(resources.files("abmll_pyro.data").joinpath("crossfit_splits.json").read_text())
    return {k: {s: v[s] for s in ("train", "dev", "test")} for k, v in data.items() if not k.startswith("_")}


def _split_names(split: str) -> dict[str, list[str]]:
    splits = crossfit_splits()
    if split not in splits:
        raise ValueError(f"unknown CrossFit/MetaICL split {split!r}; choose one of {sorted(splits)}")
    return splits[split]


def _read_files(data_dir: Path, task: str, files: list[str], max_examples: int | None) -> Task:
    examples: list[Example] = []
    for name in files:
        path = data_dir / task / name
        if not path.exists():
            raise FileNotFoundError(f"task {task!r}: {path} does not exist")
        examples += read_jsonl_examples(path)
    if not examples:
        raise ValueError(f"task {task!r}: {files} in {data_dir / task} hold no examples")
    return Task(task, examples[:max_examples] if max_examples else examples)


def load_metaicl_split(
    split: str,
    data_dir: str | Path,
    k: int = 16,
    seed: int = 100,
    train_k: int = 16384,
    max_examples: int | None = None,
) -> TaskSet:
    """The tasks of CrossFit/MetaICL split ``split`` from a MetaICL data directory (layout above)."""
    names = _split_names(split)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"MetaICL data directory {data_dir} does not exist")
    train = [_read_files(data_dir, t, [f"{t}_{train_k}_{seed}_train.jsonl"], max_examples) for t in names["train"]]
    held = {
        s: [_read_files(data_dir, t, [f"{t}_{k}_{seed}_train.jsonl", f"{t}_{k}_{seed}_test.jsonl"], max_examples)
            for t in names[s]]
        for s in ("dev", "test")
    }
    return TaskSet(train, held["dev"], held["test"])


_SAMPLE_WORDS = ("red", "blue", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird")


def write_metaicl_sample(
    root: str | Path,
    split: str = "cls-45",
    examples: int = 8,
    k: int = 16,
    seed: int = 100,
    train_k: int = 16384,
) -> Path:
    """Write a small generated MetaICL-format directory holding every task of ``split`` and return it.

    For running the ``paper`` preset's path without CrossFit's data (a wiring check, not a result):
    each task gets ``examples`` short two-option lines (``"<task>: w1 w2 w3?"``, options
    ``("yes", "no")``, the answer whether the task's cue word appears) in every file
    :func:`load_metaicl_split` reads: ``{task}_{train_k}_{seed}_train.jsonl`` for meta-train tasks,
    ``{task}_{k}_{seed}_train.jsonl`` and ``{task}_{k}_{seed}_test.jsonl`` for dev/test tasks.
    """
    import random

    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples!r}")
    root = Path(root)
    names = _split_names(split)
    rng = random.Random(0)

    def lines(index: int, task: str) -> str:
        cue = _SAMPLE_WORDS[index % len(_SAMPLE_WORDS)]
        out = []
        for _ in range(examples):
            words = rng.sample([w for w in _SAMPLE_WORDS if w != cue], 3)
            if rng.random() < 0.5:
                words[rng.randrange(3)] = cue
            out.append(json.dumps({"input": f"{task}: {' '.join(words)}?", "options": ["yes", "no"],
                                   "output": "yes" if cue in words else "no"}))
        return "\n".join(out) + "\n"

    files = [(t, f"{t}_{train_k}_{seed}_train.jsonl") for t in names["train"]]
    files += [(t, f"{t}_{k}_{seed}_{part}.jsonl") for s in ("dev", "test") for t in names[s] for part in ("train", "test")]
    for index, (task, name) in enumerate(files):
        (root / task).mkdir(parents=True, exist_ok=True)
        (root / task / name).write_text(lines(index, task))
    return root


def load_hub_task(
    dataset: str,
    name: str | None = None,
    split: str = "train",
    task_name: str | None = None,
    keys: tuple[str, str, str] = ("input", "options", "output"),
    max_examples: int | None = None,
    **load_kwargs: Any,
) -> Task:
    """One task from ``datasets.load_dataset(dataset, name, split=split)`` whose rows carry input,
    options and output under ``keys`` (needs a reachable hub or a local dataset script/path)."""
    import datasets

    rows = datasets.load_dataset(dataset, name, split=split, **load_kwargs)
    in_key, opt_key, out_key = keys
    task_name = task_name or (name or dataset).replace("/", "_")
    examples = []
    for i, row in enumerate(rows):
        if max_examples is not None and i >= max_examples:
            break
        examples.append(Example.from_output(row[in_key], row[opt_key], row[out_key], where=f"{dataset} row {i}"))
    return Task(task_name, examples)
