r"""COMLN: gradient flow of a linear softmax head, with exact meta-gradients in
memory that does not grow with the horizon $T$.

The head $W \in \mathbb{R}^{N \times d}$ adapts to a support set of $M$
embedded examples $\phi_m$ = `features[m]` with one-hot labels $y_m$ =
`labels[m]` by following

$$\frac{dW}{dt} = -\nabla L(W), \quad W(0) = W_0, \qquad
  L(W) = \frac{1}{M} \sum_m \mathrm{CE}\big(\mathrm{softmax}(W \phi_m), y_m\big)
         + \frac{\lambda}{2} \|W - W_0\|_F^2$$

up to the horizon $T$ (COMLN, Deleu et al. 2022, Eq. 7 and Appendix B). The
adapted head $W(T)$ is differentiable with respect to $W_0$, `features` and
$T$; `jax.grad` of any outer loss of $W(T)$ gives the exact meta-gradients.

**Maths.** Write $\Phi \in \mathbb{R}^{M \times d}$ for the features,
$Y \in \mathbb{R}^{M \times N}$ for the labels, $G = \Phi \Phi^\top$ for the
Gram matrix and $L_0 = \Phi W_0^\top$ for the initial logits.

*State (Proposition 1).* Since $\nabla L(W) = \frac{1}{M} \sum_m (p_m - y_m)
\phi_m^\top + \lambda (W - W_0)$ and $W - W_0$ starts at zero, $W(t) - W_0$
stays in the row space of $\Phi$:

$$W(t) = W_0 - S(t)^\top \Phi, \qquad \frac{dS}{dt} = \frac{P(t) - Y}{M} - \lambda S, \qquad S(0) = 0,$$

with rows $s_m \in \mathbb{R}^N$ of $S \in \mathbb{R}^{M \times N}$ and
$P = \mathrm{softmax}(L_0 - G S)$ row-wise. (Plug $W = W_0 - S^\top \Phi$ into
the flow: $-\dot S^\top \Phi = -\frac{1}{M}(P - Y)^\top \Phi + \lambda S^\top
\Phi$, and the proximal term $\lambda (W - W_0) = -\lambda S^\top \Phi$ becomes
the decay $-\lambda S$.) So $S(T)$ is a function of $L_0$, $G$ (and $Y$,
$\lambda$, $T$) alone; $W_0$ and $\Phi$ enter only through $L_0$, $G$ and the
final $W(T) = W_0 - S(T)^\top \Phi$. In particular the proximal term's
dependence on the meta-parameter $W_0$ is carried exactly: it is the
$-\lambda S$ decay, and no separate $W_0$ term is needed anywhere
(equivalently, the $+\lambda I$ in the sensitivity ODE $\dot S = -H S +
\lambda I$ of Appendix B.2 is absorbed).

*Sensitivities (Propositions 2 and 3).* With $A_i = (\mathrm{diag}(p_i) -
p_i p_i^\top)/M$ the (scaled) softmax Jacobians, the forward sensitivities

$$B_{ij} = \frac{\partial s_i}{\partial (L_0)_j} \in \mathbb{R}^{N \times N}, \qquad
  z_{ijm} = \frac{\partial s_i}{\partial G_{jm}} + \frac{\partial s_i}{\partial G_{mj}} \in \mathbb{R}^N$$

($B$ is $M \times M \times N \times N$, $z$ is $M \times M \times M \times N$;
$G$ taken as an unconstrained matrix, then symmetrised) follow, by
differentiating $\dot S$ above,

$$\dot B_{ij} = \mathbb{1}[i = j]\, A_i - A_i \sum_k G_{ik} B_{kj} - \lambda B_{ij}, \qquad
  \dot z_{ijm} = -A_i \Big[\mathbb{1}[i = j]\, s_m + \mathbb{1}[i = m]\, s_j + \sum_k G_{ik} z_{kjm}\Big]
                 - \lambda z_{ijm},$$

from zero. These are Propositions 2 and 3, with one correction: the paper's
statement of Proposition 3 (and the last line of its proof) puts
$\lambda z_{ijm}$ inside the bracket multiplied by $A_i$, but the $\lambda I$
block of the Hessian in the first line of that proof acts on the $z$ term
alone, giving the decay $-\lambda z_{ijm}$ outside, as here. (With the
paper's form the `features` meta-gradient is off by 87% at $\lambda = 0.3$,
$T = 10$ in our check; with this one it matches autodiff through a direct
solve to solver tolerance.)

*Projection (Propositions 4 to 6).* Given the outer cotangent
$V = \partial J / \partial W(T) \in \mathbb{R}^{N \times d}$, let
$U = \Phi V^\top \in \mathbb{R}^{M \times N}$ (row $i$ is $V \phi_i$). Then

$$C_j = \sum_i U_i^\top B_{ij}, \qquad D_{mj} = \sum_i z_{ijm} \cdot U_i,$$

$$\frac{dJ}{dW_0} = V - C^\top \Phi \quad \text{(Proposition 5)}, \qquad
  \frac{dJ}{d\Phi} = -(S V + C W_0 + D \Phi) \quad \text{(Proposition 6)},$$

$$\frac{dJ}{dT} = \langle V, \dot W(T) \rangle = -\sum_{m,n} \dot S(T)_{mn} U_{mn}
  = -\langle V, \nabla L(W(T)) \rangle \quad \text{(Proposition 4)}.$$

($dJ/d\Phi$ is the part flowing through $W(T)$; autodiff adds any direct use
of the features by the outer loss.) Nothing here is of size $d^2$ or
$Nd \times Nd$; the largest objects are $B$, $z$ and the $M \times d$ /
$N \times d$ products, and only the final state is kept, so memory is
independent of $T$. (Algorithm 1 of the paper writes the $T$ meta-gradient
with a $+$ sign; the $-$ above is Proposition 4's and matches autodiff.)

**Solvers.** `"dopri5"` (default) is adaptive (Dormand-Prince 5(4), error
controlled on the whole augmented state so that the sensitivities are as
accurate as the state). `"euler"` uses fixed steps: `steps=K` gives $K$
steps of $h = T/K$; `dt0=h` gives $\lceil T/h \rceil$ equal steps of
$T / \lceil T/h \rceil \le h$ (diffrax's constant-step convention). Euler on
the head is ANIL: $K$ steps of gradient descent with learning rate $h$
(COMLN Section 3.3), and Euler applied to the augmented system is exactly the
forward-mode derivative of that discrete map (explicit Runge-Kutta
discretisation commutes with forward sensitivity). So with `"euler"`, the
meta-gradients with respect to $W_0$ and `features` are the exact gradients
of ANIL (up to rounding), while the one with respect to $T$ is the
continuous-time formula $-\langle V, \nabla L(W_K) \rangle$ evaluated at the
Euler end point, an $O(h)$ approximation of the derivative of the discrete
map with respect to $T$.

Only reverse mode is provided (`jax.custom_vjp`): `jax.grad`, `jax.vjp`,
`jax.jit` and `jax.vmap` (over tasks, including per-task $T$) work;
`jax.jvp`/`jax.hessian` through `linear_flow` do not.

**One concept, 600 lines.** The augmented system (state and both
sensitivities), its custom VJP and the two public entry points share one
private problem type and field; split, each half would import the other's
privates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._eager import quiet_callback_errors
from ._errors import InputError, NumericalError
from .ode import SolveStatus, nan_if_failed, solve_status

__all__ = ["linear_flow", "linear_flow_adapt"]

_SOLVERS = ("dopri5", "euler")

# Marks the messages of the in-`jit` checks, so that the eager boundary can
# turn the runtime error JAX raises into a `NumericalError`.
_MESSAGE_PREFIX = "ctmeta.linear_flow"


# --------------------------------------------------------------------------
# Configuration and boundary checks
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _FlowConfig:
    """Static (hashable) solver options.

    The numbers that only enter the arithmetic (`lam`, and `dt0` or `steps`)
    travel as arrays in `_Dynamic` instead, so that changing them (a sweep
    over the proximal strength or the Euler step) does not recompile.
    """

    solver: str
    rtol: float
    atol: float
    step_mode: str  # "auto" (Dopri5 picks its first step) or "dt0"
    max_steps: int
    throw: bool = True  # raise on a failed solve, or return NaN and a status


class _Dynamic(NamedTuple):
    """Non-differentiated scalars, passed as arrays (see `_FlowConfig`)."""

    lam: jax.Array  # the proximal strength
    step: jax.Array  # dt0 (step_mode "dt0"; T/steps for Euler's `steps`), else unused


def _concrete(x) -> np.ndarray | None:
    """`x` as a NumPy array if its value is known now, else `None` (traced)."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _positive_number(name: str, value, *, allow_none: bool = False, integer: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, jax.core.Tracer) or not isinstance(value, (int, float, np.number)):
        raise InputError(
            f"`{name}` must be a Python number (a solver option, not differentiated), "
            f"got {type(value).__name__}."
        )
    if isinstance(value, bool) or (integer and int(value) != value):
        raise InputError(f"`{name}` must be a positive integer, got {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"`{name}` must be positive and finite, got {value!r}.")
    return int(value) if integer else float(value)


def _make_config(*, lam, solver, rtol, atol, dt0, steps, max_steps, throw=True):
    """Validate the options; return the static `_FlowConfig` and the numbers
    `(lam, dt0, steps)` that become `_Dynamic`."""
    if solver not in _SOLVERS:
        raise InputError(f"`solver` must be one of {_SOLVERS}, got {solver!r}.")
    if isinstance(lam, jax.core.Tracer) or not isinstance(lam, (int, float, np.number)):
        raise InputError(
            "`lam` must be a Python number: it is a fixed hyperparameter of the "
            "inner loss (linear_flow does not differentiate with respect to it), "
            f"got {type(lam).__name__}."
        )
    if isinstance(lam, bool) or not (math.isfinite(lam) and lam >= 0):
        raise InputError(f"`lam` must be finite and >= 0, got {lam!r}.")
    rtol = _positive_number("rtol", rtol)
    atol = _positive_number("atol", atol)
    dt0 = _positive_number("dt0", dt0, allow_none=True)
    steps = _positive_number("steps", steps, allow_none=True, integer=True)
    max_steps = _positive_number("max_steps", max_steps, integer=True)
    if solver == "euler":
        if (dt0 is None) == (steps is None):
            raise InputError(
                "solver='euler' takes a fixed step: pass exactly one of `dt0` "
                "(the step size h) or `steps` (the number of steps, h = T/steps)."
            )
        if steps is not None:
            # The number of steps is fixed; the step budget must cover it.
            max_steps = max(max_steps, steps)
    elif steps is not None:
        raise InputError(
            "`steps` is for solver='euler'; solver='dopri5' chooses its own steps "
            "(control them with `rtol`/`atol`, and `dt0` for the first step)."
        )
    step_mode = "auto" if dt0 is None and steps is None else "dt0"
    return _FlowConfig(solver, rtol, atol, step_mode, max_steps, bool(throw)), (float(lam), dt0, steps)


def _check_arrays(W0, features, labels, T):
    """Shape checks always; value checks only on arrays known now (not traced)."""
    shapes = {}
    for name, x in (("W0", W0), ("features", features), ("labels", labels)):
        shape = jnp.shape(x)
        if name == "labels" and len(shape) == 1:
            raise InputError(
                f"`labels` must be one-hot, shape (M, N); got integer-like labels of shape {shape}: "
                "pass `jax.nn.one_hot(labels, N)`."
            )
        if len(shape) != 2:
            raise InputError(
                f"`{name}` must be a 2-D array, got shape {shape}. Call linear_flow "
                "on one task and `jax.vmap` it over a batch of tasks."
            )
        shapes[name] = shape
    (N, d), (M, d_features), (M_labels, N_labels) = (
        shapes["W0"],
        shapes["features"],
        shapes["labels"],
    )
    if M_labels != M:
        raise InputError(
            f"`labels` has {M_labels} rows but `features` has {M}: pass one one-hot "
            "label row per support example."
        )
    if N_labels != N:
        raise InputError(
            f"`labels` has {N_labels} classes (columns) but `W0` has {N} rows: the "
            "head must have one row per class, labels one-hot over the same classes."
        )
    if d_features != d:
        raise InputError(
            f"`features` have dimension {d_features} but `W0` has {d} columns: the "
            "head must act on the embedding, W0 of shape (N, d) for features (M, d)."
        )
    if M == 0 or N == 0 or d == 0:
        raise InputError(f"empty support set or head: M={M}, N={N}, d={d}.")
    if jnp.ndim(T) != 0:
        raise InputError(
            f"`T` must be a scalar, got shape {jnp.shape(T)}. For per-task horizons, "
            "`jax.vmap` linear_flow over the tasks and their horizons together."
        )

    T_value = _concrete(T)
    if T_value is not None and not (np.isfinite(T_value) and T_value > 0):
        raise InputError(
            f"`T` must be positive and finite, got {T_value}. To learn T, "
            "parametrise it as T = exp(log_T)."
        )
    for name, x in (("features", features), ("W0", W0)):
        value = _concrete(x)
        if value is not None and not np.all(np.isfinite(value)):
            raise InputError(
                f"`{name}` contains non-finite values (NaN or inf); check the "
                "embedding network and its inputs."
            )
    label_values = _concrete(labels)
    if label_values is not None:
        binary = np.all((label_values == 0) | (label_values == 1))
        if not (binary and np.all(label_values.sum(axis=1) == 1)):
            raise InputError(
                "`labels` must be one-hot: each row all zeros but a single 1. "
                "From integer labels use `jax.nn.one_hot(y, N)`."
            )


def _as_arrays(W0, features, labels, T, numbers):
    # The head and the features set the precision; the rest follows.
    dtype = jnp.result_type(W0, features)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    lam, dt0, steps = numbers
    T = jnp.asarray(T, dtype)
    if steps is not None:
        # Euler's `steps`: h = T/steps. The T meta-gradient is Proposition 4's
        # (see the module docstring), not d/dT through h.
        step = jax.lax.stop_gradient(T) / steps
    else:
        step = 0.0 if dt0 is None else dt0
    return (
        jnp.asarray(W0, dtype),
        jnp.asarray(features, dtype),
        jnp.asarray(labels, dtype),
        T,
        _Dynamic(jnp.asarray(lam, dtype), jnp.asarray(step, dtype)),
    )


@contextlib.contextmanager
def _numerical_errors_as_numerical_error():
    """Turn our in-`jit` checks into `NumericalError` when run eagerly.

    Inside a caller's `jax.jit` the same checks surface as JAX's runtime error
    with the same message when the compiled function runs.
    """
    try:
        with quiet_callback_errors():  # the error is raised below, not also logged by JAX
            yield
    except NumericalError:
        raise
    except Exception as error:  # JaxRuntimeError, EquinoxTracetimeError, ...
        text = str(error)
        start = text.find(_MESSAGE_PREFIX)
        if start < 0:
            raise
        message = text[start:].splitlines()[0]
        raise NumericalError(message) from error


# --------------------------------------------------------------------------
# Dynamics
# --------------------------------------------------------------------------


class _Problem(NamedTuple):
    """Everything the vector fields need; `W0` and `Phi` only via `L0` and `G`."""

    logits0: jax.Array  # L0 = Phi W0^T, (M, N)
    gram: jax.Array  # G = Phi Phi^T, (M, M)
    labels: jax.Array  # Y, (M, N)
    lam: jax.Array  # the proximal strength, a scalar (never differentiated)


class _Augmented(NamedTuple):
    """The augmented state of Propositions 1 to 3."""

    s: jax.Array  # (M, N)
    B: jax.Array  # (M, M, N, N): B[i, j] = d s_i / d L0_j
    z: jax.Array  # (M, M, M, N): z[i, j, m] = d s_i / d G_jm + d s_i / d G_mj


def _predictions(problem: _Problem, s):
    """`P = softmax(L0 - G S)`: the predictions of `W = W0 - S^T Phi` on the support."""
    return jax.nn.softmax(problem.logits0 - problem.gram @ s, axis=-1)


def _s_field(t, s, problem: _Problem):
    """Proposition 1: `dS/dt = (P - Y)/M - lam S`."""
    del t
    M = s.shape[0]
    return (_predictions(problem, s) - problem.labels) / M - problem.lam * s


def _augmented_field(t, state: _Augmented, problem: _Problem):
    """Propositions 1 to 3 (with the `lam` decay; see the module docstring)."""
    del t
    s, B, z = state
    M = s.shape[0]
    lam, gram = problem.lam, problem.gram
    p = _predictions(problem, s)
    ds = (p - problem.labels) / M - lam * s
    # A_i = (diag(p_i) - p_i p_i^T)/M: the Hessian blocks of Lemma 1, (M, N, N).
    A = (jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]) / M
    eye = jnp.eye(M, dtype=s.dtype)

    # dB[i,j] = 1(i=j) A_i - A_i sum_k G_ik B[k,j] - lam B[i,j]
    GB = jnp.einsum("ik,kjnl->ijnl", gram, B)
    dB = (
        eye[:, :, None, None] * A[:, None, :, :]
        - jnp.einsum("ian,ijnl->ijal", A, GB)
        - lam * B
    )

    # dz[i,j,m] = -A_i [1(i=j) s_m + 1(i=m) s_j + sum_k G_ik z[k,j,m]] - lam z[i,j,m]
    inner = (
        jnp.einsum("ik,kjmn->ijmn", gram, z)
        + eye[:, :, None, None] * s[None, None, :, :]
        + eye[:, None, :, None] * s[None, :, None, :]
    )
    dz = -jnp.einsum("ian,ijmn->ijma", A, inner) - lam * z
    return _Augmented(ds, dB, dz)


def _zeros_augmented(M, N, dtype) -> _Augmented:
    return _Augmented(
        s=jnp.zeros((M, N), dtype),
        B=jnp.zeros((M, M, N, N), dtype),
        z=jnp.zeros((M, M, M, N), dtype),
    )


def _solve(field, y0, T, problem: _Problem, config: _FlowConfig, step):
    """Integrate `field` from 0 to `T`; return the final state and its `SolveStatus`.

    `SaveAt(t1=True)` and no differentiation through the solver: nothing is
    stored along the trajectory, so memory does not depend on `T`. The solver
    is run with `throw=False`; with `config.throw` the status is checked
    below, so that a failure names linear_flow's options rather than the
    solver's internals. Otherwise the caller handles the status.
    """
    if config.solver == "dopri5":
        solver = diffrax.Dopri5()
        controller = diffrax.PIDController(rtol=config.rtol, atol=config.atol)
        dt0 = step if config.step_mode == "dt0" else None
    else:
        solver = diffrax.Euler()
        controller = diffrax.ConstantStepSize()
        dt0 = step
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        solver,
        t0=jnp.zeros((), T.dtype),
        t1=T,
        dt0=dt0,
        y0=y0,
        args=problem,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=controller,
        max_steps=config.max_steps,
        throw=False,
    )
    y_T = jax.tree.map(lambda leaf: leaf[0], solution.ys)
    status = solve_status(solution.result, y_T)
    if not config.throw:
        return y_T, status
    # The status already says which check failed: no second pass over the state.
    y_T = eqx.error_if(
        y_T,
        (status == SolveStatus.MAX_STEPS) | (status == SolveStatus.FAILED),
        f"{_MESSAGE_PREFIX}: the ODE solver stopped before reaching the horizon T "
        f"(max_steps={config.max_steps} exhausted, or the step size collapsed). "
        "Raise `max_steps`, loosen `rtol`/`atol`, or shorten `T`; very large "
        "feature norms make the flow stiff, so normalising the features also helps.",
    )
    y_T = eqx.error_if(
        y_T,
        status == SolveStatus.NONFINITE,
        f"{_MESSAGE_PREFIX}: the adapted state is not finite (NaN or inf). With "
        "solver='euler' the step h is probably too large for the curvature of the "
        "loss (use smaller `dt0` or more `steps`, or solver='dopri5'); otherwise "
        "check `W0`, `features` and `T` for extreme values.",
    )
    return y_T, status


def _problem(W0, features, labels, lam) -> _Problem:
    return _Problem(
        logits0=features @ W0.T,
        gram=features @ features.T,
        labels=labels,
        lam=lam,
    )


# --------------------------------------------------------------------------
# Meta-training path: custom VJP
# --------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flow(config: _FlowConfig, W0, features, labels, T, dynamic: _Dynamic):
    """`(W(T), status)`; the integer status gets no cotangent."""
    out, _ = _flow_fwd(config, W0, features, labels, T, dynamic)
    return out


def _flow_fwd(config: _FlowConfig, W0, features, labels, T, dynamic: _Dynamic):
    problem = _problem(W0, features, labels, dynamic.lam)
    M, N = labels.shape
    y0 = _zeros_augmented(M, N, W0.dtype)
    state, status = _solve(_augmented_field, y0, T, problem, config, dynamic.step)
    failed = status != SolveStatus.SUCCESS
    # A failed solve (possible only with `throw=False`) has no value: NaN.
    W_T = jnp.where(failed, jnp.nan, W0 - state.s.T @ features)
    return (W_T, status), (state, status, W0, features, labels, T, dynamic)


def _flow_bwd(config: _FlowConfig, residuals, cotangents):
    V, _ = cotangents  # that of W(T); the status has none
    state, status, W0, features, labels, T, dynamic = residuals
    s, B, z = state
    # U[i] = V phi_i: the outer cotangent seen through each support example.
    U = features @ V.T  # (M, N)
    C = jnp.einsum("ik,ijkl->jl", U, B)  # (M, N), Propositions 5 and 6
    D = jnp.einsum("ijmk,ik->mj", z, U)  # (M, M), Proposition 6
    W0_bar = V - C.T @ features
    features_bar = -(s @ V + C @ W0 + D @ features)
    # Proposition 4: dJ/dT = <V, dW/dt(T)>, with dW/dt = -(dS/dt)^T Phi.
    ds_dt = _s_field(T, s, _problem(W0, features, labels, dynamic.lam))
    T_bar = -jnp.sum(ds_dt * U)
    # `labels` and the `_Dynamic` numbers are not meta-parameters (the boundary
    # makes `lam`, `dt0`, `steps` Python numbers): zero cotangents.
    zeros = jax.tree.map(jnp.zeros_like, dynamic)
    # ... nor any derivative: NaN, so that no caller mistakes it for one.
    W0_bar, features_bar, T_bar = nan_if_failed((W0_bar, features_bar, T_bar), status)
    return W0_bar, features_bar, jnp.zeros_like(labels), T_bar.astype(T.dtype), zeros


_flow.defvjp(_flow_fwd, _flow_bwd)
_flow_jit = jax.jit(_flow, static_argnums=0)


def linear_flow(
    W0,
    features,
    labels,
    T,
    *,
    lam: float = 0.0,
    solver: str = "dopri5",
    rtol: float = 1e-6,
    atol: float = 1e-8,
    dt0: float | None = None,
    steps: int | None = None,
    max_steps: int = 4096,
    throw: bool = True,
) -> jax.Array:
    r"""Adapt a linear softmax head by gradient flow up to time `T` (COMLN).

    Solves $\dot W = -\nabla L(W)$, $W(0) = W_0$, for

    $$L(W) = \frac{1}{M} \sum_m \mathrm{CE}\big(\mathrm{softmax}(W \phi_m), y_m\big)
             + \frac{\lambda}{2} \|W - W_0\|_F^2,$$

    and returns $W(T)$. Reverse-mode derivatives of $W(T)$ with respect to
    `W0`, `features` and `T` are exact (to the solver tolerance): they come
    from the forward sensitivities $s, B, z$ integrated with the state and
    projected onto the outer cotangent (COMLN Propositions 1 to 6; see the
    module docstring), in memory independent of `T`.

    **Arguments:**

    - `W0`: the head's initialisation, `(N, d)`.
    - `features`: the embedded support set `phi_m`, `(M, d)`.
    - `labels`: one-hot support labels, `(M, N)` (not differentiated).
    - `T`: the horizon, a positive scalar (traced is fine; `vmap` it for
      per-task horizons). Learn it as `T = exp(log_T)`.
    - `lam`: the proximal strength around `W0`, a Python float `>= 0`.
    - `solver`: `"dopri5"` (adaptive, default) or `"euler"` (fixed step;
      equals ANIL with learning rate `h`).
    - `rtol`, `atol`: Dopri5 tolerances, on the whole augmented state.
    - `dt0`: Euler's step `h` (`ceil(T/h)` equal steps), or Dopri5's
      first step (default: chosen automatically).
    - `steps`: Euler's number of steps `K` (`h = T/K`); give `dt0` or `steps`.
    - `max_steps`: the solver's step budget.
    - `throw`: `True` (default): a failed solve raises (below). `False`:
      nothing raises; a failed solve gives NaN for `W(T)` and its
      meta-gradients, and a status says why (for a `vmap`-ed meta-batch, so
      that one task's failure does not stop the others).

    **Returns:** `W(T)`, `(N, d)`; with `throw=False`, the pair
    `(W(T), status)`, `status` an int32 `ctmeta.ode.SolveStatus` code
    (`MAX_STEPS` when `max_steps` ran out, `NONFINITE` for a non-finite state).

    **Raises:** `InputError` for bad arguments (checked eagerly; value
    checks only on arrays that are not traced). With `throw=True`,
    `NumericalError` when run eagerly and the solver runs out of steps or the
    state is not finite; under the caller's `jit` the same check raises JAX's
    runtime error with the same message.
    """
    config, numbers = _make_config(
        lam=lam, solver=solver, rtol=rtol, atol=atol, dt0=dt0, steps=steps, max_steps=max_steps, throw=throw
    )
    _check_arrays(W0, features, labels, T)
    W0, features, labels, T, dynamic = _as_arrays(W0, features, labels, T, numbers)
    # Blocking inside the handler: with asynchronous dispatch a failed check
    # would otherwise surface later, wherever the result is first read, as
    # JAX's runtime error (or never, if it is not read).
    with _numerical_errors_as_numerical_error():
        W_T, status = jax.block_until_ready(_flow_jit(config, W0, features, labels, T, dynamic))
    return W_T if throw else (W_T, status)


# --------------------------------------------------------------------------
# Meta-test path: the state alone
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _adapt(config: _FlowConfig, W0, features, labels, T, dynamic: _Dynamic):
    problem = _problem(W0, features, labels, dynamic.lam)
    s0 = jnp.zeros(labels.shape, W0.dtype)
    s_T, _ = _solve(_s_field, s0, T, problem, config, dynamic.step)  # checked: config.throw
    return W0 - s_T.T @ features


def linear_flow_adapt(
    W0,
    features,
    labels,
    T,
    *,
    lam: float = 0.0,
    solver: str = "dopri5",
    rtol: float = 1e-6,
    atol: float = 1e-8,
    dt0: float | None = None,
    steps: int | None = None,
    max_steps: int = 4096,
) -> jax.Array:
    r"""Meta-test adaptation: $W(T)$ of [`linear_flow`][], integrating $S$ alone.

    COMLN Algorithms 5 and 6: $\dot S = (\mathrm{softmax}(L_0 - G S) - Y)/M - \lambda S$,
    $S(0) = 0$, $W(T) = W_0 - S(T)^\top \Phi$, an $M \times N$ state instead of
    the augmented $(s, B, z)$. Same arguments and checks as `linear_flow`.
    With `solver="euler"` the result equals `linear_flow`'s to rounding; with
    `"dopri5"`, to the solver tolerance (the adaptive steps differ because
    `linear_flow` also controls the error of the sensitivities).

    Differentiating through it backpropagates through the solver steps
    (diffrax's checkpointed autodiff); for meta-gradients use `linear_flow`.
    """
    config, numbers = _make_config(
        lam=lam, solver=solver, rtol=rtol, atol=atol, dt0=dt0, steps=steps, max_steps=max_steps
    )
    _check_arrays(W0, features, labels, T)
    W0, features, labels, T, dynamic = _as_arrays(W0, features, labels, T, numbers)
    with _numerical_errors_as_numerical_error():
        return jax.block_until_ready(_adapt(config, W0, features, labels, T, dynamic))
