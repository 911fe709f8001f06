"""What a [`MetaLearner`][] checks, and says when its arguments, a batch or an inner solve are wrong.

Internal to `ctmeta.meta`: the checks of the learner's arguments (against
the capability flags of its rule, `ctmeta.methods`) and of a batch's task
axis, the hint added to an error raised while tracing the per-task work, and
the messages (cause and advice) of failed inner solves and non-finite
meta-gradients.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ._errors import InputError, NumericalError
from .methods import AbstractMethod
from .models import EmbeddingHead, apply_to_set
from .ode import SolveStatus

__all__ = ["check_arguments", "check_batch", "describe_solve_failures", "nonfinite_error", "solve_advice", "task_axis_hint"]

_SOLVE_ADVICE = ("Raise the method's max_steps, loosen its rtol/atol or lower the horizon T "
                 "(a stiff or diverging inner flow)")
_UNSTABLE_ADVICE = ("Raise the method's steps (more stored states, a smaller h = T/steps), lower the horizon T, "
                    "use scheme='rk4' if the sweep is Heun's, or the adaptive rule (Adjoint() without steps, "
                    "whose step follows the curvature) (an unstable backward adjoint sweep)")
_DENSE_ADVICE = ("Raise the method's dense_steps (Adjoint(dense_steps=...): the forward's accepted steps it can "
                 "hold), loosen its rtol/atol or lower the horizon T (a forward that needs more steps than its "
                 "dense output holds)")


def solve_advice(status) -> str:
    """What to change for the failed inner solves among `status`, without the final full stop."""
    codes = set(np.asarray(status).reshape(-1).tolist()) - {int(SolveStatus.SUCCESS)}
    special = {int(SolveStatus.UNSTABLE_ADJOINT), int(SolveStatus.DENSE_OVERFLOW)}
    parts = ([_SOLVE_ADVICE] if codes - special else []) + (
        [_UNSTABLE_ADVICE] if int(SolveStatus.UNSTABLE_ADJOINT) in codes else []) + (
        [_DENSE_ADVICE] if int(SolveStatus.DENSE_OVERFLOW) in codes else [])
    return "; ".join(parts) if parts else _SOLVE_ADVICE


def describe_solve_failures(status, method) -> str:
    """Which tasks' inner solves failed and why, grouped by cause; "" if none did.

    **Arguments:**

    - `status`: the per-task `SolveStatus` codes of a meta-batch.
    - `method`: the learner's rule, whose `max_steps`, `steps`, `scheme`
      and `dense_steps` (where it has them) the causes name.

    **Returns:** e.g. "the inner solve of task 1 of the meta-batch exhausted
    its step budget (max_steps=64) before reaching the horizon".
    """
    status = np.asarray(status).reshape(-1)
    max_steps = getattr(method, "max_steps", None)
    sweep = {"steps": getattr(method, "steps", None), "scheme": getattr(method, "scheme", None),
             "dense_steps": getattr(method, "dense_steps", None)}
    parts = []
    for code in sorted(set(status.tolist()) - {int(SolveStatus.SUCCESS)}):
        tasks = np.flatnonzero(status == code).tolist()
        parts.append(
            f"the inner solve of task{'s' if len(tasks) > 1 else ''} {', '.join(map(str, tasks))} "
            f"of the meta-batch {SolveStatus(code).describe(max_steps, **sweep)}"
        )
    return "; ".join(parts)


def nonfinite_error(metrics: dict, iteration: int, method, on_nonfinite: str) -> NumericalError:
    """The `NumericalError` of meta-iteration `iteration` (1-based) whose
    metrics say the update was not applied: its cause (failed inner solves,
    or a non-finite meta-gradient or meta-loss) and advice."""
    it = iteration
    status = np.asarray(metrics["task_status"])
    task_finite = np.asarray(metrics["task_finite"]).reshape(-1)
    all_tasks = not bool(np.any(task_finite))
    failed_solves = describe_solve_failures(status, method)
    bad = np.flatnonzero(~task_finite & (status.reshape(-1) == SolveStatus.SUCCESS)).tolist()
    where = f"task{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of the meta-batch" if bad else ""
    if on_nonfinite == "skip-task":
        what = (f"meta-iteration {it}: every task of the meta-batch gave a non-finite loss or "
                f"meta-gradient{' (' + failed_solves + ')' if failed_solves else ''}; "
                "the parameters were left unchanged")
        return NumericalError(what + ".", iteration=it, what=what, all_tasks=True)
    if failed_solves:
        others = f"; {where} gave a non-finite loss or meta-gradient" if where else ""
        what = f"meta-iteration {it}: {failed_solves}{others}; the parameters were left unchanged"
        advice = f"{solve_advice(status)}" + ("." if all_tasks else ", or use on_nonfinite='skip-task'.")
        return NumericalError(f"{what}. {advice}", iteration=it, what=what, all_tasks=all_tasks)
    what = (f"meta-iteration {it}: non-finite meta-gradient or meta-loss "
            f"(meta-loss {float(metrics['meta_loss']):.4g}{'; ' + where if where else ''}); "
            "the parameters were left unchanged")
    advice = "Lower the horizon T or the outer learning rate" + (
        "." if all_tasks else ", or use on_nonfinite='skip-task'.")
    return NumericalError(f"{what}. {advice}", iteration=it, what=what, all_tasks=all_tasks)


def check_arguments(model, method, optimizer, loss, *, learn_T, apply, adapt, on_nonfinite, task_map) -> None:
    """Refuse, saying why, the arguments of a `MetaLearner` that do not go together (see its docstring)."""
    if not isinstance(method, AbstractMethod):
        raise InputError(
            "MetaLearner: method must be Adjoint(), Unrolled(steps=K), FirstOrder(), Implicit(), "
            f"Reptile() or LinearFlow(); got {method!r}"
        )
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise InputError(f"MetaLearner: optimizer must be an optax GradientTransformation; got {optimizer!r}")
    if not callable(loss):
        raise InputError(f"MetaLearner: loss must be callable loss(pred, y); got {loss!r}")
    if adapt not in ("all", "head"):
        raise InputError(f"MetaLearner: adapt must be 'all' or 'head'; got {adapt!r}")
    if on_nonfinite not in ("raise", "skip-task"):
        raise InputError(f"MetaLearner: on_nonfinite must be 'raise' or 'skip-task'; got {on_nonfinite!r}")
    if task_map not in ("vmap", "map"):
        raise InputError(f"MetaLearner: task_map must be 'vmap' or 'map'; got {task_map!r}")
    if adapt == "head" and not isinstance(model, EmbeddingHead):
        raise InputError("MetaLearner(adapt='head') needs an EmbeddingHead(embedding, head) model.")
    if method.head_only and adapt != "head":
        raise InputError(f"{type(method).__name__} (COMLN) adapts a linear head: use adapt='head' with an "
                         "EmbeddingHead.")
    if not method.adapts_head and adapt == "head":
        raise InputError(f"{type(method).__name__} with adapt='head' is not supported; use adapt='all'.")
    if learn_T not in (False, True, "per-task"):
        raise InputError(f"MetaLearner: learn_T must be False, True or 'per-task'; got {learn_T!r}")
    if learn_T == "per-task" and adapt != "head":
        raise InputError("MetaLearner(learn_T='per-task') reads each task's horizon off its support "
                         "features: use adapt='head' with an EmbeddingHead.")
    if learn_T and "T" not in method.differentiates:
        raise InputError(
            f"learn_T=True needs a method that differentiates T (Adjoint, Unrolled, LinearFlow); "
            f"{type(method).__name__} does not."
        )
    if not callable(apply):
        raise InputError(f"MetaLearner: apply must be callable apply(model, x_set) -> predictions; got {apply!r}")
    if apply is apply_to_set and adapt == "all" and not callable(model):
        raise InputError(
            f"MetaLearner: the model is a {type(model).__name__}, not callable, so the default "
            "apply=ctmeta.models.apply_to_set cannot run it; pass apply=lambda params, x_set: ... "
            "(the predictions of a set of inputs x_set (K, ...) under params)"
        )


_TASK_AXIS = ("takes a batch with a leading task axis: support_x (tasks, K, ...), support_y (tasks, K, ...), "
              "query_x (tasks, Q, ...), query_y (tasks, Q, ...); for one task add the axis with "
              "jax.tree.map(lambda a: a[None], task)")


def check_batch(batch, where: str) -> None:
    """Refuse, with a message that says so, a batch without its leading task axis."""
    names = ("support_x", "support_y", "query_x", "query_y", "query_mask")
    try:
        arrays = tuple(batch)
    except TypeError:
        arrays = ()
    if len(arrays) < 4:
        raise InputError(f"{where} {_TASK_AXIS}; got {type(batch).__name__} with {len(arrays)} arrays")
    shapes = [tuple(jnp.shape(a)) for a in arrays[:5]]
    for name, shape in zip(names, shapes):
        if len(shape) < 2:
            raise InputError(f"{where} {_TASK_AXIS}; got {name} of shape {shape}")
    if len({shape[0] for shape in shapes}) > 1:
        got = ", ".join(f"{n} {sh}" for n, sh in zip(names, shapes))
        raise InputError(f"{where}: the arrays of the batch disagree on the number of tasks (axis 0): {got}; "
                         f"{where} {_TASK_AXIS}")
    for x, y in ((0, 1), (2, 3)) + (((2, 4),) if len(shapes) > 4 else ()):
        if shapes[x][1] != shapes[y][1]:
            raise InputError(
                f"{where}: {names[x]} {shapes[x]} and {names[y]} {shapes[y]} disagree on the number of "
                f"examples (axis 1); {where} {_TASK_AXIS}"
            )


class task_axis_hint:
    """Say, in an `InputError` raised while tracing the per-task work (a
    model refusing its input, a loss refusing its targets), what one task's
    arrays were: the leading axis of the batch is the task axis."""

    def __init__(self, batch, where: str):
        self.batch, self.where = batch, where

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is None or not issubclass(kind, InputError) or getattr(err, "_ctmeta_hinted", False):
            return False
        sx = jnp.shape(tuple(self.batch)[0])
        new = InputError(f"{err} (in {self.where}, which maps over the leading task axis of the batch: "
                         f"support_x {sx} is {sx[0]} tasks of inputs {sx[1:]})")
        new._ctmeta_hinted = True
        raise new from None
