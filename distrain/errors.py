"""distrain's user-error types. A user error is one the user fixes (a config key, a data file or
row, a checkpoint, the job's topology); its message names what is at fault and how to fix it, and
the ``distrain`` command prints it as one line. Anything else (a CUDA, DeepSpeed or Ray failure, a
bug) is not a ``UserError`` and keeps its traceback."""

from __future__ import annotations

# the ``distrain`` command's exit status after a stop (SIGTERM, SIGUSR1, a stop notice from the
# launcher, the time limit) that saved a checkpoint: launch again to resume (EX_TEMPFAIL).
# slurm/job.sbatch requeues the job on it.
EXIT_PREEMPTED = 75


class UserError(Exception):
    """Base of the errors a user fixes; printed as one line, without a traceback."""


class ConfigError(UserError, ValueError):
    """A config key or value that is wrong; names the key and the fix."""


class TopologyError(ConfigError):
    """A batch layout or device topology that does not multiply out or does not exist here."""


class DataError(UserError, ValueError):
    """Data that cannot be read as configured; names the file (and row) and the fix."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete, altered or incompatible; names the file."""
