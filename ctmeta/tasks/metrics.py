"""Evaluation metrics shared by the regression-style task families."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .._errors import InputError


def nrmse(pred: jax.Array, y: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Normalised root-mean-square error of each task, `||pred - y|| / ||y||`.

    The norms run over the last two axes, the examples and outputs `(K, O)`
    (the `(K, 1)` targets of a regression `Batch`), so `pred` and `y` of shape
    `(..., K, O)` give an array of shape `(...)`: one value per task. Because
    both norms count the same examples, this equals `RMSE(pred, y) / RMS(y)`.

    `mask`, of shape `(..., K)`, marks the examples that count (the padded
    query sets of `MaskedBatch`); padded rows contribute to neither norm.
    A task whose (masked) targets are all zero has no scale and gives `inf`
    or `nan`.
    """
    pred = jnp.asarray(pred)
    y = jnp.asarray(y)
    if pred.shape != y.shape:
        raise InputError(f"nrmse: pred has shape {pred.shape} but y has shape {y.shape}")
    if y.ndim < 2:
        raise InputError(
            f"nrmse: expected arrays of shape (..., K, O), e.g. (K, 1) per task; got {y.shape}"
        )
    err = jnp.square(pred - y)
    ref = jnp.square(y)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != y.shape[:-1]:
            raise InputError(
                f"nrmse: mask must have shape {y.shape[:-1]} (the examples of y), got {mask.shape}"
            )
        # `where`, not a product, so that non-finite values in padded rows
        # (a model's output on an all-zero input, say) cannot leak in as nan.
        keep = mask[..., None].astype(bool)
        err = jnp.where(keep, err, 0.0)
        ref = jnp.where(keep, ref, 0.0)
    return jnp.sqrt(jnp.sum(err, axis=(-2, -1)) / jnp.sum(ref, axis=(-2, -1)))


def _masked_sums(pred, y, mask, name):
    pred, y = jnp.asarray(pred), jnp.asarray(y)
    if pred.shape != y.shape or y.ndim < 2:
        raise InputError(f"{name}: pred and y must have the same shape (..., K, O); got {pred.shape} and {y.shape}")
    keep = jnp.ones(y.shape[:-1], bool) if mask is None else jnp.asarray(mask).astype(bool)
    if keep.shape != y.shape[:-1]:
        raise InputError(f"{name}: mask must have shape {y.shape[:-1]} (the examples of y), got {keep.shape}")
    keep = jnp.broadcast_to(keep[..., None], y.shape)
    count = jnp.sum(keep, axis=(-2, -1))
    return jnp.where(keep, pred - y, 0.0), jnp.where(keep, y, 0.0), keep, count


def rmse(pred: jax.Array, y: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Root-mean-square error of each task, in the targets' units (ratings: stars).

    Shapes and `mask` as [`nrmse`][]: one value per task, over the kept examples."""
    err, _, _, count = _masked_sums(pred, y, mask, "rmse")
    return jnp.sqrt(jnp.sum(jnp.square(err), axis=(-2, -1)) / count)


@dataclasses.dataclass(frozen=True)
class RelativeSquaredError:
    r"""$\|e\|^2 / \|y - m\|^2$ of each task, `m` a fixed reference rating (the
    meta-training users' mean): 1 for predicting `m` everywhere, 0 for a perfect
    prediction. A fixed `m` (not each task's own mean) keeps it finite for a
    task whose query ratings are all equal. Shapes and `mask` as [`nrmse`][];
    hashable, so it can be passed to a jitted evaluation."""

    mean: float
    __name__ = "relative_squared_error"

    def __call__(self, pred, y, mask=None):
        err, y0, keep, _ = _masked_sums(pred, y, mask, "relative_squared_error")
        dev = jnp.where(keep, y0 - self.mean, 0.0)
        return jnp.sum(jnp.square(err), axis=(-2, -1)) / jnp.sum(jnp.square(dev), axis=(-2, -1))
