"""Fine-tuning, by its public names: the stage, the task head, the rows and the scoring.

The code lives in :mod:`healthfm.stages.finetune` (the stage: :func:`finetune`,
:class:`FinetuneConfig`), :mod:`healthfm.evaluate.task_head` (spec, head, loss,
predictions, :func:`load_finetuned`), :mod:`healthfm.evaluate.task_data` (rows, splits,
targets) and :mod:`healthfm.evaluate.finetuned` (fine-tuned models' rows in evaluations).
The stage's names are imported on first use, so importing this module does not import
the stages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from healthfm.evaluate.finetuned import (
    evaluation_is_regression,
    finetuned_method,
    finetuned_rows,
    finetuned_spec,
    read_provenance,
)
from healthfm.evaluate.task_data import TaskData, _task_data, shared_task_input, task_data
from healthfm.evaluate.task_head import (
    TASKS,
    TaskLoss,
    _head_outputs,
    head_outputs,
    load_finetuned,
    pooled_rows,
    predict,
    task_spec,
    to_scores,
    with_task_head,
)

if TYPE_CHECKING:  # imported on first use by __getattr__
    from healthfm.stages.finetune import FinetuneConfig, FinetuneResult, finetune

__all__ = [
    "TASKS",
    "FinetuneConfig",
    "FinetuneResult",
    "TaskData",
    "TaskLoss",
    "_head_outputs",
    "_task_data",
    "evaluation_is_regression",
    "finetune",
    "finetuned_method",
    "finetuned_rows",
    "finetuned_spec",
    "head_outputs",
    "load_finetuned",
    "pooled_rows",
    "predict",
    "read_provenance",
    "shared_task_input",
    "task_data",
    "task_spec",
    "to_scores",
    "with_task_head",
]

_STAGE = ("FinetuneConfig", "FinetuneResult", "finetune")


def __getattr__(name: str) -> Any:
    if name in _STAGE:
        from healthfm.stages import finetune as stage

        return getattr(stage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
