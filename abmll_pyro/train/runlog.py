"""The run log: human-readable ``log.txt``, machine-readable ``metrics.jsonl``, TensorBoard if installed."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

__all__ = ["RunLog"]


class _LogFile(logging.FileHandler):
    """``log.txt``: a failed write (a full disk) is an OSError naming the file, which the command reports
    in one line, instead of logging's printed "--- Logging error ---" block and a run that goes on."""

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror or str(err), self.baseFilename) from None
        super().handleError(record)


class RunLog:
    """``scalars(step, values)`` writes one JSON line, one log line and TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.logger = logging.getLogger(f"abmll.run.{run_dir.resolve()}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.handler = _LogFile(run_dir / "log.txt")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.logger.addHandler(self.handler)
        self.metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.writer = None

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
        if self.writer is not None:
            for k, v in values.items():
                if math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self.metrics.close()
        self.logger.removeHandler(self.handler)
        self.handler.close()
        if self.writer is not None:
            self.writer.close()
