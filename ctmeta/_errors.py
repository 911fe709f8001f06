"""The library's error types.

Every problem a user can cause (bad arguments, bad data, a run that cannot be
resumed) raises a subclass of [`CtmetaError`][], with a message that says
what was wrong and what to do. The CLI turns these into one line on stderr and
exit code 2; anything else is a bug and exits 1.
"""

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


def check_positive(name: str, value) -> float:
    """`value` as a positive, finite Python float, or an `InputError` saying what was wrong."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a positive number, got {value!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise InputError(f"{name} must be a positive, finite number, got {value!r}")
    return x
