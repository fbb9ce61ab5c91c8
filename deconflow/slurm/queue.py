"""The SLURM queue depth: cells whose jobs wait in SLURM's queue before a GPU slot frees.

With the SLURM resource, SLURM (not Dagster's run queue) decides when the next cell starts.
Dagster lets ``training slots + queue depth`` training runs be in flight; each submits its job
at once, so up to ``queue depth`` jobs are PENDING in SLURM and the next one starts the
moment a slot frees, without waiting for a Dagster run to finish and a new run worker to
start. Each waiting cell costs one run worker on the orchestrator host (about 125 MB, see
BENCHMARKS.md).

``DECONFLOW_SLURM_QUEUE_DEPTH`` (a whole number >= 0; default: the training slots, at most
16). 0 turns it off (Dagster's run queue waits, as with the local resource). The local-process
resource ignores it: its slots are the machine's.
"""

from __future__ import annotations

from deconflow import settings
from deconflow.slurm.script import SlurmConfigError

QUEUE_DEPTH_ENV = "DECONFLOW_SLURM_QUEUE_DEPTH"
DEFAULT_MAX_DEPTH = 16


def slurm_queue_depth(training_slots: int) -> int:
    """``DECONFLOW_SLURM_QUEUE_DEPTH``, or its default for ``training_slots``.

    A bad value is a one-line :class:`SlurmConfigError` naming the variable.
    """
    try:
        value = settings.get(QUEUE_DEPTH_ENV)
    except settings.SettingError as e:
        raise SlurmConfigError(str(e)) from None
    if value is None:
        return min(max(training_slots, 1), DEFAULT_MAX_DEPTH)
    return value
