"""Generative (target-only) task-folder lines: parsing, validation, round trip, token encoding."""

from __future__ import annotations

import json

import pytest

from abmll_pyro.data.scoring import OptionBatch, TokenBatch
from abmll_pyro.data.sources.folder import read_task_file, write_task_folder
from abmll_pyro.data.tasks import Example, Task
from abmll_pyro.lms.tiny import byte_tokenizer
from abmll_pyro.train.episodes import EpisodeEncoder
from abmll_pyro.data.tasks import TaskSplit


def test_target_only_lines_are_generative_examples(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"input": "Plural of cat:", "target": "cats"}\n{"input": "a", "options": ["x", "y"], "output": "y"}\n')
    task = read_task_file(path)
    assert task.examples[0].is_generative and task.examples[0].answer == "cats"
    assert not task.examples[1].is_generative and task.examples[1].answer == "y"
    write_task_folder([Task("u", task.examples)], tmp_path / "out")
    assert read_task_file(tmp_path / "out" / "u.jsonl").examples == task.examples


@pytest.mark.parametrize("line,match", [('{"input": "x", "target": ""}', "non-empty target"),
                                        ('{"input": 3, "target": "y"}', "string 'input' and 'target'")])
def test_bad_generative_line_names_file_and_line(tmp_path, line, match):
    path = tmp_path / "t.jsonl"
    path.write_text('{"input": "ok", "target": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=match) as err:
        read_task_file(path)
    assert f"{path}:2" in str(err.value)


def test_episode_encoder_gives_token_batches_for_generative_examples():
    tok = byte_tokenizer()
    gen = tuple(Example(f"in {i}", (), 0, f"out{i}") for i in range(3))
    episode = EpisodeEncoder(tok)(TaskSplit("t", gen[:2], gen[2:]))
    assert isinstance(episode.support, TokenBatch) and isinstance(episode.query, TokenBatch)
    # the target tokens are exactly " out2" (byte tokenizer: one token per byte)
    assert int(episode.query.target_mask.sum()) == len(" out2")
    mc = (Example("q", ("a", "b"), 1),) * 2
    assert isinstance(EpisodeEncoder(tok)(TaskSplit("m", mc[:1], mc[1:])).support, OptionBatch)


def test_bigbench_generative_conversion_rules():
    from abmll_pyro.data.sources.bigbench_generative import MAX_TARGET_WORDS, convert_generative_task

    examples = [{"input": f"{i} + 1", "target": str(i + 1)} for i in range(5)]
    examples += [{"input": "long", "target": "a much longer answer than allowed"},
                 {"input": "list", "target": ["first", "second"]}]
    data = {"metrics": ["exact_str_match"], "examples": examples, "keywords": ["arithmetic"]}
    kept, skipped = convert_generative_task(data, "arith")
    assert skipped == 1 and len(kept) == 6 and all(ex.is_generative for ex in kept)
    assert {ex.target for ex in kept} == {"1", "2", "3", "4", "5", "first"}
    assert all(ex.input.startswith("Q:") and ex.input.endswith("A:") for ex in kept)
    assert len("a much longer answer than allowed".split()) > MAX_TARGET_WORDS
    assert convert_generative_task({**data, "metrics": ["bleu"]}, "arith") is None  # not exact match
    assert convert_generative_task({**data, "keywords": ["non-English"]}, "arith") is None
    mc = {"metrics": ["exact_str_match"], "examples": [{"input": "x", "target_scores": {"a": 1, "b": 0}}]}
    assert convert_generative_task(mc, "mc") is None
