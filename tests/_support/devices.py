"""Which device every random draw comes from, checkable without a GPU.

:class:`GeneratorAudit` records every torch call that is handed a ``torch.Generator`` (``normal_``,
``randperm``, ``uniform_``, …): the generator's device and the devices of the call's tensors (or its
``device=`` for a factory). A draw whose generator lives elsewhere than its tensors is a *mismatch*;
on a real GPU torch raises on it, on the CPU it is invisible — unless the tensors claim another device.

:func:`fake_cuda` makes them claim one on a CPU-only build: inside it, tensors made by :meth:`FakeCuda.tensor`
are ``FakeTensor`` s on ``cuda:0`` (shapes and devices, no values: FakeTensorMode also raises on any op
mixing a CPU tensor into a cuda one), ``torch.Generator(device=...)`` returns a CPU generator that
*claims* the device it was asked for, and ``torch.cuda.default_generators`` is one such generator
claiming ``cuda:0``. Code that picks the generator of its tensors' device then passes the audit; code
that hard-codes the CPU one (``torch.Generator()``, ``torch.default_generator``) is a mismatch.

Limits (a CPU-only torch): autograd cannot run on fake cuda leaves (their gradient accumulators need the
CUDA device guard), and data-dependent ops (``.item()``, Pyro's plates over index tensors) have no fake
value, so custom autograd functions are checked by calling their ``forward``/``backward`` directly and
whole training steps run on a real device instead (``ABMLL_TEST_DEVICE``, tests/device/test_on_device.py).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

REAL_GENERATOR = torch.Generator
CUDA = torch.device("cuda", 0)


def _device(d: Any) -> torch.device:
    d = torch.device(d)
    return torch.device("cuda", 0) if d.type == "cuda" and d.index is None else d


class ClaimingGenerator(REAL_GENERATOR):
    """A CPU generator that reports the device it was created for as ``claimed``."""

    def __new__(cls, device: Any = "cpu"):
        return REAL_GENERATOR.__new__(cls)

    def __init__(self, device: Any = "cpu"):
        super().__init__()
        self.claimed = _device(device)


def generator_device(g: torch.Generator) -> torch.device:
    return getattr(g, "claimed", None) or _device(g.device)


@dataclasses.dataclass
class Draw:
    op: str
    generator: torch.device
    tensors: frozenset

    @property
    def mismatch(self) -> bool:
        return any(d != self.generator for d in self.tensors)


class GeneratorAudit(TorchFunctionMode):
    """Records a :class:`Draw` for every torch call handed a generator (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[Draw] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        gens = [a for a in flat if isinstance(a, REAL_GENERATOR)]
        if gens:
            devices = {_device(a.device) for a in flat if isinstance(a, torch.Tensor)}
            if not devices:  # a factory (randperm, randn): where its result goes
                devices = {_device(kwargs.get("device") or "cpu")}
            for g in gens:
                self.draws.append(Draw(getattr(func, "__name__", str(func)), generator_device(g), frozenset(devices)))
        return func(*args, **kwargs)

    def mismatches(self) -> list[Draw]:
        return [d for d in self.draws if d.mismatch]


class FakeCuda:
    """Makes fake ``cuda:0`` tensors within :func:`fake_cuda` (see the module doc)."""

    def __init__(self, mode) -> None:
        self.mode = mode

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        from torch._subclasses.fake_tensor import FakeTensor

        return FakeTensor(self.mode, t.detach().to("meta"), CUDA)

    def module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Every parameter (frozen: no autograd on fake cuda) and buffer of ``module`` as a fake cuda tensor."""
        for m in module.modules():
            for k, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[k] = torch.nn.Parameter(self.tensor(p), requires_grad=False)
            for k, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[k] = self.tensor(b)
        return module


class _Constants(TorchFunctionMode):
    """``tensor.new_tensor(x)`` / ``torch.tensor(x, device=cuda)``: a CPU build cannot make real cuda
    constants, so they become fake ones (values are not needed, devices are)."""

    def __init__(self, fake: FakeCuda) -> None:
        super().__init__()
        self.fake = fake

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.new_tensor, torch.tensor, torch.as_tensor):
            like = args[0] if func is torch.Tensor.new_tensor else None
            target = kwargs.pop("device", None) or (like.device if like is not None else None)
            if target is not None and torch.device(target).type == "cuda":
                data = args[1] if like is not None else args[0]
                dtype = kwargs.get("dtype") or (like.dtype if like is not None else None)
                from torch._subclasses.fake_tensor import unset_fake_temporarily

                with torch._C.DisableTorchFunction(), unset_fake_temporarily():
                    real = torch.tensor(data, dtype=dtype)
                return self.fake.tensor(real)
            if target is not None:
                kwargs["device"] = target
        return func(*args, **kwargs)


@contextmanager
def fake_cuda(monkeypatch) -> Iterator[tuple[FakeCuda, GeneratorAudit]]:
    """``(fake, audit)``: fake cuda tensors and the generator audit, on a CPU-only build (module doc)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch, "Generator", ClaimingGenerator)
    monkeypatch.setattr(torch.cuda, "default_generators", (ClaimingGenerator(CUDA),), raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = FakeCuda(mode)
    audit = GeneratorAudit()
    with mode, audit, _Constants(fake):
        yield fake, audit
