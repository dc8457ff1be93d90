"""The task folder: the interchange format every source converts to.

A folder holds one ``<task>.jsonl`` per task; each line is MetaICL's
``{"input": str, "options": [str, ...], "output": str}`` with ``output`` one of ``options``
(an optional ``"target"`` string is the generative target text). An optional ``splits.json``
``{"train": [...], "dev": [...], "test": [...]}`` names tasks by file stem; without it the caller
names the train and test tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from abmll_pyro.data.sources.taskset import TaskSet
from abmll_pyro.data.tasks import Example, Task

__all__ = ["iter_jsonl", "read_task_file", "read_jsonl_examples", "load_task_folder", "write_task_folder"]

SPLITS_FILE = "splits.json"


def iter_jsonl(path: str | Path):
    """Yield ``(where, record)`` for every non-blank line of a JSONL file, ``where`` = ``"file:line"``;
    a line that is not a JSON object is an error naming file and line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: malformed JSON ({err.msg}): {line[:120]!r}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def read_jsonl_examples(path: Path, limit: int | None = None) -> list[Example]:
    """Parse a MetaICL-format JSONL file (the first ``limit`` examples if given); any bad line is an
    error naming file and line number."""
    examples: list[Example] = []
    for where, record in iter_jsonl(path):
        if limit is not None and len(examples) >= limit:
            break
        missing = [k for k in ("input", "options", "output") if k not in record]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing} in {sorted(record)}")
        options = record["options"]
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise ValueError(f"{where}: 'options' must be a list of strings, got {options!r}")
        if not isinstance(record["input"], str) or not isinstance(record["output"], str):
            raise ValueError(f"{where}: 'input' and 'output' must be strings")
        try:
            example = Example.from_output(record["input"], options, record["output"], where=where)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        target = record.get("target")
        examples.append(example if target is None else Example(example.input, example.options, example.gold, target))
    return examples


def read_task_file(path: str | Path, max_examples: int | None = None) -> Task:
    """A :class:`Task` named by the file stem; an empty file is an error. ``max_examples`` keeps the
    first that many examples (files from :func:`write_task_folder` are already shuffled)."""
    path = Path(path)
    examples = read_jsonl_examples(path, max_examples)
    if not examples:
        raise ValueError(f"task file {path} has no examples")
    return Task(path.stem, examples)


def _task_names(root: Path) -> list[str]:
    return sorted(p.stem for p in root.glob("*.jsonl"))


def load_task_folder(
    root: str | Path,
    train: Sequence[str] | None = None,
    dev: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
    max_examples: int | None = None,
) -> TaskSet:
    """Load the tasks of a folder into a :class:`TaskSet`.

    Task lists given here override ``splits.json``; without both, an error says what to pass.
    Every named task must exist as ``<root>/<name>.jsonl``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"task folder {root} does not exist")
    available = _task_names(root)
    splits_path = root / SPLITS_FILE
    if train is None and test is None and dev is None:
        if not splits_path.exists():
            raise ValueError(
                f"task folder {root} has no {SPLITS_FILE}; name the train and test tasks "
                f"(available: {available})"
            )
        splits = json.loads(splits_path.read_text())
        unknown = set(splits) - {"train", "dev", "test"}
        if unknown:
            raise ValueError(f"{splits_path}: unknown split name(s) {sorted(unknown)}")
        train, dev, test = (splits.get(k, []) for k in ("train", "dev", "test"))
    names = {"train": list(train or []), "dev": list(dev or []), "test": list(test or [])}
    TaskSet.check_names(names, where=str(root))
    for split, tasks in names.items():
        missing = [t for t in tasks if t not in available]
        if missing:
            raise ValueError(f"{root}: {split} task(s) {missing} not found; available: {available}")
    load = {t: read_task_file(root / f"{t}.jsonl", max_examples) for ts in names.values() for t in ts}
    return TaskSet(*(tuple(load[t] for t in names[s]) for s in ("train", "dev", "test")))


def write_task_folder(
    tasks: Iterable[Task], root: str | Path, splits: dict[str, Sequence[str]] | None = None
) -> Path:
    """Write ``tasks`` as ``<root>/<name>.jsonl`` (and ``splits.json`` if given); returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for task in tasks:
        if task.name in seen:
            raise ValueError(f"duplicate task name {task.name!r}")
        seen.add(task.name)
        with open(root / f"{task.name}.jsonl", "w", encoding="utf-8") as f:
            for ex in task.examples:
                record = {"input": ex.input, "options": list(ex.options), "output": ex.answer}
                if ex.target is not None:
                    record["target"] = ex.target
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if splits is not None:
        TaskSet.check_names(dict(splits), where=str(root))
        (root / SPLITS_FILE).write_text(json.dumps({k: list(v) for k, v in splits.items()}, indent=1))
    return root
