r"""Per-task losses and metrics.

Each takes one task's predictions and targets, with no task axis:
`pred (K, O)` and `y (K, O)` for regression, `logits (K, ways)` and integer
`labels (K,)` for classification, and an optional `mask (K,)` of the
examples that count (a ratings task's padded queries). A
[`MetaLearner`][] maps them over the tasks of a meta-batch.

| function | what | better |
| --- | --- | --- |
| [`mse`][] | $\frac{1}{K}\sum_k \frac{1}{O}\|\hat y_k - y_k\|^2$ | lower |
| [`cross_entropy`][] | $-\frac{1}{K}\sum_k \log \operatorname{softmax}(z_k)_{y_k}$ | lower |
| [`nrmse_metric`][] | normalised RMSE (`ctmeta.tasks.metrics.nrmse`) | lower |
| [`accuracy`][] | $\frac{1}{K}\sum_k [\arg\max z_k = y_k]$ | higher |

With a mask the means are over the examples whose mask is set.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._errors import InputError

__all__ = ["METRICS", "METRIC_OF_LOSS", "accuracy", "apply_loss", "cross_entropy", "mse", "nrmse_metric", "resolve_metric", "summarize"]


def _masked_mean(values, mask):
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _check_regression_shapes(name: str, pred, y) -> None:
    if jnp.shape(pred) != jnp.shape(y):
        raise InputError(
            f"{name}: the predictions have shape {jnp.shape(pred)} but the targets have shape {jnp.shape(y)} "
            "(one task: (K, outputs) each); give targets of the model's output shape, or a model with as many "
            "outputs as the targets have columns"
        )


def _check_class_shapes(name: str, logits, labels) -> None:
    lshape, yshape = jnp.shape(logits), jnp.shape(labels)
    if len(lshape) < 1 or yshape != lshape[:-1]:
        extra = ""
        if yshape == lshape:
            extra = " (these look like one-hot labels: pass the integer labels, jnp.argmax(onehot, axis=-1))"
        raise InputError(
            f"{name}: the logits have shape {lshape} but the labels have shape {yshape}; one task takes logits "
            f"(K, ways) and integer labels (K,){extra}"
        )


def mse(pred: jax.Array, y: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    r"""Mean squared error of one task, $\frac{1}{K}\sum_k \frac{1}{O}\|\hat y_k - y_k\|^2$.

    **Arguments:**

    - `pred`, `y`: `(K, O)` each, the same shape (no broadcasting).
    - `mask`: optional `(K,)`, the examples that count.

    **Returns:** a scalar.
    """
    _check_regression_shapes("mse", pred, y)
    err = jnp.mean(jnp.square(pred - y), axis=-1)
    if mask is not None:
        err = jnp.where(mask, err, 0.0)
    return _masked_mean(err, mask)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    r"""Mean softmax cross-entropy of one task, $-\frac{1}{K}\sum_k \log \operatorname{softmax}(z_k)_{y_k}$.

    **Arguments:**

    - `logits`: `(K, ways)`.
    - `labels`: integer `(K,)`.
    - `mask`: optional `(K,)`, the examples that count.

    **Returns:** a scalar.
    """
    _check_class_shapes("cross_entropy", logits, labels)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
    return _masked_mean(ce, mask)


def nrmse_metric(pred: jax.Array, y: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Normalised RMSE of one task (`ctmeta.tasks.metrics.nrmse`), lower is better."""
    from .tasks.metrics import nrmse

    return nrmse(pred, y, mask)


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    r"""Fraction of correctly classified examples of one task, $\frac{1}{K}\sum_k [\arg\max z_k = y_k]$;
    higher is better."""
    _check_class_shapes("accuracy", logits, labels)
    hit = (jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype)
    return _masked_mean(hit, mask)


def apply_loss(fn: Callable, pred, y, mask=None) -> jax.Array:
    """`fn(pred, y)`, or `fn(pred, y, mask)` given a mask: a loss or metric of
    the user's own needs the mask argument only for masked batches."""
    return fn(pred, y) if mask is None else fn(pred, y, mask)


#: The metrics `MetaLearner(metric=...)` knows by name ("loss": the learner's own loss).
METRICS = {"nrmse": nrmse_metric, "accuracy": accuracy}
#: The metric that goes with each of ctmeta's losses.
METRIC_OF_LOSS = {mse: "nrmse", cross_entropy: "accuracy"}


def resolve_metric(metric, loss) -> tuple[Callable | None, str]:
    """The metric a [`MetaLearner`][] built with `metric` and `loss` scores
    with (see its `metric` argument).

    **Returns:** `(metric function, name)`; `(None, "inferred")` when
    `evaluate` infers it from the targets (a loss of the user's own, with
    no metric given: a `UserWarning` says so).
    """
    if metric is None:
        name = METRIC_OF_LOSS.get(loss)
        if name is not None:
            return METRICS[name], name
        import warnings

        loss_name = getattr(loss, "__name__", type(loss).__name__)
        warnings.warn(
            f"MetaLearner: no metric given for the loss {loss_name}; evaluate() will score accuracy when "
            "the query targets are integer labels and nRMSE when they are floating-point: pass "
            "metric='accuracy', 'nrmse', 'loss' or metric(pred, y, mask=None) to choose",
            UserWarning,
            stacklevel=3,
        )
        return None, "inferred"
    if isinstance(metric, str):
        if metric == "loss":
            return loss, "loss"
        if metric not in METRICS:
            raise InputError(
                f"MetaLearner: unknown metric {metric!r}; use 'nrmse', 'accuracy', 'loss' or a function "
                "metric(pred, y, mask=None)"
            )
        return METRICS[metric], metric
    if not callable(metric):
        raise InputError(f"MetaLearner: metric must be a name or a function metric(pred, y, mask=None); "
                         f"got {metric!r}")
    return metric, getattr(metric, "__name__", type(metric).__name__)


def summarize(values) -> tuple[float, float]:
    r"""Mean and half-width of the normal 95% confidence interval over tasks.

    **Returns:** $(\bar v, 1.96\, s / \sqrt{n})$, $s$ the sample standard
    deviation of the $n$ values (NaN for the half-width when $n = 1$).
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    mean = float(np.mean(values))
    half = float(1.96 * np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, half
