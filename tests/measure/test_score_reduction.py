"""One score setting for every method: ``score_reduction`` changes every method's scores, and is saved."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _support.helpers import method_predictions
from abmll_pyro.data.encoding import encode_options
from abmll_pyro.data.scoring import option_scores
from abmll_pyro.data.tasks import Example
from abmll_pyro.lms import tiny_model
from abmll_pyro.methods import METHODS
from abmll_pyro.methods.temperature import fit_temperature
from abmll_pyro.train.config import ConfigError, RunConfig

# options of very different token and character lengths, so sum, mean and char disagree (the tiny models
# tokenize bytes, so char != mean only where characters take several bytes)
OPTIONS = ("no", "oui, très élégant à côté de lœuvre")  # multi-byte characters: bytes (tiny tokens) != chars
EXAMPLES = tuple(Example(f"question {i}: is {w} blue?", OPTIONS, i % 2)
                 for i, w in enumerate(["sky", "grass", "sea", "snow", "ink", "coal", "ice", "sun"]))


def _probs(name: str, reduction: str) -> torch.Tensor:
    return method_predictions(name, EXAMPLES, score_reduction=reduction)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_scores_with_the_configured_reduction(name):
    by = {r: _probs(name, r) for r in ("sum", "mean", "char")}
    assert not torch.allclose(by["sum"], by["mean"], atol=1e-4), f"{name}: mean reduction changed nothing"
    assert not torch.allclose(by["mean"], by["char"], atol=1e-4), f"{name}: char reduction changed nothing"


def test_char_reduction_divides_by_the_option_text_length():
    lm, tok = tiny_model("qwen2", seed=0)
    batch = encode_options(tok, EXAMPLES[:2])
    total, char = option_scores(lm, batch, "sum"), option_scores(lm, batch, "char")
    # the direct template scores " " + option, but the length is the option's own (no separator)
    assert torch.allclose(char[0, 1], total[0, 1] / len(OPTIONS[1]))
    assert torch.allclose(char[:, 0], total[:, 0] / len("no"))
    sub = batch.select(torch.tensor([1]))
    assert torch.allclose(option_scores(lm, sub, "char"), char[1:])


def _lm_eval_acc_norm(lls, choices, gold):
    """lm-evaluation-harness's multiple-choice ``acc_norm`` (``ConfigurableTask.process_results``):
    ``completion_len = [len(i) for i in choices]``; ``argmax(lls / completion_len) == gold``, where
    ``choices`` are the option texts and ``lls`` the log-likelihoods of target_delimiter + choice."""
    completion_len = np.array([float(len(i)) for i in choices])
    return float(np.argmax(np.asarray(lls) / completion_len) == gold), np.asarray(lls) / completion_len


def test_char_reduction_matches_lm_evals_acc_norm_formula():
    """Options whose lengths differ by one character ("yes" 3, "no way" 6, "maybe so" 8): the separator
    counted would give 4, 7, 9 and a different ranking where the log-likelihoods are close."""
    lm, tok = tiny_model("qwen2", seed=0)
    options = ("yes", "no way", "maybe so")
    examples = [Example(f"question {i}?", options, i % 3) for i in range(6)]
    batch = encode_options(tok, examples)
    with torch.no_grad():
        total, char = option_scores(lm, batch, "sum"), option_scores(lm, batch, "char")
    for i, ex in enumerate(examples):
        acc, normed = _lm_eval_acc_norm(total[i].double().numpy(), ex.options, ex.gold)
        np.testing.assert_allclose(char[i].double().numpy(), normed, rtol=1e-6)  # float32 division
        assert float(int(char[i].argmax()) == ex.gold) == acc
    # the formula itself: equal log-likelihoods per character of the option text tie under acc_norm
    lls = [-3.0, -6.0, -8.0]
    assert list(_lm_eval_acc_norm(lls, options, 0)[1]) == [-1.0, -1.0, -1.0]


def test_the_saved_config_records_the_reduction(tmp_path):
    RunConfig(score_reduction="char").save(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["score_reduction"] == "char"
    with pytest.raises(ConfigError, match="score_reduction must be one of"):
        RunConfig(score_reduction="max")


def test_fit_temperature_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 3, generator=g) * 3.0
    for true_t in (0.5, 2.0):
        gold = torch.multinomial(torch.softmax(logits / true_t, -1), 1, generator=g).squeeze(1)
        assert fit_temperature(logits, gold) == pytest.approx(true_t, rel=0.1)
    # padded option slots (-inf) are ignored
    padded = torch.cat([logits, torch.full((4000, 1), float("-inf"))], 1)
    gold = torch.multinomial(torch.softmax(logits / 2.0, -1), 1, generator=g).squeeze(1)
    assert fit_temperature(padded, gold) == pytest.approx(fit_temperature(logits, gold))


def test_the_log_temperature_prior_shrinks_towards_one_when_the_support_is_small():
    g = torch.Generator().manual_seed(1)
    # 4000 examples: the prior's (log T)^2 / (2 sigma^2 n) is negligible, the estimate stays where the data put it
    logits = torch.randn(4000, 2, generator=g) * 3.0
    gold = torch.multinomial(torch.softmax(logits / 3.0, -1), 1, generator=g).squeeze(1)
    assert fit_temperature(logits, gold, prior_std=0.5) == pytest.approx(fit_temperature(logits, gold), rel=0.1)
    # 16 examples, all right with margins: the unregularized fit sharpens to the grid's end, the prior stops it
    small = torch.tensor([[2.0, -2.0]] * 8 + [[-1.5, 1.5]] * 8)
    gold = torch.tensor([0] * 8 + [1] * 8)
    free = fit_temperature(small, gold)
    assert free < 0.2  # flat to float64 precision below this; ties go to the T nearest 1
    fits = [fit_temperature(small, gold, prior_std=s) for s in (2.0, 1.0, 0.5, 0.25)]
    assert all(free < t for t in fits) and fits == sorted(fits) and fits[-1] < 1.0  # tighter prior, nearer 1
    # and the other way: a support the model gets half wrong softens, less so under the prior
    gold = torch.tensor([0, 1] * 8)
    free = fit_temperature(small, gold)
    assert free > 5.0 and 1.0 < fit_temperature(small, gold, prior_std=0.5) < free
    with pytest.raises(ValueError, match="prior_std must be finite and > 0"):
        fit_temperature(small, gold, prior_std=0.0)
    with pytest.raises(ConfigError, match="ts_prior_std must be > 0"):
        RunConfig(ts_prior_std=-1.0)


def test_eval_split_is_validated():
    assert RunConfig(eval_split="dev").eval_split == "dev"
    with pytest.raises(ConfigError, match=r"eval_split must be one of \['test', 'dev'\], got 'train'"):
        RunConfig(eval_split="train")
