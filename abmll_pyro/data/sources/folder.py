"""The task folder: the interchange format every source converts to.

A folder holds one ``<task>.jsonl`` per task; each line is MetaICL's
``{"input": str, "options": [str, ...], "output": str}`` with ``output`` one of ``options``
(an optional ``"target"`` string is the generative target text; a generative line may be just
``{"input": str, "target": str}``). An optional ``splits.json``
``{"train": [...], "dev": [...], "test": [...]}`` names tasks by file stem; without it the caller
names the train and test tasks (``--train-tasks`` / ``--test-tasks``).

Validation (every fault is a :class:`~abmll_pyro.data.tasks.DataError` naming ``file:line``): the file
is UTF-8; each line is a JSON object; ``input`` a string, ``options`` a list of at least two
non-blank strings, no two equal after whitespace normalisation (a tie would count as correct),
``output`` one of them. :func:`parse_example` checks one record; predict's query files use it too.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Iterable, Sequence

from abmll_pyro.data.sources.taskset import TaskSet
from abmll_pyro.data.fingerprint import folder_fingerprint
from abmll_pyro.data.tasks import DataError, Example, Task, unique_keys

__all__ = ["iter_jsonl", "read_task_file", "read_jsonl_examples", "load_task_folder", "write_task_folder",
           "parse_example", "read_splits"]

SPLITS_FILE = "splits.json"
MAX_OPTIONS = 1000  # options per example: each is scored by a pass of the LM, held in memory at once


def check_regular(path: str | Path) -> None:
    """A :class:`DataError` unless ``path`` is a regular file (reading a FIFO would block forever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a regular file (a FIFO, device or folder is not read)")


def iter_jsonl(path: str | Path):
    """Yield ``(where, record)`` for every non-blank line of a JSONL file, ``where`` = ``"file:line"``;
    a line that is not UTF-8 or not a JSON object is a :class:`DataError` naming file and line, and so
    is a path that is not a regular file."""
    check_regular(path)
    try:
        f = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    with f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as err:  # JSONDecodeError, an over-long integer, deep nesting
                msg = getattr(err, "msg", None) or ("nested too deeply" if isinstance(err, RecursionError) else str(err))
                raise DataError(f"{where}: malformed JSON ({msg[:100]}): {line[:120]!r}") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _text(where: str, key: str, value) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {value!r}"[:300])
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: {key!r} holds an unpaired surrogate (not valid Unicode)") from None
    return value


def parse_example(where: str, record: dict, require_output: bool = True) -> Example:
    """One example from a MetaICL record, every fault a :class:`DataError` naming ``where``. Without
    ``require_output`` (predict's queries) an unlabelled record gets the placeholder gold 0."""
    needed = ("input", "options", "output") if require_output else ("input", "options")
    missing = [k for k in needed if k not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} in {sorted(record)}"[:300])
    text = _text(where, "input", record["input"])
    options = record["options"]
    if not isinstance(options, list):
        raise DataError(f"{where}: 'options' must be a list of strings, got {options!r}"[:300])
    options = [_text(where, "options", o) for o in options]
    if len(options) < 2:
        raise DataError(f"{where}: an example needs at least 2 options, got {options!r}"[:300])
    if len(options) > MAX_OPTIONS:
        raise DataError(f"{where}: {len(options)} options; the limit is {MAX_OPTIONS} per example (each is scored "
                        f"by a pass of the LM)")
    normal = [" ".join(o.split()) for o in options]
    if not all(normal):
        raise DataError(f"{where}: option {normal.index('')} is blank: {options!r}"[:300])
    seen: dict[str, int] = {}
    for i, o in enumerate(normal):
        if o in seen:
            raise DataError(f"{where}: options {seen[o]} and {i} are the same ({o!r}) after whitespace normalisation")
        seen[o] = i
    if "output" not in record:
        return Example(text, tuple(options), 0)
    output = _text(where, "output", record["output"])
    if output not in options:
        raise DataError(f"{where}: output {output!r} is not among options {options!r}"[:300])
    target = record.get("target")
    if target is not None:
        target = _text(where, "target", target)
    return Example(text, tuple(options), options.index(output), target)


def read_jsonl_examples(path: Path, limit: int | None = None) -> list[Example]:
    """Parse a MetaICL-format JSONL file (the first ``limit`` examples if given); any bad line is a
    :class:`DataError` naming file and line number."""
    examples: list[Example] = []
    for where, record in iter_jsonl(path):
        if limit is not None and len(examples) >= limit:
            break
        if "target" in record and "options" not in record:  # a generative line
            examples.append(_generative(record, where))
            continue
        examples.append(parse_example(where, record))
    return examples


def _generative(record: dict, where: str) -> Example:
    if not isinstance(record.get("input"), str) or not isinstance(record["target"], str):
        raise DataError(f"{where}: a generative line needs string 'input' and 'target', got {record!r}"[:300])
    try:
        return Example(record["input"], (), 0, record["target"])
    except ValueError as err:
        raise DataError(f"{where}: {err}") from None


def read_task_file(path: str | Path, max_examples: int | None = None) -> Task:
    """A :class:`Task` named by the file stem; an empty file is an error. ``max_examples`` keeps the
    first that many examples (files from :func:`write_task_folder` are already shuffled)."""
    path = Path(path)
    examples = read_jsonl_examples(path, max_examples)
    if not examples:
        raise DataError(f"task file {path} has no examples")
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
            raise DataError(
                f"task folder {root} has no {SPLITS_FILE}; name the train and test tasks with --train-tasks and --test-tasks "
                f"(keys train_tasks, test_tasks; available: {available})"
            )
        train, dev, test = (read_splits(splits_path).get(k, []) for k in ("train", "dev", "test"))
    names = {"train": list(train or []), "dev": list(dev or []), "test": list(test or [])}
    try:
        TaskSet.check_names(names, where=str(root))
    except DataError:
        raise
    except ValueError as err:
        raise DataError(str(err)) from None
    for split, tasks in names.items():
        missing = [t for t in tasks if t not in available]
        if missing:
            raise DataError(f"{root}: {split} task(s) {missing} not found; available: {available}")
    load = {t: read_task_file(root / f"{t}.jsonl", max_examples) for ts in names.values() for t in ts}
    return TaskSet(*(tuple(load[t] for t in names[s]) for s in ("train", "dev", "test")),
                   fingerprint=folder_fingerprint(root))


def read_splits(path: Path) -> dict[str, list[str]]:
    """``splits.json``: a JSON object mapping ``train``/``dev``/``test`` to lists of task names."""
    check_regular(path)

    try:
        splits = json.loads(Path(path).read_bytes().decode("utf-8-sig"), object_pairs_hook=unique_keys(str(path)))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (at byte {err.start})") from None
    except DataError:
        raise
    except (ValueError, RecursionError) as err:
        where = f"{path}:{err.lineno}" if isinstance(err, json.JSONDecodeError) else str(path)
        msg = getattr(err, "msg", None) or ("nested too deeply" if isinstance(err, RecursionError) else str(err))
        raise DataError(f"{where}: malformed JSON ({msg[:100]})") from None
    if not isinstance(splits, dict):
        raise DataError(f"{path}: expected a JSON object {{\"train\": [...], \"test\": [...]}}, got {type(splits).__name__}")
    unknown = set(splits) - {"train", "dev", "test"}
    if unknown:
        raise DataError(f"{path}: unknown split name(s) {sorted(unknown)}")
    for split, names in splits.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{path}: split {split!r} must be a list of task names, got {names!r}"[:300])
    return splits


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
                record = ({"input": ex.input} if ex.is_generative else
                          {"input": ex.input, "options": list(ex.options), "output": ex.answer})
                if ex.target is not None:
                    record["target"] = ex.target
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if splits is not None:
        TaskSet.check_names(dict(splits), where=str(root))
        (root / SPLITS_FILE).write_text(json.dumps({k: list(v) for k, v in splits.items()}, indent=1))
    return root
