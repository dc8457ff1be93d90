"""Packed scoring (one prompt pass, tree mask) must equal one row per option, values and gradients."""

import pytest
import torch

from abmll_pyro.data.encoding import encode_options
from abmll_pyro.data.packing import packing_supported
from abmll_pyro.data.scoring import option_scores
from abmll_pyro.data.tasks import Example
from abmll_pyro.lms import tiny_model

EXAMPLES = [
    Example("The capital of France is", ("Paris", "Rome", "a city in Spain"), 0),
    Example("2 + 2 =", ("4", "five"), 0),
    Example("", ("empty prompt gets BOS", "ok"), 1),
    Example("Colours:", ("red", "green", "blue", "yellow", "a long purple thing"), 3),
]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_matches_per_option(kind, attn):
    model, tok = tiny_model(kind)
    model.config._attn_implementation = attn
    assert packing_supported(model)
    batch = encode_options(tok, EXAMPLES)
    per_row = option_scores(model, batch, packed=False)
    packed = option_scores(model, batch, packed=True)
    finite = per_row.isfinite()
    assert torch.equal(finite, packed.isfinite())
    # Same math, different kernels/summation order: fp32 round-off, far below 1e-4 nats.
    assert (per_row[finite] - packed[finite]).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_gradients_match(kind):
    model, tok = tiny_model(kind)
    batch = encode_options(tok, EXAMPLES[:2])
    grads = []
    for packed in (False, True):
        model.zero_grad()
        scores = option_scores(model, batch, packed=packed)
        torch.log_softmax(scores, -1).gather(1, batch.gold[:, None]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[1].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_auto_falls_back_for_unknown_models():
    model, tok = tiny_model("llama")
    batch = encode_options(tok, EXAMPLES[:2])
    expected = option_scores(model, batch, packed=False)

    class Wrapped(torch.nn.Module):  # no HF config reachable: must use one row per option
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, **kwargs):
            assert kwargs["attention_mask"].dim() == 2
            return self.lm(**kwargs)

    assert not packing_supported(Wrapped(model))
    assert torch.allclose(option_scores(Wrapped(model), batch), expected)
    model.config._attn_implementation = "flash_attention_2"
    assert not packing_supported(model)


def test_packed_requires_a_packed_layout():
    model, tok = tiny_model("llama")
    batch = encode_options(tok, EXAMPLES[:2], pack=False)
    assert batch.packed is None
    with pytest.raises(ValueError, match="no packed layout"):
        option_scores(model, batch, packed=True)
