r"""Differentiable ODE solves with a choice of sensitivity rule.

`solve(vector_field, y0, t1, args)` integrates

$$\frac{dy}{dt} = f(t, y, \text{args}), \qquad y(0) = y_0,$$

on $[0, t_1]$ and returns $y(t_1)$, differentiable with `jax.grad` in `y0`,
`args`, `t1` and any array the vector field closes over. How the derivative is
computed is the *sensitivity rule*:

- [`StoredAdjoint`][] (default; A-MAML, Sec. 3.2): forward with an adaptive
  Runge-Kutta solver (Dopri5) whose dense output stores the state on a uniform
  grid of `steps` intervals, $h = t_1 / \text{steps}$; backward, the adjoint ODE
  for $J = g(y(t_1))$,

  $$a(t_1) = \frac{\partial g}{\partial y(t_1)}, \qquad
    \frac{da}{dt} = -\Big(\frac{\partial f}{\partial y}\Big)^\top a,$$

  is solved over the stored states by modified Euler (Heun, $O(h^2)$) or Euler
  ($O(h)$), accumulating

  $$\frac{dJ}{dy_0} = a(0), \quad
    \frac{dJ}{d\,\text{args}} = \int_0^{t_1} \Big(\frac{\partial f}{\partial \text{args}}\Big)^\top a\,dt,
    \quad \frac{dJ}{dt_1} = a(t_1) \cdot f(t_1, y(t_1)).$$

  Memory is the `steps + 1` stored states, with no graph over the trajectory.
  With `checkpoints=C` only `C + 1` states are kept and each segment is
  re-integrated during the backward pass.
- [`AdaptiveAdjoint`][] (what `ctmeta.Adjoint()` uses): the forward records
  its accepted steps (state, derivative and mid-step state: Dopri5's own
  4th-order dense output), and the same adjoint ODE is solved backward by an
  adaptive Dopri5 that reads $y(t)$ from that interpolant. No grid, no
  stability bound on $h\,\lambda_{\max}$, a cost that follows the steps the
  flow needs; memory is the `dense_steps` slots of the dense output.
- [`Backprop`][]: exact reverse-mode differentiation through the solver's
  operations (diffrax's `RecursiveCheckpointAdjoint`). The reference rule.
- [`Backsolve`][]: the continuous adjoint of Chen et al. that re-integrates
  $y$ backward in time together with $a$ (diffrax's `BacksolveAdjoint`). Cheap
  in memory, but unstable for gradient flows (COMLN Sec. 3.2): included for
  comparison, not for use.

**Stiff gradient flows.** `solver="rkc2"` (with [`AdaptiveAdjoint`][], as
`ctmeta.Adjoint(solver="rkc2")` does) solves the forward and the adjoint by
adaptive Runge-Kutta-Chebyshev ([`rkc2_step`][]): a step of $s$ stages is
stable for $h\rho \le \beta(s) \approx 0.65\,s^2$ ([`stability_interval`][]),
$\rho$ the spectral radius of the Jacobian, estimated by power iteration on
Hessian-vector products. Dopri5's step is bounded by $h\rho < 3.3$ whatever
its tolerance, so when meta-training sharpens the loss its cost grows like
$\rho$; RKC2's like $\sqrt{\rho}$. Valid for fields with a symmetric
Jacobian only (`symmetric_jacobian`; a gradient flow, a preconditioned one);
others are refused in one line. It is second order, so at tight tolerances
on a flow that is not stiff Dopri5 stays cheaper (docs/bench.md, "Stiff
flows"). `error_scale="displacement"` measures the forward's error relative
to $y - y_0$ instead of $y$.

Vector fields with structure can say how to apply their transposed Jacobian
(see [`AbstractVectorField`][]): a gradient flow does it with one
Hessian-vector product, forward-over-reverse.

**Failures.** A forward solve fails when it exhausts its step budget
`max_steps` before $t_1$ or ends with a non-finite state. By default
(`throw=True`) `solve` then raises at run time, inside `jit` too. Under `vmap`
that error stops the whole batch and cannot say which element failed, so
with `throw=False` a failed solve instead returns NaN for $y(t_1)$ and for
every derivative through it, together with a [`SolveStatus`][] code per
element saying why. A meta-learner uses that mode to skip or name the one
task of a meta-batch whose inner solve failed.

A solve differentiated by [`StoredAdjoint`][] can also fail in its backward
sweep: for a vector field with a symmetric Jacobian (a gradient flow, where
it is $-H$), the fixed-step sweep is stable only while
$h\,\lambda_{\max}(H) < c$ ($c = 2$ for Euler and Heun, $2.785$ for RK4),
and beyond that its gradient is wrong, finite or not. By default the custom
VJP's forward rule estimates $\lambda_{\max}$ at the first, middle and last
stored states (Lanczos, 30 Hessian-vector products) and, above $0.95\,c$,
ends the solve with status `UNSTABLE_ADJOINT`: `throw=True` raises when the
gradient is taken, `throw=False` keeps $y(t_1)$ and makes its derivatives
NaN. A solve that is not differentiated runs no check and never ends so.
`StoredAdjoint(stability_check=False)` turns the check off.

**Layout.** One concept a module: `_fields` (vector fields and their
transposed Jacobians), `_status` (how a solve ended), `_solvers` (forward
solvers, [`SolveOptions`][], the [`AbstractSensitivity`][] contract,
[`Backprop`][], [`Backsolve`][]), `_stored` ([`StoredAdjoint`][]: grid,
curvature check, backward sweep), `_rkc` (the RKC2 step, its stage rule and
adaptive loop), `_adaptive` ([`AdaptiveAdjoint`][]: dense output and
adaptive backward, by Dopri5 or RKC2); this file holds [`solve`][], the entry point.
Everything public is imported here: use `ctmeta.ode.X`.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import InputError
from ._adaptive import AdaptiveAdjoint, DenseOutput, adjoint_backward
from ._fields import (AbstractVectorField, VectorField, closure_convert, cotangent_like, differentiable,
                      literals_as_arrays)
from ._rkc import rkc2_step, stability_interval, stages_for
from ._solvers import (ERROR_SCALES, FIXED_STEP_SOLVERS, RK4, SOLVERS, STABILIZED_SOLVERS, AbstractSensitivity,
                       Backprop, Backsolve, SolveOptions, effective_rtol)
from ._spectrum import curvature_range, max_curvature
from ._status import SolveStatus, nan_if_failed, nan_if_forward_failed, raise_if_failed, solve_status
from ._stored import StoredAdjoint, adjoint_sweep, max_curvature_on_grid

PyTree = Any

__all__ = [
    "AbstractVectorField",
    "VectorField",
    "AbstractSensitivity",
    "AdaptiveAdjoint",
    "StoredAdjoint",
    "Backprop",
    "Backsolve",
    "SolveOptions",
    "SolveStatus",
    "curvature_range",
    "max_curvature",
    "solve",
    "SOLVERS",
    "rkc2_step",
    "stability_interval",
    "stages_for",
    "solve_status",
    # The pieces other rules are built from (ctmeta.methods, ctmeta.linear_flow).
    "RK4",
    "DenseOutput",
    "adjoint_backward",
    "adjoint_sweep",
    "check_horizon",
    "closure_convert",
    "cotangent_like",
    "differentiable",
    "effective_rtol",
    "literals_as_arrays",
    "nan_if_failed",
]


def _check_structure(field, y0, args):
    """`f(0, y0, args)` must be a pytree of the same structure and shapes as `y0`."""
    try:
        out = jax.eval_shape(lambda: field(0.0, y0, args))
    except Exception as err:  # a user's vector field failing to trace
        raise InputError(f"ctmeta.ode.solve: the vector field fails on (t=0, y0, args): {err}") from err
    y_struct = jax.tree.structure(y0)
    if jax.tree.structure(out) != y_struct:
        raise InputError(
            "ctmeta.ode.solve: the vector field must return a pytree with the structure "
            f"of y0; got {jax.tree.structure(out)} for y0 of structure {y_struct}."
        )
    for yo, fo in zip(jax.tree.leaves(y0), jax.tree.leaves(out)):
        if jnp.shape(yo) != fo.shape:
            raise InputError(
                f"ctmeta.ode.solve: the vector field returned a leaf of shape {fo.shape} "
                f"for a state leaf of shape {jnp.shape(yo)}; they must match."
            )


def check_horizon(t1, name: str = "t1"):
    """Eager check of a horizon when its value is known (not under `jit`)."""
    try:
        value = np.asarray(t1)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced: checked at run time instead
    if not np.issubdtype(value.dtype, np.number) or not np.all(np.isfinite(value)) or np.any(value <= 0):
        raise InputError(
            f"{name} must be a positive, finite time horizon; got {value!r}. "
            f"(A learned horizon is usually parametrised as exp(log_{name}).)"
        )


def solve(
    vector_field: Callable | AbstractVectorField,
    y0: PyTree,
    t1,
    args: PyTree = None,
    *,
    steps: int = 100,
    sensitivity: AbstractSensitivity = StoredAdjoint(),
    rtol: float = 1e-6,
    atol: float = 1e-8,
    max_steps: int = 16384,
    solver: Literal["dopri5", "tsit5", "rkc2", "euler", "heun", "rk4"] = "dopri5",
    throw: bool = True,
    error_scale: Literal["state", "displacement"] = "state",
) -> PyTree:
    r"""Solve $dy/dt = f(t, y, \text{args})$ on $[0, t_1]$ and return $y(t_1)$.

    **Arguments:**

    - `vector_field`: `f(t, y, args) -> dy/dt` (diffrax's convention), or an
      [`AbstractVectorField`][].
    - `y0`: initial state, any pytree of arrays.
    - `t1`: the horizon, a positive scalar; may be traced and differentiated.
    - `args`: any pytree passed to `f`; differentiated where it holds floats.
    - `steps`: number of intervals of the stored grid ($h = t_1/\text{steps}$)
      for [`StoredAdjoint`][]; the number of steps of a fixed-step `solver`.
    - `sensitivity`: the rule for derivatives ([`StoredAdjoint`][] by default).
    - `rtol`, `atol`: tolerances of the adaptive forward solver. `rtol` is
      raised to at least `1e-5` for a float32 state (`1e-2` float16, `1e-1`
      bfloat16): below that the solver's error estimate measures rounding
      and its step collapses (see `effective_rtol`).
    - `max_steps`: the forward solver's step budget.
    - `solver`: `"dopri5"` (default), `"tsit5"`, `"rkc2"` (adaptive
      Runge-Kutta-Chebyshev for stiff fields with a symmetric Jacobian, e.g.
      a gradient flow; with [`AdaptiveAdjoint`][] only, see `_rkc`), or the
      fixed-step `"euler"`, `"heun"`, `"rk4"` ([`RK4`][]), which take `steps`
      steps of $t_1/\text{steps}$.
    - `throw`: what a failed forward solve (`max_steps` exhausted, or a
      non-finite state) does. `True` (default): raise at run time, inside
      `jit` too, naming the cause; under `vmap` one failing element stops the
      whole batch. `False`: return `(y(t1), status)` instead, where `y(t1)`
      and every derivative through it are NaN for the failed solves and
      `status` is an int32 [`SolveStatus`][] code (one per element under
      `vmap`); nothing raises, so each element can be handled on its own.
      When differentiated by [`StoredAdjoint`][], an unstable backward sweep
      is reported the same way (`UNSTABLE_ADJOINT`), except that $y(t_1)$
      keeps its value and only its derivatives are NaN.

    - `error_scale`: `"state"` (default): the tolerances are relative to
      $|y|$; `"displacement"`: relative to $|y - y_0|$, what a meta-gradient
      depends on when the flow moves $y$ little ([`AdaptiveAdjoint`][] only).

    **Returns:** $y(t_1)$, with the structure of `y0`; with `throw=False`,
    the pair `(y(t1), status)`.
    """
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"ctmeta.ode.solve: steps must be a positive int; got {steps!r}.")
    if not isinstance(sensitivity, AbstractSensitivity):
        raise InputError(
            "ctmeta.ode.solve: sensitivity must be StoredAdjoint(), Backprop() or Backsolve(); "
            f"got {sensitivity!r}."
        )
    if solver not in SOLVERS:
        raise InputError(f"ctmeta.ode.solve: unknown solver {solver!r}; use {', '.join(SOLVERS)}.")
    if error_scale not in ERROR_SCALES:
        raise InputError(f"ctmeta.ode.solve: error_scale must be 'state' or 'displacement'; got {error_scale!r}.")
    if (solver in STABILIZED_SOLVERS or error_scale != "state") and not isinstance(sensitivity, AdaptiveAdjoint):
        what = f"solver={solver!r}" if solver in STABILIZED_SOLVERS else f"error_scale={error_scale!r}"
        raise InputError(f"ctmeta.ode.solve: {what} is implemented by the recorded forward of AdaptiveAdjoint; "
                         f"pass sensitivity=AdaptiveAdjoint() (got {type(sensitivity).__name__}).")
    if not jax.tree.leaves(y0) or not all(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in jax.tree.leaves(y0)):
        raise InputError("ctmeta.ode.solve: y0 must be a non-empty pytree of floating-point arrays.")
    check_horizon(t1)
    field = vector_field if isinstance(vector_field, AbstractVectorField) else VectorField(vector_field)
    _check_structure(field, y0, args)
    t1 = jnp.asarray(t1, dtype=jnp.result_type(*[x for x in jax.tree.leaves(y0)], float))
    if t1.ndim != 0:
        raise InputError(f"ctmeta.ode.solve: t1 must be a scalar; got shape {t1.shape} (vmap for one per task).")
    field = field.closure_convert(t1, y0, args)
    options = SolveOptions(steps=int(steps), rtol=rtol, atol=atol, max_steps=max_steps, solver=solver,
                           throw=bool(throw), error_scale=error_scale)
    if isinstance(sensitivity, AdaptiveAdjoint):
        sensitivity = sensitivity.sized_for(y0, max_steps)  # so that a failure names its dense_steps
    settings = dict(max_steps=max_steps, steps=int(steps), scheme=getattr(sensitivity, "scheme", None),
                    dense_steps=getattr(sensitivity, "dense_steps", None))
    if throw:
        from .._eager import is_traced, raise_if_failed_now, solve_errors_as_numerical

        if not is_traced(y0, t1, args, field):  # eager, nothing differentiated: check the status on the host
            with solve_errors_as_numerical("ctmeta.ode.solve"):
                y1, status = jax.block_until_ready(
                    sensitivity.solve(field, y0, t1, args, dataclasses.replace(options, throw=False)))
            raise_if_failed_now(status, "ctmeta.ode.solve", types.SimpleNamespace(**settings))
            return y1
        with solve_errors_as_numerical("ctmeta.ode.solve"):  # eager under jax.grad: NumericalError, not a callback's
            y1, status = sensitivity.solve(field, y0, t1, args, options)
            y1 = raise_if_failed(y1, status, settings.pop("max_steps"), **settings)
            if not is_traced(y1):
                jax.block_until_ready(y1)
        return y1
    y1, status = sensitivity.solve(field, y0, t1, args, options)
    return nan_if_forward_failed(y1, status), status
