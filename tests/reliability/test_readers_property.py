"""Property: whatever bytes or JSON lines a task folder or a predict file holds, the readers either
load them or raise the library's own :class:`~abmll_pyro.data.tasks.DataError` (one message naming
the file) — never a UnicodeDecodeError, TypeError, KeyError, RecursionError or anything else."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from abmll_pyro.data.sources.folder import load_task_folder, read_task_file
from abmll_pyro.data.tasks import DataError, Task
from abmll_pyro.train.predict import read_query

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(["input", "options", "output", "target", "extra"])
options = st.lists(st.sampled_from(["a", "b", " a", "a ", "", " ", "yes", "no", "\ud800"]), max_size=4)
records = st.dictionaries(keys, json_values | options | st.sampled_from(["a", "b", "yes", "q"]), max_size=5)
lines = st.lists(records.map(lambda r: json.dumps(r)) | st.text(max_size=20) | json_values.map(json.dumps), max_size=6)
raw = st.binary(max_size=200)


def _outcome(fn):
    try:
        return fn()
    except DataError as err:
        assert str(err)  # a message, naming something
        return err


@SETTINGS
@given(content=raw)
def test_random_bytes_in_a_task_file(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.jsonl"
        path.write_bytes(content)
        result = _outcome(lambda: read_task_file(path))
        assert isinstance(result, (Task, DataError))
        if isinstance(result, DataError):
            assert str(path) in str(result)


@SETTINGS
@example(content='{"input": "x", "options": ["p", "q"], "output": "q"}\n\n{"input": "y", "options": ["p", "r"], "output": "p"}')
@example(content='{"input": "x", "options": ["p", " p"], "output": "p"}')
@given(content=st.lists(lines, min_size=1, max_size=1).map(lambda x: "\n".join(x[0])))
def test_random_json_lines_in_a_task_file_and_a_query_file(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.jsonl"
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
        task = _outcome(lambda: read_task_file(path))
        assert isinstance(task, (Task, DataError))
        query = _outcome(lambda: read_query(path))
        assert isinstance(query, (tuple, DataError))
        if isinstance(task, Task):
            assert all(len(set(" ".join(o.split()) for o in ex.options)) == len(ex.options) for ex in task.examples)


@SETTINGS
@given(splits=raw | json_values.map(lambda v: json.dumps(v).encode()), task=raw)
def test_random_splits_json_and_task_bytes_in_a_folder(splits, task):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "splits.json").write_bytes(splits)
        (root / "a.jsonl").write_bytes(task)
        (root / "b.jsonl").write_bytes(b'{"input": "x", "options": ["p", "q"], "output": "q"}\n')
        result = _outcome(lambda: load_task_folder(root))
        assert not isinstance(result, Exception) or isinstance(result, DataError)
