r"""Inner-loop adaptation of a whole model by its gradient flow.

`gradient_flow(loss_fn, params, data, T, method=...)` adapts any parameter
pytree (an equinox module, a flax params dict, a plain dict) on a task's
training loss and returns the adapted pytree; `jax.grad` through it gives the
meta-gradient of the chosen rule (see `ctmeta.methods`).
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from . import ode
from ._errors import InputError
from .methods import AbstractMethod, Adjoint

PyTree = Any

__all__ = ["gradient_flow"]


def _check_loss(loss_fn, params, data):
    try:
        out = eqx.filter_eval_shape(loss_fn, params, data)
    except InputError:
        raise
    except Exception as err:  # the user's loss failing to trace on these inputs
        raise InputError(
            f"gradient_flow: loss_fn(params, data) fails on the given params and data: "
            f"{type(err).__name__}: {err}"
        ) from err
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        shape = getattr(out, "shape", type(out).__name__)
        raise InputError(
            f"gradient_flow: loss_fn must return a scalar float loss; it returned {shape}. "
            "Average or sum over examples inside loss_fn."
        )


def gradient_flow(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    data: PyTree,
    T,
    *,
    method: AbstractMethod = Adjoint(),
    throw: bool = True,
) -> PyTree:
    r"""Adapt `params` by the gradient flow $\dot u = -\nabla_u L(u, \text{data})$ for time `T`.

    **Arguments:**

    - `loss_fn`: `loss_fn(params, data) -> scalar`, the task's training loss.
    - `params`: the initialisation $\theta$, any pytree; its floating-point
      arrays adapt, everything else (activations, integer buffers) is kept.
    - `data`: the task's training data, any pytree (differentiated where it
      holds floats, e.g. features from a learned embedding).
    - `T`: the horizon, a positive scalar; may be traced and learned, or
      differ between the tasks of a `vmap`-ed meta-batch (early stopping).
    - `method`: the meta-gradient rule ([`Adjoint`][] by default).
    - `throw`: what a failed inner solve (step budget `max_steps` exhausted,
      non-finite state) does. `True` (default): raise at run time, inside
      `jit` too; under `vmap` that stops every task. `False`: return NaN for
      the failed task's $u(T)$ and its derivatives, and a status (see below),
      so that a meta-batch can skip or name that task alone. [`Adjoint`][]'s
      stability check of its backward sweep reports the same way when
      differentiated (`UNSTABLE_ADJOINT`: NaN derivatives, $u(T)$ kept).

    **Returns:** the adapted parameters $u(T)$, with the structure of `params`;
    with `throw=False`, the pair `(u(T), status)`, `status` an int32
    `ctmeta.ode.SolveStatus` code (always `SUCCESS` for rules without a solve).
    """
    if not isinstance(method, AbstractMethod) or method.head_only:
        raise InputError(
            f"gradient_flow: method must be Adjoint(), Unrolled(), FirstOrder(), Implicit() or Reptile(); got {method!r}."
        )
    diff, static = eqx.partition(params, eqx.is_inexact_array)
    if not jax.tree.leaves(diff):
        raise InputError("gradient_flow: params has no floating-point arrays to adapt.")
    ode.check_horizon(T, "T")
    T = jnp.asarray(T, dtype=jnp.result_type(*jax.tree.leaves(diff), float))
    if T.ndim != 0:
        raise InputError(f"gradient_flow: T must be a scalar, got shape {T.shape}; vmap over tasks for one T per task.")
    _check_loss(loss_fn, params, data)

    def diff_loss(u, data_):
        return loss_fn(eqx.combine(u, static), data_)

    if throw:
        return eqx.combine(method.adapt(diff_loss, diff, data, T), static)
    adapted, status = method.adapt_with_status(diff_loss, diff, data, T)
    return eqx.combine(adapted, static), status
