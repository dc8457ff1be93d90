"""Generative tasks, `abmll generate` and `abmll export` end to end on a hand-written generative folder
(tests/cli/generative: target-only lines) with the tiny random Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from abmll_pyro.cli import main
from abmll_pyro.export import export_peft
from abmll_pyro.lms.tiny import tiny_model
from abmll_pyro.train.generate_run import load_adapted

GENERATIVE = Path(__file__).parent / "generative"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ABMLL and Regular LoRA trained (3 steps) on the generative folder; shared by the tests below."""
    from .conftest import TINY

    root = tmp_path_factory.mktemp("gen")
    out = {}
    for method in ("abmll", "lora"):
        out[method] = root / method
        assert main(["--quiet", "train", "--method", method, "--tasks", str(GENERATIVE), "--out", str(out[method]),
                     "--steps", "3", *TINY]) == 0
    return out


def _files(tmp_path):
    support, prompts = tmp_path / "support.jsonl", tmp_path / "prompts.jsonl"
    lines = (GENERATIVE / "opposite.jsonl").read_text().splitlines()
    support.write_text("\n".join(lines[:3]) + "\n")
    prompts.write_text("\n".join(lines[3:5]) + "\n" + json.dumps({"input": "Opposite of up:"}) + "\n")
    return support, prompts


def test_generative_folder_trains_and_evaluates(runs, tmp_path, capsys):
    for method, run in runs.items():
        result = json.loads((run / "results.json").read_text())
        assert result["kind"] == "generative" and result["method"] == method
        assert set(result["per_task"]) == {"opposite", "upper"}
        for task in result["per_task"].values():
            # per-token NLL of random weights over a 259-token vocabulary: about log(259) = 5.56
            assert 3.0 < task["token_nll"] < 8.0 and 0.0 <= task["exact_match"] <= 1.0 and task["num_tokens"] > 0
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(m["nll"]) for m in metrics)
    out = tmp_path / "ev.json"
    assert main(["--quiet", "evaluate", "--run", str(runs["abmll"]), "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["macro"]["token_nll"] == pytest.approx(json.loads((runs["abmll"] / "results.json").read_text())["macro"]["token_nll"])
    assert main(["--quiet", "evaluate", "--method", "pretrained", "--model", "tiny-llama", "--tasks", str(GENERATIVE),
                 "--eval-query-size", "3", "--shots", "2", "--num-threads", "1"]) == 0
    assert '"exact_match"' in capsys.readouterr().out


def test_generate_writes_s_answers_and_is_seed_reproducible(runs, tmp_path):
    support, prompts = _files(tmp_path)
    outs = []
    for i in range(2):
        outs.append(tmp_path / f"out{i}.jsonl")
        assert main(["--quiet", "generate", "--run", str(runs["abmll"]), "--support", str(support), "--prompts",
                     str(prompts), "--num-samples", "3", "--max-new-tokens", "5", "--do-sample", "true",
                     "--out", str(outs[i])]) == 0
    assert outs[0].read_text() == outs[1].read_text()
    rows = [json.loads(x) for x in outs[0].read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["answers"]) == 3 for r in rows)
    assert all({"majority", "agreement", "entropy"} <= set(r) for r in rows)
    assert "exact_match" in rows[0] and rows[0]["target"] == "slow" and "exact_match" not in rows[2]
    assert all(0 < r["agreement"] <= 1 and 0 <= r["entropy"] <= math.log(3) + 1e-9 for r in rows)
    other = tmp_path / "seed1.jsonl"
    assert main(["--quiet", "generate", "--run", str(runs["abmll"]), "--support", str(support), "--prompts",
                 str(prompts), "--num-samples", "3", "--max-new-tokens", "5", "--do-sample", "true", "--seed", "1",
                 "--out", str(other)]) == 0
    assert other.read_text() != outs[0].read_text()


def test_generate_bad_prompt_line_is_one_line_error(runs, tmp_path, capsys):
    support, _ = _files(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["--quiet", "generate", "--run", str(runs["abmll"]), "--support", str(support), "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.jsonl:1" in err and "'input'" in err


@pytest.mark.parametrize("method,with_support", [("abmll", True), ("abmll", False), ("lora", True)])
def test_export_loads_in_peft_with_equal_logits(runs, tmp_path, method, with_support):
    peft = pytest.importorskip("peft")
    support, _ = _files(tmp_path)
    out = tmp_path / "peft"
    args = ["--quiet", "export", "--run", str(runs[method]), "--format", "peft", "--out", str(out)]
    assert main(args + (["--support", str(support)] if with_support else [])) == 0
    adapted = load_adapted(runs[method], support if with_support else None)
    adapter = adapted.built.adapter
    state = adapted.state if with_support else (adapted.built.method.svi.theta() if method == "abmll"
                                                 else adapted.built.method.lora.params())
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), adapter.use(adapter.mean_deltas(state)):
        ours = adapter.lm(ids).logits
    with torch.no_grad(), adapter.off():
        assert (adapter.lm(ids).logits - ours).abs().max() > 1e-4  # trained B ≠ 0: the comparison is not vacuous
    base, _ = tiny_model("llama", seed=adapted.config.seed)
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_init_from_peft_starts_theta_and_mismatch_is_one_line(runs, tmp_path, capsys):
    from .conftest import TINY

    lm, _ = tiny_model("llama")
    from abmll_pyro import AdapterConfig, BayesLoRA

    source = BayesLoRA(lm, AdapterConfig(rank=2, lora_alpha=4.0), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for k, p in source.factors.items():
            if k.endswith(":mu_B"):
                p.normal_(0, 0.1)
    good = export_peft(source, source.global_params(), tmp_path / "good", "tiny-llama")
    from abmll_pyro.train.config import RunConfig
    from abmll_pyro.train.setup import build

    config = RunConfig(model="tiny-llama", tasks=str(GENERATIVE), rank=2, lora_alpha=4.0, init_from_peft=str(good))
    built, _ = build(config)
    for m in built.adapter.shapes:
        torch.testing.assert_close(built.adapter.mean(built.adapter.global_params(), m),
                                   source.mean(source.global_params(), m))
    code = main(["--quiet", "train", "--method", "abmll", "--tasks", str(GENERATIVE), "--out", str(tmp_path / "r"),
                 "--steps", "1", *TINY, "--rank", "4", "--init-from-peft", str(good)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "rank r=2, this run's rank is 4" in err


def test_generative_comparison_pairs_examples(runs):
    from abmll_pyro.eval.generative_compare import format_generative, generative_comparison, load_generative

    loaded = load_generative([runs["abmll"] / "results.json", runs["lora"] / "results.json"])
    rows = generative_comparison(loaded, "abmll", num_resamples=50)
    assert len(rows) == 1 and rows[0]["n"] == 6 and rows[0]["num_tasks"] == 2
    result = json.loads((runs["abmll"] / "results.json").read_text())
    total = sum(t["token_nll"] * t["num_tokens"] for t in result["per_task"].values())
    tokens = sum(t["num_tokens"] for t in result["per_task"].values())
    assert rows[0]["token_nll"]["reference"] == pytest.approx(total / tokens)  # pooled = token-weighted task NLLs
    r = rows[0]["token_nll"]
    assert r["diff"] == pytest.approx(r["reference"] - r["other"])
    same = generative_comparison({"a": loaded["abmll"], "b": loaded["abmll"]}, "a", num_resamples=20)[0]
    assert same["token_nll"]["ci95"] == (0.0, 0.0) and same["exact_match"]["diff"] == 0.0
    assert "abmll − lora" in format_generative(rows)
