"""Data-parallel meta-training in one process: sharding a global batch over simulated ranks gives the
one-process gradient, for every trainable method (tests/train/test_distributed.py runs real ranks)."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from abmll_pyro.methods import TRAINABLE
from abmll_pyro.presets import PRESETS, synthetic_task_folder
from abmll_pyro.train.config import RunConfig
from abmll_pyro.train.distributed import Ranks, check_supported, episode_seed
from abmll_pyro.train.episodes import EpisodeEncoder, EpisodeSampler
from abmll_pyro.train.run import _micro_batch
from abmll_pyro.train.setup import build


@pytest.fixture(scope="module")
def smoke_tasks(tmp_path_factory):
    smoke = PRESETS["smoke"]
    return synthetic_task_folder(tmp_path_factory.mktemp("tasks") / "tasks", **smoke.synthetic)


def _setup(method: str, tasks, batch: int):
    config = RunConfig.from_dict({**PRESETS["smoke"].config, "tasks": str(tasks), "method": method,
                                  "tasks_per_step": batch})
    built, taskset = build(config)
    m = built.method
    sampler = EpisodeSampler(taskset.train, config.shots, config.query_size, config.tasks_per_step, config.seed)
    encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(m.in_context), config.template, m.in_context)
    return config, m, sampler, encoder


def _grads(method, run) -> tuple[dict[str, torch.Tensor], dict]:
    for p in method.parameters():
        p.grad = None
    parts = run()
    return {str(i): (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for i, p in enumerate(method.parameters())}, parts


def _sharded(method, sampler, encoder, world: int, draw: int, seed: int) -> dict:
    """Ranks 0..world-1 in turn; ``.grad`` accumulates, which is what the all-reduce sums."""
    parts: dict[str, float] = {}
    for r in reversed(range(world)):  # reverse order too: nothing may depend on who goes first
        for k, v in _micro_batch(method, sampler, encoder, Ranks(r, world), draw, seed, lambda l: l.backward()).items():
            parts[k] = parts.get(k, 0.0) + v
    return parts


def _close(a: dict, b: dict) -> None:
    for k in a:
        # float32 sums of the same terms in another order: ~1e-7 relative
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("method", TRAINABLE)
def test_sharded_batch_gives_the_one_process_gradient(method, smoke_tasks):
    config, m, sampler, encoder = _setup(method, smoke_tasks, batch=3)
    g1, p1 = _grads(m, lambda: _sharded(m, sampler, encoder, 1, draw=5, seed=config.seed))
    for world in (2, 3, 4):  # B = 3 on 2 ranks (uneven), on 3, and on 4 (one rank idle)
        gw, pw = _grads(m, lambda: _sharded(m, sampler, encoder, world, draw=5, seed=config.seed))
        _close(g1, gw)
        assert p1.keys() == pw.keys()
        for k in p1:
            assert pw[k] == pytest.approx(p1[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("method", ["lora", "structured-lora", "reptile"])
def test_one_episode_steps_weighted_equal_the_methods_own_batch_step(method, smoke_tasks):
    """Oracle: for the deterministic methods, the harness's weighted one-episode steps reproduce the
    method's own multi-episode ``train_step`` (pooled examples for lora, a task mean otherwise)."""
    config, m, sampler, encoder = _setup(method, smoke_tasks, batch=3)
    episodes = [encoder(s) for s in sampler.batch(2)]
    g_own, p_own = _grads(m, lambda: m.train_step(episodes, lambda l: l.backward()))
    g_h, p_h = _grads(m, lambda: _micro_batch(m, sampler, encoder, Ranks(), 2, config.seed, lambda l: l.backward()))
    _close(g_own, g_h)
    assert any(g.abs().sum() > 0 for g in g_own.values())  # a real gradient, not zeros on both sides
    for k in ("loss", "nll"):
        assert p_h[k] == pytest.approx(p_own[k], rel=1e-5), k


def test_sampler_batches_depend_on_seed_and_draw_only(smoke_tasks):
    config, _, sampler, _ = _setup("lora", smoke_tasks, batch=3)
    again = EpisodeSampler(sampler.tasks, config.shots, config.query_size, 3, config.seed)
    assert [s.support for s in sampler.batch(7)] == [s.support for s in again.batch(7)]
    assert [s.name for s in sampler.batch(0)] != [s.name for s in sampler.batch(1)] or \
        [s.support for s in sampler.batch(0)] != [s.support for s in sampler.batch(1)]
    first = sampler.draw()
    assert [s.support for s in first] == [s.support for s in again.batch(0)]
    assert episode_seed(0, "train", 1, 2) != episode_seed(0, "train", 2, 1)


def test_rank_shards_partition_the_batch():
    for batch in range(0, 7):
        for world in range(1, 5):
            shards = [list(Ranks(r, world).shard(batch)) for r in range(world)]
            assert sorted(j for s in shards for j in s) == list(range(batch))


def _collectives(rank: int, world: int, init: str, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    ranks = Ranks(rank, world)
    a, b = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))
    a.grad = torch.full((2, 3), float(rank + 1))
    if rank == 0:
        b.grad = torch.arange(4.0)  # rank 1 has no grad for b: counts as zeros
    ranks.sum_grads([a, b])
    c = torch.nn.Parameter(torch.full((3,), float(rank)))
    ranks.broadcast_([c])
    values = ranks.sum_values({"x": 1.0, "only0": 2.0} if rank == 0 else {"x": 0.5})
    queue.put((rank, a.grad.tolist(), b.grad.tolist(), c.tolist(), values, ranks.all_gather(rank * 10)))
    torch.distributed.destroy_process_group()


def _run_two(target, args) -> list:
    """Run ``target(rank, 2, *args, queue)`` in two spawned processes; return their sorted queue items."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, 2, *args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    out = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return out


def test_collectives_on_two_gloo_processes(tmp_path):
    out = _run_two(_collectives, (f"file://{tmp_path / 'rendezvous'}",))
    for rank, a, b, c, values, gathered in out:
        assert a == [[3.0] * 3] * 2 and b == [0.0, 1.0, 2.0, 3.0] and c == [0.0] * 3
        assert values == {"x": 1.5, "only0": 2.0} and gathered == [0, 10]


@pytest.mark.parametrize("kind", ["DEEPSPEED", "FSDP", "MEGATRON_LM"])
def test_unsupported_engines_fail_at_start_with_a_clear_message(kind):
    from accelerate.utils import DistributedType

    class Fake:
        distributed_type = DistributedType(kind)

    with pytest.raises(ValueError, match=f"configured for {kind}.*docs/distributed.md"):
        check_supported(Fake())


def test_plain_data_parallel_is_supported():
    from accelerate.utils import DistributedType

    for kind in ("NO", "MULTI_CPU", "MULTI_GPU"):
        class Fake:
            distributed_type = DistributedType(kind)

        check_supported(Fake())
    assert os.environ.get("RANK", "0") == "0"


def _append(path: str) -> str:
    with open(path, "a") as f:
        f.write(f"written by rank {os.environ['RANK']}\n")
    return path.upper()


def _writer(rank: int, world: int, port: int, path: str, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from abmll_pyro.train.distributed import main_writes, wait_for_everyone

    got = main_writes(_append, path, cpu=True)
    wait_for_everyone(cpu=True)
    queue.put((rank, got, open(path).read()))
    torch.distributed.destroy_process_group()


def test_main_writes_runs_once_and_every_rank_gets_its_value(tmp_path):
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "out.txt")
    out = _run_two(_writer, (port, path))
    assert out == [(0, path.upper(), "written by rank 0\n"), (1, path.upper(), "written by rank 0\n")]
