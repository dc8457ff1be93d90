"""PEFT export and import: our mean-mode forward and PEFT's LoRA forward are the same function."""

from __future__ import annotations

import json

import pytest
import torch

from abmll_pyro import AdapterConfig, BayesLoRA
from abmll_pyro.export import PeftMismatchError, export_peft, init_from_peft, peft_target_modules
from abmll_pyro.lms.tiny import tiny_model

peft = pytest.importorskip("peft")


def _adapter(kind: str, targets=None, rank: int = 2, alpha: float = 4.0, seed: int = 0) -> BayesLoRA:
    lm, _ = tiny_model(kind, seed=0)
    adapter = BayesLoRA(lm, AdapterConfig(rank=rank, lora_alpha=alpha, target_modules=targets),
                        generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B = 0 at init would make ΔW = 0 and the test vacuous
        for key, p in adapter.factors.items():
            if key.endswith(":mu_B"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return adapter


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind,targets", [("llama", None), ("gpt2", None),
                                          ("llama", ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"))])
def test_peft_logits_equal_mean_mode_logits(tmp_path, kind, targets):
    adapter = _adapter(kind, targets)
    ids = _ids()
    with torch.no_grad():
        with adapter.off():
            base_logits = adapter.lm(ids).logits
        with adapter.use(adapter.mean_deltas(adapter.global_params())):
            ours = adapter.lm(ids).logits
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter changes the logits: the comparison is not vacuous
    export_peft(adapter, adapter.global_params(), tmp_path, f"tiny-{kind}")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4.0 and config["fan_in_fan_out"] == (kind == "gpt2")
    assert config["target_modules"] == (list(targets) if targets else (["c_attn"] if kind == "gpt2" else ["q_proj", "v_proj"]))
    base = adapter.detach()
    model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)  # same float32 ops up to summation order


def test_round_trip_import_sets_theta_mean(tmp_path):
    source = _adapter("llama", alpha=8.0, seed=5)
    export_peft(source, source.global_params(), tmp_path, "tiny-llama")
    target = _adapter("llama", alpha=4.0, seed=9)  # other α: B is rescaled so the mean ΔW is PEFT's
    sigma_before = {k: v.clone() for k, v in target.factors.items() if "sigma" in k}
    init_from_peft(target, tmp_path)
    for m in target.shapes:
        torch.testing.assert_close(target.mean(target.global_params(), m), source.mean(source.global_params(), m))
    for k, v in sigma_before.items():
        assert torch.equal(target.factors[k], v)


def test_import_wrong_rank_or_targets_names_the_mismatch(tmp_path):
    source = _adapter("llama", rank=2)
    export_peft(source, source.global_params(), tmp_path / "r2", "tiny-llama")
    with pytest.raises(PeftMismatchError, match=r"rank r=2, this run's rank is 4"):
        init_from_peft(_adapter("llama", rank=4), tmp_path / "r2")
    with pytest.raises(PeftMismatchError, match=r"targets other modules.*missing \['model.layers.0.self_attn.k_proj'"):
        init_from_peft(_adapter("llama", targets=("q_proj", "v_proj", "k_proj")), tmp_path / "r2")


def test_target_modules_full_names_when_only_some_blocks():
    adapter = _adapter("llama", ("model.layers.1.self_attn.q_proj",))
    assert peft_target_modules(adapter) == ["model.layers.1.self_attn.q_proj"]
