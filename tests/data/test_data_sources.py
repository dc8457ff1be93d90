"""CrossFit/MetaICL, UnifiedQA and BIG-bench conversion on generated fixtures (no network)."""

import io
import json
import tarfile

import pytest

from abmll_pyro.data.sources import crossfit_splits, load_tasks, load_unifiedqa_task, parse_unifiedqa
from abmll_pyro.data.sources.bigbench import MIN_EXAMPLES, _convert_all, convert_task, packaged_split, split_of
from abmll_pyro.data.sources.bigbench_fetch import iter_task_files, list_task_dirs


def test_crossfit_split_lists_are_disjoint_and_sized():
    splits = crossfit_splits()
    assert {"cls-45", "cls-23", "non-nli-to-nli", "non-paraphrase-to-paraphrase", "qa-to-mc"} <= set(splits)
    assert len(splits["cls-45"]["train"]) == 45 and len(splits["cls-23"]["train"]) == 45
    for name, split in splits.items():
        names = split["train"] + split["dev"] + split["test"]
        assert len(names) == len(set(names)), name


def _write_metaicl(root, task, k, seed, split, n, options=("yes", "no")):
    folder = root / task
    folder.mkdir(exist_ok=True)
    with open(folder / f"{task}_{k}_{seed}_{split}.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"task": task, "input": f"{task} {i}", "options": list(options), "output": options[i % 2]}) + "\n")


def test_metaicl_directory(tmp_path):
    names = crossfit_splits()["non-paraphrase-to-paraphrase"]
    for t in names["train"]:
        _write_metaicl(tmp_path, t, 16384, 100, "train", 3)
    for t in names["test"]:
        _write_metaicl(tmp_path, t, 16, 100, "train", 16)
        _write_metaicl(tmp_path, t, 16, 100, "test", 5)
    tasks = load_tasks("non-paraphrase-to-paraphrase", data_dir=tmp_path)
    assert len(tasks.train) == 59 and tasks.names("test") == names["test"]
    assert len(tasks.test[0]) == 21 and tasks.test[0].examples[0].input == "glue-mrpc 0"
    with pytest.raises(ValueError, match="needs data_dir"):
        load_tasks("cls-45")
    (tmp_path / "paws" / "paws_16_100_test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="paws_16_100_test.jsonl does not exist"):
        load_tasks("non-paraphrase-to-paraphrase", data_dir=tmp_path)


def test_unifiedqa_parsing_and_files(tmp_path):
    ex = parse_unifiedqa("What is red? \\n (A) sky (B) Blood (C) grass \\n some context", "blood")
    assert ex.input == "What is red?\nsome context" and ex.options == ("sky", "Blood", "grass") and ex.gold == 1
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "train.tsv").write_text("q1 \\n (A) a (B) b\ta\nq2 \\n (A) a (B) b\tc\n")
    with pytest.raises(ValueError, match=r"train.tsv:2: answer 'c' is not among options"):
        load_unifiedqa_task(tmp_path, "arc")
    assert len(load_unifiedqa_task(tmp_path, "arc", max_examples=1)) == 1


def _bb_task(n, options=2, keywords=("logical reasoning",), extra=None):
    examples = [{"input": f"q{i}", "target_scores": {f"o{j}": int(j == i % options) for j in range(options)}}
                for i in range(n)]
    return {"keywords": list(keywords), "examples": examples + (extra or [])}


def test_bigbench_conversion_rules():
    kept, skipped = convert_task(_bb_task(60, extra=[{"input": "tie", "target_scores": {"a": 1, "b": 1}}]), "t")
    assert len(kept) == 60 and skipped == 1
    assert kept[0].input.startswith("Q: q") and kept[0].input.endswith("\nA:")
    assert convert_task(_bb_task(60, keywords=("non-English",)), "t") is None
    assert convert_task(_bb_task(60), "entailed_polarity_hindi") is None
    assert convert_task({"examples": [{"input": "x", "target": "y"}]}, "gen") is None
    kept, skipped = convert_task(_bb_task(60, options=6), "t")
    assert kept == [] and skipped == 60


def test_bigbench_archive_conversion(tmp_path):
    """A fake sdist: parents with subtasks contribute the subtasks; small tasks are left out."""
    files = {"alpha/task.json": _bb_task(MIN_EXAMPLES), "beta/task.json": {"examples": []},
             "beta/one/task.json": _bb_task(MIN_EXAMPLES + 1, 3), "small/task.json": _bb_task(MIN_EXAMPLES - 1)}
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for rel, data in files.items():
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    assert list_task_dirs(archive) == ["alpha", "beta", "beta/one", "small"]
    assert dict(iter_task_files(archive))["alpha"] == json.dumps(files["alpha/task.json"]).encode()
    manifest = _convert_all(archive, tmp_path / "tasks")
    assert sorted(manifest["tasks"]) == ["alpha", "beta.one"]
    tasks = load_tasks(tmp_path / "tasks", train=["alpha", "beta.one"])
    assert [len(t) for t in tasks.train] == [MIN_EXAMPLES, MIN_EXAMPLES + 1]


def test_packaged_bigbench_split_follows_the_rule():
    split = packaged_split()
    names = split["train"] + split["dev"] + split["test"]
    assert len(names) == len(set(names)) >= 80
    assert all(split_of(n) == s for s in split for n in split[s])
    # subtasks share their parent's split
    assert {split_of(n) for n in names if n.startswith("bbq_lite_json.")} == {split_of("bbq_lite_json")}
