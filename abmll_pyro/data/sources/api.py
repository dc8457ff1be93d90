"""``load_tasks(source, ...)``: debian-cls, BIG-bench, a task folder, or a CrossFit/MetaICL split -> TaskSet."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from abmll_pyro.data.sources.bigbench import packaged_split, prepare_bigbench
from abmll_pyro.data.sources import debian_cls
from abmll_pyro.data.sources.bigbench_generative import SUITE as BIGBENCH_GEN, prepare_bigbench_generative
from abmll_pyro.data.sources.crossfit import crossfit_splits, load_metaicl_split
from abmll_pyro.data.sources.folder import load_task_folder
from abmll_pyro.data.sources.taskset import TaskSet

__all__ = ["load_tasks"]


def load_tasks(
    source: str | Path = "debian-cls",
    train: Sequence[str] | None = None,
    dev: Sequence[str] | None = None,
    test: Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    max_examples: int | None = None,
    **options,
) -> TaskSet:
    """Tasks with a train/dev/test split of *tasks*, from:

    * ``"debian-cls"`` (the embedded default): real label-word classification tasks from Debian
      packages' data, prepared into the user cache on first use (apt-get, or by URL from a Debian mirror),
      split by family (``debian_cls_split.json``; ``train``/``dev``/``test`` override it);
    * ``"bigbench"``: BIG-bench's English multiple-choice tasks, converted from a local copy of its task
      files (``abmll data prepare bigbench --from PATH`` once, or ``$ABMLL_BIGBENCH_SOURCE``; the package index no longer serves them) into
      the user cache on first use, split by the packaged ``bigbench_split.json``;
    * ``"bigbench-gen"``: BIG-bench's generative tasks with short targets, prepared likewise, split by
      the same hash rule (the folder's splits.json);
    * a CrossFit/MetaICL split name (see :func:`crossfit_splits`), read from ``data_dir`` in MetaICL's
      layout (``options`` go to :func:`load_metaicl_split`: ``k``, ``seed``, ``train_k``);
    * a task-folder path (``splits.json``, or ``train``/``dev``/``test`` naming file stems).

    ``max_examples`` caps each task (the first examples of each file).
    """
    name = str(source)
    if name == "bigbench":
        folder = prepare_bigbench(**options)
        if train is None and dev is None and test is None:
            split = packaged_split()
            train, dev, test = split["train"], split["dev"], split["test"]
        return load_task_folder(folder, train, dev, test, max_examples=max_examples)
    if name == "debian-cls":
        folder = debian_cls.prepare_debian_cls(**options)
        if train is None and dev is None and test is None:
            split = debian_cls.packaged_split()
            train, dev, test = split["train"], split["dev"], split["test"]
        return load_task_folder(folder, train, dev, test, max_examples=max_examples)
    if name == BIGBENCH_GEN:  # BIG-bench's generative exact-match tasks (target-only lines)
        return load_task_folder(prepare_bigbench_generative(**options), train, dev, test, max_examples=max_examples)
    if name in crossfit_splits():
        if data_dir is None:
            raise ValueError(f"split {name!r} needs data_dir, a MetaICL-format data directory")
        return load_metaicl_split(name, data_dir, max_examples=max_examples, **options)
    if Path(name).is_dir():
        return load_task_folder(name, train, dev, test, max_examples=max_examples)
    raise ValueError(
        f"unknown task source {name!r}: not 'bigbench' or 'debian-cls', not a CrossFit/MetaICL split "
        f"{sorted(crossfit_splits())}, and not an existing folder"
    )
