"""From text tasks to encoded episodes: the support/query split, in-context prompts, and a cache.

An :class:`EncodedEpisode` carries the text split (for methods that build their own prompts) and the
encoded support and query batches. With ``in_context=True`` every query prompt starts with the whole
support set as demonstrations, and every support prompt with the *other* support examples (leave one
out: an example never sees its own answer), so adapting and predicting both see the demonstrations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..data.encoding import encode_options, encode_tokens
from ..data.scoring import OptionBatch, TokenBatch
from ..data.tasks import Example, Task, TaskSplit, split_task
from ..data.templates import DirectTemplate, make_template
from ..models.likelihoods import TaskData
from .distributed import episode_seed

__all__ = ["EncodedEpisode", "EpisodeEncoder", "EpisodeSampler", "with_demonstrations"]


@dataclass(frozen=True)
class EncodedEpisode:
    """A task's text split and its encoded support and query sets."""

    name: str
    split: TaskSplit
    support: OptionBatch | TokenBatch
    query: OptionBatch | TokenBatch

    def task_data(self) -> tuple[TaskData, TaskData]:
        return TaskData(self.support), TaskData(self.query)


def with_demonstrations(examples: Sequence[Example], demonstrations: Sequence[Example], leave_one_out: bool) -> list[Example]:
    """``examples`` whose inputs carry ``demonstrations`` in MetaICL's direct format; with
    ``leave_one_out`` an example that is itself a demonstration is left out of its own prompt."""
    template = DirectTemplate()
    out = []
    for ex in examples:
        demos = [d for d in demonstrations if not (leave_one_out and d is ex)]
        out.append(Example(template.prompt(ex.input, demos), ex.options, ex.gold, ex.target))
    return out


class EpisodeEncoder:
    """Tokenizes splits into :class:`EncodedEpisode` s (``template``: ``"direct"`` or ``"chat"``)."""

    def __init__(self, tokenizer: Any, max_length: int | None = None, template: str = "direct",
                 in_context: bool = False, device: torch.device | str = "cpu"):
        if in_context and template != "direct":
            raise ValueError(f"in-context demonstrations use the 'direct' template, got template={template!r}")
        self.tokenizer, self.max_length, self.in_context, self.device = tokenizer, max_length, in_context, device
        self.template = make_template(template, tokenizer)

    def encode(self, examples: Sequence[Example], name: str) -> OptionBatch | TokenBatch:
        """An :class:`OptionBatch`; a :class:`TokenBatch` when every example is generative (target only)."""
        if examples and all(ex.is_generative for ex in examples):
            tokens = encode_tokens(self.tokenizer, examples, self.template, self.max_length, name=name)
            return TokenBatch(*(t.to(self.device) for t in (tokens.input_ids, tokens.attention_mask, tokens.target_mask)))
        batch = encode_options(self.tokenizer, examples, self.template, self.max_length, name=name)
        return batch.to(self.device)

    def __call__(self, split: TaskSplit) -> EncodedEpisode:
        support, query = list(split.support), list(split.query)
        if self.in_context:
            support, query = (with_demonstrations(support, split.support, leave_one_out=True),
                              with_demonstrations(query, split.support, leave_one_out=False))
        return EncodedEpisode(split.name, split, self.encode(support, f"{split.name} support"),
                              self.encode(query, f"{split.name} query"))


class EpisodeSampler:
    """The global batches of training episodes, each a pure function of ``(seed, draw)``.

    Draw ``d`` picks ``tasks_per_step`` distinct tasks uniformly with a generator seeded from
    ``(seed, d)``, then episode j's ``shots``/``query_size`` split (smaller tasks give a smaller query
    set) with one seeded from ``(seed, d, j)``. Every rank of a multi-process run therefore sees the
    same batch and any rank can draw any episode of it; a resumed run needs only the draw index.
    :meth:`draw` walks ``d = 0, 1, …`` (its counter is :meth:`get_state`).
    """

    def __init__(self, tasks: Sequence[Task], shots: int, query_size: int, tasks_per_step: int, seed: int):
        if not tasks:
            raise ValueError("no training tasks: the task source's train split is empty")
        too_small = [t.name for t in tasks if len(t) <= shots]
        if too_small:
            raise ValueError(f"training task(s) {too_small} have at most shots={shots} examples")
        self.tasks, self.shots, self.query_size = list(tasks), shots, query_size
        self.tasks_per_step = min(tasks_per_step, len(self.tasks))
        self.seed = seed
        self.count = 0

    def _generator(self, *keys: int | str) -> torch.Generator:
        return torch.Generator().manual_seed(episode_seed(self.seed, "train", *keys))

    def task_indices(self, draw: int) -> list[int]:
        """The training tasks of global batch ``draw`` (indices into ``tasks``)."""
        return torch.randperm(len(self.tasks), generator=self._generator(draw))[: self.tasks_per_step].tolist()

    def split(self, draw: int, j: int, task_index: int) -> TaskSplit:
        """Episode ``j`` of batch ``draw``: the split of task ``task_index``, from ``(seed, draw, j)``."""
        return split_task(self.tasks[task_index], self.shots, self.query_size, self._generator(draw, j),
                          allow_smaller_query=True)

    def batch(self, draw: int) -> list[TaskSplit]:
        """All ``tasks_per_step`` episodes of global batch ``draw``."""
        return [self.split(draw, j, i) for j, i in enumerate(self.task_indices(draw))]

    def draw(self) -> list[TaskSplit]:
        self.count += 1
        return self.batch(self.count - 1)

    def get_state(self) -> torch.Tensor:
        return torch.tensor([self.count], dtype=torch.int64)

    def set_state(self, state: torch.Tensor) -> None:
        self.count = int(state.reshape(-1)[0])


def test_splits(tasks: Sequence[Task], shots: int, query_size: int, seed: int) -> list[TaskSplit]:
    """One fixed split per test task, from ``seed`` alone: every method sees the same support and query."""
    out = []
    for i, task in enumerate(tasks):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        out.append(split_task(task, shots, query_size, g, allow_smaller_query=True))
    return out
