"""Task sources; :func:`load_tasks` is the one entry point."""

from abmll_pyro.data.sources.api import load_tasks
from abmll_pyro.data.sources.bigbench import prepare_bigbench
from abmll_pyro.data.sources.debian_cls import prepare_debian_cls
from abmll_pyro.data.sources.crossfit import crossfit_splits, load_hub_task, load_metaicl_split, write_metaicl_sample
from abmll_pyro.data.sources.folder import load_task_folder, read_task_file, write_task_folder
from abmll_pyro.data.sources.taskset import TaskSet
from abmll_pyro.data.sources.unifiedqa import load_unifiedqa_hub, load_unifiedqa_task, parse_unifiedqa

__all__ = [
    "TaskSet", "load_tasks", "prepare_bigbench", "prepare_debian_cls", "load_task_folder", "read_task_file", "write_task_folder",
    "crossfit_splits", "load_metaicl_split", "load_hub_task", "write_metaicl_sample", "load_unifiedqa_task", "load_unifiedqa_hub",
    "parse_unifiedqa",
]
