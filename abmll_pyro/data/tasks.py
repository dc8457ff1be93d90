"""Tasks and examples: the one interface between data sources and the likelihood.

A task is a name plus examples. An example is an input text, a list of option strings and the index
of the gold option (MetaICL's multiple-choice format); generative data also carries a target text.
Every data source (task folder, BIG-bench, CrossFit/MetaICL, UnifiedQA) produces :class:`Task`s,
and every likelihood consumes them through :mod:`abmll_pyro.data.scoring`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["Example", "Task", "TaskSplit", "split_task", "DataError"]


class DataError(ValueError):
    """Bad task data (a file, a line, a field); the message names the file and line when there is one."""


def unique_keys(where: str, error: type[Exception] | None = None):
    """A ``json.loads`` ``object_pairs_hook``: an object with a key given twice is ``error`` (default
    :class:`DataError`) naming ``where`` and the key, instead of the last value silently winning."""
    error = error or DataError

    def pairs(items):
        out: dict = {}
        for key, value in items:
            if key in out:
                raise error(f"{where}: key {key!r} given twice")
            out[key] = value
        return out

    return pairs


@dataclass(frozen=True)
class Example:
    """One multiple-choice example: ``options[gold]`` is the answer.

    ``target`` is the text a token-level (generative) likelihood scores; it defaults to the gold option.
    A generative example has a ``target`` and no options (``options=()``, ``gold=0``).
    """

    input: str
    options: tuple[str, ...]
    gold: int
    target: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))
        if not self.options and self.target is not None:  # generative: the target is the answer
            if not isinstance(self.target, str) or not self.target.strip():
                raise ValueError(f"a generative example needs a non-empty target string, got {self.target!r} "
                                 f"(input {self.input[:80]!r})")
            return
        if len(self.options) < 2:
            raise ValueError(
                f"an example needs at least 2 options, got {len(self.options)}: {list(self.options)!r} "
                f"(input {self.input[:80]!r})"
            )
        if not (0 <= int(self.gold) < len(self.options)):
            raise ValueError(
                f"gold index {self.gold} is not among the {len(self.options)} options "
                f"{list(self.options)!r} (input {self.input[:80]!r})"
            )

    @classmethod
    def from_output(cls, input: str, options: Sequence[str], output: str, where: str = "") -> "Example":
        """Build from MetaICL's ``{"input", "options", "output"}`` where ``output`` is an option string."""
        options = tuple(options)
        if output not in options:
            at = f" ({where})" if where else ""
            raise ValueError(f"output {output!r} is not among options {list(options)!r}{at}")
        return cls(input=input, options=options, gold=options.index(output))

    @property
    def is_generative(self) -> bool:
        """True for a target-only example (no options)."""
        return not self.options

    @property
    def answer(self) -> str:
        return self.options[self.gold] if self.options else self.target

    @property
    def target_text(self) -> str:
        return self.target if self.target is not None else self.answer


@dataclass(frozen=True)
class Task:
    """A named list of examples."""

    name: str
    examples: tuple[Example, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "examples", tuple(self.examples))
        if not self.name:
            raise ValueError("a task needs a non-empty name")
        if not self.examples:
            raise ValueError(f"task {self.name!r} has no examples")

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class TaskSplit:
    """A task's support set (for adaptation) and query set (for the outer loss / evaluation)."""

    name: str
    support: tuple[Example, ...]
    query: tuple[Example, ...]


def split_task(
    task: Task,
    shots: int,
    query_size: int | None,
    generator: torch.Generator,
    allow_smaller_query: bool = False,
) -> TaskSplit:
    """Draw ``shots`` support and ``query_size`` query examples without overlap.

    ``query_size=None`` takes every remaining example. The permutation comes from ``generator``, so
    a seed fixes the split. A task smaller than ``shots + query_size`` is an error naming the task,
    unless ``allow_smaller_query`` (then the query set is whatever remains, at least one example).
    """
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if query_size is not None and query_size < 1:
        raise ValueError(f"query_size must be >= 1 or None, got {query_size}")
    n = len(task)
    need = shots + (query_size or 1)
    if n < need:
        if not (allow_smaller_query and n > shots):
            raise ValueError(
                f"task {task.name!r} has {n} examples, fewer than shots + query = {need} "
                f"(allow smaller query sets to use what remains)"
            )
    perm = torch.randperm(n, generator=generator).tolist()
    support = tuple(task.examples[i] for i in perm[:shots])
    rest = perm[shots:]
    if query_size is not None:
        rest = rest[:query_size]
    return TaskSplit(task.name, support, tuple(task.examples[i] for i in rest))
