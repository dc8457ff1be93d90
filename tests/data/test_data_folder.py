"""The task-folder format and every bad-input error it promises."""

import json

import pytest

from abmll_pyro.data.sources import TaskSet, load_task_folder, load_tasks, read_task_file, write_task_folder
from abmll_pyro.data.tasks import Example, Task


def _line(input="x", options=("a", "b"), output="a") -> str:
    return json.dumps({"input": input, "options": list(options), "output": output}) + "\n"


def _folder(tmp_path, tasks: dict[str, str], splits=None):
    for name, text in tasks.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
    if splits is not None:
        (tmp_path / "splits.json").write_text(json.dumps(splits))
    return tmp_path


def test_hand_written_folder_loads_through_load_tasks(tmp_path):
    root = _folder(tmp_path, {"sst": _line("good film", ("positive", "negative"), "positive") * 3,
                              "nli": _line() * 2, "qa": _line(output="b")},
                   {"train": ["sst", "nli"], "test": ["qa"]})
    tasks = load_tasks(root)
    assert tasks.names("train") == ["sst", "nli"] and tasks.names("test") == ["qa"] and tasks.dev == ()
    assert tasks.train[0].examples[0] == Example("good film", ("positive", "negative"), 0)
    assert tasks.test[0].examples[0].gold == 1
    assert len(load_tasks(root, max_examples=2).train[0]) == 2


def test_caller_names_tasks_without_splits_json(tmp_path):
    root = _folder(tmp_path, {"a": _line(), "b": _line()})
    with pytest.raises(ValueError, match="no splits.json; name the train and test tasks"):
        load_task_folder(root)
    tasks = load_task_folder(root, train=["a"], test=["b"])
    assert tasks.names("train") == ["a"]


def test_round_trip(tmp_path):
    task = Task("t", [Example("q", ("a", "b", "c"), 2), Example("r", ("x", "y"), 0, target="gen")])
    write_task_folder([task], tmp_path, {"train": ["t"]})
    assert read_task_file(tmp_path / "t.jsonl") == task


def test_malformed_line_names_file_and_line(tmp_path):
    root = _folder(tmp_path, {"bad": _line() + "{not json\n"})
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        read_task_file(root / "bad.jsonl")


@pytest.mark.parametrize("line, message", [
    (_line(options=("a",), output="a"), "at least 2 options"),
    (_line(output="c"), "'c' is not among options"),
    (json.dumps({"input": "x", "options": ["a", "b"]}) + "\n", r"missing field\(s\) \['output'\]"),
    (json.dumps({"input": "x", "options": "ab", "output": "a"}) + "\n", "must be a list of strings"),
    ("[1, 2]\n", "expected a JSON object"),
])
def test_bad_records_are_errors_with_location(tmp_path, line, message):
    root = _folder(tmp_path, {"t": _line() + line})
    with pytest.raises(ValueError, match=message) as err:
        read_task_file(root / "t.jsonl")
    assert "t.jsonl:2" in str(err.value)


def test_empty_task_file_is_an_error(tmp_path):
    root = _folder(tmp_path, {"empty": "\n"})
    with pytest.raises(ValueError, match="has no examples"):
        read_task_file(root / "empty.jsonl")


def test_missing_or_unknown_task_is_an_error(tmp_path):
    root = _folder(tmp_path, {"a": _line()}, {"train": ["a"], "test": ["ghost"]})
    with pytest.raises(ValueError, match=r"test task\(s\) \['ghost'\] not found; available: \['a'\]"):
        load_tasks(root)
    with pytest.raises(ValueError, match="unknown task source 'no-such-thing'"):
        load_tasks("no-such-thing")
    with pytest.raises(ValueError, match="unknown split name"):
        load_tasks(_folder(tmp_path, {}, {"train": ["a"], "valid": []}))


def test_split_naming_a_task_twice_is_an_error(tmp_path):
    root = _folder(tmp_path, {"a": _line(), "b": _line()}, {"train": ["a", "a"], "test": ["b"]})
    with pytest.raises(ValueError, match=r"split 'train' names task\(s\) \['a'\] more than once"):
        load_tasks(root)
    with pytest.raises(ValueError, match="task 'a' is in both 'train' and 'test'"):
        load_task_folder(root, train=["a"], test=["a", "b"])


def test_duplicate_task_names_are_an_error(tmp_path):
    task = Task("t", [Example("q", ("a", "b"), 0)])
    with pytest.raises(ValueError, match="duplicate task name 't'"):
        write_task_folder([task, task], tmp_path)
    with pytest.raises(ValueError, match=r"names task\(s\) \['t'\] more than once"):
        TaskSet(train=(task, task))
