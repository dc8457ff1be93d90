"""The run log: human-readable ``log.txt``, machine-readable ``metrics.jsonl``, and the experiment
trackers of ``report_to`` (TensorBoard, Weights & Biases, ...) through Accelerate's tracking API.

Trackers (none by default): ``Accelerator(log_with=report_to, project_config=...)`` (:func:`tracker_settings`),
``accelerator.init_trackers`` with the run's config (:meth:`RunLog.start_trackers`), ``accelerator.log``
at every logged step (as ``train/<name>``), ``accelerator.end_training`` at :meth:`RunLog.close`.
Local trackers (TensorBoard) write under ``RUN_DIR/tensorboard/abmll``. A tracker whose package is
missing is a :class:`~abmll_pyro.train.config.ConfigError` naming what to install
(:func:`check_trackers`), before the run starts: Accelerate itself would drop it silently.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["RunLog", "check_trackers", "tracker_settings", "TRACKER_DIR", "TRACKER_PROJECT"]

TRACKER_DIR = "tensorboard"  # the logging folder of local trackers, inside the run directory
TRACKER_PROJECT = "abmll"  # init_trackers' project name (TensorBoard's subfolder, W&B's project)
# what to install for each tracker: the package extra where pyproject.toml has one, else the tracker's package
_INSTALL = {"tensorboard": "abmll-pyro[tensorboard]", "wandb": "abmll-pyro[wandb]", "comet_ml": "comet-ml"}


def check_trackers(report_to: tuple[str, ...] | None) -> None:
    """Every tracker named in ``report_to`` has its package installed; the first one missing is a
    ``ConfigError`` (one line: the tracker and what to ``pip install``)."""
    if not report_to:
        return
    from accelerate.tracking import get_available_trackers

    from .config import ConfigError

    available = {str(t) for t in get_available_trackers()}
    for name in report_to:
        if name not in available:
            raise ConfigError(f"report_to {name}: its package is not installed; install it with "
                              f"pip install '{_INSTALL.get(name, name)}' (or drop {name} from --report-to)")


def tracker_settings(report_to: tuple[str, ...] | None, run_dir: Path | None) -> dict[str, Any]:
    """The ``Accelerator(...)`` keyword arguments that report to ``report_to`` from ``run_dir`` (none
    without trackers or without a run directory: evaluation reports nowhere)."""
    if not report_to or run_dir is None:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": list(report_to),
            "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / TRACKER_DIR))}


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The config as trackers store hyperparameters: scalars kept, lists joined by commas, null as "null"."""
    def flat(v):
        if isinstance(v, (list, tuple)):
            return ",".join(map(str, v))
        return "null" if v is None else v

    return {k: flat(v) for k, v in config.items()}


class _LogFile(logging.FileHandler):
    """``log.txt``: a failed write (a full disk) is an OSError naming the file, which the command reports
    in one line, instead of logging's printed "--- Logging error ---" block and a run that goes on."""

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror or str(err), self.baseFilename) from None
        super().handleError(record)


class RunLog:
    """``scalars(step, values)`` writes one JSON line, one log line and (after :meth:`start_trackers`)
    the values to the run's trackers."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.logger = logging.getLogger(f"abmll.run.{run_dir.resolve()}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.handler = _LogFile(run_dir / "log.txt")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.logger.addHandler(self.handler)
        self.metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.accelerator = None  # reports to its trackers once started

    def start_trackers(self, accelerator, config: dict[str, Any]) -> None:
        """Start ``accelerator``'s trackers (its ``log_with``), storing ``config`` as the run's hyperparameters."""
        if accelerator.log_with:
            accelerator.init_trackers(TRACKER_PROJECT, config=_hparams(config))
            self.accelerator = accelerator
            names = [str(t.value) if hasattr(t, "value") else getattr(t, "name", str(t)) for t in accelerator.log_with]
            self.info(f"reporting to {', '.join(names)}")  # (a LoggerType, or a GeneralTracker object)

    def info(self, message: str) -> None:
        self.logger.info(message)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        finite = {k: v if math.isfinite(v) else None for k, v in values.items()}  # JSON has no NaN: null
        try:
            self.metrics.write(json.dumps({"step": step, **finite}) + "\n")
            self.metrics.flush()
        except OSError as err:  # a full disk: name the file
            raise OSError(err.errno, err.strerror or str(err), self.metrics.name) from None
        self.logger.info("step %d " % step + " ".join(f"{k}={v:.6g}" for k, v in values.items()))
        if self.accelerator is not None:
            self.accelerator.log({f"train/{k}": v for k, v in values.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        self.metrics.close()
        self.logger.removeHandler(self.handler)
        self.handler.close()
        if self.accelerator is not None:
            self.accelerator.end_training()
            self.accelerator = None
