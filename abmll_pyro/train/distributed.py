"""Data-parallel meta-training and evaluation over processes (``torchrun`` / ``accelerate launch``).

The frozen LM and every trainable tensor are *replicated* on each rank; nothing is sharded. A step's
global batch of B episodes is the same on every rank (drawn from ``(seed, draw)`` alone, see
:class:`~abmll_pyro.train.episodes.EpisodeSampler`); rank r processes the global episodes
j ∈ {r, r + W, r + 2W, …} (W the world size, B need not be a multiple of W). Each episode's loss is
weighted by w_j = ω_j / Σ_k ω_k over the *global* batch (ω from ``Method.episode_weight``; 1 for
per-task means), so after the gradients are summed across ranks,

    g = Σ_r Σ_{j ∈ shard(r)} w_j ∇ℓ_j = Σ_j w_j ∇ℓ_j,

exactly the one-process gradient of the same batch (up to float summation order). Per-episode
randomness (the support/query split, ΔW noise, Pyro's sample sites) is seeded from
``(seed, draw, j)`` by :func:`seed_rng`, so a run does not depend on the number of processes.

:class:`Ranks` is the small collective API the harness uses (shard, all-reduce, gather, broadcast,
barrier); with one process every call is the identity, so no code path differs.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["Ranks", "episode_seed", "seed_rng", "is_main_process", "world_size", "wait_for_everyone", "main_writes",
           "check_supported", "NullLog", "UNSUPPORTED"]

# accelerate's DistributedType values whose engines own the backward pass or shard parameters: the
# inner loop's torch.autograd.grad through a frozen, wrapped LM is not supported by them (see
# docs/distributed.md), so a run refuses them at start.
UNSUPPORTED = {
    "DEEPSPEED": "DeepSpeed (ZeRO) owns backward and the optimizer; the inner loop's torch.autograd.grad and the "
                 "harness's own gradient all-reduce bypass it",
    "FSDP": "FSDP shards the LM and reshards in backward hooks that torch.autograd.grad (the inner loop) does not run",
    "MEGATRON_LM": "Megatron-LM tensor/pipeline parallelism wraps the LM's layers",
    "XLA": "TPU/XLA is untested (the inner loop's autograd.grad and per-episode host-side seeding)",
}


def is_main_process() -> bool:
    """Rank 0 of the launch (``RANK`` from torchrun / accelerate launch), usable before any process
    group exists; True without a launcher."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """The number of processes of the launch (``WORLD_SIZE``), before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def wait_for_everyone(cpu: bool = False) -> None:
    """A barrier across the launch usable before any ``Accelerator`` exists (it starts the process
    group as the Accelerator would, which then reuses it); nothing without a launcher."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState(cpu=cpu).wait_for_everyone()


def main_writes(fn: Callable[..., Any], *args: Any, cpu: bool = False, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` (something that writes files) on the main process only; every rank
    waits for it and gets its (picklable) return value."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    from accelerate import PartialState

    PartialState(cpu=cpu)  # the process group
    box = [fn(*args, **kwargs) if is_main_process() else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def episode_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed from ``(seed, *keys)``: BLAKE2b of their decimal text (stable across runs,
    processes and platforms, unlike ``hash``)."""
    text = "/".join(str(k) for k in (seed, *keys)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def seed_rng(seed: int, *keys: int | str) -> None:
    """Seed torch (CPU and every CUDA device; Pyro samples from torch's generator) and Python's
    ``random`` from ``episode_seed(seed, *keys)``."""
    s = episode_seed(seed, *keys)
    torch.manual_seed(s)
    random.seed(s)


def check_supported(accelerator: Any) -> None:
    """Fail at start (a ``ValueError`` naming the engine) when accelerate is configured for an engine
    the meta-training loop cannot run under."""
    kind = getattr(getattr(accelerator, "distributed_type", None), "value", None)
    if kind in UNSUPPORTED:
        raise ValueError(f"accelerate is configured for {kind}, which abmll does not support: {UNSUPPORTED[kind]}. "
                         "Launch plain data parallelism instead (`accelerate launch --multi_gpu`, or `torchrun`); "
                         "see docs/distributed.md")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch: ``rank`` of ``world`` (global), ``local_main`` for the
    first process of its machine. Collectives go through ``torch.distributed`` (gloo on CPU, NCCL on
    GPU); with ``world == 1`` they are the identity."""

    rank: int = 0
    world: int = 1
    local_main: bool = True

    @classmethod
    def of(cls, accelerator: Any) -> "Ranks":
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.is_local_main_process)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """The global indices ``0..n-1`` this rank handles: ``rank, rank + world, …`` (may be empty)."""
        return range(self.rank, n, self.world)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum_grads(self, params: Sequence[Tensor]) -> None:
        """Replace each parameter's ``.grad`` by its sum over ranks (a missing grad counts as zeros):
        one flat all-reduce, so every rank then clips and steps on identical gradients."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset: offset + g.numel()].view_as(p).clone()
            offset += g.numel()

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """Key-wise sum of every rank's ``values`` (a rank may lack keys, e.g. one without episodes)."""
        out: dict[str, float] = {}
        for part in self.all_gather(values):
            for k, v in part.items():
                out[k] = out.get(k, 0.0) + v
        return out

    @torch.no_grad()
    def broadcast_(self, tensors: Iterable[Tensor]) -> None:
        """Copy rank 0's values into ``tensors`` on every rank (start all replicas identical)."""
        if self.world == 1:
            return
        for t in tensors:
            torch.distributed.broadcast(t.data, src=0)


class NullLog:
    """The run log of a non-main rank: it writes nothing (one writer per run directory)."""

    def info(self, message: str) -> None:
        pass

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass
