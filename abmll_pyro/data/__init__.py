"""Tasks, their sources, formatting and option scoring.

The public surface: :func:`load_tasks` (any source: ``"debian-cls"``, ``"bigbench"``, a task folder,
a CrossFit/MetaICL split), :class:`TaskSet`, :class:`Task` / :class:`Example`, :func:`split_task`
(support and query of one task), :func:`encode_options` (examples -> the option-scoring batch),
:func:`folder_fingerprint` (which data a result saw).
"""

from abmll_pyro.data.encoding import encode_options
from abmll_pyro.data.fingerprint import folder_fingerprint
from abmll_pyro.data.sources import TaskSet, load_tasks, load_task_folder, write_task_folder
from abmll_pyro.data.tasks import DataError, Example, Task, TaskSplit, split_task

__all__ = ["load_tasks", "load_task_folder", "write_task_folder", "TaskSet", "Task", "Example", "TaskSplit",
           "split_task", "encode_options", "folder_fingerprint", "DataError"]
