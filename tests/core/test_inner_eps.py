"""Adam's ε in the inner loop (``inner_adam_eps``): full ±lr first steps above it, SGD-like below."""

import pytest
import torch

from _support.helpers import method_predictions

from abmll_pyro.config import InnerLoopConfig
from abmll_pyro.data.tasks import Example
from abmll_pyro.infer.inner import inner_loop
from abmll_pyro.train.config import ConfigError, RunConfig

EXAMPLES = tuple(Example(f"question {i}: is {w} blue?", ("no", "yes"), i % 2)
                 for i, w in enumerate(["sky", "grass", "sea", "snow", "ink", "coal", "ice", "sun"]))
ADAPTING = ("lora", "lora-ts", "structured-lora", "reptile", "bayes-lora", "abmll", "abmll-icl")


def test_first_adam_step_is_sign_above_eps_and_proportional_below():
    target = torch.tensor([1e-9, 1e-6, 1e-2, -1e-2])

    def loss(p):
        return -(p["w"] * target).sum()  # gradient −target everywhere: Adam steps towards +target

    lr = 1e-2
    default = inner_loop(loss, {"w": torch.zeros(4)}, 1, lr, "adam")["w"]
    # ε = 1e-8: every element with |g| ≫ ε moves by a full lr, the 1e-6 one as far as the 1e-2 one
    assert torch.allclose(default[1:], lr * torch.sign(target[1:]), rtol=1e-4)
    wide = inner_loop(loss, {"w": torch.zeros(4)}, 1, lr, "adam", adam_eps=1e-4)["w"]
    # ε = 1e-4: the 1e-9 and 1e-6 gradients now move by lr·g/ε (to 1%), the 1e-2 ones still ≈ lr
    assert torch.allclose(wide[:2], lr * target[:2] / 1e-4, rtol=1e-2)
    assert torch.allclose(wide[2:], lr * torch.sign(target[2:]), rtol=1e-3)


def test_inner_adam_eps_reaches_the_inner_config_and_is_checked():
    assert RunConfig(inner_adam_eps=1e-5).inner_config().adam_eps == 1e-5
    assert RunConfig().inner_config().adam_eps == 1e-8
    with pytest.raises(ConfigError, match="adam_eps"):
        RunConfig(inner_adam_eps=0.0)
    with pytest.raises(ValueError, match="adam_eps"):
        InnerLoopConfig(adam_eps=-1.0)
    with pytest.raises(ValueError, match="adam_eps"):
        inner_loop(lambda p: p["w"].sum(), {"w": torch.zeros(1)}, 1, 1e-2, "adam", adam_eps=float("nan"))


def _probs(name: str, eps: float) -> torch.Tensor:
    return method_predictions(name, EXAMPLES, num_inner_steps=2, inner_lr=5e-2, inner_adam_eps=eps)


@pytest.mark.parametrize("name", ADAPTING)
def test_every_adapting_method_uses_the_inner_adam_eps(name):
    """ε = 100 turns the inner steps into tiny SGD steps: every adapting method must predict differently."""
    assert not torch.allclose(_probs(name, 1e-8), _probs(name, 1e2), atol=1e-5), f"{name} ignores inner_adam_eps"
