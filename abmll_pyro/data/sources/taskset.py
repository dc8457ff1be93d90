"""A meta-learning task collection: train, dev and test tasks, no task in two splits."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

from abmll_pyro.data.tasks import Task

__all__ = ["TaskSet"]

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class TaskSet:
    """``train`` tasks meta-train; ``dev`` tasks tune; ``test`` tasks are held out."""

    train: tuple[Task, ...]
    dev: tuple[Task, ...] = ()
    test: tuple[Task, ...] = ()
    fingerprint: str | None = None  # the source folder's content fingerprint (data/fingerprint.py), if any

    def __post_init__(self) -> None:
        for split in SPLITS:
            object.__setattr__(self, split, tuple(getattr(self, split)))
        self.check_names({s: [t.name for t in getattr(self, s)] for s in SPLITS}, where="task set")

    @staticmethod
    def check_names(splits: Mapping[str, Sequence[str]], where: str) -> None:
        """Reject a task named twice within a split or in two splits."""
        for split, names in splits.items():
            if isinstance(names, str):
                raise ValueError(f"{where}: split {split!r} must be a list of task names, got the string {names!r}")
            twice = sorted(n for n, c in Counter(names).items() if c > 1)
            if twice:
                raise ValueError(f"{where}: split {split!r} names task(s) {twice} more than once")
        owner: dict[str, str] = {}
        for split, names in splits.items():
            for n in names:
                if n in owner:
                    raise ValueError(f"{where}: task {n!r} is in both {owner[n]!r} and {split!r}")
                owner[n] = split

    def __getitem__(self, split: str) -> tuple[Task, ...]:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; choose one of {SPLITS}")
        return getattr(self, split)

    def names(self, split: str) -> list[str]:
        return [t.name for t in self[split]]
