"""RunLog reports through Accelerate's tracking API: init_trackers with the run's config, log at every
logged step, end_training at close (a recording tracker stands in for TensorBoard / W&B)."""

from __future__ import annotations

import json

from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.tracking import GeneralTracker

from abmll_pyro.train.runlog import RunLog, tracker_settings


class Recorder(GeneralTracker):
    name = "recorder"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.logged, self.finished = None, [], False

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_scalars_reach_the_trackers(tmp_path):
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    recorder = Recorder()
    accelerator = Accelerator(cpu=True, log_with=[recorder])
    log = RunLog(tmp_path)
    log.start_trackers(accelerator, {"rank": 2, "target_modules": ["q_proj", "v_proj"], "kl_gamma": None})
    log.scalars(1, {"loss": 2.5, "nll": 0.75, "task_kl": float("nan")})
    log.scalars(2, {"loss": 2.0, "nll": 0.5, "task_kl": 1.0})
    log.close()
    assert recorder.config == {"rank": 2, "target_modules": "q_proj,v_proj", "kl_gamma": "null"}  # trackers' scalars
    assert recorder.logged == [(1, {"train/loss": 2.5, "train/nll": 0.75}),  # a non-finite value is left out
                               (2, {"train/loss": 2.0, "train/nll": 0.5, "train/task_kl": 1.0})]
    assert recorder.finished
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["nll"] for r in lines] == [0.75, 0.5] and lines[0]["task_kl"] is None
    assert "reporting to recorder" in (tmp_path / "log.txt").read_text()


def test_no_trackers_by_default_or_without_a_run_directory(tmp_path):
    assert tracker_settings(None, tmp_path) == {} and tracker_settings(("tensorboard",), None) == {}
    settings = tracker_settings(("tensorboard",), tmp_path)
    assert settings["log_with"] == ["tensorboard"]
    assert settings["project_config"].logging_dir == str(tmp_path / "tensorboard")
