"""Evaluation metrics shared by the regression-style task families."""

from __future__ import annotations

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
