"""``device``, ``dtype`` and ``mixed_precision`` are honoured, or refused in one line (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from abmll_pyro.cli import main
from abmll_pyro.train.config import ConfigError, RunConfig
from abmll_pyro.train.run import check_device, make_accelerator
from abmll_pyro.train.setup import build

HANDWRITTEN = Path(__file__).resolve().parents[1] / "cli" / "handwritten"
TINY = dict(model="tiny-llama", tasks=str(HANDWRITTEN), rank=2, lora_alpha=4.0, shots=2, query_size=2,
            eval_query_size=2, num_inner_steps=1, num_samples=1, max_length=96)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_fp16_autocast_on_the_cpu_is_refused_in_one_line(tmp_path, capsys, device):
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("auto is a GPU here")
    code = main(["--quiet", "train", "--method", "abmll", "--model", "tiny-llama", "--tasks", str(HANDWRITTEN),
                 "--out", str(tmp_path / "run"), "--mixed-precision", "fp16", "--device", device])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("abmll: error: mixed_precision='fp16' needs a CUDA GPU"), err
    assert not (tmp_path / "run").exists()  # refused before the run directory is touched


def test_cuda_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match=r"device='cuda' but torch sees no CUDA GPU"):
        check_device(RunConfig(device="cuda"))


def test_bf16_mixed_precision_autocasts_on_the_cpu():
    """accelerate's CPU autocast is bfloat16: a matmul inside it comes out bf16, outside float32."""
    accelerator = make_accelerator(RunConfig(device="cpu", mixed_precision="bf16"))
    x = torch.randn(4, 4)
    with accelerator.autocast():
        inside = (x @ x).dtype
    assert (inside, (x @ x).dtype) == (torch.bfloat16, torch.float32)


def test_build_puts_the_lm_and_every_trainable_tensor_on_its_device_in_its_dtype():
    """``meta`` stands for any device but the CPU: nothing of the LM or the method stays behind on the
    CPU; the LM's weights take ``dtype``, the trained factors stay float32."""
    built, _ = build(RunConfig(**TINY, method="abmll", dtype="bfloat16"), torch.device("meta"))
    lm = {(p.device.type, p.dtype) for p in built.lm.parameters()}
    buffers = {b.device.type for b in built.lm.buffers()}
    trained = {(p.device.type, p.dtype) for p in built.method.parameters()}
    assert lm == {("meta", torch.bfloat16)} and buffers <= {"meta"}
    assert trained == {("meta", torch.float32)}
