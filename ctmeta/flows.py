r"""Inner flows: the ODE an inner loop follows, with meta-parameters of its own.

A-MAML's inner loop is the gradient flow $\dot u = -\nabla L(u)$ of a task's
training loss $L$. An *inner flow* generalises it to any vector field built
from $L$ whose arrays (a preconditioner, a friction) are learned beside the
initialisation $\theta$: the adjoint ([`Adjoint`][ctmeta.methods.Adjoint])
differentiates every array a vector field holds, and backprop through the
flow's Euler steps ([`Unrolled`][ctmeta.methods.Unrolled]) is its exact
discrete reference.

| flow | ODE | state | meta-parameters | its Euler step of $h$ |
| --- | --- | --- | --- | --- |
| [`Gradient`][] (default) | $\dot u = -\nabla L(u)$ | $u$ | none | gradient descent |
| [`Preconditioned`][] | $\dot u = -P\,\nabla L(u)$, $P = e^{\rho}$ | $w = P^{-1/2} u$ | $\rho$ | Meta-SGD $u - hP\nabla L(u)$ |
| [`HeavyBall`][] | $\dot u = v$, $\dot v = -\gamma v - \nabla L(u)$ | $(u, v)$, $v(0) = 0$ | $\log\gamma$ | momentum GD |

**The contract** ([`AbstractFlow`][]): `field(loss_fn)`, the
[`AbstractVectorField`][ctmeta.ode.AbstractVectorField] of the flow of a loss
`loss_fn(params, data)`; `init_state(params)`, the state at $t = 0$;
`params_of(state)`, the parameters a state stands for; `euler_step(field,
state, data, h)`, one explicit Euler step ([`Unrolled`][ctmeta.methods.Unrolled]'s
and [`FirstOrder`][ctmeta.methods.FirstOrder]'s inner loop); and
`meta_params`, its learnable arrays. A flow is an equinox module: its arrays
are pytree leaves, so a [`MetaLearner`][ctmeta.meta.MetaLearner] learns them
with its optax optimiser and saves them in its checkpoints.

**Which rules take a flow.** [`Adjoint`][ctmeta.methods.Adjoint] (both backward
forms), [`Unrolled`][ctmeta.methods.Unrolled] and
[`FirstOrder`][ctmeta.methods.FirstOrder] (whose identity Jacobian gives the
flow's arrays no gradient). [`Implicit`][ctmeta.methods.Implicit] (its
meta-gradient is that of the inner optimum, not of the path),
[`Reptile`][ctmeta.methods.Reptile] (its outer direction does not differentiate
the inner loop) and [`LinearFlow`][ctmeta.methods.LinearFlow] (COMLN's own head
flow) refuse any flow but [`Gradient`][].
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp

from . import ode
from ._errors import InputError

PyTree = Any

__all__ = ["AbstractFlow", "Gradient", "Preconditioned", "HeavyBall", "GradientField", "PreconditionedField",
           "HeavyBallField", "FLOWS"]


def _neg(tree):
    return jax.tree.map(jnp.negative, tree)


def _call_loss(triple):
    u, data, loss = triple
    return loss(u, data)


def _grad_and_hvp(loss, u, data, v, wrt_data, wrt_loss):
    r"""$(\nabla_u L,\ \nabla^2 L\,(v, 0, 0))$ over $(u, \text{data}, \text{loss constants})$ jointly.

    One forward-over-reverse product: the jvp of the full gradient in the
    tangent $(v, 0, 0)$ gives $H_{uu} v$, $H_{\text{data},u} v$ and
    $H_{\text{loss},u} v$ at once (the Hessian is symmetric), and its primal
    output is the gradient itself, for free.
    """
    spec = ode.differentiable((u, data, loss), (True, wrt_data, wrt_loss))
    diff, nondiff = eqx.partition((u, data, loss), spec)
    full_grad = jax.grad(lambda d: _call_loss(eqx.combine(d, nondiff)))
    tangent = (v,) + jax.tree.map(jnp.zeros_like, diff[1:])
    grads, hvp = jax.jvp(full_grad, (diff,), (tangent,))
    return grads[0], hvp


def _field_wrt(wrt_self, name):
    """The flag of the field's attribute `name` in `wrt_self` (a bool, or a field-shaped pytree)."""
    return getattr(wrt_self, name) if isinstance(wrt_self, eqx.Module) else wrt_self


class GradientField(ode.AbstractVectorField):
    r"""The gradient flow $f(t, u, \text{data}) = -\nabla_u L(u, \text{data})$ of a loss.

    Its transposed Jacobian needs no reverse-over-reverse: the Hessian is
    symmetric, so one forward-over-reverse product (a `jvp` of `grad` taken
    over $(u, \text{data}, \text{loss constants})$ jointly, tangent
    $(a, 0, 0)$) gives every cotangent at once:

    $$(\partial f/\partial u)^\top a = -H_{uu}\, a, \qquad
      (\partial f/\partial \text{data})^\top a = -H_{\text{data},u}\, a .$$

    Its Jacobian $-H_{uu}$ is symmetric (`symmetric_jacobian`), so
    `ctmeta.ode.StoredAdjoint` checks the stability of its backward sweep.
    """

    symmetric_jacobian: ClassVar[bool] = True

    loss: Callable

    def __call__(self, t, u, data):
        return _neg(jax.grad(self.loss)(u, data))

    def vjp(self, t, u, data, a, wrt=None):
        # `wrt` is over (data, self); this field's only leaves are those of `loss`.
        wrt_data, wrt_self = wrt if wrt is not None else (True, True)
        _, (hu, hdata, hloss) = _grad_and_hvp(self.loss, u, data, a, wrt_data, _field_wrt(wrt_self, "loss"))
        return _neg(hu), _neg(hdata), GradientField(_neg(hloss))

    def closure_convert(self, t, u, data):
        return GradientField(ode.closure_convert(self.loss, u, data))


class PreconditionedField(ode.AbstractVectorField):
    r"""$\dot u = -P\,\nabla L(u)$, $P = e^{\rho}$ diagonal, solved in $w = P^{-1/2} u$.

    With $s = P^{1/2} = e^{\rho/2}$ (elementwise; a scalar per leaf for a
    per-layer $\rho$) the state is $w = u / s$ and

    $$\dot w = f(w) = -s \odot \nabla L(s \odot w),$$

    the gradient flow of $\tilde L(w) = L(s \odot w)$. Its Jacobian is the
    symmetric $-P^{1/2} H P^{1/2}$, similar to the $-P H$ of the flow in $u$
    (same eigenvalues), so it is a gradient field (`symmetric_jacobian`):
    [`StoredAdjoint`][ctmeta.ode.StoredAdjoint]'s stability check estimates
    exactly the $\lambda_{\max}(P^{1/2} H P^{1/2})$ that bounds its fixed
    step, $h\,\lambda_{\max} < c$. A linear change of variables commutes with
    every Runge-Kutta scheme, so the flow, its Euler steps and the adjoint
    are those of $\dot u = -P\nabla L(u)$ (up to rounding). Its vjp, one
    Hessian-vector product $z = H(u)\,(s \odot a)$ at $u = s \odot w$, with
    $g = \nabla L(u)$:

    $$(\partial f/\partial w)^\top a = -s \odot z, \qquad
      (\partial f/\partial \rho)^\top a = -\tfrac12\big(s \odot g \odot a + u \odot z\big),$$

    summed over each leaf for a per-layer $\rho$, and
    $(\partial f/\partial \text{data})^\top a = -H_{\text{data},u}(s \odot a)$.
    (In $u$ coordinates these are the $(\partial f/\partial u)^\top a =
    -H P a$ and $(\partial f/\partial \rho)^\top a = -(P \odot g) \odot a$
    of $f = -P g$.)
    """

    symmetric_jacobian: ClassVar[bool] = True

    loss: Callable
    rho: PyTree

    def __call__(self, t, w, data):
        s = _scales(self.rho, w)
        u = jax.tree.map(jnp.multiply, s, w)
        return jax.tree.map(lambda si, gi: -si * gi, s, jax.grad(self.loss)(u, data))

    def vjp(self, t, w, data, a, wrt=None):
        wrt_data, wrt_self = wrt if wrt is not None else (True, True)
        s = _scales(self.rho, w)
        u = jax.tree.map(jnp.multiply, s, w)
        sa = jax.tree.map(jnp.multiply, s, a)
        g, (z, hdata, hloss) = _grad_and_hvp(self.loss, u, data, sa, wrt_data, _field_wrt(wrt_self, "loss"))
        aw = jax.tree.map(lambda si, zi: -si * zi, s, z)
        arho = jax.tree.map(lambda r: None, self.rho)  # not differentiated: None at each leaf
        if _any_true(_field_wrt(wrt_self, "rho")):
            arho = jax.tree.map(lambda r, si, gi, ai, ui, zi: _sum_to(-0.5 * (si * gi * ai + ui * zi), r),
                                self.rho, s, g, a, u, z)
        return aw, _neg(hdata), PreconditionedField(_neg(hloss), arho)

    def closure_convert(self, t, w, data):
        return PreconditionedField(ode.closure_convert(self.loss, w, data), self.rho)


class HeavyBallField(ode.AbstractVectorField):
    r"""The heavy-ball flow $\dot u = v$, $\dot v = -\gamma v - \nabla L(u)$, $\gamma = e^{\log\gamma}$.

    Its vjp, for a cotangent $(a_u, a_v)$, is one Hessian-vector product
    $z = H(u)\,a_v$:

    $$(\partial f/\partial u)^\top a = -z, \qquad (\partial f/\partial v)^\top a = a_u - \gamma a_v,
      \qquad (\partial f/\partial \log\gamma)^\top a = -\gamma\,\langle v, a_v\rangle,$$

    and $(\partial f/\partial \text{data})^\top a = -H_{\text{data},u}\,a_v$.
    Its Jacobian $\begin{pmatrix} 0 & I \\ -H & -\gamma I\end{pmatrix}$ is not
    symmetric, and its eigenvalues $-\gamma/2 \pm \sqrt{\gamma^2/4 - \lambda}$
    ($\lambda$ an eigenvalue of $H$) are complex once $\lambda > \gamma^2/4$:
    the real-axis bound $h\,\lambda_{\max} < c$ that
    [`StoredAdjoint`][ctmeta.ode.StoredAdjoint] checks does not apply (Heun is
    unstable on the undamped imaginary axis at any $h$), and Lanczos bounds
    nothing for a non-normal matrix. So `symmetric_jacobian` is False and a
    stored sweep over this flow is not checked: prefer the adaptive adjoint
    (`Adjoint()`), whose step control keeps the backward solve stable, or
    check a stored sweep against it.
    """

    loss: Callable
    log_gamma: jax.Array

    def __call__(self, t, y, data):
        u, v = y
        gamma = jnp.exp(self.log_gamma)
        g = jax.grad(self.loss)(u, data)
        return v, jax.tree.map(lambda vi, gi: (-gamma * vi - gi).astype(vi.dtype), v, g)

    def vjp(self, t, y, data, a, wrt=None):
        wrt_data, wrt_self = wrt if wrt is not None else (True, True)
        u, v = y
        au, av = a
        gamma = jnp.exp(self.log_gamma)
        _, (z, hdata, hloss) = _grad_and_hvp(self.loss, u, data, av, wrt_data, _field_wrt(wrt_self, "loss"))
        cot_v = jax.tree.map(lambda x, y_: (x - gamma * y_).astype(x.dtype), au, av)
        alog = None
        if _any_true(_field_wrt(wrt_self, "log_gamma")):
            alog = (-gamma * _vdot(v, av)).astype(jnp.result_type(self.log_gamma))
        return (_neg(z), cot_v), _neg(hdata), HeavyBallField(_neg(hloss), alog)

    def closure_convert(self, t, y, data):
        return HeavyBallField(ode.closure_convert(self.loss, y[0], data), self.log_gamma)


def _any_true(flags) -> bool:
    return any(bool(f) for f in jax.tree.leaves(flags))


def _vdot(x, y):
    return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


def _scales(rho, like):
    """$e^{\rho/2}$, leaf by leaf, in the state's dtype."""
    return jax.tree.map(lambda r, x: jnp.exp(0.5 * r).astype(x.dtype), rho, like)


def _sum_to(x, r):
    """`x` summed to the shape of `r` (a per-layer scalar), in `r`'s dtype."""
    return (x if jnp.shape(r) == x.shape else jnp.sum(x)).astype(jnp.result_type(r))


class AbstractFlow(eqx.Module):
    r"""An inner flow: a vector field built from a loss, and its meta-parameters.

    A subclass implements `field`, and `init_state` / `params_of` when its
    state is not the parameters themselves; `euler_step` defaults to the
    explicit Euler step $y + h f(y)$ of its field. Its floating-point array
    leaves are its meta-parameters (`meta_params`); static configuration
    goes in `eqx.field(static=True)`. `name` is its name on the command line
    (`ctmeta train --flow NAME`).
    """

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def field(self, loss_fn: Callable) -> ode.AbstractVectorField:
        """The vector field of this flow of `loss_fn(params, data)`, on the flow's state."""

    def init_state(self, params: PyTree) -> PyTree:
        """The state at $t = 0$ of a flow started at `params`."""
        return params

    def params_of(self, state: PyTree) -> PyTree:
        """The parameters a state stands for (its `u`)."""
        return state

    def check_like(self, params: PyTree, where: str | None = None) -> None:
        """Raise an `InputError` (naming `where`, the flow and the mismatch) if
        this flow's arrays were built for other parameters than `params`, the
        ones it adapts; a flow whose arrays do not follow the parameters
        (the gradient and heavy-ball flows) fits any."""

    def euler_step(self, field: ode.AbstractVectorField, state: PyTree, data: PyTree, h) -> PyTree:
        """One explicit Euler step $y + h\\,f(y)$ of `field` (from `self.field`)."""
        return jax.tree.map(lambda y, f: (y + h * f).astype(y.dtype), state, field(0.0, state, data))

    @property
    def meta_params(self) -> PyTree:
        """The learnable arrays (the module with its other leaves `None`)."""
        return eqx.filter(self, eqx.is_inexact_array)

    @property
    def is_gradient(self) -> bool:
        """Whether this is the plain gradient flow (what every rule can run)."""
        return False

    def astype(self, dtype) -> "AbstractFlow":
        """The same flow with its arrays in `dtype` (the parameters'), differentiably."""
        return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, self)


class Gradient(AbstractFlow):
    r"""The gradient flow $\dot u = -\nabla L(u)$ (the default): no meta-parameters."""

    name: ClassVar[str] = "gradient"

    def field(self, loss_fn):
        return GradientField(loss_fn)

    def euler_step(self, field, state, data, h):
        # As `Unrolled` always did: u - h g (bitwise the same as y + h (-g)).
        g = jax.grad(field.loss)(state, data)
        return jax.tree.map(lambda ui, gi: ui - h * gi, state, g)

    @property
    def is_gradient(self) -> bool:
        return True


class Preconditioned(AbstractFlow):
    r"""Meta-SGD in continuous time: $\dot u = -P\,\nabla L(u)$, $P = e^{\rho}$ a learned diagonal.

    $\rho$ has the structure of the adapted parameters: per parameter
    (`per="parameter"`, each leaf of $\rho$ the shape of its parameter) or
    per layer (`per="layer"`, one scalar per leaf). The flow is solved in
    $w = P^{-1/2} u$, where it is a gradient flow ([`PreconditionedField`][]):
    its stored-sweep stability check is then exact for it. Its Euler step of
    $h$ is Meta-SGD's $u - h\,P\,\nabla L(u)$ (in $w$).

    Build one with [`Preconditioned.like`][] from the parameters (or the
    model) it will adapt.

    **Fields:** `rho` (the log-preconditioner, a pytree like the adapted
    parameters, `None` at their non-array leaves) and `per`.
    """

    name: ClassVar[str] = "preconditioned"

    rho: PyTree
    per: Literal["parameter", "layer"] = eqx.field(default="parameter", static=True)

    def __check_init__(self):
        if self.per not in ("parameter", "layer"):
            raise InputError(f"Preconditioned(per={self.per!r}): use 'parameter' or 'layer'.")

    @classmethod
    def like(cls, params: PyTree, *, per: Literal["parameter", "layer"] = "parameter",
             scale: float = 1.0) -> "Preconditioned":
        r"""$P = $ `scale` $\cdot I$ ($\rho = \log$ `scale`) for the floating-point arrays of `params`.

        `params` is what the flow adapts: a model (its floating-point arrays)
        or, for a head-only learner, the head.
        """
        if per not in ("parameter", "layer"):
            raise InputError(f"Preconditioned.like(per={per!r}): use 'parameter' or 'layer'.")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise InputError(f"Preconditioned.like(scale={scale!r}): give a positive float.")
        arrays = eqx.filter(params, eqx.is_inexact_array)
        if not jax.tree.leaves(arrays):
            raise InputError("Preconditioned.like: params has no floating-point arrays.")
        value = float(jnp.log(scale))
        shape = (lambda x: x.shape) if per == "parameter" else (lambda x: ())
        return cls(jax.tree.map(lambda x: jnp.full(shape(x), value, x.dtype), arrays), per)

    def field(self, loss_fn):
        return PreconditionedField(loss_fn, self.rho)

    def mismatch(self, params: PyTree) -> str | None:
        """How `params` differ from the parameters this flow was built for
        (its `rho`'s arrays, their shapes, the module); `None` if they fit."""
        arrays = eqx.filter(params, eqx.is_inexact_array)
        theirs = jax.tree_util.tree_flatten_with_path(arrays)[0]
        mine = jax.tree_util.tree_flatten_with_path(self.rho)[0]
        paths = [jax.tree_util.keystr(k) for k, _ in theirs]
        rho_paths = [jax.tree_util.keystr(k) for k, _ in mine]
        if paths != rho_paths:
            extra = [k for k in rho_paths if k not in paths]
            lacking = [k for k in paths if k not in rho_paths]
            where = (f"rho{extra[0]} is not among the parameters" if extra
                     else f"the parameters' {lacking[0]} has no rho" if lacking else "they are in another order")
            return f"rho has {len(mine)} arrays, the parameters {len(theirs)}: {where}"
        for path, (_, r), (_, x) in zip(paths, mine, theirs):
            want = () if self.per == "layer" else jnp.shape(x)
            if jnp.shape(r) != want:
                return (f"rho{path} has shape {tuple(jnp.shape(r))} but the adapted parameter {path} has shape "
                        f"{tuple(jnp.shape(x))}"
                        + (" (per='layer': one scalar per array)" if self.per == "layer" else ""))
        if jax.tree.structure(self.rho) != jax.tree.structure(arrays):
            return "the parameters are another kind of module (its type or static fields differ)"
        return None

    def check_like(self, params: PyTree, where: str | None = None) -> None:
        """An `InputError` naming the flow and the mismatch unless `params` are
        what this flow was built for by [`Preconditioned.like`][]."""
        why = self.mismatch(params)
        if why is not None:
            raise InputError(f"{where + ': ' if where else ''}flow=Preconditioned(per={self.per!r}) was built for "
                             f"other parameters than the ones it adapts: {why}. Build it with "
                             "Preconditioned.like(params) of what it adapts (the model, or for a head-only learner "
                             "its head).")

    def init_state(self, params):
        self.check_like(params)  # shapes are static: this runs once, when traced
        return jax.tree.map(lambda x, s: x / s, params, _scales(self.rho, params))

    def params_of(self, state):
        return jax.tree.map(jnp.multiply, _scales(self.rho, state), state)

    @property
    def preconditioner(self) -> PyTree:
        """$P = e^{\\rho}$."""
        return jax.tree.map(jnp.exp, self.rho)


class HeavyBall(AbstractFlow):
    r"""The heavy-ball flow $\dot u = v$, $\dot v = -\gamma v - \nabla L(u)$, $v(0) = 0$.

    Momentum gradient descent is its Euler discretisation (with momentum
    $1 - h\gamma$ and learning rate $h^2$ in the usual form); $\gamma =
    e^{\log\gamma} > 0$ is learned. The state is $(u, v)$; the adapted
    parameters are $u(T)$. See [`HeavyBallField`][] for its vjp, and for why
    the stored sweep's stability check does not apply to it.

    **Fields:** `log_gamma`, a scalar array. `HeavyBall.with_gamma(2.0)`
    builds one from $\gamma$.
    """

    name: ClassVar[str] = "heavy-ball"

    log_gamma: jax.Array

    @classmethod
    def with_gamma(cls, gamma: float = 1.0) -> "HeavyBall":
        r"""The flow with friction $\gamma$ (`log_gamma` $= \log\gamma$)."""
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise InputError(f"HeavyBall.with_gamma(gamma={gamma!r}): the friction must be a positive float.")
        return cls(jnp.log(jnp.asarray(gamma, dtype=float)))

    @property
    def gamma(self) -> jax.Array:
        """$\\gamma = e^{\\log\\gamma}$."""
        return jnp.exp(self.log_gamma)

    def field(self, loss_fn):
        return HeavyBallField(loss_fn, self.log_gamma)

    def init_state(self, params):
        return params, jax.tree.map(jnp.zeros_like, params)

    def params_of(self, state):
        return state[0]


#: The flows by their command-line name.
FLOWS: dict[str, type[AbstractFlow]] = {f.name: f for f in (Gradient, Preconditioned, HeavyBall)}


def check_flow(flow, where: str) -> AbstractFlow:
    """`flow`, or `Gradient()` for `None`; an `InputError` naming `where` for anything else."""
    if flow is None:
        return Gradient()
    if not isinstance(flow, AbstractFlow):
        raise InputError(f"{where}: flow must be an inner flow (ctmeta.Gradient(), ctmeta.Preconditioned.like(params), "
                         f"ctmeta.HeavyBall.with_gamma(...)); got {flow!r}.")
    return flow
