"""One run, start to end: build, meta-train (through ``accelerate.Accelerator``), checkpoint, evaluate.

Run directory (``RUN_DIR``): ``config.json`` (the resolved :class:`RunConfig`), ``log.txt``,
``metrics.jsonl`` (one line per step: the method's loss components, e.g. ABMLL's ``task_kl`` and
``log_p_theta``; ``nll`` is, for every method, the mean NLL per scored example of the examples its
training loss scores, in nats), ``tensorboard/`` (with ``report_to`` tensorboard), ``checkpoints/``,
``results.json``.

Accelerate gives device placement, mixed precision (``bf16``: autocast around the LM; the core keeps
KL and prior terms in float32) and gradient accumulation (``grad_accum`` micro-batches per optimizer
step; ABMLL's ``MetaSVI.step`` sees an accelerator-wrapped optimizer whose ``step``/``zero_grad`` wait
for the last micro-batch).

Under ``torchrun`` / ``accelerate launch`` the ranks split every global batch of episodes and every
evaluation, sum gradients before clipping, and rank 0 alone writes the run directory
(:mod:`abmll_pyro.train.distributed`, docs/distributed.md). Each episode is trained on by itself,
seeded from ``(seed, draw, j)`` and weighted ω_j/Σω in the global batch, in one process too.
"""

from __future__ import annotations

import json
import math
import random
import re
import resource
import time
from pathlib import Path

import pyro
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoint import atomic_write_text, load_latest, save_checkpoint
from .config import ConfigError, RunConfig
from .cost import cost_block
from .faults import (RunInterrupted, TrainingDiverged, absolute_sources, check_checkpoint_config, check_resume, condense,
                     diverged_message, interrupted_message, prepare_run_dir, summarize_truncation, truncate_metrics)
from .lock import RunLock
from .outputs import refuse_root
from .distributed import NullLog, Ranks, check_supported, is_main_process, seed_rng, wait_for_everyone
from .episodes import EpisodeEncoder, EpisodeSampler, test_splits
from .evaluate import evaluate_method, metrics_json, pooled_json, predictions_path, write_predictions
from .generative import evaluate_generative_run, is_generative
from .results import SCHEMA_VERSION, validate_result
from .runlog import RunLog, check_trackers, tracker_settings
from .setup import build

__all__ = ["train_run", "evaluate_run", "make_accelerator", "peak_memory_mb", "load_run_config", "open_run"]

CONFIG = "config.json"
RESULTS = "results.json"


def wants_cpu(config: RunConfig) -> bool:
    return config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())


def check_device(config: RunConfig) -> None:
    """Refuse, as a :class:`ConfigError`, what the machine would not honour: ``device="cuda"`` where torch
    sees no CUDA GPU (never a silent CPU run), and ``mixed_precision="fp16"`` on the CPU (accelerate's
    CPU autocast is bfloat16 only: fp16 would silently run in float32)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                          "use --device cpu, or auto")
    if config.mixed_precision == "fp16" and wants_cpu(config):
        raise ConfigError(f"mixed_precision='fp16' needs a CUDA GPU (device={config.device!r} runs on the CPU, where "
                          "fp16 autocast does not exist and the run would silently be float32); use bf16 or no")


def make_accelerator(config: RunConfig, run_dir: Path | None = None) -> Accelerator:
    """The run's Accelerator; with ``run_dir`` it also reports to ``config.report_to``'s trackers."""
    check_device(config)
    cpu = wants_cpu(config)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    # Accelerate keeps process-wide singletons; runs in one process (benchmark, tests) may differ in
    # mixed precision or accumulation, so start each run from a clean state.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=cpu, mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
                              **tracker_settings(config.report_to, run_dir))
    check_supported(accelerator)
    if accelerator.device.type == "cuda":  # peak_memory_mb is this run's, not an earlier run's of the same process
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    return accelerator


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch since :func:`make_accelerator` (CUDA), else the process's peak
    resident set (ru_maxrss: a process-wide peak, earlier runs of the same process included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no {CONFIG}")
    from .config import read_text_file, strict_json

    values = strict_json(read_text_file(path, "run config"), str(path))
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object of config keys, got {type(values).__name__}")
    return RunConfig.from_dict(values, where=str(path))


def open_run(run_dir: Path, trust_plugins: bool, replaced: tuple[str, ...] = ()) -> RunConfig:
    """The one way a command loads a run directory's config (``evaluate``, ``predict``, ``generate``,
    ``export``, ``train --resume``): a plug-in *file* it names (prior, guide) is refused unless
    ``trust_plugins`` (loading it would run that file's code), except a key in ``replaced`` (a flag
    gives another value, so the stored one is never imported)."""
    from ..registry import check_trusted

    config = load_run_config(run_dir)
    check_trusted({k: getattr(config, k) for k in ("prior", "guide") if k not in replaced},
                  str(Path(run_dir) / CONFIG), trust_plugins)
    return config


_NON_FINITE = re.compile(r"\bnan\b|\binf\b|invalid values|non-finite", re.IGNORECASE)


def _finite(params) -> bool:
    """Whether every parameter is finite (one device sync)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True


def _shapes(method) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in method.state_tensors().items()}


def _restore(ckpt, method, optimizer) -> int:
    """The step of ``ckpt`` after loading its tensors, optimizer and RNG states (the sampler needs none:
    a batch is a function of ``(seed, draw)``, so a checkpoint resumes under any world size)."""
    method.load_state_tensors(ckpt.tensors)
    if optimizer is not None and ckpt.optimizer is not None:
        optimizer.load_state_dict(ckpt.optimizer)
    torch.set_rng_state(ckpt.torch_rng)
    random.setstate(ckpt.python_rng)
    return ckpt.step


def _micro_batch(method, sampler, encoder, ranks: Ranks, draw: int, seed: int, backward) -> dict[str, float]:
    """This rank's share of global batch ``draw``: episode j (j ∈ ``ranks.shard(B)``) seeded from
    ``(seed, draw, j)``, its loss weighted by w_j = ω_j / Σ ω over the global batch. Returns the
    rank's Σ_j w_j·(logged part of episode j); summed over ranks that is the batch's weighted mean."""
    tasks = sampler.task_indices(draw)
    splits = {j: sampler.split(draw, j, i) for j, i in enumerate(tasks)}
    omega = [method.episode_weight(splits[j]) for j in range(len(tasks))]
    parts: dict[str, float] = {}
    for j in ranks.shard(len(tasks)):
        w = omega[j] / sum(omega)
        seed_rng(seed, "train", draw, j)
        out = method.train_step([encoder(splits[j])], lambda loss, w=w: backward(loss * w))
        for k, v in out.items():
            parts[k] = parts.get(k, 0.0) + w * v
    return parts


def _train(config, run_dir, built, taskset, accelerator, log, resume: bool, progress: bool, stored: dict) -> int:
    method, ranks = built.method, Ranks.of(accelerator)
    sampler = EpisodeSampler(taskset.train, config.shots, config.query_size, config.tasks_per_step, config.seed)
    encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(method.in_context), config.template, method.in_context, accelerator.device)
    optimizer = accelerator.prepare_optimizer(method.make_optimizer())
    start = 0
    ckpt = load_latest(run_dir, repair=ranks.main, expect=_shapes(method)) if resume else None
    if ckpt is not None:
        if ranks.main:  # a checkpoint of the wrong shapes was set aside: the metrics go back to this one
            truncate_metrics(run_dir, ckpt.step)
        start = _restore(ckpt, method, optimizer)
        log.info(f"resumed from step {start} on {ranks.world} process(es)")
    params = method.parameters()
    ranks.broadcast_(params)  # identical replicas (they are built from one seed; this makes it certain)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"train {method.name}",
               disable=not (progress and ranks.local_main), dynamic_ncols=True)
    for step in bar:
        parts: dict[str, float] = {}
        for micro in range(config.grad_accum):
            # Pyro's argument/support checks off while training (they re-check dense [out, in] tensors at
            # every site, every step; values only, the math is unchanged): a non-finite value still
            # surfaces as a non-finite loss, rejected by name. Evaluation keeps them.
            with accelerator.accumulate(), accelerator.autocast(), pyro.validation_enabled(False):
                try:
                    mine = _micro_batch(method, sampler, encoder, ranks, step * config.grad_accum + micro, config.seed,
                                        accelerator.backward)
                except (ValueError, RuntimeError, FloatingPointError) as err:  # e.g. a non-finite loss
                    if not (_NON_FINITE.search(str(err)) or not _finite(params)):
                        raise
                    raise TrainingDiverged(diverged_message(run_dir, step + 1, condense(err))) from None
                for k, v in mine.items():
                    parts[k] = parts.get(k, 0.0) + v / config.grad_accum
                if accelerator.sync_gradients:
                    ranks.sum_grads(params)  # before clipping: every rank clips and steps the same gradient
                    if config.grad_clip:
                        grad_norm = float(accelerator.clip_grad_norm_(params, config.grad_clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        parts = ranks.sum_values(parts)
        if config.grad_clip:
            parts["grad_norm"] = grad_norm
        bad = [f"{k}={v:g}" for k, v in parts.items() if k != "grad_norm" and not math.isfinite(v)]
        if bad or not _finite(params):  # before anything of the step is logged or saved
            what = f"non-finite loss: {', '.join(bad)}" if bad else "non-finite parameters after the update"
            raise TrainingDiverged(diverged_message(run_dir, step + 1, what))
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            log.scalars(step + 1, parts)
        bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items() if k in ("loss", "nll", "task_kl")})
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            if ranks.main:
                save_checkpoint(run_dir, step + 1, method.state_tensors(), optimizer, None,
                                stored, config.keep_checkpoints)
            ranks.barrier()  # nobody runs ahead of (or resumes before) the checkpoint on disk
    return config.steps - start


def train_run(config: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
              overwrite: bool = False, allow_config_change: bool = False) -> dict:
    """Train ``config.method`` into ``run_dir`` (or continue it), evaluate on the test tasks, write results.json.

    The run holds ``run_dir``'s lock throughout (a second writer fails at once). A fresh run refuses a
    directory holding a finished or checkpointed run unless ``overwrite``. ``resume`` continues from the
    newest intact checkpoint with the saved config, changed only in :data:`~.faults.RESUMABLE` keys
    (``config`` carries the requested values); a ``config.json`` that differs from the config its
    checkpoint was saved with is refused unless ``allow_config_change`` (then recorded in log.txt). Ctrl-C raises :class:`~.faults.RunInterrupted`, whose
    message names the checkpoint kept and the command that resumes."""
    run_dir = refuse_root(run_dir)
    check_device(config)  # before the run directory is touched
    check_trackers(config.report_to)
    config = absolute_sources(config)
    saved = load_run_config(run_dir) if resume else None  # (a clear error before anything is created)
    with RunLock(run_dir):
        if not is_main_process():  # rank 0 prepares (cleans, repairs) the directory before the others read it
            wait_for_everyone(cpu=wants_cpu(config))
        step = prepare_run_dir(run_dir, resume, overwrite)
        if is_main_process():
            wait_for_everyone(cpu=wants_cpu(config))
        changed = []
        if saved is not None:
            changed = check_checkpoint_config(run_dir, saved, allow_config_change)
            config = check_resume(saved, config, step)
        if is_main_process():  # one writer per run directory (rank 0 of a torchrun/accelerate launch)
            atomic_write_text(run_dir / CONFIG, json.dumps(config.to_dict(), indent=1) + "\n")
        log = RunLog(run_dir) if is_main_process() else NullLog()
        if changed:
            log.info(f"config changed on resume (--allow-config-change): {'; '.join(changed)}")
        try:
            with summarize_truncation(log, f"; details in {run_dir / 'log.txt'}"):
                return _train_and_evaluate(config, run_dir, log, resume, progress)
        except KeyboardInterrupt:
            message = interrupted_message(run_dir)
            log.info(message)
            raise RunInterrupted(message) from None
        finally:
            log.close()


def _train_and_evaluate(config: RunConfig, run_dir: Path, log: RunLog, resume: bool, progress: bool) -> dict:
    t0 = time.perf_counter()
    accelerator = make_accelerator(config, run_dir)
    if isinstance(log, RunLog):
        log.start_trackers(accelerator, config.to_dict())
    log.info(f"{'resume' if resume else 'start'} {config.method} on {config.model}, tasks {config.tasks}, "
             f"seed {config.seed}, device {accelerator.device}")
    built, taskset = build(config, accelerator.device)
    stored, config = config, built.config  # (checkpoints carry the config as stored, before fitting to the LM)
    if not taskset[config.eval_split]:  # before training, not after it
        raise ConfigError(f"task source {config.tasks!r} has no {config.eval_split} tasks: nothing to evaluate after "
                          f"training (name them with --{config.eval_split}-tasks, or in the folder's splits.json)")
    if not is_generative(taskset):  # the evaluation's splits are fixed by the seed: check them before training
        try:
            test_splits(taskset[config.eval_split], config.shots, config.eval_query_size, config.seed)
        except ValueError as err:
            raise ConfigError(f"{config.eval_split} {err} (checked before training)") from None
    log.info(f"{len(taskset.train)} train tasks, {len(taskset.test)} test tasks; adapted modules: "
             f"{len(built.adapter.module_names)}; trainable values: {sum(p.numel() for p in built.method.parameters())}")
    if built.method.trainable:
        _train(config, run_dir, built, taskset, accelerator, log, resume, progress, stored.to_dict())
    train_time = time.perf_counter() - t0
    if is_generative(taskset):  # target-only tasks: per-token NLL and exact match (train/generative.py)
        result = evaluate_generative_run(config, built, taskset[config.eval_split], accelerator, progress)
        result.update(wall_time_s=time.perf_counter() - t0, train_time_s=train_time,
                      eval_time_s=time.perf_counter() - t0 - train_time,
                      peak_memory_mb=peak_memory_mb(accelerator.device))
        if is_main_process():
            atomic_write_text(run_dir / RESULTS, json.dumps(result, indent=1) + "\n")
        log.info(f"macro token NLL {result['macro']['token_nll']:.4f} exact match "
                 f"{result['macro']['exact_match']:.4f}; wall time {result['wall_time_s']:.1f} s")
        return result
    result, predictions = _evaluate(config, built, taskset[config.eval_split], accelerator, progress, log,
                                    taskset.fingerprint)
    result.update(wall_time_s=time.perf_counter() - t0, train_time_s=train_time,
                  eval_time_s=time.perf_counter() - t0 - train_time,
                  peak_memory_mb=peak_memory_mb(accelerator.device))
    validate_result(result)
    if is_main_process():  # one writer per run directory
        write_predictions(run_dir / "predictions.jsonl", config.method, config.seed, predictions)
        atomic_write_text(run_dir / RESULTS, json.dumps(result, indent=1) + "\n")
    pooled = result["pooled"]
    log.info(f"pooled accuracy {pooled['accuracy']:.4f} nll {pooled['nll']:.4f} ece {pooled['ece']:.4f} "
             f"(floor {pooled['ece_floor']:.4f}, n={pooled['n']}); wall time {result['wall_time_s']:.1f} s")
    return result


def _evaluate(config: RunConfig, built, tasks, accelerator, progress: bool, log: RunLog | None,
              fingerprint: str | None = None) -> tuple[dict, list]:
    """``(result without timing fields, per-example prediction records)``; ``fingerprint``: the task
    source's content fingerprint (``data_fingerprint``, null where the source has none)."""
    encoder = EpisodeEncoder(built.tokenizer, config.prompt_length(built.method.in_context), config.template,
                             built.method.in_context, accelerator.device)
    ranks = Ranks.of(accelerator)
    per_task, reliability = evaluate_method(built.method, tasks, encoder, config, progress and ranks.local_main,
                                            accelerator.autocast, ranks)
    tasks_json, macro = metrics_json(per_task)
    cost = cost_block(list(per_task.adapt_time_s.values()), list(per_task.predict_time_s.values()),
                      sum(len(g) for g in per_task.gold.values()), per_task.peak_memory_mb,
                      sum(p.numel() for p in built.method.parameters()), list(per_task.adapted_values.values()))
    result = {"schema_version": SCHEMA_VERSION, "method": config.method, "model": config.model,
              "tasks": str(config.tasks), "data_fingerprint": fingerprint, "seed": config.seed,
              "per_task": tasks_json, "macro": macro,
              "pooled": pooled_json(per_task, config.ece_bins, config.seed), "config": config.to_dict(),
              "steps": config.steps if built.method.trainable else 0, "reliability": reliability, "cost": cost}
    return result, per_task.predictions()


def load_trained(config: RunConfig, run_dir: Path, accelerator, with_tasks: bool = True):
    """The method of a finished (or checkpointed) run with its trained state, and the run's tasks
    (none with ``with_tasks=False``). ``built.trained_steps`` is the step of the checkpoint loaded."""
    built, taskset = build(config, accelerator.device, with_tasks=with_tasks)
    built.trained_steps = 0
    if built.method.trainable:
        ckpt = load_latest(run_dir, expect=_shapes(built.method))
        if ckpt is None:
            raise FileNotFoundError(f"run {run_dir} has no checkpoint to evaluate (train it first)")
        built.method.load_state_tensors(ckpt.tensors)
        built.trained_steps = ckpt.step
    return built, taskset


def evaluate_run(config: RunConfig, run_dir: str | Path | None, progress: bool = True, out: str | Path | None = None,
                 split: str = "test") -> dict:
    """Evaluate a trained run (``run_dir``) or an untrained method (``run_dir=None``) on ``config``'s
    ``split`` tasks (``"test"``, or ``"dev"``)."""
    t0 = time.perf_counter()
    accelerator = make_accelerator(config)
    with summarize_truncation():
        if run_dir is not None:
            built, taskset = load_trained(config, Path(run_dir), accelerator)
        else:
            built, taskset = build(config, accelerator.device)
        config = built.config
        if not taskset[split]:
            raise ValueError(f"task source {config.tasks!r} has no {split} tasks")
        if is_generative(taskset):  # target-only tasks (train/generative.py)
            result = evaluate_generative_run(config, built, taskset[split], accelerator, progress)
            wall = time.perf_counter() - t0
            result.update(wall_time_s=wall, train_time_s=0.0, eval_time_s=wall,
                          peak_memory_mb=peak_memory_mb(accelerator.device))
            if out is not None:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(Path(out), json.dumps(result, indent=1) + "\n")
            return result
        result, predictions = _evaluate(config, built, taskset[split], accelerator, progress, None, taskset.fingerprint)
    if run_dir is not None and built.method.trainable:
        result["steps"] = built.trained_steps  # a partially trained run reports the step it was evaluated at
    wall = time.perf_counter() - t0
    result.update(wall_time_s=wall, train_time_s=0.0, eval_time_s=wall, peak_memory_mb=peak_memory_mb(accelerator.device))
    validate_result(result)
    if out is not None and is_main_process():
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_predictions(predictions_path(out), config.method, config.seed, predictions)
        atomic_write_text(Path(out), json.dumps(result, indent=1) + "\n")
    return result
