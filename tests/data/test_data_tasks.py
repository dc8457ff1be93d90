"""Examples, tasks and seeded support/query splits."""

import pytest
import torch

from abmll_pyro.data.tasks import Example, Task, split_task


def _task(n: int, name: str = "t") -> Task:
    return Task(name, [Example(f"x{i}", ("a", "b"), i % 2) for i in range(n)])


def test_example_needs_two_options_and_a_valid_gold():
    with pytest.raises(ValueError, match="at least 2 options"):
        Example("x", ("only",), 0)
    with pytest.raises(ValueError, match="gold index 2"):
        Example("x", ("a", "b"), 2)
    with pytest.raises(ValueError, match="'c' is not among options"):
        Example.from_output("x", ["a", "b"], "c", where="f.jsonl:3")


def test_empty_task_is_an_error():
    with pytest.raises(ValueError, match="'empty' has no examples"):
        Task("empty", [])


def test_split_is_seeded_disjoint_and_sized():
    task = _task(20)
    a = split_task(task, 4, 8, torch.Generator().manual_seed(1))
    b = split_task(task, 4, 8, torch.Generator().manual_seed(1))
    c = split_task(task, 4, 8, torch.Generator().manual_seed(2))
    assert a == b and a != c
    assert len(a.support) == 4 and len(a.query) == 8
    assert not {e.input for e in a.support} & {e.input for e in a.query}


def test_query_none_takes_the_rest():
    split = split_task(_task(10), 3, None, torch.Generator().manual_seed(0))
    assert len(split.query) == 7


def test_small_task_is_an_error_naming_it_unless_allowed():
    with pytest.raises(ValueError, match="task 'tiny' has 5 examples"):
        split_task(_task(5, "tiny"), 4, 8, torch.Generator().manual_seed(0))
    split = split_task(_task(5, "tiny"), 4, 8, torch.Generator().manual_seed(0), allow_smaller_query=True)
    assert len(split.support) == 4 and len(split.query) == 1
    with pytest.raises(ValueError, match="tiny"):  # nothing left for a query set at all
        split_task(_task(4, "tiny"), 4, 8, torch.Generator().manual_seed(0), allow_smaller_query=True)
