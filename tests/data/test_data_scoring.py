"""Option scores against a direct computation of the LM's log-likelihood (the oracle)."""

import pytest
import torch

from abmll_pyro.data.encoding import encode_options
from abmll_pyro.data.scoring import OptionBatch, option_scores
from abmll_pyro.data.tasks import Example
from abmll_pyro.lms import tiny_model

EXAMPLES = [
    Example("Is fire hot?", ("yes", "no"), 0),
    Example("Pick a colour", ("red", "green", "a very long blue"), 2),
]


def _direct_log_likelihood(model, prompt_ids, option_ids) -> float:
    """sum_t log p(o_t | prompt, o_<t) from one unpadded sequence: the oracle."""
    ids = torch.tensor([prompt_ids + option_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    p = len(prompt_ids)
    return sum(float(logp[p - 1 + t, tok]) for t, tok in enumerate(option_ids))


@pytest.mark.parametrize("packed", [False, True])
def test_scores_equal_direct_log_likelihood(packed):
    model, tok = tiny_model("llama")
    batch = encode_options(tok, EXAMPLES)
    scores = option_scores(model, batch, packed=packed).detach()
    assert scores.shape == (2, 3) and scores.dtype == torch.float32
    assert scores[0, 2] == float("-inf")  # padded option slot
    for i, ex in enumerate(EXAMPLES):
        prompt = tok(ex.input).input_ids
        for j, opt in enumerate(ex.options):
            want = _direct_log_likelihood(model, prompt, tok(" " + opt, add_special_tokens=False).input_ids)
            # fp32 forward with padding vs an unpadded fp64 log-softmax: round-off well below 1e-4
            assert abs(float(scores[i, j]) - want) < 1e-4


def test_mean_divides_by_option_length():
    model, tok = tiny_model("qwen2")
    batch = encode_options(tok, EXAMPLES)
    total, mean = option_scores(model, batch, "sum"), option_scores(model, batch, "mean")
    length = len(tok(" a very long blue", add_special_tokens=False).input_ids)
    assert torch.allclose(mean[1, 2], total[1, 2] / length)
    with pytest.raises(ValueError, match="reduction must be"):
        option_scores(model, batch, "max")


def test_select_keeps_scores_and_gold():
    model, tok = tiny_model("llama")
    batch = encode_options(tok, EXAMPLES)
    full = option_scores(model, batch)
    sub = batch.select([1])
    assert len(sub) == 1 and sub.gold.tolist() == [2] and sub.num_options.tolist() == [3]
    for packed in (False, True):
        assert torch.allclose(option_scores(model, sub, packed=packed)[0], full[1], atol=1e-5)


def test_from_token_ids_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        OptionBatch.from_token_ids([[1]], [[[2]]], [0])
    with pytest.raises(ValueError, match="gold index 3"):
        OptionBatch.from_token_ids([[1]], [[[2], [3]]], [3])
    with pytest.raises(ValueError, match="empty prompt"):
        OptionBatch.from_token_ids([[]], [[[2], [3]]], [0])
