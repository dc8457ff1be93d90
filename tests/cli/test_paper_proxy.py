"""The ``paper`` preset's path end to end on the Llama-3-8B shape proxy, at a tiny budget.

Everything of the preset is kept (CrossFit cls-45 from a MetaICL-format directory, rank 8, α 16,
K = 5, kl_beta 1e-8, 2 tasks per step, bf16 weights with bf16 autocast, ``device: auto``) except the
model (``llama3-8b-proxy``: Llama-3-8B's shapes, one random block), the number of outer steps, the
examples per episode and the test tasks. Measured on the shared 2-core machine: 95–126 s for both methods
at load average 2–5 (7 minutes at load 6; about 95 s of CPU time either way), peak RSS 3.7 GB.
"""

from __future__ import annotations

import json

import pytest

from abmll_pyro.cli import main
from abmll_pyro.data.sources import load_tasks, write_metaicl_sample
from abmll_pyro.presets import get_preset


def test_metaicl_sample_holds_every_cls45_task(tmp_path):
    root = write_metaicl_sample(tmp_path / "metaicl", "cls-45", examples=6)
    tasks = load_tasks("cls-45", data_dir=root)
    assert (len(tasks.train), len(tasks.dev), len(tasks.test)) == (45, 10, 10)
    assert len(tasks.train[0]) == 6 and len(tasks.test[0]) == 12  # test: the k file then the test file
    assert all(ex.options == ("yes", "no") for ex in tasks.test[0].examples)
    with pytest.raises(ValueError, match="unknown CrossFit/MetaICL split 'cls-99'"):
        write_metaicl_sample(tmp_path / "x", "cls-99")


@pytest.mark.slow
def test_paper_preset_runs_on_the_llama3_8b_proxy(tmp_path):
    data = write_metaicl_sample(tmp_path / "metaicl", "cls-45", examples=8)
    out = tmp_path / "bench"
    args = ["--quiet", "benchmark", "--preset", "paper", "--model", "llama3-8b-proxy", "--data-dir", str(data),
            "--out", str(out), "--methods", "abmll", "lora", "--seeds", "1", "--steps", "1",
            "--max-train-tasks", "2", "--max-test-tasks", "1", "--shots", "2", "--query-size", "2",
            "--eval-query-size", "2", "--num-samples", "2"]
    assert main(args) == 0
    paper = get_preset("paper").config
    for method in ("abmll", "lora"):
        run = out / "runs" / f"{method}-seed0"
        config = json.loads((run / "config.json").read_text())
        for key in ("tasks", "rank", "lora_alpha", "num_inner_steps", "kl_beta", "tasks_per_step", "dtype",
                    "mixed_precision", "device"):
            assert config[key] == paper[key], key
        result = json.loads((run / "results.json").read_text())
        assert result["pooled"]["n"] == 2 and result["peak_memory_mb"] > 0
        assert "device cpu" in (run / "log.txt").read_text()  # auto resolved to the CPU here
    assert (out / "results.json").exists() and (out / "table.md").exists()
