"""The Llama-3-8B shape proxies: Llama-3-8B's layer shapes, 1–2 blocks, built offline by load_lm."""

import pytest
import torch
from transformers import LlamaForCausalLM

from abmll_pyro.lms import llama3_8b_config, load_lm
from abmll_pyro.lms.proxy import PROXIES


def test_config_has_llama3_8b_shapes():
    c = llama3_8b_config(2)
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (4096, 14336, 32, 8)
    assert (c.vocab_size, c.num_hidden_layers, c.tie_word_embeddings) == (128256, 2, False)
    assert c.rope_parameters["rope_theta"] == 500000.0
    with pytest.raises(ValueError, match="num_layers must be an integer >= 1, got 0"):
        llama3_8b_config(0)


def test_meta_device_shapes_and_parameter_count():
    # on the meta device: shapes without memory. 32 blocks give Llama-3-8B's 8.03 billion parameters.
    with torch.device("meta"):
        full = LlamaForCausalLM(llama3_8b_config(32))
    assert sum(p.numel() for p in full.parameters()) == 8_030_261_248
    attn = full.model.layers[0].self_attn
    assert tuple(attn.q_proj.weight.shape) == (4096, 4096) and tuple(attn.v_proj.weight.shape) == (1024, 4096)
    assert tuple(full.model.layers[0].mlp.up_proj.weight.shape) == (14336, 4096)


def test_one_block_proxy_loads_by_name_and_runs_offline():
    assert PROXIES == {"llama3-8b-proxy": 1, "llama3-8b-proxy-2l": 2}
    model, tok = load_lm("llama3-8b-proxy", dtype="bf16")
    assert model.dtype == torch.bfloat16 and len(model.model.layers) == 1 and not model.training
    assert len(tok) < model.config.vocab_size
    assert model.model.rotary_emb.inv_freq[1].item() == pytest.approx(500000.0 ** (-2 / 128), rel=1e-6)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q[0], q[1]) and abs(q.float().std().item() - 0.02) < 2e-3  # random, HF's init scale
    ids = torch.tensor([tok("a few tokens").input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 128256) and torch.isfinite(logits).all()
