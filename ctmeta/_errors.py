"""The library's error types.

They live here, below every module that raises them (the tasks, the
download, the commands), so that this module imports none of them.

Every problem a user can cause (bad arguments, bad data, a run that cannot be
resumed) raises a subclass of [`CtmetaError`][ctmeta.CtmetaError], with a message that says
what was wrong and what to do. The commands turn these into one line on
stderr and the exit status of [`exit_code`][ctmeta._errors.exit_code]: 2 for
what the user can fix, 1 for a failure at run time; anything else is a bug and
exits 1.
"""

import errno
import math
import operator


class CtmetaError(ValueError):
    """Base class of every error ctmeta raises on purpose."""


class InputError(CtmetaError):
    """An argument to a public function is invalid (shape, value, type)."""


class DataError(CtmetaError):
    """A dataset file or directory is missing or malformed."""


class CheckpointError(CtmetaError):
    """A checkpoint is missing, truncated, corrupted or incompatible."""


class DownloadError(CtmetaError):
    """A download failed: the network, the server, or what it sent (`ctmeta.tasks.download`)."""


class NumericalError(CtmetaError):
    """A solve or a meta-gradient produced non-finite values or ran out of steps.

    Raised by `MetaLearner.meta_step`, it also says (as attributes, `None`
    when unknown) at which meta-`iteration` (1-based) it happened, `what`
    happened without the advice for the Python API (the command line gives
    its own), and whether `all_tasks` of the meta-batch failed (then
    `on_nonfinite="skip-task"` cannot help)."""

    def __init__(self, message: str = "", *, iteration: int | None = None, what: str | None = None,
                 all_tasks: bool | None = None):
        super().__init__(message)
        self.iteration = iteration
        self.what = what
        self.all_tasks = all_tasks


def check_int(name: str, value, *, minimum: int = 1) -> int:
    """`value` as a Python int `>= minimum`, or an `InputError` saying what was wrong."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_positive_int(name: str, value) -> int:
    """`value` if it is a positive Python int (not a bool), else an `InputError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_positive(name: str, value) -> float:
    """`value` as a positive, finite Python float, or an `InputError` saying what was wrong."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a positive number, got {value!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise InputError(f"{name} must be a positive, finite number, got {value!r}")
    return x


ENVIRONMENT_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                      errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device",
                      errno.EDQUOT: "disk quota exceeded"}
"""`OSError` numbers that are the user's environment (permissions, a read-only
or full disk), not a bug, with the words the commands print for them."""


def exit_code(err: BaseException) -> int:
    """The exit status of a command that stopped on `err`, the same for every command.

    - 2: what the user can fix: a [`CtmetaError`][ctmeta.CtmetaError] (a bad
      argument, missing data, an unusable run directory), or an `OSError` of
      the environment ([`ENVIRONMENT_ERRNOS`][ctmeta._errors.ENVIRONMENT_ERRNOS]);
    - 1: a failure at run time that the input did not cause (a
      [`NumericalError`][ctmeta.NumericalError], a failed download), or a bug;
    - $128 + s$ for an interruption by signal $s$ (130 for Ctrl-C).
    """
    if isinstance(err, KeyboardInterrupt):
        return 128 + getattr(err, "signum", 2)
    if isinstance(err, (NumericalError, DownloadError)):
        return 1
    if isinstance(err, CtmetaError):
        return 2
    if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
        return 2
    return 1
