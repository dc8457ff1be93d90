"""What keeps a run directory safe when things go wrong: who may write it, what a new run may replace,
what a resumed run may change, Ctrl-C, and warnings that would otherwise bury the progress bars.

* :func:`prepare_run_dir` (called holding the run's :class:`~abmll_pyro.train.lock.RunLock`) removes
  temporary files of an interrupted writer, refuses to replace a finished or checkpointed run unless
  ``overwrite``, and on resume picks the newest intact checkpoint and cuts ``metrics.jsonl`` back to it.
* :func:`check_resume` allows a resumed run to change only :data:`RESUMABLE` keys.
* :class:`RunInterrupted` (a ``KeyboardInterrupt``) says where the run can be resumed from;
  :func:`defer_interrupts` holds Ctrl-C back while a checkpoint is written.
* :func:`summarize_truncation` turns the per-episode "truncated from the left" warnings into one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator

from .checkpoint import CheckpointError, checkpoint_folders, clean_temporaries, defer_interrupts, load_latest
from .config import ConfigError, RunConfig
from .outputs import TEMPORARIES, check_output_dir, mark_output

__all__ = ["prepare_run_dir", "check_resume", "RESUMABLE", "RunInterrupted", "defer_interrupts",
           "summarize_truncation", "absolute_sources", "truncate_metrics", "RUN_FILES", "check_checkpoint_config"]

# keys a resumed run may change: they alter neither the trained state so far nor its randomness
RESUMABLE = ("steps", "num_threads", "checkpoint_every", "keep_checkpoints", "log_every", "device", "report_to")
# what a run writes into its directory (and --overwrite removes)
RUN_FILES = ("config.json", "results.json", "predictions.jsonl", "metrics.jsonl", "log.txt", "checkpoints", "tensorboard")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says which checkpoint is kept and how to resume."""


def truncate_metrics(run_dir: Path, step: int) -> int:
    """Keep the lines of ``metrics.jsonl`` up to ``step`` (those the checkpoint has seen); returns how
    many lines were dropped. A torn last line (a run killed mid-write) is dropped too."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines(True):
        try:
            ok = line.endswith("\n") and int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
    return dropped


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> int | None:
    """Make ``run_dir`` ready for a writer that holds its lock; returns the step of the checkpoint a
    resumed run continues from (None for a fresh run, or a resumed run without a checkpoint)."""
    run_dir = Path(run_dir)
    if int(os.environ.get("RANK", "0")) != 0:  # under a launcher rank 0 alone changes the directory
        ckpt = load_latest(run_dir) if resume else None
        return ckpt.step if ckpt is not None else None
    if not resume:  # before anything is removed: nothing of the user's is replaced
        check_output_dir(run_dir, "run", (*RUN_FILES, TEMPORARIES), overwrite)
    clean_temporaries(run_dir)
    if resume:
        ckpt = load_latest(run_dir, repair=True)
        step = ckpt.step if ckpt is not None else 0
        truncate_metrics(run_dir, step)
        mark_output(run_dir, "run")
        return ckpt.step if ckpt is not None else None
    corrupt = [p.name for p in (run_dir / "checkpoints").glob("corrupt-*")] if (run_dir / "checkpoints").is_dir() else []
    held = [name for name, present in (("results.json", (run_dir / "results.json").exists()),
                                       ("checkpoints", bool(checkpoint_folders(run_dir))),
                                       ("set-aside corrupt checkpoints", bool(corrupt))) if present]
    if held and not overwrite:
        what = "a finished run" if "results.json" in held else "a checkpointed run"
        raise ConfigError(f"{run_dir} already holds {what} ({', '.join(held)}); pass --resume {run_dir} to "
                          f"continue it, --overwrite to replace it, or choose a new --out")
    for name in RUN_FILES:  # a fresh run starts from a clean directory (metrics.jsonl is appended to)
        path = run_dir / name
        if name == "checkpoints" and path.is_dir():  # set-aside corrupt checkpoints stay, for inspection
            for child in path.iterdir():
                if not child.name.startswith("corrupt-"):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    mark_output(run_dir, "run")
    return None


def check_resume(saved: RunConfig, requested: RunConfig, checkpoint_step: int | None) -> RunConfig:
    """``saved`` with the :data:`RESUMABLE` changes of ``requested``; any other difference is a
    :class:`ConfigError` naming the key (a resumed run must continue the same experiment)."""
    old, new = saved.to_dict(), requested.to_dict()
    changed = [k for k in old if old[k] != new.get(k, old[k])]
    fixed = [k for k in changed if k not in RESUMABLE]
    if fixed:
        k = fixed[0]
        raise ConfigError(f"--{k.replace('_', '-')} cannot change on --resume (the run has {k}={old[k]!r}, asked "
                          f"{new[k]!r}); a resumed run may change only {', '.join(RESUMABLE)}; start a new run with --out")
    if checkpoint_step is not None and requested.steps < checkpoint_step:
        raise ConfigError(f"steps={requested.steps} is below the run's checkpoint at step {checkpoint_step}; "
                          f"--steps can only extend a resumed run")
    return saved.updated(**{k: new[k] for k in changed}) if changed else saved


def check_checkpoint_config(run_dir: Path, saved: RunConfig, allow: bool) -> list[str]:
    """Compare ``config.json`` (``saved``) with the config the latest checkpoint was saved with: any
    difference outside :data:`RESUMABLE` (an edited ``config.json``) is a :class:`ConfigError` naming
    the key, unless ``allow``; returns the differences as ``"key: old -> new"``."""
    root = Path(run_dir) / "checkpoints"
    try:
        latest = json.loads((root / "latest.json").read_text())
        stored = json.loads((root / latest["path"] / "state.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # no checkpoint (yet): nothing was trained with another config
    now = saved.to_dict()
    changed = []
    for key, value in now.items():
        old = stored.get(key, value)
        if key in RESUMABLE or old == value:
            continue
        if key in ("max_length", "icl_max_length") and isinstance(old, int) and (value is None or value > old):
            continue  # a checkpoint written before it carried the config as stored holds the value fitted to the LM
        changed.append(f"{key}: {old!r} -> {value!r}")
    if changed and not allow:
        key = changed[0].split(":")[0]
        raise ConfigError(f"{Path(run_dir) / 'config.json'} differs from the config its checkpoint {latest['path']} was "
                          f"saved with ({changed[0].replace(' -> ', ' there, now ')}{' and more' if len(changed) > 1 else ''}); "
                          f"undo the edit of {key}, or pass --allow-config-change to continue with the edited values "
                          f"(recorded in log.txt)")
    return changed


def absolute_sources(config: RunConfig) -> RunConfig:
    """``config`` with a task-folder ``tasks`` and ``data_dir`` made absolute, so the stored config
    works from any directory (``evaluate --run``, ``predict --run``)."""
    changes = {}
    if config.tasks != "bigbench" and Path(config.tasks).is_dir():
        changes["tasks"] = str(Path(config.tasks).resolve())
    if config.data_dir is not None and Path(config.data_dir).exists():
        changes["data_dir"] = str(Path(config.data_dir).resolve())
    return config.updated(**changes) if changes else config


_TRUNCATED = re.compile(r"^(?P<name>.*?)(?: support| query)?: (?P<count>\d+) of \d+ examples truncated from the left"
                        r" to fit max_length=(?P<max>\w+)")


@contextlib.contextmanager
def summarize_truncation(log=None, where: str = "") -> Iterator[Counter]:
    """Collect the encoders' "N of M examples truncated from the left" warnings inside the block:
    each goes to ``log`` (the run's log.txt), and one warning at the end sums them up per task.
    Other warnings are shown as they come."""
    counts: Counter = Counter()
    limits: set = set()
    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        warnings.filterwarnings("always", message=r".*examples truncated from the left")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            match = _TRUNCATED.match(str(message))
            if match is None:
                return shown(message, category, filename, lineno, file, line)
            counts[match["name"]] += int(match["count"])
            limits.add(match["max"])
            if log is not None:
                log.info(f"truncated: {message}")

        warnings.showwarning = show
        yield counts
    if counts:
        top = ", ".join(f"{name} {n}" for name, n in counts.most_common(5))
        more = f" and {len(counts) - 5} more tasks" if len(counts) > 5 else ""
        warnings.warn(f"{sum(counts.values())} example encodings of {len(counts)} tasks were truncated from the left "
                      f"to fit max_length={'/'.join(sorted(limits))} ({top}{more}){where}")


class TrainingDiverged(ValueError):
    """A training step gave a non-finite loss or parameters; nothing of that step was saved."""


def condense(err: BaseException, limit: int = 200) -> str:
    """An exception as one short line: Pyro's trace dumps (``Trace Shapes: ...``) and tensor listings cut off."""
    text = str(err).split("Trace Shapes:")[0]
    line = " ".join(text.split()) or type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def diverged_message(run_dir: Path, step: int, what: str) -> str:
    """Why training stopped at ``step`` and the last finite checkpoint, which stays the latest."""
    try:
        latest = json.loads((Path(run_dir) / "checkpoints" / "latest.json").read_text())
        kept = (f"the last finite checkpoint, step {latest['step']} ({Path(run_dir) / 'checkpoints' / latest['path']}), "
                f"stays the latest")
    except (OSError, ValueError, KeyError, TypeError):
        kept = "the run has no checkpoint"
    return (f"training diverged at step {step} ({what}); nothing of step {step} was saved and {kept}; lower "
            f"--outer-lr (or --lora-alpha, --inner-lr) and start a new run")


def interrupted_message(run_dir: Path) -> str:
    """Where an interrupted run stands and the command that continues it."""
    try:
        latest = json.loads((Path(run_dir) / "checkpoints" / "latest.json").read_text())
        kept = f"its last checkpoint is step {latest['step']} ({Path(run_dir) / 'checkpoints' / latest['path']})"
    except (OSError, ValueError, KeyError, TypeError):
        kept = "it has no checkpoint yet"
    return f"interrupted: {run_dir} is consistent, {kept}; resume with: abmll train --resume {run_dir}"


__all__ += ["interrupted_message", "CheckpointError", "TrainingDiverged", "condense", "diverged_message"]
