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
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from typing import Any, Callable, ClassVar, Literal

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from ._errors import InputError

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
    "max_curvature",
    "solve",
    "solve_status",
]


# --------------------------------------------------------------------------- #
# Vector fields
# --------------------------------------------------------------------------- #


class AbstractVectorField(eqx.Module):
    r"""A vector field $f(t, y, \text{args})$ that knows its transposed Jacobian.

    Subclasses implement `__call__` and may override `vjp` when the structure
    of $f$ allows something cheaper than reverse-mode through `__call__`.
    Every array leaf of the vector field itself (e.g. closed-over constants) is
    a parameter of the ODE, differentiated like `args`.

    A subclass whose Jacobian $\partial f/\partial y$ is symmetric at every
    state (a gradient flow $f = -\nabla L$: $-H$) sets the class attribute
    `symmetric_jacobian = True`; [`StoredAdjoint`][] then checks the
    stability of its backward sweep (see there). False by default: for a
    non-normal Jacobian the estimate it uses says nothing reliable.
    """

    symmetric_jacobian: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, t, y: PyTree, args: PyTree) -> PyTree:
        """Evaluate $f(t, y, \\text{args})$; same structure as `y`."""

    def vjp(self, t, y: PyTree, args: PyTree, a: PyTree, wrt: PyTree = None):
        r"""Return $\big((\partial f/\partial y)^\top a,\ (\partial f/\partial \text{args})^\top a,\
        (\partial f/\partial \text{self})^\top a\big)$.

        `wrt`, a pytree of bools over `(args, self)` (a prefix is enough),
        restricts the last two to the leaves being differentiated; the others
        and every leaf that is not a floating-point array get `None`.
        """
        spec = differentiable((y, args, self), (True,) + (wrt if wrt is not None else (True, True)))
        diff, nondiff = eqx.partition((y, args, self), spec)
        _, pullback = jax.vjp(lambda d: _call_field(eqx.combine(d, nondiff), t), diff)
        return pullback(a)[0]

    def closure_convert(self, t, y, args) -> "AbstractVectorField":
        """Hoist arrays that user callables close over into pytree leaves.

        Needed so that `jax.custom_vjp` sees (and differentiates) them.
        """
        return self


def closure_convert(fn: Callable, *example_args) -> Callable:
    """`eqx.filter_closure_convert`, with hoisted scalar literals made arrays.

    JAX hands a Python float given to `jax.grad` to a closure as a typed
    scalar literal, which is not an array and so would not be differentiated
    through `jax.custom_vjp`; make every hoisted constant an array.
    """
    return literals_as_arrays(eqx.filter_closure_convert(fn, *example_args))


def literals_as_arrays(tree):
    """Make JAX's typed scalar literals (float subclasses) arrays, so filters see them.

    Inside a custom-VJP rule, JAX may pass a weakly typed scalar primal as such
    a literal; `eqx.is_inexact_array` would then skip its cotangent.
    """
    is_literal = lambda x: isinstance(x, (int, float, complex)) and type(x) not in (int, float, complex, bool)
    return jax.tree.map(lambda x: jnp.asarray(x) if is_literal(x) else x, tree)


def _call_field(triple, t):
    y, args, field = triple
    return field(t, y, args)


def differentiable(tree: PyTree, wrt: PyTree) -> PyTree:
    """Boolean filter spec: floating-point arrays of `tree` where the prefix `wrt` is True."""

    def leaf_spec(w, sub):
        return jax.tree.map(lambda x: bool(w) and eqx.is_inexact_array(x), sub)

    return jax.tree.map(leaf_spec, wrt, tree, is_leaf=lambda w: isinstance(w, bool))


class VectorField(AbstractVectorField):
    """Wrap a plain callable `fn(t, y, args)` as a vector field."""

    fn: Callable

    def __call__(self, t, y, args):
        return self.fn(t, y, args)

    def closure_convert(self, t, y, args):
        return VectorField(closure_convert(self.fn, t, y, args))


# --------------------------------------------------------------------------- #
# How a solve ended
# --------------------------------------------------------------------------- #


class SolveStatus(enum.IntEnum):
    r"""How a forward solve ended: the int32 codes `solve(..., throw=False)` returns.

    - `SUCCESS` (0): it reached $t_1$ with finite states.
    - `MAX_STEPS` (1): it used its whole step budget `max_steps` before $t_1$.
      A stiff flow does this; so does a diverging one under an adaptive
      solver, which rejects non-finite steps and shrinks the step until the
      budget runs out.
    - `NONFINITE` (2): it reached $t_1$ but a stored or final state is NaN or
      infinite (a fixed-step solver on a diverging flow; non-finite inputs).
    - `FAILED` (3): any other failure the solver reports.
    - `DENSE_OVERFLOW` (5): the forward solve of [`AdaptiveAdjoint`][]
      accepted as many steps as its dense output holds (`dense_steps`)
      before $t_1$; raise `dense_steps` (memory: three states a step).
    - `UNSTABLE_ADJOINT` (4): the forward solve succeeded, but the backward
      adjoint sweep of [`StoredAdjoint`][] over its stored states would be
      unstable, $h\,\lambda_{\max} > 0.95\,c$ (see there), so its
      meta-gradient would be wrong (finite, or overflowing). Only a solve
      being differentiated can end so (the check runs in the custom VJP's
      forward rule): its value $y(t_1)$ is kept, its derivatives are NaN.
    """

    SUCCESS = 0
    MAX_STEPS = 1
    NONFINITE = 2
    FAILED = 3
    UNSTABLE_ADJOINT = 4
    DENSE_OVERFLOW = 5

    def describe(self, max_steps: int | None = None, *, steps: int | None = None, scheme: str | None = None,
                 dense_steps: int | None = None) -> str:
        r"""What went wrong, as the end of a sentence ("the inner solve ...").

        `max_steps` names the forward step budget; `steps` (the stored grid's
        intervals, $h = t_1/\text{steps}$) and `scheme` (of the backward sweep)
        make the text of `UNSTABLE_ADJOINT` say what to change.
        """
        budget = f" (max_steps={max_steps})" if max_steps is not None else " (max_steps)"
        return {
            SolveStatus.SUCCESS: "succeeded",
            SolveStatus.MAX_STEPS: f"exhausted its step budget{budget} before reaching the horizon",
            SolveStatus.NONFINITE: "produced a non-finite state (NaN or inf)",
            SolveStatus.FAILED: "failed (the solver stopped before reaching the horizon)",
            SolveStatus.UNSTABLE_ADJOINT: _describe_unstable(steps, scheme),
            SolveStatus.DENSE_OVERFLOW: "filled its dense output"
            + (f" (dense_steps={dense_steps} accepted steps)" if dense_steps is not None else " (dense_steps)")
            + " before reaching the horizon",
        }[self]


def _describe_unstable(steps, scheme) -> str:
    limit = _STABILITY_LIMIT.get(scheme)
    bound = (f"h*lambda_max > {_STABILITY_MARGIN * limit:.3g} where the {scheme} sweep is stable only below "
             f"{limit:.4g}" if limit is not None else "h*lambda_max above the scheme's stability limit")
    grid = f"h = T/steps with steps={steps}" if steps is not None else "h = T/steps"
    return (f"has an unstable backward adjoint sweep: {bound} ({grid}; lambda_max: the largest curvature "
            "of the loss, estimated at stored states of the flow), so its meta-gradient would be wrong")


# Real-axis stability limits c of the backward sweeps: a decaying mode a' = -lambda a
# (lambda > 0) stays bounded iff h lambda < c. Euler: |1 - x| < 1; Heun: |1 - x + x^2/2| < 1;
# RK4: the real root of 1 - x + x^2/2 - x^3/6 + x^4/24 = 1, about 2.785.
_STABILITY_LIMIT = {"euler": 2.0, "heun": 2.0, "rk4": 2.785293563405282}
_STABILITY_MARGIN = 0.95  # flag h lambda_max above 0.95 c: near c the mode barely decays
_LANCZOS_STEPS = 10  # Jacobian-vector products per checked state
_UNSTABLE_ADVICE = ("Store more states (steps of solve or Adjoint: h = T/steps, and h*lambda_max must fall below "
                    "0.95 of the limit), "
                    "shorten the horizon, use scheme='rk4' (stable up to h*lambda_max = 2.785) if the sweep is "
                    "Heun's or Euler's, or AdaptiveAdjoint (its step follows the curvature); "
                    "stability_check=False turns this check off.")


def _all_finite(tree) -> jax.Array:
    """Whether every inexact leaf of `tree` is finite.

    As `isfinite(max |x|)` (the max propagates NaN): a reduction XLA fuses with
    `abs`, whereas `all(isfinite(x))` materialises a boolean mask as large as
    `x`, a quarter of the stored states in float32.
    """
    leaves = [jnp.isfinite(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
              if x.size]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def solve_status(result, ys) -> jax.Array:
    """The [`SolveStatus`][] of one diffrax solve: its result, then whether `ys` is finite.

    A reduction over `ys`, so no copy of the stored states is made (an
    `eqx.error_if` on them would copy them all through its callback).
    """
    code = jnp.where(
        result == diffrax.RESULTS.successful,
        SolveStatus.SUCCESS,
        jnp.where(result == diffrax.RESULTS.max_steps_reached, SolveStatus.MAX_STEPS, SolveStatus.FAILED),
    )
    code = jnp.where((code == SolveStatus.SUCCESS) & jnp.logical_not(_all_finite(ys)), SolveStatus.NONFINITE, code)
    return code.astype(jnp.int32)


@jax.custom_jvp
def _nan_if(failed, x):
    """`x`, or NaN where `failed`; derivatives through it are NaN there too.

    (`jnp.where` alone would give a failed solve a zero derivative, which looks
    like a valid one.) The tangent rule is linear in the tangent, so reverse
    mode transposes it: cotangents are multiplied by NaN where `failed`.
    """
    return jnp.where(failed, jnp.nan, x)


@_nan_if.defjvp
def _nan_if_jvp(primals, tangents):
    failed, x = primals
    _, tx = tangents
    return _nan_if(failed, x), tx * jnp.where(failed, jnp.nan, 1.0).astype(tx.dtype)


def nan_if_failed(tree, status):
    """Every inexact leaf of `tree` NaN, value and derivatives, where `status` is not `SUCCESS`."""
    failed = status != SolveStatus.SUCCESS
    return jax.tree.map(lambda x: _nan_if(failed, x) if eqx.is_inexact_array(x) else x, tree)


def nan_if_forward_failed(tree, status):
    """As `nan_if_failed`, but only for a failed forward solve.

    `UNSTABLE_ADJOINT` leaves the value alone (the forward solve is fine);
    the custom VJP makes its derivatives NaN.
    """
    return nan_if_failed(tree, jnp.where(status == SolveStatus.UNSTABLE_ADJOINT, SolveStatus.SUCCESS, status))


def raise_if_failed(tree, status, max_steps: int | None = None, where: str = "ctmeta.ode.solve", *,
                    steps: int | None = None, scheme: str | None = None, dense_steps: int | None = None):
    """`tree`, raising at run time (inside `jit` too) if `status` is not `SUCCESS`.

    The check is attached to `tree`, so keep it small (the final state, not
    the stored grid): `eqx.error_if` passes what it guards through a callback.
    `steps` and `scheme` complete the text for `UNSTABLE_ADJOINT`.
    """
    advice = {
        SolveStatus.MAX_STEPS: "The flow is stiff or diverging: raise max_steps, loosen rtol/atol, "
        "shorten the horizon t1, or rescale the loss.",
        SolveStatus.NONFINITE: "The ODE diverged: shorten the horizon t1, rescale the loss, or check the data.",
        SolveStatus.FAILED: "Check the vector field and the horizon.",
        SolveStatus.UNSTABLE_ADJOINT: _UNSTABLE_ADVICE,
        SolveStatus.DENSE_OVERFLOW: "Raise dense_steps (AdaptiveAdjoint, or Adjoint(dense_steps=...)), loosen "
        "rtol/atol, or shorten the horizon t1.",
    }
    # One `error_if` per cause rather than `branched_error_if`, whose vmapped
    # index has no differentiation rule (the status is an output of a custom VJP).
    for code, text in advice.items():
        what = "solve" if code == SolveStatus.UNSTABLE_ADJOINT else "forward solve"
        tree = eqx.error_if(tree, status == code,
                            f"{where}: the {what} "
                            f"{code.describe(max_steps, steps=steps, scheme=scheme, dense_steps=dense_steps)}. {text}")
    return tree


# --------------------------------------------------------------------------- #
# Sensitivity rules (static configuration)
# --------------------------------------------------------------------------- #


class AbstractSensitivity(eqx.Module):
    r"""How [`solve`][] is differentiated. Static configuration: no arrays.

    **Adding a rule.** Subclass it and implement [`AbstractSensitivity.solve`][]:
    integrate the forward solve (for instance with diffrax, through the
    solver [`SolveOptions`][ctmeta.ode.SolveOptions]`.solver` names) and return $y(t_1)$ whose
    derivatives follow the rule, typically through `eqx.filter_custom_vjp`.
    [`solve`][] does the rest: it checks its arguments, closure-converts the
    vector field (so its closed-over arrays are differentiated like `args`)
    and raises, or returns NaN and the status, on failure. A rule that needs
    the forward's status should derive it with [`solve_status`][].

    ```python
    class MyRule(ctmeta.ode.AbstractSensitivity):
        def solve(self, field, y0, t1, args, options):
            ...  # y1 = y(t1), status = its SolveStatus code
            return y1, status

    ctmeta.ode.solve(f, y0, t1, args, sensitivity=MyRule())
    ```
    """

    @abc.abstractmethod
    def solve(self, field: AbstractVectorField, y0, t1, args, options: "SolveOptions"):
        r"""Integrate $dy/dt = f(t, y, \text{args})$ on $[0, t_1]$.

        **Arguments:**

        - `field`: the vector field, an [`AbstractVectorField`][] (already
          closure-converted by [`solve`][]).
        - `y0`: the initial state, a pytree of floating-point arrays.
        - `t1`: the horizon, a scalar array (may be traced).
        - `args`: the field's arguments, any pytree.
        - `options`: the forward solver's [`SolveOptions`][].

        **Returns:** `(y(t1), status)`: $y(t_1)$ differentiable by this rule,
        unchecked, and its int32 [`SolveStatus`][] code ([`solve`][] raises
        or NaNs on failure).
        """


class SolveOptions(eqx.Module):
    """Forward-solver options shared by every rule (what [`solve`][] was given).

    - `steps`: the number of uniform steps of a fixed-step solver, or of
      intervals of a stored grid.
    - `rtol`, `atol`: the adaptive solver's tolerances (see `effective_rtol`).
    - `max_steps`: the step budget.
    - `solver`: one of `SOLVERS`.
    - `throw`: whether [`solve`][] raises on failure (a rule that cannot
      report a failure through its status, like diffrax's backsolve, may
      raise itself).
    """

    steps: int = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    solver: Literal["dopri5", "tsit5", "euler", "heun", "rk4"] = eqx.field(static=True)
    throw: bool = eqx.field(static=True, default=True)




class RK4(diffrax.AbstractERK):
    r"""The classical fourth-order Runge-Kutta method, for fixed steps.

    Stages $k_1 = f(t, y)$, $k_2 = f(t + h/2, y + h k_1/2)$,
    $k_3 = f(t + h/2, y + h k_2/2)$, $k_4 = f(t + h, y + h k_3)$;
    $y_{n+1} = y_n + h (k_1 + 2 k_2 + 2 k_3 + k_4)/6$. Its error estimate
    (against the midpoint rule) is second order only: use it with
    `diffrax.ConstantStepSize`, as [`solve`][] does for `solver="rk4"`.
    Fixed steps $h = t_1/K$ (A-MAML's authors' own choice for images) give
    a fixed cost where an adaptive solver's steps follow the field (on a
    ReLU/max-pool network they collapse at every switch), and are stable
    on a gradient flow only while $h\,\lambda_{\max} < 2.785$.
    """

    tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
        c=np.array([0.5, 0.5, 1.0]),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        b_error=np.array([1 / 6, 1 / 3 - 1, 1 / 3, 1 / 6]),
        a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    )
    interpolation_cls: ClassVar[Callable] = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 4


#: Solvers taking `steps` uniform steps (the others are adaptive).
FIXED_STEP_SOLVERS = ("euler", "heun", "rk4")
SOLVERS = ("dopri5", "tsit5") + FIXED_STEP_SOLVERS


def _diffrax_solver(name: str):
    return {
        "dopri5": diffrax.Dopri5,
        "tsit5": diffrax.Tsit5,
        "euler": diffrax.Euler,
        "heun": diffrax.Heun,
        "rk4": RK4,
    }[name]()


# The smallest relative tolerance an adaptive solve is run with, per state dtype:
# about 80 machine epsilons. Below it the embedded error estimate of a step
# measures rounding, not truncation, so the controller shrinks the step for
# nothing. Measured (float32, whole Conv-4 on Omniglot 5-way 5-shot, T = 0.1,
# one gradient 47 ms): Dopri5 took 5 steps at rtol 1e-3, 8 at 1e-4, 32 at 1e-5
# and 200 at 1e-6 (15 rejected), so A-MAML's default 1e-6 made a meta-iteration
# of the paper's Omniglot setting (T = 0.5) take tens of minutes on a CPU.
_RTOL_FLOOR = {jnp.dtype(jnp.float16): 1e-2, jnp.dtype(jnp.bfloat16): 1e-1, jnp.dtype(jnp.float32): 1e-5}


def effective_rtol(rtol: float, y0) -> float:
    """`rtol`, raised to what the state's precision can resolve (`1e-5` in float32).

    The float64 default (`1e-6`) is kept as it is; in float32 a request below
    `1e-5` becomes `1e-5` (see `_RTOL_FLOOR` for the measurement behind it).
    """
    dtypes = [jnp.dtype(x.dtype) for x in jax.tree.leaves(y0) if eqx.is_inexact_array(x)]
    floor = max((_RTOL_FLOOR.get(d, 0.0) for d in dtypes), default=0.0)
    return max(float(rtol), floor)


def _forward(field, y0, t0, t1, args, options: SolveOptions, ts=None, adjoint=None):
    """One forward diffrax solve; adaptive for embedded RK pairs, fixed-step otherwise.

    Fixed-step solvers take `options.steps` uniform steps over `[t0, t1]`.
    Returns `(ys, status)`: the saved states and their [`SolveStatus`][]. The
    solve itself never throws (diffrax's `throw=False`); callers decide. The
    exception is `BacksolveAdjoint`, whose backward re-integration can only be
    checked by diffrax, so it gets `throw=options.throw`.
    """
    solver = _diffrax_solver(options.solver)
    if options.solver in FIXED_STEP_SOLVERS:
        controller = diffrax.ConstantStepSize()
        dt0 = (t1 - t0) / options.steps
    else:
        controller = diffrax.PIDController(rtol=effective_rtol(options.rtol, y0), atol=options.atol)
        dt0 = None
    saveat = diffrax.SaveAt(ts=ts) if ts is not None else diffrax.SaveAt(t1=True)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, a: field(t, y, a)),
        solver,
        t0=t0,
        t1=t1,
        dt0=dt0,
        y0=y0,
        args=args,
        saveat=saveat,
        stepsize_controller=controller,
        max_steps=options.max_steps,
        adjoint=adjoint if adjoint is not None else diffrax.RecursiveCheckpointAdjoint(),
        throw=options.throw and isinstance(adjoint, diffrax.BacksolveAdjoint),
    )
    return sol.ys, solve_status(sol.result, sol.ys)


def _last(ys):
    return jax.tree.map(lambda x: x[-1], ys)


class Backprop(AbstractSensitivity):
    """Reverse-mode differentiation through every operation of the solver.

    Exact for the discretised solve (up to round-off); memory grows with the
    number of solver steps (diffrax recursive checkpointing bounds it).
    """

    def solve(self, field, y0, t1, args, options):
        ys, status = _forward(field, y0, 0.0, t1, args, options)
        return _last(ys), status


class Backsolve(AbstractSensitivity):
    """The continuous adjoint that re-integrates `y` backward with `a`.

    Memory does not grow with `t1`, but for a gradient flow the backward
    re-integration runs the flow in reverse, which amplifies errors at the
    rate of the largest Hessian eigenvalue (COMLN Sec. 3.2, Fig. 2).

    With `throw=False`, a failure of the backward re-integration is not
    reported (diffrax does not return its status): comparison only.
    """

    def solve(self, field, y0, t1, args, options):
        ys, status = _forward(field, y0, 0.0, t1, args, options, adjoint=diffrax.BacksolveAdjoint())
        return _last(ys), status


class StoredAdjoint(AbstractSensitivity):
    r"""A-MAML's rule: store the forward states on a grid, solve the adjoint back over them.

    **Arguments:**

    - `scheme`: `"heun"` (modified Euler, second order, the paper's choice) or
      `"euler"` (first order; this is what backprop through gradient descent
      computes when the forward solve is also Euler), or `"rk4"` (fourth
      order over the same stored states, Hermite-interpolated at mid-step;
      beyond the paper, see `adjoint_sweep`).
    - `checkpoints`: if given, keep only `checkpoints + 1` states (on the
      coarse grid of `checkpoints` segments, `steps` divisible by it) and
      re-integrate each segment forward, to its `steps / checkpoints` fine
      states, during the backward pass. Memory falls from `O(steps)` to
      `O(checkpoints + steps / checkpoints)` states for one more forward
      solve; the gradient is unchanged (the same fine grid is used).
    - `stability_check`: check that the backward sweep is stable (default
      True; applies to vector fields with `symmetric_jacobian`, such as a
      gradient flow). See below.

    **Stability of the backward sweep.** For a gradient flow $f = -\nabla L$
    the Jacobian is $-H$ ($H$ the Hessian of $L$, symmetric), and the adjoint,
    swept backward with the fixed step $h = t_1/\text{steps}$, decays in
    each direction of positive curvature $\lambda$ as $e^{-\lambda s}$. An
    explicit scheme follows that decay only while $h\lambda < c$, with $c = 2$
    for Euler and Heun and $c \approx 2.785$ for RK4; above, the mode grows
    by $|R(-h\lambda)| > 1$ a step and the meta-gradient is wrong: finite
    (e.g. 7,413 for a true norm of 10.5) or overflowing. Negative curvature
    is a genuine growth of the adjoint, not an instability, and is not
    flagged. Since the curvature of a loss typically grows along its flow,
    the check estimates $\lambda_{\max}(H)$ at the first, middle and last
    stored states (of the coarse grid with `checkpoints`; $h$ is the fine
    step) by 10 steps of Lanczos with Jacobian-vector products of the field,
    and flags the solve when $h\,\lambda_{\max} > 0.95\,c$: its status is
    then [`SolveStatus`][]`.UNSTABLE_ADJOINT`, so `throw=True` raises when the
    gradient is taken and `throw=False` gives NaN derivatives (the value
    $y(t_1)$ is kept). Lanczos' largest Ritz value is a lower bound of
    $\lambda_{\max}$ whatever the signs of the other eigenvalues, so a
    flagged sweep is truly past the margin; one that is unstable only between
    the checked states, or for a top eigenvalue that 10 steps underestimate,
    can go unflagged. Cost: 30 Hessian-vector products (one each for a
    gradient flow) per meta-gradient, against the sweep's 2 per stored
    interval for Heun (1 Euler, 4 RK4), run only when differentiating (in the
    custom VJP's forward rule); the frozen-coefficient criterion is a
    heuristic for a Hessian that varies along the flow. To choose `steps`,
    [`max_curvature`][] gives the estimate at any state: `steps` $\ge
    t_1 \lambda_{\max} / (0.9\,c)$ leaves a margin.
    """

    scheme: Literal["heun", "euler", "rk4"] = eqx.field(default="heun", static=True)
    checkpoints: int | None = eqx.field(default=None, static=True)
    stability_check: bool = eqx.field(default=True, static=True)

    def __check_init__(self):
        if self.scheme not in ("heun", "euler", "rk4"):
            raise InputError(f"StoredAdjoint(scheme={self.scheme!r}): use 'heun', 'euler' or 'rk4'.")
        if self.checkpoints is not None and (not isinstance(self.checkpoints, int) or self.checkpoints < 1):
            raise InputError(
                f"StoredAdjoint(checkpoints={self.checkpoints!r}): give a positive int, or None to store every state."
            )
        if not isinstance(self.stability_check, bool):
            raise InputError(f"StoredAdjoint(stability_check={self.stability_check!r}): give True or False.")

    def solve(self, field, y0, t1, args, options):
        if self.checkpoints is not None and options.steps % self.checkpoints:
            raise InputError(
                f"StoredAdjoint(checkpoints={self.checkpoints}) must divide steps={options.steps}."
            )
        return _stored_adjoint_solve((field, y0, t1, args), self, options)


# --------------------------------------------------------------------------- #
# The stored-state adjoint as a custom VJP
# --------------------------------------------------------------------------- #


def _grid_states(field, y0, t1, args, options, rule: StoredAdjoint):
    """States on the coarse grid that the backward pass starts from, and their status."""
    n = options.steps if rule.checkpoints is None else rule.checkpoints
    ts = jnp.linspace(0.0, 1.0, n + 1, dtype=jnp.result_type(t1, float)) * t1
    return _forward(field, y0, 0.0, t1, args, options, ts=ts)


@eqx.filter_custom_vjp
def _stored_adjoint_solve(primal, rule, options):
    """`(y(t1), status)`; the status is an integer output, so it gets no cotangent."""
    field, y0, t1, args = primal
    ys, status = _forward(field, y0, 0.0, t1, args, options)
    return _last(ys), status


@_stored_adjoint_solve.def_fwd
def _stored_adjoint_fwd(perturbed, primal, rule, options):
    field, y0, t1, args = primal
    ys, status = _grid_states(field, y0, t1, args, options, rule)
    # Only the sweep's products need it: with t1 alone differentiated, dJ/dt1 = a(t1) . f.
    sweeps = any(jax.tree.leaves((perturbed[0], perturbed[1], perturbed[3])))
    if rule.stability_check and field.symmetric_jacobian and sweeps:
        n = jax.tree.leaves(ys)[0].shape[0] - 1
        lam = max_curvature_on_grid(field, ys, t1 / n, args, indices=(0, n // 2, n))
        h = t1 / options.steps
        unstable = h * lam > _STABILITY_MARGIN * _STABILITY_LIMIT[rule.scheme]
        status = jnp.where((status == SolveStatus.SUCCESS) & unstable, SolveStatus.UNSTABLE_ADJOINT, status)
        status = status.astype(jnp.int32)
    return (_last(ys), status), (ys, status)


def max_curvature(field: Callable | AbstractVectorField, t, y, args, iterations: int = _LANCZOS_STEPS) -> jax.Array:
    r"""A lower bound of the largest eigenvalue of $-\partial f/\partial y$ at `(t, y)`, by Lanczos.

    For a field with a symmetric Jacobian only (a gradient flow: the largest
    eigenvalue of the Hessian of the loss, its largest curvature
    $\lambda_{\max}$). `iterations` steps of the Lanczos process on
    $M = -\partial f/\partial y$ from a fixed pseudo-random start, one
    `field.vjp` each (one Hessian-vector product for [`GradientField`][]),
    then the largest eigenvalue of the `iterations`-square tridiagonal matrix.
    That Ritz value lies in $[\lambda_{\min}(M), \lambda_{\max}(M)]$ and
    converges to $\lambda_{\max}$ from below whatever the signs of the
    other eigenvalues: unlike power iteration it needs no shift when the
    eigenvalue of largest magnitude is negative (negative curvature). No
    reorthogonalisation (memory: three vectors of the state's size); a lost
    orthogonality only repeats converged Ritz values. On a breakdown (an
    invariant Krylov space, e.g. a state of fewer than `iterations` numbers)
    the process stops: the remaining Ritz values are 0, never above a
    positive $\lambda_{\max}$.
    """
    field = field if isinstance(field, AbstractVectorField) else VectorField(field)
    flat, unravel = jax.flatten_util.ravel_pytree(y)
    dtype = jnp.promote_types(flat.dtype, jnp.float32)  # half-precision states: the process in float32

    def matvec(v):
        jtv = field.vjp(t, y, args, unravel(v.astype(flat.dtype)), (False, False))[0]
        return -jax.flatten_util.ravel_pytree(cotangent_like(jtv, y))[0].astype(dtype)

    q0 = jax.random.normal(jax.random.PRNGKey(0), flat.shape, dtype)
    q0 = q0 / jnp.linalg.norm(q0)
    tol = jnp.sqrt(jnp.finfo(dtype).eps)

    def step(carry, _):
        q_prev, q, beta_prev = carry
        w = matvec(q)
        w_norm = jnp.linalg.norm(w)
        alpha = jnp.vdot(q, w)
        w = w - alpha * q - beta_prev * q_prev
        beta = jnp.linalg.norm(w)
        # Breakdown: the Krylov space is (numerically) invariant. Stopping early only
        # leaves a Rayleigh-Ritz value on a smaller space, still a lower bound.
        ok = beta > tol * w_norm
        beta = jnp.where(ok, beta, 0.0)
        q_next = jnp.where(ok, w / jnp.where(ok, beta, 1.0), 0.0)
        return (q, q_next, beta), (alpha, beta)

    zero = jnp.zeros((), dtype)
    _, (alphas, betas) = jax.lax.scan(step, (jnp.zeros_like(q0), q0, zero), None, length=iterations)
    off = betas[:-1]
    tridiagonal = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
    return jnp.max(jnp.linalg.eigvalsh(tridiagonal))


def max_curvature_on_grid(field, ys, h, args, indices) -> jax.Array:
    """The largest `max_curvature` over the stored states `ys[i]` at `t = i h`, `i` in `indices`.

    The states are read in place (no copy of `ys`) and checked one after the
    other, so the extra memory is that of one check.
    """
    indices = jnp.asarray(sorted(set(indices)))

    def one(worst, i):
        y = jax.tree.map(lambda x: x[i], ys)
        return jnp.maximum(worst, max_curvature(field, i * h, y, args)), None

    dtype = jnp.promote_types(jax.flatten_util.ravel_pytree(jax.tree.map(lambda x: x[0], ys))[0].dtype, jnp.float32)
    worst, _ = jax.lax.scan(one, jnp.asarray(-jnp.inf, dtype), indices)
    return worst


def _tree_axpy(alpha, x, y):
    """`alpha * x + y` over pytrees whose non-differentiable leaves are None."""
    return jax.tree.map(lambda xi, yi: alpha * xi + yi, x, y)


def _zeros_for(tree):
    return jax.tree.map(jnp.zeros_like, eqx.filter(tree, eqx.is_inexact_array))


def cotangent_like(cot, tree):
    """Give `cot` the structure of `tree`'s inexact leaves, zeros where `cot` is None."""
    return jax.tree.map(
        lambda c, x: c if c is not None else (None if x is None else jnp.zeros_like(x)),
        cot,
        eqx.filter(tree, eqx.is_inexact_array),
        is_leaf=lambda c: c is None,
    )


def _hermite_midpoint(y0, y1, f0, f1, h):
    """Cubic Hermite interpolation of the state at the middle of a step, O(h^4)."""
    return jax.tree.map(lambda a, b, fa, fb: 0.5 * (a + b) + (h / 8) * (fa - fb), y0, y1, f0, f1)


def adjoint_sweep(field, ys, t0, h, args, a_end, scheme: str, wrt=None):
    r"""Solve the adjoint backward over stored states `ys[0..n]` at `t0 + j h`.

    Returns `(a(t0), integral of (df/dparams)^T a)` where params are
    `(args, field)`. With $J = \partial f / \partial y$, Heun's step from
    $t_{j+1}$ to $t_j$ (A-MAML Sec. 3.2) is

    $$\tilde a_j = a_{j+1} + h\,J_{j+1}^\top a_{j+1},\qquad
      a_j = a_{j+1} + \tfrac{h}{2}\big(J_{j+1}^\top a_{j+1} + J_j^\top \tilde a_j\big),$$

    and the parameter integral takes the same trapezoid weights (Heun on the
    augmented state). `"euler"` keeps the first term only, $O(h)$. `"rk4"`
    is classical Runge-Kutta on the same augmented state, with the state at
    mid-step from cubic Hermite interpolation of the stored states and their
    derivatives $f$ (which the grid gives for free): $O(h^4)$ for the same
    memory, at two more Jacobian products and one more $f$ a step.

    Memory: the sweep is a reverse `scan` over the indices $j$ that reads
    `ys[j]` and `ys[j + 1]` in place, so the stored states are held once
    (slicing or reversing `ys` into the scan's inputs would copy them, about
    three times their size in all).
    """
    n = jax.tree.leaves(ys)[0].shape[0] - 1
    zero_p = _zeros_for((args, field))
    add = lambda *trees: jax.tree.map(lambda *xs: sum(xs), *trees)

    def vjp_at(t, y, a):
        ay, aargs, afield = field.vjp(t, y, args, a, wrt)
        return cotangent_like(ay, a), cotangent_like((aargs, afield), (args, field))

    def step(carry, j):
        a, acc = carry[:2]
        # Read the two stored states in place (a dynamic slice of `ys`, which the
        # loop closes over): no reversed or shifted copy of the K + 1 states.
        y_next = jax.tree.map(lambda x: x[j + 1], ys)
        y_prev = jax.tree.map(lambda x: x[j], ys)
        t_next, t_prev = t0 + (j + 1) * h, t0 + j * h
        k1, p1 = vjp_at(t_next, y_next, a)
        if scheme == "euler":
            return (_tree_axpy(h, k1, a), _tree_axpy(h, p1, acc)), None
        if scheme == "heun":
            k2, p2 = vjp_at(t_prev, y_prev, _tree_axpy(h, k1, a))
            a = _tree_axpy(h / 2, add(k1, k2), a)
            acc = _tree_axpy(h / 2, add(p1, p2), acc)
            return (a, acc), None
        # rk4: f at the later end is carried from the previous step.
        f_next = carry[2]
        f_prev = field(t_prev, y_prev, args)
        y_mid = _hermite_midpoint(y_prev, y_next, f_prev, f_next, h)
        t_mid = t_prev + h / 2
        k2, p2 = vjp_at(t_mid, y_mid, _tree_axpy(h / 2, k1, a))
        k3, p3 = vjp_at(t_mid, y_mid, _tree_axpy(h / 2, k2, a))
        k4, p4 = vjp_at(t_prev, y_prev, _tree_axpy(h, k3, a))
        two = lambda t: jax.tree.map(lambda x: 2 * x, t)
        a = _tree_axpy(h / 6, add(k1, two(k2), two(k3), k4), a)
        acc = _tree_axpy(h / 6, add(p1, two(p2), two(p3), p4), acc)
        return (a, acc, f_prev), None

    carry = (a_end, zero_p)
    if scheme == "rk4":
        y_last = jax.tree.map(lambda x: x[-1], ys)
        carry = carry + (field(t0 + n * h, y_last, args),)
    carry, _ = jax.lax.scan(step, carry, jnp.arange(n), reverse=True)  # j = n - 1, ..., 0
    return carry[0], carry[1]


@_stored_adjoint_solve.def_bwd
def _stored_adjoint_bwd(residuals, g, perturbed, primal, rule, options):
    ys, status = residuals
    g, _ = g  # the cotangent of y(t1); the status has none
    field, y0, t1, args = literals_as_arrays(primal)
    # Only what is being differentiated gets Jacobian products (e.g. not the images
    # in `args` when only the initialisation is learned).
    wrt = (perturbed[3], perturbed[0])
    y1 = jax.tree.map(lambda x: x[-1], ys)
    g = cotangent_like(g, y1)
    h_fine = t1 / options.steps
    if rule.checkpoints is None:
        a0, (gargs, gfield) = adjoint_sweep(field, ys, 0.0, h_fine, args, g, rule.scheme, wrt)
    else:
        # Each coarse segment is re-integrated to its fine states, then swept.
        per = options.steps // rule.checkpoints
        h_coarse = t1 / rule.checkpoints
        seg_options = dataclasses.replace(options, steps=per)

        def segment(carry, k):
            a, acc, seg_status = carry
            y_start = jax.tree.map(lambda x: x[k], ys)  # read in place, as in `adjoint_sweep`
            t_start = k * h_coarse
            fine_ts = t_start + jnp.arange(per + 1) * h_fine
            fine, fine_status = _forward(field, y_start, t_start, t_start + h_coarse, args, seg_options, ts=fine_ts)
            a, seg_acc = adjoint_sweep(field, fine, t_start, h_fine, args, a, rule.scheme, wrt)
            return (a, jax.tree.map(jnp.add, acc, seg_acc), jnp.maximum(seg_status, fine_status)), None

        (a0, (gargs, gfield), seg_status), _ = jax.lax.scan(
            segment, (g, _zeros_for((args, field)), jnp.zeros_like(status)), jnp.arange(rule.checkpoints),
            reverse=True,
        )
        if options.throw:  # the forward solve was checked; re-integrating a segment may still fail
            a0 = raise_if_failed(a0, seg_status, options.max_steps,
                                 "ctmeta.ode.solve (a checkpointed segment, re-integrated in the backward pass)")
        status = jnp.where(status != SolveStatus.SUCCESS, status, seg_status)
    # d y(t1) / d t1 = f(t1, y(t1)): the horizon moves only the end point.
    f1 = field(t1, y1, args)
    gt1 = sum(jnp.vdot(gi, fi) for gi, fi in zip(jax.tree.leaves(g), jax.tree.leaves(f1)))
    gt1 = jnp.asarray(gt1, dtype=jnp.result_type(t1)) if eqx.is_inexact_array(t1) else None
    # A failed solve has no derivative: NaN, so that no caller mistakes it for one.
    return nan_if_failed((gfield, a0, gt1, gargs), status)


# --------------------------------------------------------------------------- #
# The adaptive adjoint over the forward's dense output
# --------------------------------------------------------------------------- #


class AdaptiveAdjoint(AbstractSensitivity):
    r"""Adjoint solved backward by an adaptive solver over the forward's dense output.

    Forward: Dopri5 with step-size control, as for every rule, recording at
    each accepted step $t_i$ the state $y_i$, its derivative
    $f_i = f(t_i, y_i)$ (Dopri5's last stage, free by FSAL) and the state
    $m_i$ at mid-step from Dopri5's own dense output. Between two accepted
    steps the state is the quartic through $y_i, f_i, m_i, y_{i+1}, f_{i+1}$:
    the cubic Hermite interpolant $c(\theta)$ plus
    $16\,\theta^2 (1 - \theta)^2 (m_i - c(\tfrac12))$, i.e. Dopri5's
    4th-order continuous extension, $C^1$ across steps. (The cubic alone,
    two states a step, was 5x less accurate in the measurement below.) Backward: in reversed time
    $s = t_1 - t$, the augmented adjoint

    $$\frac{da}{ds} = \Big(\frac{\partial f}{\partial y}\Big)^\top a, \qquad
      \frac{dp}{ds} = \Big(\frac{\partial f}{\partial \text{args}}\Big)^\top a, \qquad
      a(s = 0) = \frac{\partial g}{\partial y(t_1)},\ p(0) = 0,$$

    (for a gradient flow, $da/ds = -H(y(t_1 - s))\,a$: one Hessian-vector
    product per stage) is solved by Dopri5 with its own step-size control,
    each evaluation reading $y(t_1 - s)$ from the interpolant. Then
    $dJ/dy_0 = a(t_1)$, $dJ/d\text{args} = p(t_1)$ and
    $dJ/dt_1 = a(0) \cdot f_N$.

    Against [`StoredAdjoint`][]: no grid to choose. The backward controller
    keeps the sweep stable whatever $h\,\lambda_{\max}$ (no stability check
    is needed), and its cost follows the steps the adjoint needs, close to
    the forward's, not $t_1 / h$. Its accuracy is bounded by the forward's
    tolerance: the interpolant's error is invisible to the backward
    controller.

    **Arguments:**

    - `dense_steps`: the most accepted forward steps the dense output holds
      (memory: $3(\text{dense\_steps} + 1)$ states, allocated whole, since
      shapes are static). A forward that needs more ends with status
      [`SolveStatus`][]`.DENSE_OVERFLOW` (raised, or NaN with `throw=False`).
    - `rtol`, `atol`: tolerances of the backward solve, as factors of the
      forward's: the backward uses `rtol * forward rtol` and `atol * forward
      atol`. The default 10 costs no accuracy where the forward's own error
      dominates (it always does at the forward's tolerance): measured on
      CosMixture 100-shot, T = 5, float64, against backprop through a
      converged solve, the meta-gradient's relative error is 1.1e-5 at 1x,
      3.2e-5 at 10x and 2.8e-4 at 100x, for 37, 28 and 24 backward steps
      (the stored Heun sweep at h = 0.01: 1.3e-4).
    - `max_steps`: the backward solver's step budget (default: the forward's
      `max_steps`). A backward solve that fails or runs out of steps raises
      when the gradient is taken (`throw=True`) or gives NaN derivatives
      (`throw=False`), never a wrong gradient.
    """

    dense_steps: int = eqx.field(default=256, static=True)
    rtol: float = eqx.field(default=10.0, static=True)
    atol: float = eqx.field(default=10.0, static=True)
    max_steps: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        if not isinstance(self.dense_steps, int) or isinstance(self.dense_steps, bool) or self.dense_steps < 1:
            raise InputError(f"AdaptiveAdjoint(dense_steps={self.dense_steps!r}): give a positive int.")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InputError(f"AdaptiveAdjoint({name}={value!r}): give a positive factor of the forward's {name}.")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise InputError(f"AdaptiveAdjoint(max_steps={self.max_steps!r}): give a positive int or None.")

    def solve(self, field, y0, t1, args, options):
        if options.solver != "dopri5":
            raise InputError(f"AdaptiveAdjoint records Dopri5's steps; solver={options.solver!r} is not supported.")
        return _adaptive_adjoint_solve((field, y0, t1, args), self, options)


class DenseOutput(eqx.Module):
    r"""The accepted steps of a forward solve: times, states and derivatives.

    `ts[i]`, `ys[i]`, `fs[i]` for `i = 0..n` (`n` accepted steps; the slots
    past `n` repeat `t1`), read by [`DenseOutput.evaluate`][] as a piecewise
    cubic Hermite interpolant.
    """

    ts: jax.Array
    ys: PyTree
    fs: PyTree
    n: jax.Array
    ms: PyTree = None  # states at mid-step, for the quartic interpolant (None: cubic)

    def evaluate(self, t) -> PyTree:
        """The interpolated state at time `t` (clamped to the solved interval)."""
        i = jnp.clip(jnp.searchsorted(self.ts, t, side="right") - 1, 0, jnp.maximum(self.n - 1, 0))
        t0, t1 = self.ts[i], self.ts[i + 1]
        h = t1 - t0
        theta = jnp.clip(jnp.where(h > 0, (t - t0) / jnp.where(h > 0, h, 1), 0), 0, 1)
        w0 = (1 - theta) ** 2 * (1 + 2 * theta)
        w1 = theta ** 2 * (3 - 2 * theta)
        v0 = h * theta * (1 - theta) ** 2
        v1 = -h * theta ** 2 * (1 - theta)

        def hermite(ys, fs):
            y0, y1, f0, f1 = ys[i], ys[i + 1], fs[i], fs[i + 1]
            return (w0 * y0 + w1 * y1 + v0 * f0 + v1 * f1).astype(ys.dtype)

        if self.ms is None:
            return jax.tree.map(hermite, self.ys, self.fs)
        # Quartic: the cubic plus alpha theta^2 (1 - theta)^2 (zero value and slope at both
        # ends) with alpha such that it passes through the mid-step state.
        bump = theta ** 2 * (1 - theta) ** 2

        def quartic(ys, fs, ms):
            y0, y1, f0, f1 = ys[i], ys[i + 1], fs[i], fs[i + 1]
            cubic_mid = 0.5 * (y0 + y1) + (h / 8) * (f0 - f1)
            return (w0 * y0 + w1 * y1 + v0 * f0 + v1 * f1 + 16 * bump * (ms[i] - cubic_mid)).astype(ys.dtype)

        return jax.tree.map(quartic, self.ys, self.fs, self.ms)


def _dense_forward(field, y0, t1, args, options: SolveOptions, dense_steps: int | None, midpoints: bool = False):
    """Dopri5 from 0 to `t1` with step-size control; `(y(t1), DenseOutput or None, status, stats)`.

    diffrax's Dopri5 step and PID controller, in a loop of our own so that
    only what the interpolant needs is kept (three states an accepted step with
    `midpoints`, else two; diffrax's dense output keeps nine, for `max_steps` slots). With
    `dense_steps=None` nothing is recorded: the same arithmetic, so `y(t1)`
    is bitwise that of the recording solve.
    """
    term = diffrax.ODETerm(lambda t, y, a: field(t, y, a))
    solver = diffrax.Dopri5()
    controller = diffrax.PIDController(rtol=effective_rtol(options.rtol, y0), atol=options.atol)
    dtype = jnp.result_type(t1)
    t0 = jnp.zeros((), dtype)
    error_order = solver.error_order(term)
    tnext, cstate = controller.init(term, t0, t1, y0, None, args, solver.func, error_order)
    tnext = jnp.minimum(tnext, t1)
    sstate = solver.init(term, t0, tnext, y0, args)
    clip_floor = t1 - 100 * jnp.finfo(dtype).eps * jnp.abs(t1)  # as diffrax: no sliver of a last step
    record = dense_steps is not None
    if record:
        slots = dense_steps + 1
        f0 = field(t0, y0, args)
        ts = jnp.full((slots,), t1, dtype).at[0].set(t0)
        ys = jax.tree.map(lambda x: jnp.zeros((slots,) + x.shape, x.dtype).at[0].set(x), y0)
        fs = jax.tree.map(lambda x, f: jnp.zeros((slots,) + x.shape, x.dtype).at[0].set(f.astype(x.dtype)), y0, f0)
        buf = (ts, ys, fs)
        if midpoints:
            buf = buf + (jax.tree.map(lambda x: jnp.zeros((slots,) + x.shape, x.dtype), y0),)
    else:
        buf = None
    capacity = dense_steps if record else jnp.iinfo(jnp.int32).max
    zero = jnp.zeros((), jnp.int32)
    ok = jnp.array(True)

    def cond(c):
        t, _, _, _, _, _, n_steps, n_acc, _, good = c
        return (t < t1) & (n_steps < options.max_steps) & (n_acc < capacity) & good

    def body(c):
        t, tn, y, ss, cs, jump, n_steps, n_acc, buf, good = c
        y1, y_err, dense_info, ss1, res = solver.step(term, t, tn, y, args, ss, jump)
        y_err = jax.tree.map(lambda x: jnp.where(jnp.isnan(x), jnp.inf, x), y_err)
        keep, t_new, tn_new, jump1, cs1, cres = controller.adapt_step_size(t, tn, y, y1, args, y_err, error_order, cs)
        t_new = jnp.minimum(t_new, t1)
        tn_new = jnp.where(tn_new > clip_floor, jnp.where(keep, t1, t_new + 0.5 * (t1 - t_new)), tn_new)
        sel = lambda a, b: jnp.where(keep, a, b)
        if buf is not None:  # each slot is written once, by the step that ends there
            ts, ys, fs = buf[:3]
            j = n_acc + 1
            put = lambda new, arr, at=j: arr.at[at].set(new.astype(arr.dtype), pred=keep)
            new_buf = (put(tn, ts), jax.tree.map(put, y1, ys), jax.tree.map(put, ss1[1], fs))
            if midpoints:  # Dopri5's own 4th-order dense output at mid-step
                ym = solver.interpolation_cls(t0=t, t1=tn, **dense_info).evaluate(0.5 * (t + tn))
                new_buf = new_buf + (jax.tree.map(lambda new, arr: put(new, arr, n_acc), ym, buf[3]),)
            buf = new_buf
        # As diffrax: a solver failure counts on an accepted step, a controller failure always.
        good = good & (~keep | (res == diffrax.RESULTS.successful)) & (cres == diffrax.RESULTS.successful)
        return (t_new, tn_new, jax.tree.map(sel, y1, y), jax.tree.map(sel, ss1, ss), cs1,
                sel(jump1, jump), n_steps + 1, n_acc + keep.astype(jnp.int32), buf, good)

    carry = (t0, tnext, y0, sstate, cstate, jnp.array(False), zero, zero, buf, ok)
    # equinox's loop makes the dense buffers in-place buffers: a plain `lax.while_loop`
    # under `vmap` (a batched predicate) selects between the old and new carry at every
    # step, copying the whole buffer each step and holding it twice.
    t, _, y, _, _, _, n_steps, n_acc, buf, good = eqxi.while_loop(
        cond, body, carry, buffers=(lambda c: c[8]) if record else None, kind="lax")
    done = t >= t1
    status = jnp.where(
        done,
        jnp.where(_all_finite(y), SolveStatus.SUCCESS, SolveStatus.NONFINITE),
        jnp.where(~good, SolveStatus.FAILED,
                  jnp.where(n_steps >= options.max_steps, SolveStatus.MAX_STEPS, SolveStatus.DENSE_OVERFLOW)),
    ).astype(jnp.int32)
    dense = DenseOutput(buf[0], buf[1], buf[2], n_acc, buf[3] if midpoints else None) if record else None
    return y, dense, status, {"accepted_steps": n_acc, "steps": n_steps}


def adjoint_backward(field, dense: DenseOutput, t1, args, a_end, rule: AdaptiveAdjoint, options: SolveOptions, wrt=None):
    """The backward solve of [`AdaptiveAdjoint`][] from `a(t1) = a_end` over `dense`.

    Returns `(a(0), (dJ/dargs, dJ/dfield), status, stats)`, `stats` diffrax's
    (`num_steps`, `num_rejected_steps`, ...).
    """

    def rhs(s, state, _):
        a, _ = state
        t = t1 - s
        ay, aargs, afield = field.vjp(t, dense.evaluate(t), args, a, wrt)
        return cotangent_like(ay, a), cotangent_like((aargs, afield), (args, field))

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(rhs),
        diffrax.Dopri5(),
        t0=jnp.zeros_like(t1),
        t1=t1,
        dt0=None,
        y0=(a_end, _zeros_for((args, field))),
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.PIDController(rtol=rule.rtol * effective_rtol(options.rtol, a_end),
                                                  atol=rule.atol * options.atol),
        max_steps=rule.max_steps if rule.max_steps is not None else options.max_steps,
        adjoint=diffrax.RecursiveCheckpointAdjoint(),
        throw=False,
    )
    a0, params = jax.tree.map(lambda x: x[-1], sol.ys)
    return a0, params, solve_status(sol.result, (a0, params)), sol.stats


@eqx.filter_custom_vjp
def _adaptive_adjoint_solve(primal, rule, options):
    """`(y(t1), status)`; undifferentiated, the same solve records nothing."""
    field, y0, t1, args = primal
    y1, _, status, _ = _dense_forward(field, y0, t1, args, options, None)
    return y1, status


@_adaptive_adjoint_solve.def_fwd
def _adaptive_adjoint_fwd(perturbed, primal, rule, options):
    field, y0, t1, args = primal
    y1, dense, status, _ = _dense_forward(field, y0, t1, args, options, rule.dense_steps, midpoints=True)
    return (y1, status), (dense, status)


@_adaptive_adjoint_solve.def_bwd
def _adaptive_adjoint_bwd(residuals, g, perturbed, primal, rule, options):
    dense, status = residuals
    g, _ = g
    field, y0, t1, args = literals_as_arrays(primal)
    wrt = (perturbed[3], perturbed[0])
    y_end = jax.tree.map(lambda x: x[dense.n], dense.ys)
    f_end = jax.tree.map(lambda x: x[dense.n], dense.fs)
    g = cotangent_like(g, y_end)
    gt1 = sum(jnp.vdot(gi, fi) for gi, fi in zip(jax.tree.leaves(g), jax.tree.leaves(f_end)))
    gt1 = jnp.asarray(gt1, dtype=jnp.result_type(t1)) if eqx.is_inexact_array(t1) else None
    sweeps = any(jax.tree.leaves((perturbed[0], perturbed[1], perturbed[3])))
    if not sweeps:  # t1 alone: dJ/dt1 = a(t1) . f, no backward solve
        zeros = _zeros_for((args, field))
        return nan_if_failed((zeros[1], jax.tree.map(jnp.zeros_like, g), gt1, zeros[0]), status)

    a0, (gargs, gfield), back_status, _ = adjoint_backward(field, dense, t1, args, g, rule, options, wrt)
    if options.throw:
        a0 = raise_if_failed(a0, back_status, rule.max_steps or options.max_steps,
                             "ctmeta.ode.solve (the backward adjoint solve of AdaptiveAdjoint)")
    status = jnp.where(status != SolveStatus.SUCCESS, status, back_status)
    return nan_if_failed((gfield, a0, gt1, gargs), status)


# --------------------------------------------------------------------------- #
# The public entry point
# --------------------------------------------------------------------------- #


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
    solver: Literal["dopri5", "tsit5", "euler", "heun", "rk4"] = "dopri5",
    throw: bool = True,
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
    - `solver`: `"dopri5"` (default), `"tsit5"`, or the fixed-step `"euler"`,
      `"heun"`, `"rk4"` ([`RK4`][]), which take `steps` steps of $t_1/\text{steps}$.
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
                           throw=bool(throw))
    y1, status = sensitivity.solve(field, y0, t1, args, options)
    if throw:
        return raise_if_failed(y1, status, max_steps, steps=int(steps), scheme=getattr(sensitivity, "scheme", None),
                               dense_steps=getattr(sensitivity, "dense_steps", None))
    return nan_if_forward_failed(y1, status), status
