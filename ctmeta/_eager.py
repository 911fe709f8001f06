"""A failed inner solve of an eager call, as a `NumericalError`.

The solves check themselves with `eqx.error_if`, which works inside `jit` but
fails through a host callback: called eagerly, the caller would get
`equinox.EquinoxRuntimeError` (which `except ctmeta.NumericalError` misses),
JAX would log the callback's traceback with equinox's "you do not appear to
be using filter_jit" banner, and an error left in JAX's runtime token would
be printed again at exit ("Exception ignored in atexit callback").

So a public entry point called eagerly does one of two things:

- nothing traced (the common `gradient_flow(loss, model, data, T)`): solve
  without the in-graph check (`throw=False`) and check the status here, on
  the host ([`raise_if_failed_now`][]): no callback ever fails;
- traced but run eagerly (`jax.grad` without `jit`): keep the in-graph check,
  turn its error into a `NumericalError` and silence the callback's log
  ([`solve_errors_as_numerical`][]).

Under the caller's `jit` the check runs when the compiled function does,
outside ctmeta, and raises JAX's runtime error with the same message.
"""

from __future__ import annotations

import contextlib
import logging

import equinox as eqx
import jax
import numpy as np

from ._errors import NumericalError

__all__ = ["is_traced", "quiet_callback_errors", "raise_if_failed_now", "solve_errors_as_numerical"]

# The messages of ctmeta's in-graph checks start with the name of what raised.
_MARKERS = ("ctmeta.", "gradient_flow:", "loss_along_flow:")


def is_traced(*trees) -> bool:
    """Whether any leaf of `trees` is a JAX tracer (under `jit`, `grad`, `vmap`...)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


def raise_if_failed_now(status, where: str, method=None) -> None:
    """Raise `NumericalError` naming the cause if the concrete `status` is not `SUCCESS`.

    `where` names the entry point ("gradient_flow"); `method`'s `max_steps`,
    `steps`, `scheme` and `dense_steps` (where it has them) complete the cause.
    """
    from ._learner_checks import solve_advice
    from .ode import SolveStatus

    codes = sorted(set(np.asarray(status).reshape(-1).tolist()) - {int(SolveStatus.SUCCESS)})
    if not codes:
        return
    sweep = {name: getattr(method, name, None) for name in ("steps", "scheme", "dense_steps")}
    causes = "; ".join(SolveStatus(c).describe(getattr(method, "max_steps", None), **sweep) for c in codes)
    raise NumericalError(f"{where}: the inner solve {causes}. {solve_advice(status)}.")


class _DropCtmetaCallbackErrors(logging.Filter):
    """Drop JAX's log record of a host callback that failed on one of ctmeta's checks."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        return not (err is not None and any(m in str(err) for m in _MARKERS))


@contextlib.contextmanager
def solve_errors_as_numerical(where: str):
    """Turn the runtime error of a ctmeta check that fails inside the block into
    a `NumericalError` (its first line, prefixed by `where` unless it names
    itself); other errors pass unchanged. JAX's log of the failed callback is
    dropped meanwhile. Block on the block's results inside it, so that the
    error is raised here and not later (or at exit) under async dispatch."""
    try:
        with quiet_callback_errors():
            yield
    except NumericalError as err:  # from an entry point inside this one (ctmeta.ode.solve): named after this one
        inner = "ctmeta.ode.solve: "
        if where != inner[:-2] and str(err).startswith(inner):
            raise NumericalError(f"{where}: {str(err)[len(inner):]}") from err
        raise
    except (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError, RuntimeError) as err:
        message = _check_message(str(err))
        if message is None:
            raise
        if not message.startswith(where):
            message = f"{where}: {message}"
        raise NumericalError(message) from err


@contextlib.contextmanager
def quiet_callback_errors():
    """Drop, inside the block, JAX's log (traceback and equinox's banner) of a
    host callback that failed on one of ctmeta's checks: the error itself is
    raised, and said once."""
    logger = logging.getLogger("jax._src.callback")
    quiet = _DropCtmetaCallbackErrors()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _check_message(text: str) -> str | None:
    """The line of `text` that is one of ctmeta's check messages, or None."""
    for line in text.splitlines():
        for marker in _MARKERS:
            at = line.find(marker)
            if at >= 0:
                return line[at:].strip()
    return None
