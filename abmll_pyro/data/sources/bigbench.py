"""BIG-bench as the embedded default: English multiple-choice JSON tasks as a task folder.

Selection (applied to every ``benchmark_tasks/**/task.json`` of bigbench 1.0.0):

* multiple choice: every example has ``target_scores``; an example is kept when it has 2-5 options
  and a unique best-scored option (the gold); the rest are skipped and *counted* in the manifest;
* at least :data:`MIN_EXAMPLES` kept examples;
* English: no keyword in :data:`EXCLUDED_KEYWORDS`, no name part in :data:`EXCLUDED_NAME_PARTS`;
* subtasks: a task with sub-folders contributes its subtasks (named ``parent.subtask``), not itself.

The input text is ``example_input_prefix + input + example_output_prefix`` (BIG-bench's defaults
``"\\nQ: "`` / ``"\\nA: "``), stripped; the task prefix (instruction) and the appended choice list are
left out, so a model must learn each task from its examples. Examples are shuffled with a seed drawn
from the task name, so a file's first lines are a random sample.

The train/dev/test split of tasks is fixed in ``bigbench_split.json`` (in this package), made once by
:func:`split_of`: hash the *parent* task name (so subtasks of one task share a split) with SHA-256,
take it mod 10: 0-1 test, 2 dev, else train.
"""

from __future__ import annotations

import hashlib
import json
import random
from importlib import resources
from pathlib import Path
from typing import Callable

from abmll_pyro.data.cache import build_task_folder, cache_dir
from abmll_pyro.data.sources.bigbench_fetch import BIGBENCH_VERSION, fetcher, iter_task_files, list_task_dirs
from abmll_pyro.data.sources.folder import SPLITS_FILE, write_task_folder
from abmll_pyro.data.tasks import Example, Task

__all__ = ["prepare_bigbench", "convert_task", "split_of", "packaged_split", "MIN_EXAMPLES"]

MIN_EXAMPLES = 50
MIN_OPTIONS, MAX_OPTIONS = 2, 5
EXCLUDED_KEYWORDS = frozenset({"non-English", "multilingual", "low-resource language", "translation", "non-language"})
EXCLUDED_NAME_PARTS = (
    "hindi", "hinglish", "persian", "parsinlu", "spanish", "kannada", "swahili", "russian", "arabic",
    "german", "french", "bengali", "japanese", "chinese", "kanji", "swedish", "polish", "urdu",
)
MANIFEST = "manifest.json"


def split_of(name: str) -> str:
    """The fixed split rule: SHA-256 of the parent task name, mod 10: 0-1 test, 2 dev, 3-9 train."""
    parent = name.split(".", 1)[0]
    bucket = int(hashlib.sha256(parent.encode()).hexdigest(), 16) % 10
    return "test" if bucket < 2 else "dev" if bucket == 2 else "train"


def packaged_split() -> dict[str, list[str]]:
    """The committed split (``abmll_pyro/data/bigbench_split.json``)."""
    text = resources.files("abmll_pyro.data").joinpath("bigbench_split.json").read_text()
    return {k: v for k, v in json.loads(text).items() if k in ("train", "dev", "test")}


def _keep(text: str, scores: dict) -> Example | None:
    """The example, or None when it has not 2-5 distinct options or no unique best score."""
    options = [str(o).strip() for o in scores]
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS or len(set(options)) != len(options):
        return None
    values = [float(v) for v in scores.values()]
    best = max(values)
    if values.count(best) != 1:
        return None
    return Example(text, options, values.index(best))


def convert_examples(data: dict, name: str, of_kind: Callable[[list[dict]], bool],
                     make: Callable[[str, dict], Example | None]) -> tuple[list[Example], int] | None:
    """``(kept examples, skipped count)`` of one BIG-bench JSON task whose examples pass ``of_kind``
    (else None; also None for excluded keywords or names). Each example's prompt is the task's input
    prefix + input + output prefix; ``make(prompt, example)`` converts it or returns None to skip it.
    The kept examples are shuffled by a seed derived from the task name (a fixed order per task)."""
    examples = data.get("examples") or []
    if not examples or not of_kind(examples):
        return None
    if set(data.get("keywords", [])) & EXCLUDED_KEYWORDS or any(p in name for p in EXCLUDED_NAME_PARTS):
        return None
    before = data.get("example_input_prefix", "\nQ: ")
    after = data.get("example_output_prefix", "\nA: ")
    made = (make(f"{before}{ex.get('input', '')}{after}".strip(), ex) for ex in examples)
    kept = [ex for ex in made if ex is not None]
    random.Random(hashlib.sha256(name.encode()).hexdigest()).shuffle(kept)
    return kept, len(examples) - len(kept)


def convert_task(data: dict, name: str) -> tuple[list[Example], int] | None:
    """``(kept examples, skipped count)`` of one BIG-bench JSON task, or None if it is not an English
    multiple-choice task (see module docstring)."""
    return convert_examples(data, name, lambda examples: all("target_scores" in e for e in examples),
                            lambda prompt, ex: _keep(prompt, ex["target_scores"]))


def _convert_all(source: Path, out: Path) -> dict:
    parents = {rel.rsplit("/", 1)[0] for rel in list_task_dirs(source) if "/" in rel}
    report: dict[str, dict] = {}

    def tasks():  # one task in memory at a time (the source tree is 1.8 GB)
        for rel, raw in iter_task_files(source):
            if rel in parents:
                continue  # its subtasks are the tasks
            name = rel.replace("/", ".")
            data = json.loads(raw)
            converted = convert_task(data, name)
            if converted is None or len(converted[0]) < MIN_EXAMPLES:
                continue
            kept, skipped = converted
            report[name] = {"examples": len(kept), "skipped": skipped, "keywords": data.get("keywords", [])}
            yield Task(name, kept)

    write_task_folder(tasks(), out)
    names = sorted(report)
    splits = {s: [n for n in names if split_of(n) == s] for s in ("train", "dev", "test")}
    write_task_folder([], out, splits)
    return {"version": BIGBENCH_VERSION, "tasks": report, "splits": splits}


def prepare_bigbench(root: str | Path | None = None, force: bool = False, source: str | Path | None = None) -> Path:
    """The BIG-bench task folder (``<cache>/bigbench-1.0.0/tasks``), converted on first use from
    ``source`` (a checkout, source tree or ``.tar.gz`` archive; default ``$ABMLL_BIGBENCH_SOURCE``), else
    from the package index's archive where it can still be had (one-line DataError where not).

    A finished folder holds ``manifest.json`` (written last); later calls return it without reading the
    source again. ``force`` rebuilds it."""
    base = Path(root) if root is not None else cache_dir(f"bigbench-{BIGBENCH_VERSION}")
    return build_task_folder(base, fetcher(source), _convert_all, force)
