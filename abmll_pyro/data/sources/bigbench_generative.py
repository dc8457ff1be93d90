"""BIG-bench's generative JSON tasks (short targets) as an embedded task folder, beside the
multiple-choice suite of :mod:`abmll_pyro.data.sources.bigbench`.

Selection (every ``benchmark_tasks/**/task.json`` of bigbench 1.0.0, the same download):

* generative: the task's ``metrics`` include ``exact_str_match`` and every example has a ``target``
  (a string, or a list whose first entry is taken) and no ``target_scores``;
* short targets: an example is kept when its target has 1 to :data:`MAX_TARGET_WORDS` words and at most
  :data:`MAX_TARGET_CHARS` characters (exact match is meaningful, generation cheap); the rest are
  skipped and counted in the manifest;
* at least :data:`MIN_EXAMPLES` kept examples; English and subtask rules as the multiple-choice suite.

Lines are target-only task-folder lines ``{"input", "target"}``; inputs carry BIG-bench's example
prefixes (``"\\nQ: "`` / ``"\\nA: "``) as in the multiple-choice suite. The task split is the same
hash rule (:func:`~abmll_pyro.data.sources.bigbench.split_of`), written into the folder's splits.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from abmll_pyro.data.cache import build_task_folder, cache_dir
from abmll_pyro.data.sources.bigbench import MIN_EXAMPLES, convert_examples, split_of
from abmll_pyro.data.sources.bigbench_fetch import BIGBENCH_VERSION, fetcher, iter_task_files, list_task_dirs
from abmll_pyro.data.sources.folder import write_task_folder
from abmll_pyro.data.tasks import Example, Task

__all__ = ["prepare_bigbench_generative", "convert_generative_task", "MAX_TARGET_WORDS", "MAX_TARGET_CHARS",
           "SUITE"]

SUITE = "bigbench-gen"
MAX_TARGET_WORDS = 3
MAX_TARGET_CHARS = 24
MANIFEST = "manifest.json"


def _target(ex: dict) -> str | None:
    target = ex.get("target")
    if isinstance(target, list):
        target = target[0] if target and isinstance(target[0], str) else None
    if not isinstance(target, str):
        return None
    target = target.strip()
    words = len(target.split())
    return target if 1 <= words <= MAX_TARGET_WORDS and len(target) <= MAX_TARGET_CHARS else None


def convert_generative_task(data: dict, name: str) -> tuple[list[Example], int] | None:
    """``(kept examples, skipped count)`` of one BIG-bench JSON task, or None when it is not an English
    generative exact-match task (see the module docstring)."""
    if "exact_str_match" not in (data.get("metrics") or []):
        return None

    def make(prompt: str, ex: dict) -> Example | None:
        target = _target(ex)
        return Example(prompt, (), 0, target) if target is not None and prompt else None

    return convert_examples(data, name, lambda examples: not any("target_scores" in e or "target" not in e
                                                                 for e in examples), make)


def _convert_all(source: Path, out: Path) -> dict:
    parents = {rel.rsplit("/", 1)[0] for rel in list_task_dirs(source) if "/" in rel}
    report: dict[str, dict] = {}

    def tasks():
        for rel, raw in iter_task_files(source):
            if rel in parents:
                continue
            name = rel.replace("/", ".")
            converted = convert_generative_task(json.loads(raw), name)
            if converted is None or len(converted[0]) < MIN_EXAMPLES:
                continue
            kept, skipped = converted
            report[name] = {"examples": len(kept), "skipped": skipped}
            yield Task(name, kept)

    write_task_folder(tasks(), out)
    names = sorted(report)
    splits = {s: [n for n in names if split_of(n) == s] for s in ("train", "dev", "test")}
    write_task_folder([], out, splits)
    return {"version": BIGBENCH_VERSION, "suite": SUITE, "max_target_words": MAX_TARGET_WORDS,
            "max_target_chars": MAX_TARGET_CHARS, "tasks": report, "splits": splits}


def prepare_bigbench_generative(root: str | Path | None = None, force: bool = False, source: str | Path | None = None) -> Path:
    """The generative task folder (``<cache>/bigbench-gen-1.0.0/tasks``), fetched and converted on first
    use (``manifest.json`` written last). ``source``: a local BIG-bench checkout, source tree or archive
    (default ``$ABMLL_BIGBENCH_SOURCE``; without one, pip, as :func:`prepare_bigbench`)."""
    base = Path(root) if root is not None else cache_dir(f"{SUITE}-{BIGBENCH_VERSION}")
    return build_task_folder(base, fetcher(source), _convert_all, force)
