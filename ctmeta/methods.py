r"""Meta-gradient rules: how the inner loop is run and how it is differentiated.

Every rule adapts a parameter pytree $\theta$ on a task's training loss
$L(u) = $ `loss_fn(u, data)` over a horizon $T$ and returns $u(T)$; `jax.grad`
of an outer loss $J(u(T))$ through the result gives that rule's
meta-gradient. All rules share the convention that $T$ is continuous time and
$K$ discrete steps have learning rate $h = T / K$ (gradient descent with step
$h$ is forward Euler on the gradient flow).

| rule | inner loop | meta-gradient $dJ/d\theta$ | memory |
| --- | --- | --- | --- |
| [`Adjoint`][] (A-MAML) | gradient flow, Dopri5 | adjoint ODE $\dot a = H a$ backward: adaptive Dopri5 over the dense output, or Heun over $K$ stored states | $O(N\,|\theta|)$, $N$ the forward's steps, or $O(K\,|\theta|)$ |
| [`Unrolled`][] (MAML; ANIL on a head) | $K$ GD steps | backprop through the loop: $\prod_k (I - hH_k)\,\nabla J$ | graph of $K$ steps |
| [`FirstOrder`][] (FOMAML) | $K$ GD steps | $\nabla J(u_K)$ (identity Jacobian) | $O(|\theta|)$ |
| [`Implicit`][] (iMAML) | $K$ GD steps on $L + \tfrac{\lambda}{2}\|u-\theta\|^2$ | $(I + H/\lambda)^{-1}\nabla J$ by conjugate gradients | $O(|\theta|)$ |
| [`Reptile`][] | $K$ GD steps | outer rule: $\theta - u_K$ (see [`reptile_direction`][]) | $O(|\theta|)$ |
| [`LinearFlow`][] (COMLN; a linear head only) | gradient flow of a softmax head, Dopri5 | forward sensitivity ([`linear_flow`][]) | independent of $T$ |

Here $H = \nabla^2 L(u)$. The derivative in $T$ of the continuous flow is
$dJ/dT = -\langle \nabla J(u(T)), \nabla L(u(T)) \rangle$ ([`Adjoint`][]); for
[`Unrolled`][] it is the exact derivative of the discrete map in $h = T/K$.

**Capabilities.** What a rule can do is said by class attributes (in the
style of [`AbstractVectorField`][ctmeta.ode.AbstractVectorField]'s `symmetric_jacobian`), which a
[`MetaLearner`][] reads to check its configuration:

| rule | `differentiates` | `outer_direction` | `head_only` | `adapts_head` | `takes_flow` |
| --- | --- | --- | --- | --- | --- |
| [`Adjoint`][], [`Unrolled`][] | params, data, T, flow | no | no | yes | yes |
| [`FirstOrder`][] | params | no | no | yes | yes |
| [`Implicit`][] | params, data | no | no | yes | no |
| [`Reptile`][] | params | yes | no | no | no |
| [`LinearFlow`][] | params, data, T | no | yes | yes | no |

A horizon can be learned (`learn_T`) only with a rule whose
`differentiates` holds `"T"`, an inner flow's meta-parameters only with one
whose `differentiates` holds `"flow"`.

**Inner flows.** `adapt(..., flow=...)` runs another ODE than the gradient
flow (`ctmeta.flows`: [`Preconditioned`][ctmeta.flows.Preconditioned],
[`HeavyBall`][ctmeta.flows.HeavyBall]): [`Adjoint`][] solves it and its
adjoint (the flow's arrays are leaves of its vector field, differentiated
like the data), [`Unrolled`][] and [`FirstOrder`][] take its explicit Euler
steps. A rule with `takes_flow` False refuses any flow but the gradient
flow, in one line saying why.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, Callable, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from . import ode
from ._errors import InputError
from .flows import AbstractFlow, Gradient, GradientField, check_flow
from .linear_flow import linear_flow

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

__all__ = [
    "AbstractMethod",
    "Adjoint",
    "Unrolled",
    "FirstOrder",
    "Implicit",
    "Reptile",
    "LinearFlow",
    "GradientField",
    "reptile_direction",
]


def _check_steps(name: str, steps):
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"{name}(steps={steps!r}): steps must be a positive int (the number of inner steps K).")


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _underivable(x, message: str):
    """`x`; differentiating through it raises `InputError(message)` when traced.

    A rule that gives no derivative in an input (its `differentiates`) would
    otherwise hand `jax.grad` a zero that looks like a real one."""
    return x


def _underivable_jvp(message, primals, tangents):
    (x,), (t,) = primals, tangents
    if isinstance(t, SymbolicZero):  # not differentiated after all
        return x, t
    raise InputError(message)


_underivable.defjvp(_underivable_jvp, symbolic_zeros=True)


def _refuse_derivative(method: "AbstractMethod", what: str, tree):
    """`tree`, whose inexact arrays refuse differentiation (one line saying
    that `method` does not differentiate `what`, and what to do)."""
    gives = ", ".join(sorted(method.differentiates))
    message = (f"{method!r} does not differentiate {what} (it differentiates {gives} only): jax.grad in {what} "
               f"through it would be a silent 0. Use Adjoint() or Unrolled(steps=K) for a derivative in {what}, "
               f"or jax.lax.stop_gradient on {what} to keep it fixed.")
    return jax.tree.map(lambda x: _underivable(x, message) if eqx.is_inexact_array(x) else x, tree)


class AbstractMethod(eqx.Module):
    r"""A meta-gradient rule. Static configuration objects: compare and hash by value.

    A subclass implements `adapt` and says what it can do through class
    attributes (read by [`MetaLearner`][]; defaults in brackets):

    - `differentiates` (`{"params", "data", "T"}`): the inputs of `adapt`
      whose derivatives `jax.grad` through its result gives. A learned
      horizon needs `"T"`. The built-in rules refuse, in one `InputError`
      line at trace time, a derivative in `T` or in a flow's meta-parameters
      that they do not give (rather than a silent 0); the data of
      [`FirstOrder`][] and [`Reptile`][] get the first-order 0 by design.
    - `outer_direction` (`False`): the outer update is not the gradient of an
      outer loss but [`reptile_direction`][] $\theta - u$ (Reptile).
    - `head_only` (`False`): the rule adapts a linear softmax head alone,
      through `adapt_head` instead of `adapt` (COMLN's [`LinearFlow`][]);
      a learner must use it with `adapt="head"`.
    - `adapts_head` (`True`): the rule can adapt a linear head on fixed
      features (`adapt="head"`).
    - `takes_flow` (`True`): the rule runs any inner flow of
      `ctmeta.flows` (`adapt(..., flow=...)`), not only the gradient flow;
      `"flow" in differentiates` when it also differentiates the flow's
      meta-parameters.
    """

    differentiates: ClassVar[frozenset[str]] = frozenset({"params", "data", "T", "flow"})
    outer_direction: ClassVar[bool] = False
    head_only: ClassVar[bool] = False
    adapts_head: ClassVar[bool] = True
    takes_flow: ClassVar[bool] = True
    #: Fields the repr shows even at their default (the step count: `FirstOrder(steps=100)`, not `FirstOrder()`).
    _repr_always: ClassVar[tuple[str, ...]] = ("steps",)

    def __repr__(self) -> str:
        """The rule with its step count and every argument that differs from its default."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            shown = f.name in self._repr_always and value is not None
            if shown or f.default is dataclasses.MISSING or value != f.default:
                parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    @abc.abstractmethod
    def adapt(self, loss_fn: LossFn, params: PyTree, data: PyTree, T, flow: AbstractFlow | None = None) -> PyTree:
        """Return the adapted differentiable parameters `u(T)` (same structure as `params`).

        `params` holds only floating-point arrays (the caller partitions the
        model); `loss_fn(params, data)` is the scalar training loss; `flow`
        the inner flow (`None`: the gradient flow, [`Gradient`][ctmeta.flows.Gradient]).
        A failed inner solve raises (see `ctmeta.ode.solve`).
        """

    def check_flow(self, flow) -> AbstractFlow:
        """`flow` (`Gradient()` for `None`), or a one-line `InputError` if this rule cannot run it."""
        flow = check_flow(flow, type(self).__name__)
        if not flow.is_gradient and not self.takes_flow:
            raise InputError(
                f"{type(self).__name__} cannot run flow={type(flow).__name__}: {self._flow_refusal} "
                "Use Adjoint, Unrolled or FirstOrder for it, or the gradient flow (flow=Gradient()).")
        return flow

    _flow_refusal: ClassVar[str] = ""

    def adapt_with_status(self, loss_fn: LossFn, params: PyTree, data: PyTree, T,
                          flow: AbstractFlow | None = None) -> tuple[PyTree, jax.Array]:
        """`(u(T), status)`, never raising for a failed inner solve.

        As `adapt`, but a failed solve (step budget exhausted, non-finite
        state) gives NaN for `u(T)` and for every derivative through it, and
        `status` (an int32 `ctmeta.ode.SolveStatus` code, one per task under
        `vmap`) says why. When differentiated, an unstable backward adjoint
        sweep ([`Adjoint`][]) gives NaN derivatives (`u(T)` is kept) and
        `UNSTABLE_ADJOINT`. Rules without an ODE solve cannot fail this way:
        their status is always `SUCCESS`.
        """
        if flow is None or flow.is_gradient:  # a rule written before flows takes no `flow`
            return self.adapt(loss_fn, params, data, T), jnp.asarray(ode.SolveStatus.SUCCESS, jnp.int32)
        return self.adapt(loss_fn, params, data, T, flow=flow), jnp.asarray(ode.SolveStatus.SUCCESS, jnp.int32)

    @property
    def inner_steps(self) -> int:
        """Number of stored states or gradient steps, `K`."""
        return self.steps  # type: ignore[attr-defined]


def _flow_steps(flow, loss_fn, params, data, h, steps, unroll=1):
    """`steps` explicit Euler steps of size `h` of `flow` from `params`; the parameters they end at."""
    field = flow.field(loss_fn)

    def step(y, _):
        return flow.euler_step(field, y, data, h), None

    y, _ = jax.lax.scan(step, flow.init_state(params), None, length=steps, unroll=unroll)
    return flow.params_of(y)


def _gd_steps(loss_fn, u, data, h, steps, *, prox=None, unroll=1):
    """`steps` gradient-descent steps of size `h` (optionally with a proximal term)."""

    def step(u, _):
        g = jax.grad(loss_fn)(u, data)
        if prox is not None:
            lam, theta = prox
            g = jax.tree.map(lambda gi, ui, ti: gi + lam * (ui - ti), g, u, theta)
        return jax.tree.map(lambda ui, gi: ui - h * gi, u, g), None

    u, _ = jax.lax.scan(step, u, None, length=steps, unroll=unroll)
    return u


class Adjoint(AbstractMethod):
    r"""A-MAML: gradient flow by Dopri5, meta-gradient by the adjoint ODE solved backward.

    Two backward rules, chosen by `steps`:

    - `Adjoint()` (`steps=None`, the default): the adjoint
      $da/ds = -H(u(T - s))\,a$ is solved backward by an adaptive Dopri5
      that reads $u(t)$ from the forward's dense output
      (`ctmeta.ode.AdaptiveAdjoint`): no grid to choose, stable whatever the
      curvature, and its cost follows the steps the flow needs.
    - `Adjoint(steps=K)`: the paper's rule (Sec. 3.2): the forward stores
      $K + 1$ states on a uniform grid, $h = T/K$, and the adjoint is swept
      back over them by Heun (`ctmeta.ode.StoredAdjoint`).
    - `Adjoint(steps=K, solver="rk4")`: the same sweep after a fixed-step
      forward, $K$ classical Runge-Kutta steps of $h = T/K$
      (`ctmeta.ode.RK4`): a fixed cost ($4K$ gradients forward), stable
      only while $h\,\lambda_{\max} < 2.785$ (the stability check flags it
      otherwise); its discrete reference is backprop through the same
      steps. On a field that is not smooth (a ReLU/max-pool Conv-4) no
      rule's meta-gradient converges quickly in $K$ (docs/bench.md).

    **Arguments:**

    - `steps`: `None` (adaptive backward), or `K`, the number of intervals
      of the stored grid, $h = T/K$.
    - `rtol`, `atol`: tolerances of the adaptive forward solve (`rtol` at
      least `1e-5` for float32 parameters: `ctmeta.ode.effective_rtol`).
    - `solver`: the forward solver, `"dopri5"` (adaptive, default),
      `"rkc2"` (adaptive Runge-Kutta-Chebyshev, `ctmeta.ode._rkc`: its
      stages grow like $\sqrt{h\lambda_{\max}}$, so a stiff flow costs
      far fewer gradients than Dopri5's $h\lambda_{\max} < 3.3$ allows;
      the adaptive rule only, gradient and preconditioned flows) or `"rk4"`
      (fixed steps of $T/K$; needs `steps`).
    - `error_scale` (adaptive rule): the forward's tolerances relative to
      the state (`"state"`) or to the displacement $u(t) - u_0$
      (`"displacement"`), which is what the meta-gradient depends on when
      adaptation moves the parameters little.
    - `backward_solver` (adaptive rule): `"dopri5"` or `"rkc2"` for the
      adjoint; `None`: the forward's.
    - `dense_steps` (adaptive rule): the most accepted forward steps kept,
      three states each; a forward that needs more fails with
      `SolveStatus.DENSE_OVERFLOW`. `None` (default): sized from the
      parameters, 16 MB a task (`ctmeta.ode.AdaptiveAdjoint`).
    - `adjoint_rtol`, `adjoint_atol` (adaptive rule): the backward solve's
      tolerances as factors of the forward's.
    - `scheme` (stored rule): backward scheme, `"heun"` (the paper's),
      `"euler"` or `"rk4"`.
    - `checkpoints` (stored rule): keep `C` states and re-integrate segments
      backward (memory $O((C + K/C)|\theta|)$, same gradient).
    - `max_steps`: the forward solver's step budget (and the adaptive
      backward's).
    - `stability_check` (stored rule): check that the backward sweep is stable (default
      True). The sweep's fixed step $h = T/K$ must satisfy
      $h\,\lambda_{\max} < c$, $\lambda_{\max}$ the largest eigenvalue of
      the Hessian of the training loss along the flow, $c = 2$ for Heun and
      Euler, $2.785$ for RK4; beyond it the meta-gradient is wrong (finite or
      overflowing), and the curvature of a loss often grows along its flow
      (e.g. Alpine, MLP 2x32, $T = 5$: $\lambda_{\max}$ from 29 to 239, so
      $K = 500$ is wrong by a factor 700 where $K = 1000$ is right). The
      check estimates $\lambda_{\max}$ at the first, middle and last stored
      states (10 Lanczos steps each: 30 Hessian-vector products per task and
      meta-gradient, against the Heun sweep's $2K$) and flags $h\,\lambda_{\max}
      > 0.95\,c$: `adapt` then raises when differentiated, and
      `adapt_with_status` gives NaN meta-gradients with status
      `SolveStatus.UNSTABLE_ADJOINT`, so a `MetaLearner` names or skips the
      task. Raise `steps`, shorten `T`, or use `scheme="rk4"`. See
      `ctmeta.ode.StoredAdjoint`.
    """

    steps: int | None = eqx.field(default=None, static=True)
    rtol: float = eqx.field(default=1e-6, static=True)
    atol: float = eqx.field(default=1e-8, static=True)
    scheme: str = eqx.field(default="heun", static=True)
    checkpoints: int | None = eqx.field(default=None, static=True)
    max_steps: int = eqx.field(default=16384, static=True)
    stability_check: bool = eqx.field(default=True, static=True)
    dense_steps: int | None = eqx.field(default=None, static=True)
    adjoint_rtol: float = eqx.field(default=10.0, static=True)
    adjoint_atol: float = eqx.field(default=10.0, static=True)
    solver: str = eqx.field(default="dopri5", static=True)
    error_scale: str = eqx.field(default="state", static=True)
    backward_solver: str | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        if self.solver not in ("dopri5", "rkc2", "rk4"):
            raise InputError(f"Adjoint(solver={self.solver!r}): use 'dopri5' (adaptive), 'rkc2' (adaptive, stabilized "
                             "for stiff gradient flows) or 'rk4' (fixed steps).")
        if self.error_scale not in ode.ERROR_SCALES:
            raise InputError(f"Adjoint(error_scale={self.error_scale!r}): use 'state' or 'displacement'.")
        if self.steps is not None and (self.solver == "rkc2" or self.error_scale != "state"
                                       or self.backward_solver is not None):
            what = ("solver='rkc2'" if self.solver == "rkc2" else f"error_scale={self.error_scale!r}"
                    if self.error_scale != "state" else f"backward_solver={self.backward_solver!r}")
            raise InputError(f"Adjoint({what}) is a setting of the adaptive rule: leave steps=None.")
        if self.steps is None:
            if self.checkpoints is not None:
                raise InputError("Adjoint(checkpoints=...) applies to the stored sweep: give steps=K too.")
            if self.solver == "rk4":
                raise InputError(f"Adjoint(solver={self.solver!r}) takes fixed steps of T/K: give steps=K too.")
        else:
            _check_steps("Adjoint", self.steps)
            if self.checkpoints is not None and isinstance(self.checkpoints, int) and self.steps % self.checkpoints:
                raise InputError(f"Adjoint(checkpoints={self.checkpoints}) must divide steps={self.steps}.")
        self.sensitivity  # validates the rule's arguments

    @property
    def sensitivity(self) -> ode.AbstractSensitivity:
        """The `ctmeta.ode` rule that differentiates the flow."""
        if self.steps is None:
            return ode.AdaptiveAdjoint(self.dense_steps, self.adjoint_rtol, self.adjoint_atol,
                                       backward_solver=self.backward_solver)
        return ode.StoredAdjoint(self.scheme, self.checkpoints, self.stability_check)

    @property
    def inner_steps(self) -> int:
        """`K` for the stored rule; 100 (the default evaluation's `T / h`) for the adaptive one."""
        return self.steps if self.steps is not None else 100

    def adapt(self, loss_fn, params, data, T, flow=None):
        return self._solve(loss_fn, params, data, T, throw=True, flow=flow)

    def adapt_with_status(self, loss_fn, params, data, T, flow=None):
        return self._solve(loss_fn, params, data, T, throw=False, flow=flow)

    def _solve(self, loss_fn, params, data, T, throw, flow=None):
        flow = self.check_flow(flow)
        if not flow.is_gradient:  # the flow's own field and state; its arrays are the field's leaves
            out = self._ode_solve(flow.field(loss_fn), flow.init_state(params), data, T, throw)
            return flow.params_of(out) if throw else (flow.params_of(out[0]), out[1])
        return self._ode_solve(GradientField(loss_fn), params, data, T, throw)

    def _ode_solve(self, field, y0, data, T, throw):
        # Only the array part of the parameters flows; structure is static.
        return ode.solve(
            field,
            y0,
            T,
            data,
            steps=self.steps if self.steps is not None else 100,
            sensitivity=self.sensitivity,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
            solver=self.solver,
            throw=throw,
            error_scale=self.error_scale,
        )


class Unrolled(AbstractMethod):
    """MAML: `steps` gradient steps of size `T / steps`, differentiated by backprop.

    `steps` is required: it sets both the step size $h = T/K$ and the memory
    of the graph, and no default fits both (MAML's 5 steps, the other rules'
    100); `Unrolled()` says so instead of running 5 steps unannounced.

    The meta-gradient is exact for the discrete map; memory grows with
    `steps` (that is the comparison A-MAML and COMLN make). Applied to a
    linear head alone, this is ANIL. With an inner flow (`ctmeta.flows`) the
    steps are the flow's explicit Euler steps of `T / steps` (Meta-SGD for
    [`Preconditioned`][ctmeta.flows.Preconditioned], momentum GD for
    [`HeavyBall`][ctmeta.flows.HeavyBall]), differentiated in the
    initialisation, the data, `T` and the flow's meta-parameters.
    """

    steps: int | None = eqx.field(default=None, static=True)
    unroll: int = eqx.field(default=1, static=True)

    def __check_init__(self):
        if self.steps is None:
            raise InputError("Unrolled needs steps=K, the number of unrolled gradient steps (h = T/K; the graph's "
                             "memory grows with K), e.g. Unrolled(steps=5) for MAML's 5 steps.")
        _check_steps("Unrolled", self.steps)

    def adapt(self, loss_fn, params, data, T, flow=None):
        flow = self.check_flow(flow)
        if not flow.is_gradient:  # the flow's explicit Euler steps: its exact discrete reference
            return _flow_steps(flow, loss_fn, params, data, T / self.steps, self.steps, unroll=self.unroll)
        return _gd_steps(loss_fn, params, data, T / self.steps, self.steps, unroll=self.unroll)


class FirstOrder(AbstractMethod):
    r"""FOMAML: gradient steps whose Jacobian is replaced by the identity.

    `jax.grad` through the result gives $\nabla J(u_K)$ for $\theta$ and
    zero for the data (the first-order approximation). It gives no derivative
    in $T$ or in an inner flow's meta-parameters (it runs any flow's Euler
    steps, `ctmeta.flows`, but does not learn the flow): differentiating in
    them raises `InputError` rather than return a silent 0.
    """

    differentiates: ClassVar[frozenset[str]] = frozenset({"params"})

    steps: int = eqx.field(default=100, static=True)

    def __check_init__(self):
        _check_steps("FirstOrder", self.steps)

    def adapt(self, loss_fn, params, data, T, flow=None):
        flow = self.check_flow(flow)
        T = _refuse_derivative(self, "T", T)
        if not flow.is_gradient:
            flow = _refuse_derivative(self, "the flow's meta-parameters", flow)
        return self._first_order(loss_fn, params, data, T, flow)

    def _first_order(self, loss_fn, params, data, T, flow):
        stop = jax.lax.stop_gradient
        if not flow.is_gradient:
            u = _flow_steps(stop(flow), loss_fn, stop(params), stop(data), stop(T / self.steps), self.steps)
        else:
            u = _gd_steps(loss_fn, stop(params), stop(data), stop(T / self.steps), self.steps)
        # u = theta + const: the identity Jacobian, without a graph over the steps.
        return jax.tree.map(lambda th, ui: th + jax.lax.stop_gradient(ui - th), params, u)


class Reptile(AbstractMethod):
    r"""Reptile: gradient steps, then the outer update moves $\theta$ toward the result.

    Reptile's update is not the gradient of an outer loss; a meta-learner
    uses [`reptile_direction`][] ($\theta - u_K$, averaged over tasks) as the
    "gradient" handed to the optimiser. Through `adapt` the parameters get
    the first-order (identity) Jacobian, like [`FirstOrder`][], and a
    derivative in $T$ is refused (`InputError`).
    """

    differentiates: ClassVar[frozenset[str]] = frozenset({"params"})
    outer_direction: ClassVar[bool] = True
    adapts_head: ClassVar[bool] = False  # its direction is taken in the whole model's parameters
    takes_flow: ClassVar[bool] = False
    _flow_refusal: ClassVar[str] = "its outer direction theta - u_K differentiates no inner loop, so a flow's meta-parameters would get no update."

    steps: int = eqx.field(default=100, static=True)

    def __check_init__(self):
        _check_steps("Reptile", self.steps)

    def adapt(self, loss_fn, params, data, T, flow=None):
        self.check_flow(flow)
        T = _refuse_derivative(self, "T", T)
        return FirstOrder(self.steps)._first_order(loss_fn, params, data, T, Gradient())


def reptile_direction(params: PyTree, adapted: PyTree) -> PyTree:
    r"""Reptile's update direction $\theta - u$; with a leading task axis on `adapted`, its mean.

    Feed it to an optax optimiser as the gradient: a descent step then moves
    $\theta$ toward the adapted parameters.
    """

    def direction(theta, u):
        d = theta - u if u.ndim == theta.ndim else theta[None] - u
        return d if u.ndim == theta.ndim else jnp.mean(d, axis=0)

    return jax.tree.map(direction, params, adapted)


class Implicit(AbstractMethod):
    r"""iMAML: proximal inner loss, implicit meta-gradient by conjugate gradients.

    The inner loop runs `steps` gradient steps of size $T/K$ on
    $\hat L(u) = L(u) + \tfrac{\lambda}{2}\|u - \theta\|^2$. At the proximal
    optimum $\nabla L(u^*) + \lambda (u^* - \theta) = 0$, so by the implicit
    function theorem

    $$\frac{dJ}{d\theta} = \Big(I + \tfrac{1}{\lambda} H\Big)^{-1} \nabla J(u^*), \qquad
      \frac{dJ}{d\,\text{data}} = -\tfrac{1}{\lambda}\,
      \partial_{\text{data}} \langle \nabla_u L(u^*), v\rangle,$$

    with $v$ the first solution, found by `cg_steps` iterations of conjugate
    gradients with Hessian-vector products. It gives no derivative in $T$
    (the proximal optimum does not depend on it): differentiating in $T$
    raises `InputError`.
    """

    differentiates: ClassVar[frozenset[str]] = frozenset({"params", "data"})
    takes_flow: ClassVar[bool] = False
    _flow_refusal: ClassVar[str] = "its meta-gradient is that of the proximal optimum, not of the path to it, so a flow's meta-parameters get none."

    _repr_always: ClassVar[tuple[str, ...]] = ("steps", "lam")

    steps: int = eqx.field(default=100, static=True)
    lam: float = eqx.field(default=1.0, static=True)
    cg_steps: int = eqx.field(default=5, static=True)

    def __check_init__(self):
        _check_steps("Implicit", self.steps)
        if not self.lam > 0:
            raise InputError(f"Implicit(lam={self.lam!r}): the proximal strength must be positive.")
        if not isinstance(self.cg_steps, int) or self.cg_steps < 1:
            raise InputError(f"Implicit(cg_steps={self.cg_steps!r}): give a positive int.")

    def adapt(self, loss_fn, params, data, T, flow=None):
        self.check_flow(flow)
        loss_fn = ode.closure_convert(loss_fn, params, data)
        T = _refuse_derivative(self, "T", T)
        return _implicit_adapt((params, data, loss_fn), jax.lax.stop_gradient(T), self)


def _implicit_forward(loss_fn, params, data, T, method):
    h = T / method.steps
    return _gd_steps(loss_fn, params, data, h, method.steps, prox=(method.lam, params))


@eqx.filter_custom_vjp
def _implicit_adapt(primal, T, method):
    params, data, loss_fn = primal
    return _implicit_forward(loss_fn, params, data, T, method)


@_implicit_adapt.def_fwd
def _implicit_fwd(perturbed, primal, T, method):
    params, data, loss_fn = primal
    u = _implicit_forward(loss_fn, params, data, T, method)
    return u, u


@_implicit_adapt.def_bwd
def _implicit_bwd(u, g, perturbed, primal, T, method):
    params, data, loss_fn = ode.literals_as_arrays(primal)
    g = ode.cotangent_like(g, u)

    def hvp(v):
        return jax.jvp(lambda w: jax.grad(loss_fn)(w, data), (u,), (v,))[1]

    def operator(v):  # (I + H / lam) v
        return jax.tree.map(lambda vi, hi: vi + hi / method.lam, v, hvp(v))

    v, _ = jax.scipy.sparse.linalg.cg(operator, g, x0=g, maxiter=method.cg_steps, tol=0.0)
    # data and the loss's constants: -(1/lam) d/d(data, loss) <grad_u L(u*), v>
    diff, nondiff = eqx.partition((data, loss_fn), eqx.is_inexact_array)

    def inner(d):
        data_, loss_ = eqx.combine(d, nondiff)
        gu = jax.grad(loss_)(u, data_)
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(gu), jax.tree.leaves(v)))

    gdata, gloss = jax.tree.map(lambda x: -x / method.lam, jax.grad(inner)(diff))
    return (v, gdata, gloss)


class LinearFlow(AbstractMethod):
    r"""COMLN: adapt a linear softmax head by the gradient flow of its cross-entropy.

    The head $W$ follows $\dot W = -\nabla_W \big(\mathrm{CE}(\phi W^\top, y)
    + \tfrac{\lambda}{2}\|W - W_0\|^2\big)$ on the embedded support set
    $\phi$ ([`linear_flow`][]); the meta-gradients in the head's
    initialisation $W_0$, the embedding (through $\phi$) and $T$ are exact,
    by forward sensitivity, in memory independent of $T$. Use it in a
    [`MetaLearner`][] with an [`EmbeddingHead`][ctmeta.models.EmbeddingHead], `adapt="head"` and the
    cross-entropy loss (the flow's inner loss is cross-entropy by
    construction): the rule is `head_only`, and its `adapt` refuses a
    general loss.

    **Arguments:**

    - `lam`: the proximal strength $\lambda \ge 0$ around $W_0$.
    - `solver`: `"dopri5"` (adaptive) or `"euler"` (then `steps` fixed
      steps, which is ANIL with learning rate $T/\text{steps}$).
    - `steps`: the number of Euler steps.
    - `rtol`, `atol`, `max_steps`: the adaptive solve's tolerances and step
      budget.
    """

    head_only: ClassVar[bool] = True
    differentiates: ClassVar[frozenset[str]] = frozenset({"params", "data", "T"})
    takes_flow: ClassVar[bool] = False
    _flow_refusal: ClassVar[str] = "it runs COMLN's own flow of a softmax head, by forward sensitivity."

    lam: float = eqx.field(default=0.0, static=True)
    solver: str = eqx.field(default="dopri5", static=True)
    steps: int | None = eqx.field(default=None, static=True)
    rtol: float = eqx.field(default=1e-6, static=True)
    atol: float = eqx.field(default=1e-8, static=True)
    max_steps: int = eqx.field(default=4096, static=True)

    def __check_init__(self):
        if self.solver not in ("dopri5", "euler"):
            raise InputError(f"LinearFlow(solver={self.solver!r}): use 'dopri5' or 'euler'.")
        if self.solver == "euler" and (not isinstance(self.steps, int) or self.steps < 1):
            raise InputError("LinearFlow(solver='euler') needs steps, a positive int.")
        if not self.lam >= 0:
            raise InputError(f"LinearFlow(lam={self.lam!r}): the proximal strength must be >= 0.")

    @property
    def inner_steps(self) -> int:
        """`steps` for Euler; 100 (the default evaluation's `T / h`) for Dopri5."""
        return self.steps if self.steps is not None else 100

    def adapt(self, loss_fn, params, data, T, flow=None):
        self.check_flow(flow)
        raise InputError(
            "LinearFlow adapts a linear softmax head by the flow of its cross-entropy, not a model on a loss: "
            "use it in a MetaLearner with adapt='head' and an EmbeddingHead, or call adapt_head "
            "(or ctmeta.linear_flow.linear_flow)"
        )

    def adapt_head(self, W0, features, labels_onehot, T, throw: bool = True):
        r"""The adapted head $W(T)$.

        **Arguments:**

        - `W0`: the head's initialisation, `(ways, d)`.
        - `features`: the embedded support set $\phi$, `(K, d)`.
        - `labels_onehot`: `(K, ways)`.
        - `T`: the horizon.
        - `throw`: as in [`linear_flow`][].

        **Returns:** $W(T)$; with `throw=False`, `(W(T), status)`.
        """
        return linear_flow(
            W0,
            features,
            labels_onehot,
            T,
            lam=self.lam,
            solver=self.solver,
            steps=self.steps if self.solver == "euler" else None,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
            throw=throw,
        )
