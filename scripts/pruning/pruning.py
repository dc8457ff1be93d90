"""Pruning robustness: zero the smallest-magnitude neurons of the adapted layers after adaptation and
measure each method's degradation (macro accuracy and ECE against the fraction pruned).

The driver (``run.py``) parses the preset and calls :func:`pruning_robustness`, which writes
``pruning.json`` and the plots ``pruning_accuracy.png``, ``pruning_ece.png`` under its output folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from abmll_pyro.eval.metrics import compute_metrics, macro_average
from abmll_pyro.train.checkpoint import atomic_write_text
from abmll_pyro.train.config import RunConfig
from abmll_pyro.train.episodes import EpisodeEncoder, test_splits
from abmll_pyro.train.run import load_trained, make_accelerator
from scripts._common import plot, trained

__all__ = ["pruning_robustness", "neuron_masks"]


def neuron_masks(adapter, fraction: float) -> dict[str, torch.Tensor]:
    """Per adapted module, a ``[out]`` 0/1 mask zeroing the ``fraction`` of output neurons whose rows of
    the frozen weight W0 have the smallest L2 norm. The masks depend on W0 alone, so every method loses
    the same neurons and the comparison measures how each adapted solution copes."""
    masks = {}
    for name, layer in adapter.layers.items():
        w = layer.base.weight
        rows = w.norm(dim=1) if isinstance(layer.base, torch.nn.Linear) else w.norm(dim=0)  # Conv1D: [in, out]
        k = int(round(fraction * rows.numel()))
        mask = torch.ones_like(rows)
        if k:
            mask[rows.argsort()[:k]] = 0.0
        masks[name] = mask
    return masks


class _Pruned:
    """Forward hooks multiplying each adapted layer's output (base + ΔW) by its neuron mask."""

    def __init__(self, adapter, masks: dict[str, torch.Tensor]):
        self.handles = [layer.register_forward_hook(self._hook(masks[name])) for name, layer in adapter.layers.items()]

    @staticmethod
    def _hook(mask):
        return lambda module, inputs, output: output * mask.to(output.dtype)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def pruning_robustness(base: RunConfig, out: Path, methods: Sequence[str] = ("abmll", "lora", "reptile"),
                       fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3), seed: int = 0, progress: bool = True,
                       runs_from: Path | None = None) -> dict:
    """Adapt each test task as usual, then predict with the smallest-magnitude neurons of the adapted
    layers zeroed; macro accuracy and ECE per method and fraction, and the drop from 0%."""
    accelerator = make_accelerator(base)
    curves: dict[str, dict[str, list[float]]] = {}
    for method in methods:
        config = base.updated(method=method, seed=seed)
        run_dir = (runs_from or out / "runs") / f"{method}-seed{seed}"
        trained(config, run_dir, progress)
        built, taskset = load_trained(config, run_dir, accelerator)
        encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(built.method.in_context), config.template,
                                 built.method.in_context, accelerator.device)
        masks = {f: neuron_masks(built.adapter, f) for f in fractions}
        per = {f: {} for f in fractions}
        torch.manual_seed(seed)
        for split in test_splits(taskset.test, config.shots, config.eval_query_size, seed):
            episode = encoder(split)
            state = built.method.adapt(episode)
            for f in fractions:
                with _Pruned(built.adapter, masks[f]), torch.no_grad():
                    probs = built.method.predict(state, episode).float().cpu()
                per[f][split.name] = compute_metrics(probs, episode.query.gold.cpu())
        built.adapter.detach()
        macro = {f: macro_average(per[f]) for f in fractions}
        curves[method] = {k: [macro[f][k] for f in fractions] for k in ("accuracy", "ece")}
        curves[method]["accuracy_drop"] = [curves[method]["accuracy"][0] - a for a in curves[method]["accuracy"]]
    pct = [100 * f for f in fractions]
    plot(pct, {m: c["accuracy"] for m, c in curves.items()}, "neurons pruned (%)", "macro accuracy",
          out / "pruning_accuracy.png")
    plot(pct, {m: c["ece"] for m, c in curves.items()}, "neurons pruned (%)", "macro ECE", out / "pruning_ece.png")
    result = {"fractions": list(fractions), "seed": seed, "curves": curves}
    atomic_write_text(out / "pruning.json", json.dumps(result, indent=1) + "\n")
    return result
