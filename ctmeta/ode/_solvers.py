"""Forward solvers, their options, and the sensitivity-rule contract with its two diffrax rules."""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._fields import AbstractVectorField
from ._status import solve_status

PyTree = Any


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
    - `error_scale`: what the adaptive solver's tolerances are relative to:
      `"state"` ($|y|$, as every ODE library) or `"displacement"`
      ($|y - y_0|$; [`AdaptiveAdjoint`][] only).
    - `throw`: whether [`solve`][] raises on failure (a rule that cannot
      report a failure through its status, like diffrax's backsolve, may
      raise itself).
    """

    steps: int = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    solver: Literal["dopri5", "tsit5", "rkc2", "euler", "heun", "rk4"] = eqx.field(static=True)
    throw: bool = eqx.field(static=True, default=True)
    error_scale: Literal["state", "displacement"] = eqx.field(static=True, default="state")




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
#: Runge-Kutta-Chebyshev: adaptive, for fields with a symmetric Jacobian, by `AdaptiveAdjoint` only (`_rkc`).
STABILIZED_SOLVERS = ("rkc2",)
SOLVERS = ("dopri5", "tsit5") + STABILIZED_SOLVERS + FIXED_STEP_SOLVERS
ERROR_SCALES = ("state", "displacement")


def diffrax_solver(name: str):
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
RTOL_FLOOR = {jnp.dtype(jnp.float16): 1e-2, jnp.dtype(jnp.bfloat16): 1e-1, jnp.dtype(jnp.float32): 1e-5}


def effective_rtol(rtol: float, y0) -> float:
    """`rtol`, raised to what the state's precision can resolve (`1e-5` in float32).

    The float64 default (`1e-6`) is kept as it is; in float32 a request below
    `1e-5` becomes `1e-5` (see `RTOL_FLOOR` for the measurement behind it).
    """
    dtypes = [jnp.dtype(x.dtype) for x in jax.tree.leaves(y0) if eqx.is_inexact_array(x)]
    floor = max((RTOL_FLOOR.get(d, 0.0) for d in dtypes), default=0.0)
    return max(float(rtol), floor)


def forward(field, y0, t0, t1, args, options: SolveOptions, ts=None, adjoint=None):
    """One forward diffrax solve; adaptive for embedded RK pairs, fixed-step otherwise.

    Fixed-step solvers take `options.steps` uniform steps over `[t0, t1]`.
    Returns `(ys, status)`: the saved states and their [`SolveStatus`][]. The
    solve itself never throws (diffrax's `throw=False`); callers decide. The
    exception is `BacksolveAdjoint`, whose backward re-integration can only be
    checked by diffrax, so it gets `throw=options.throw`.
    """
    solver = diffrax_solver(options.solver)
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


def last(ys):
    return jax.tree.map(lambda x: x[-1], ys)


class Backprop(AbstractSensitivity):
    """Reverse-mode differentiation through every operation of the solver.

    Exact for the discretised solve (up to round-off); memory grows with the
    number of solver steps (diffrax recursive checkpointing bounds it).
    """

    def solve(self, field, y0, t1, args, options):
        ys, status = forward(field, y0, 0.0, t1, args, options)
        return last(ys), status


class Backsolve(AbstractSensitivity):
    """The continuous adjoint that re-integrates `y` backward with `a`.

    Memory does not grow with `t1`, but for a gradient flow the backward
    re-integration runs the flow in reverse, which amplifies errors at the
    rate of the largest Hessian eigenvalue (COMLN Sec. 3.2, Fig. 2).

    With `throw=False`, a failure of the backward re-integration is not
    reported (diffrax does not return its status): comparison only.
    """

    def solve(self, field, y0, t1, args, options):
        ys, status = forward(field, y0, 0.0, t1, args, options, adjoint=diffrax.BacksolveAdjoint())
        return last(ys), status
