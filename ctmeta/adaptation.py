r"""Inner-loop adaptation of a whole model by its gradient flow (or another inner flow).

`gradient_flow(loss_fn, params, data, T, method=..., flow=...)` adapts any
parameter pytree (an equinox module, a flax params dict, a plain dict) on a
task's training loss and returns the adapted pytree; `jax.grad` through it
gives the meta-gradient of the chosen rule (see `ctmeta.methods`), in the
flow's meta-parameters too (see `ctmeta.flows`).

[`loss_along_flow`][] looks inside the inner loop: the support (and query)
loss at given times of the flow, read off the dense output of the one
forward solve that adapts.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from . import ode
from ._eager import is_traced, raise_if_failed_now, solve_errors_as_numerical
from ._errors import InputError
from ._internal import dense_forward
from .flows import AbstractFlow, Gradient, check_flow
from .methods import AbstractMethod, Adjoint

PyTree = Any

__all__ = ["gradient_flow", "loss_along_flow", "LossAlongFlow"]


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
    flow: AbstractFlow | None = None,
    throw: bool = True,
) -> PyTree:
    r"""Adapt `params` by the gradient flow $\dot u = -\nabla_u L(u, \text{data})$ (or `flow`) for time `T`.

    **Arguments:**

    - `loss_fn`: `loss_fn(params, data) -> scalar`, the task's training loss.
    - `params`: the initialisation $\theta$, any pytree; its floating-point
      arrays adapt, everything else (activations, integer buffers) is kept.
    - `data`: the task's training data, any pytree (differentiated where it
      holds floats, e.g. features from a learned embedding).
    - `T`: the horizon, a positive scalar; may be traced and learned, or
      differ between the tasks of a `vmap`-ed meta-batch (early stopping).
    - `method`: the meta-gradient rule ([`Adjoint`][] by default).
    - `flow`: the inner flow (`ctmeta.flows`): `None` or
      [`Gradient`][ctmeta.flows.Gradient]`()` (the gradient flow, default),
      [`Preconditioned`][ctmeta.flows.Preconditioned] or
      [`HeavyBall`][ctmeta.flows.HeavyBall]. Its arrays are differentiated
      like `params` (their meta-gradient) by [`Adjoint`][] and
      [`Unrolled`][]; [`Implicit`][], [`Reptile`][] refuse a flow other
      than the gradient flow. Cast to the parameters' dtype.
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

    **Raises:** `InputError` for bad arguments, and when `jax.grad` asks a rule
    for a derivative it does not give (`T` through [`FirstOrder`][],
    [`Reptile`][], [`Implicit`][]: see their `differentiates`). With
    `throw=True`, a failed inner solve raises `NumericalError` when called
    eagerly (`jax.grad` without `jit` included); under the caller's `jit` the
    same check raises JAX's runtime error with the same message when the
    compiled function runs.
    """
    if not isinstance(method, AbstractMethod) or method.head_only:
        raise InputError(
            f"gradient_flow: method must be Adjoint(), Unrolled(steps=K), FirstOrder(), Implicit() or Reptile(); got {method!r}."
        )
    flow = method.check_flow(check_flow(flow, "gradient_flow"))
    diff, static, T, diff_loss = _prepare("gradient_flow", loss_fn, params, data, T)
    # The default flow takes the rules' own path (no `flow` argument): the results are those of before flows.
    extra = {} if flow.is_gradient else {"flow": flow.astype(jnp.result_type(T))}
    if throw and not is_traced(diff, data, T, extra):  # eager: check the status here, no failing callback
        with solve_errors_as_numerical("gradient_flow"):  # a rule of the user's that throws itself
            adapted, status = jax.block_until_ready(method.adapt_with_status(diff_loss, diff, data, T, **extra))
            if is_traced(status):  # the loss closes over a traced array (jax.grad of its constant, no jit)
                adapted = ode.raise_if_failed(adapted, status, getattr(method, "max_steps", None), "gradient_flow")
                return eqx.combine(adapted, static)
        raise_if_failed_now(status, "gradient_flow", method)
        return eqx.combine(adapted, static)
    if throw:
        with solve_errors_as_numerical("gradient_flow"):
            adapted = method.adapt(diff_loss, diff, data, T, **extra)
            if not is_traced(adapted):
                jax.block_until_ready(adapted)
        return eqx.combine(adapted, static)
    adapted, status = method.adapt_with_status(diff_loss, diff, data, T, **extra)
    return eqx.combine(adapted, static), status


def _prepare(where, loss_fn, params, data, T):
    """The arrays of `params`, the rest, `T` as a scalar array of their dtype, and the loss of the arrays."""
    diff, static = eqx.partition(params, eqx.is_inexact_array)
    if not jax.tree.leaves(diff):
        raise InputError(f"{where}: params has no floating-point arrays to adapt.")
    ode.check_horizon(T, "T")
    T = jnp.asarray(T, dtype=jnp.result_type(*jax.tree.leaves(diff), float))
    if T.ndim != 0:
        raise InputError(f"{where}: T must be a scalar, got shape {T.shape}; vmap over tasks for one T per task.")
    _check_loss(loss_fn, params, data)

    def diff_loss(u, data_):
        return loss_fn(eqx.combine(u, static), data_)

    return diff, static, T, diff_loss


class LossAlongFlow(NamedTuple):
    """What [`loss_along_flow`][] returns.

    - `ts`: the times, `(n,)`.
    - `support`: the training loss $L(u(t))$ at each time, `(n,)`.
    - `query`: the query loss at each time, `(n,)`, or `None`.
    - `adapted`: $u(T)$, as [`gradient_flow`][] with [`Adjoint`][] returns it.
    - `status`: the forward solve's int32 `ctmeta.ode.SolveStatus` code.
    """

    ts: jax.Array
    support: jax.Array
    query: jax.Array | None
    adapted: PyTree
    status: jax.Array


def loss_along_flow(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    data: PyTree,
    T,
    ts,
    *,
    flow: AbstractFlow | None = None,
    query_data: PyTree = None,
    query_loss_fn: Callable[[PyTree, PyTree], jax.Array] | None = None,
    method: Adjoint = Adjoint(),
    throw: bool = True,
) -> LossAlongFlow:
    r"""The support loss (and the query loss) at times `ts` along the inner flow, from one forward solve.

    The flow is solved from $0$ to $T$ by [`Adjoint`][]'s forward (Dopri5
    with `method`'s `rtol`, `atol`, `max_steps`), which records its accepted
    steps; $u(t)$ at each time of `ts` is read off that dense output
    (Dopri5's 4th-order continuous extension, as
    [`AdaptiveAdjoint`][ctmeta.ode.AdaptiveAdjoint]'s backward reads it) and
    the losses are taken there: no other ODE solve. Times outside $[0, T]$
    are clamped to it.

    **Arguments:**

    - `loss_fn`, `params`, `data`, `T`, `flow`: as for [`gradient_flow`][].
    - `ts`: the times, a 1-d array (traced or not).
    - `query_data`: the query set; with it, `query` holds
      `query_loss_fn(u(t), query_data)` (default `query_loss_fn`: `loss_fn`).
    - `method`: an [`Adjoint`][] whose forward settings are used (its
      `dense_steps` bounds the accepted steps: a longer flow fails with
      `DENSE_OVERFLOW`).
    - `throw`: `True` raises on a failed forward solve (`NumericalError`
      when called eagerly, as [`gradient_flow`][]); `False` returns NaN
      losses and the status.

    Not differentiable by the adjoint (it is a diagnostic): use
    [`gradient_flow`][] for meta-gradients.
    """
    if not isinstance(method, Adjoint) or method.solver != "dopri5":
        raise InputError("loss_along_flow: method must be an Adjoint with solver='dopri5' (its forward solve's "
                         f"dense output is read); got {method!r}.")
    if throw and not is_traced(params, data, T, ts, flow, query_data):
        # Eager: check the status here (a `NumericalError`), no failing callback (see `ctmeta._eager`).
        with solve_errors_as_numerical("loss_along_flow"):
            out = jax.block_until_ready(loss_along_flow(loss_fn, params, data, T, ts, flow=flow, query_data=query_data,
                                                        query_loss_fn=query_loss_fn, method=method, throw=False))
            if is_traced(out.status):  # the loss closes over a traced array: the status is checked in-graph
                return out._replace(support=ode.raise_if_failed(out.support, out.status, method.max_steps,
                                                                "loss_along_flow"))
        raise_if_failed_now(out.status, "loss_along_flow", method)
        return out
    flow = check_flow(flow, "loss_along_flow")
    diff, static, T, diff_loss = _prepare("loss_along_flow", loss_fn, params, data, T)
    flow = flow.astype(jnp.result_type(T))
    ts = jnp.asarray(ts, dtype=jnp.result_type(T))
    if ts.ndim != 1:
        raise InputError(f"loss_along_flow: ts must be a 1-d array of times; got shape {ts.shape}.")
    field = flow.field(diff_loss)
    options = ode.SolveOptions(steps=1, rtol=method.rtol, atol=method.atol, max_steps=method.max_steps,
                               solver="dopri5", throw=throw)
    y_start = flow.init_state(diff)
    dense_steps = ode.AdaptiveAdjoint(method.dense_steps).sized_for(y_start, method.max_steps).dense_steps
    y_end, dense, status, _ = dense_forward(field, y_start, T, data, options, dense_steps,
                                            midpoints=True)
    states = jax.vmap(dense.evaluate)(jnp.clip(ts, 0, T))
    us = jax.vmap(flow.params_of)(states)
    support = jax.vmap(lambda u: diff_loss(u, data))(us)
    query = None
    if query_data is not None:
        q_loss = loss_fn if query_loss_fn is None else query_loss_fn
        query = jax.vmap(lambda u: q_loss(eqx.combine(u, static), query_data))(us)
    adapted = flow.params_of(y_end)
    if throw:
        adapted = ode.raise_if_failed(adapted, status, method.max_steps, "loss_along_flow",
                                      dense_steps=dense_steps)
    else:
        adapted = ode.nan_if_failed(adapted, status)
        support = ode.nan_if_failed(support, status)
        query = None if query is None else ode.nan_if_failed(query, status)
    return LossAlongFlow(ts, support, query, eqx.combine(adapted, static), status)
