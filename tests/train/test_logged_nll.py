"""The ``nll`` a run logs (metrics.jsonl, log.txt) has one meaning for every method: the mean NLL per
example of the examples its training loss scores (ABMLL: the episode's query under q(φ); Regular LoRA:
the episode's support and query under its LoRA), in nats, never a sum over examples."""

from __future__ import annotations

import json

import pytest
import torch

from abmll_pyro.methods.base import option_logits
from abmll_pyro.presets import synthetic_task_folder
from abmll_pyro.train.config import RunConfig
from abmll_pyro.train.episodes import EpisodeEncoder, EpisodeSampler
from abmll_pyro.train.run import train_run
from abmll_pyro.train.setup import build


def _per_example_nll(built, batch) -> torch.Tensor:
    """``[n]``: −log p(gold | x) of each example under the base model."""
    logp = torch.log_softmax(option_logits(built.adapter, None, batch, built.method.likelihood).double(), -1)
    return -logp.gather(1, batch.gold[:, None]).squeeze(1)


@pytest.mark.parametrize("method", ["abmll", "lora"])
def test_the_logged_nll_is_the_mean_per_example(method, tmp_path):
    """One step of one episode from the start, where every LoRA is the base model (B = 0, so ΔW = 0;
    ABMLL with no inner step and σ = 1e-6 draws ΔW within ~1e-6 of it): the logged ``nll`` is the
    base model's per-example NLL averaged over the scored examples, computed here from the batch.
    (A sum over ABMLL's 3 query examples would be 3 times it.)"""
    config = RunConfig(method=method, model="tiny-llama", tasks=str(synthetic_task_folder(tmp_path / "tasks")), steps=1,
                       tasks_per_step=1, shots=2, query_size=3, rank=2, num_inner_steps=0, init_std=1e-6,
                       max_test_tasks=1, eval_query_size=2, num_threads=1)
    train_run(config, tmp_path / "run", progress=False)
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert f"nll={logged['nll']:.6g}" in (tmp_path / "run" / "log.txt").read_text()

    built, taskset = build(config)
    sampler = EpisodeSampler(taskset.train, config.shots, config.query_size, config.tasks_per_step, config.seed)
    episode = EpisodeEncoder(built.tokenizer, built.config.prompt_length(False), config.template)(
        sampler.split(0, 0, sampler.task_indices(0)[0]))
    scored = [episode.query] if method == "abmll" else [episode.support, episode.query]
    expected = torch.cat([_per_example_nll(built, b) for b in scored]).mean()
    assert len(episode.query) == 3
    # float32 LM scores, and ABMLL's ΔW draw of scale 1e-6: agreement to ~1e-5 relative
    assert logged["nll"] == pytest.approx(float(expected), rel=1e-4)
    if method == "abmll":  # the loss's own term stays logged, as a sum over the query
        assert logged["query_nll_sum"] == pytest.approx(3 * logged["nll"], rel=1e-6)
