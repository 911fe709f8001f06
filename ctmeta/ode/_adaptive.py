"""The adaptive adjoint: a recorded forward (Dopri5 or RKC2, its dense output) and an adaptive backward solve over it."""

from __future__ import annotations

import dataclasses
from typing import Any

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.flatten_util
import jax.numpy as jnp

from .._errors import InputError
from ._fields import cotangent_like, flat_jtv, literals_as_arrays, zeros_for
from ._rkc import power_iteration, rkc2_solve
from ._solvers import AbstractSensitivity, SolveOptions, effective_rtol
from ._status import SolveStatus, all_finite, nan_if_failed, raise_if_failed, solve_status

PyTree = Any

#: Solvers whose accepted steps the adaptive adjoint records (and can solve its backward with).
RECORDED_SOLVERS = ("dopri5", "rkc2")
#: RKC2's settings: the most stages a step (stability interval ~0.65 * 256^2 = 43,000 h rho), the
#: safety factor on the power-iteration estimate of the spectral radius (a lower bound), and the
#: power iterations at the start (later steps take one each, warm-started, two after a rejection).
RKC_MAX_STAGES = 256
RKC_SAFETY = 1.2
RKC_POWER_ITERATIONS = 8
RKC_DAMPING = 2.0 / 13.0
RKC_REFRESH = 1

#: The default dense output (`dense_steps=None`): as many slots as `DENSE_BUDGET_BYTES` holds for the
#: state (three states a slot), at least `DENSE_MIN_STEPS`, at most the forward's `max_steps`. A Conv-4
#: (113k float32 parameters, 1.4 MB a slot) gets the floor, 256 slots (350 MB, as before); a 2x32 MLP
#: (1.2k parameters) ~1,100 slots in float32 and ~550 in float64; an 8-parameter least squares
#: `max_steps`. Per task: under `vmap` each task has its own buffer, zero-filled every solve, which
#: is why the budget is not larger.
DENSE_BUDGET_BYTES = 16 * 2 ** 20
DENSE_MIN_STEPS = 256


def default_dense_steps(y0, max_steps: int) -> int:
    """The dense output's slots for state `y0` when `dense_steps` is None (see `DENSE_BUDGET_BYTES`)."""
    slot = 3 * sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(y0))
    return int(min(max(DENSE_BUDGET_BYTES // max(slot, 1), DENSE_MIN_STEPS), max(max_steps, 1)))


def check_symmetric(field, solver: str):
    """A one-line `InputError` unless `field`'s Jacobian is symmetric (RKC2's spectral estimate needs it)."""
    if not field.symmetric_jacobian:
        raise InputError(
            f"solver={solver!r} needs a vector field with a symmetric Jacobian (a gradient flow, or "
            f"Preconditioned): its stages come from a power-iteration estimate of the spectral radius, which "
            f"says nothing about stability for {type(field).__name__} (symmetric_jacobian=False, e.g. "
            "HeavyBall's flow). Use solver='dopri5'.")


def _power_rho_fn(field, args, point=lambda t, y: (t, y)):
    """RKC2's spectral radius for `field`: warm-started power iteration on Jacobian-vector products at
    `point(t, y)`, the field's time and state (the solved ones; the backward's: the forward's, read from
    its dense output)."""

    def rho_fn(t, y, h, rho_state, iterations):
        v, _ = rho_state
        if isinstance(iterations, int) and iterations < 0:
            iterations = RKC_POWER_ITERATIONS
        matvec, _, _ = flat_jtv(field, *point(t, y), args)
        rho, v = power_iteration(matvec, v, iterations)
        rho = RKC_SAFETY * rho
        return rho, (v, rho), iterations

    return rho_fn


def _power_state(y):
    flat, _ = jax.flatten_util.ravel_pytree(y)
    dtype = jnp.promote_types(flat.dtype, jnp.float32)
    v = jax.random.normal(jax.random.PRNGKey(0), flat.shape, dtype)
    return v / jnp.linalg.norm(v), jnp.zeros((), dtype)


def rkc_forward(field, y0, t1, args, options: SolveOptions, dense_steps: int | None):
    """RKC2 from 0 to `t1`: `(y(t1), DenseOutput or None, status, stats)`, as `dense_forward`."""
    y1, dense, status, stats, _ = rkc2_solve(
        lambda t, y: field(t, y, args), y0, t1, rtol=effective_rtol(options.rtol, y0), atol=options.atol,
        max_steps=options.max_steps, max_stages=RKC_MAX_STAGES, rho_fn=_power_rho_fn(field, args),
        rho_state=_power_state(y0), displacement=options.error_scale == "displacement", dense_steps=dense_steps,
        damping=RKC_DAMPING, refresh=RKC_REFRESH)
    if dense is not None:
        ts, ys, fs, rhos, n = dense
        dense = DenseOutput(ts, ys, fs, n, None, rhos)
    return y1, dense, status, stats


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
      shapes are static). `None` (default): sized from the state, 16 MB a
      task, at least 256 and at most `max_steps` (`default_dense_steps`): a
      small model with a tight tolerance gets thousands of slots, a Conv-4 256. A forward that needs more ends with status
      [`SolveStatus`][]`.DENSE_OVERFLOW` (raised, or NaN with `throw=False`).
    - `rtol`, `atol`: tolerances of the backward solve, as factors of the
      forward's: the backward uses `rtol * forward rtol` and `atol * forward
      atol`. The default 10 costs no accuracy where the forward's own error
      dominates (it always does at the forward's tolerance): measured on
      CosMixture 100-shot, T = 5, float64, against backprop through a
      converged solve, the meta-gradient's relative error is 1.1e-5 at 1x,
      3.2e-5 at 10x and 2.8e-4 at 100x, for 37, 28 and 24 backward steps
      (the stored Heun sweep at h = 0.01: 1.3e-4).
    - `backward_solver`: `"dopri5"` or `"rkc2"` for the backward solve;
      `None` (default): the forward's solver. With `"rkc2"` after an RKC2
      forward, the backward reads the spectral radius each forward step used
      (the adjoint's Jacobian is the forward's, transposed): no estimate of
      its own.
    - `max_steps`: the backward solver's step budget (default: the forward's
      `max_steps`). A backward solve that fails or runs out of steps raises
      when the gradient is taken (`throw=True`) or gives NaN derivatives
      (`throw=False`), never a wrong gradient.
    """

    dense_steps: int | None = eqx.field(default=None, static=True)
    rtol: float = eqx.field(default=10.0, static=True)
    atol: float = eqx.field(default=10.0, static=True)
    max_steps: int | None = eqx.field(default=None, static=True)
    backward_solver: str | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        if self.backward_solver is not None and self.backward_solver not in RECORDED_SOLVERS:
            raise InputError(f"AdaptiveAdjoint(backward_solver={self.backward_solver!r}): use "
                             f"{' or '.join(map(repr, RECORDED_SOLVERS))}, or None for the forward's solver.")
        if self.dense_steps is not None and (not isinstance(self.dense_steps, int) or isinstance(self.dense_steps, bool)
                                             or self.dense_steps < 1):
            raise InputError(f"AdaptiveAdjoint(dense_steps={self.dense_steps!r}): give a positive int, or None to "
                             "size it from the state.")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InputError(f"AdaptiveAdjoint({name}={value!r}): give a positive factor of the forward's {name}.")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise InputError(f"AdaptiveAdjoint(max_steps={self.max_steps!r}): give a positive int or None.")

    def solve(self, field, y0, t1, args, options):
        if options.solver not in RECORDED_SOLVERS:
            raise InputError(f"AdaptiveAdjoint records the steps of an adaptive solver ({', '.join(RECORDED_SOLVERS)}); "
                             f"solver={options.solver!r} is not supported.")
        for name in {options.solver, self.backward_solver or options.solver} & {"rkc2"}:
            check_symmetric(field, name)
        return _adaptive_adjoint_solve((field, y0, t1, args), self.sized_for(y0, options.max_steps), options)

    def sized_for(self, y0, max_steps: int) -> "AdaptiveAdjoint":
        """This rule with `dense_steps` set: as given, or (None) from the state (`default_dense_steps`)."""
        if self.dense_steps is not None:
            return self
        return dataclasses.replace(self, dense_steps=default_dense_steps(y0, max_steps))


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
    rhos: jax.Array | None = None  # RKC2: the spectral radius each step used (with its safety factor)

    def max_rho(self, ta, tb) -> jax.Array:
        """The largest recorded spectral radius over the steps that meet `[ta, tb]`."""
        i = jnp.arange(self.ts.shape[0] - 1)
        meets = (i < self.n) & (self.ts[1:] >= ta) & (self.ts[:-1] <= tb)
        return jnp.max(jnp.where(meets, self.rhos[:-1], 0))

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


def dense_forward(field, y0, t1, args, options: SolveOptions, dense_steps: int | None, midpoints: bool = False):
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
    ref = y0 if options.error_scale == "displacement" else None
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
        # Error relative to the state, or to the displacement y - y0 (the controller's scale is its |y|).
        ya, yb = (y, y1) if ref is None else (jax.tree.map(jnp.subtract, y, ref), jax.tree.map(jnp.subtract, y1, ref))
        keep, t_new, tn_new, jump1, cs1, cres = controller.adapt_step_size(t, tn, ya, yb, args, y_err, error_order, cs)
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
        jnp.where(all_finite(y), SolveStatus.SUCCESS, SolveStatus.NONFINITE),
        jnp.where(~good, SolveStatus.FAILED,
                  jnp.where(n_steps >= options.max_steps, SolveStatus.MAX_STEPS, SolveStatus.DENSE_OVERFLOW)),
    ).astype(jnp.int32)
    dense = DenseOutput(buf[0], buf[1], buf[2], n_acc, buf[3] if midpoints else None) if record else None
    return y, dense, status, {"accepted_steps": n_acc, "steps": n_steps}


def adjoint_backward(field, dense: DenseOutput, t1, args, a_end, rule: AdaptiveAdjoint, options: SolveOptions, wrt=None):
    """The backward solve of [`AdaptiveAdjoint`][] from `a(t1) = a_end` over `dense`.

    Returns `(a(0), (dJ/dargs, dJ/dfield), status, stats)`, `stats` a dict
    with `num_steps` (attempts), `num_accepted_steps` and `num_evaluations`
    (of `field.vjp`: Hessian-vector products for a gradient flow).
    """

    def rhs(s, state, _):
        a, _ = state
        t = t1 - s
        ay, aargs, afield = field.vjp(t, dense.evaluate(t), args, a, wrt)
        return cotangent_like(ay, a), cotangent_like((aargs, afield), (args, field))

    rtol = rule.rtol * effective_rtol(options.rtol, a_end)
    atol = rule.atol * options.atol
    max_steps = rule.max_steps if rule.max_steps is not None else options.max_steps
    state0 = (a_end, zeros_for((args, field)))
    if (rule.backward_solver or options.solver) == "rkc2":
        return _rkc_backward(field, dense, t1, args, rhs, state0, rtol, atol, max_steps)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(rhs),
        diffrax.Dopri5(),
        t0=jnp.zeros_like(t1),
        t1=t1,
        dt0=None,
        y0=state0,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
        adjoint=diffrax.RecursiveCheckpointAdjoint(),
        throw=False,
    )
    a0, params = jax.tree.map(lambda x: x[-1], sol.ys)
    stats = {"num_steps": sol.stats["num_steps"], "num_accepted_steps": sol.stats["num_accepted_steps"],
             "num_evaluations": 6 * sol.stats["num_steps"] + 1}
    return a0, params, solve_status(sol.result, (a0, params)), stats


def _rkc_backward(field, dense, t1, args, rhs, state0, rtol, atol, max_steps):
    """The adjoint by RKC2 in reversed time; its stiffness is the forward's, read from `dense.rhos` if recorded."""
    if dense.rhos is not None:
        def rho_fn(s, state, h, rho_state, iterations):
            return dense.max_rho(t1 - s - h, t1 - s), rho_state, 0

        rho_state = ()
    else:  # a Dopri5 forward recorded no spectral radius: estimate it on the adjoint's own Jacobian
        rho_fn = _power_rho_fn(field, args, lambda s, state: (t1 - s, dense.evaluate(t1 - s)))
        rho_state = _power_state(state0[0])
    (a0, params), _, status, stats, _ = rkc2_solve(
        lambda s, state: rhs(s, state, None), state0, t1, rtol=rtol, atol=atol, max_steps=max_steps,
        max_stages=RKC_MAX_STAGES, rho_fn=rho_fn, rho_state=rho_state, damping=RKC_DAMPING, refresh=RKC_REFRESH)
    return a0, params, status, {"num_steps": stats.steps, "num_accepted_steps": stats.accepted_steps,
                                "num_evaluations": stats.evaluations, "num_matvecs": stats.matvecs,
                                "max_stages": stats.max_stages}


def recorded_forward(field, y0, t1, args, options: SolveOptions, dense_steps: int | None):
    """The forward of [`AdaptiveAdjoint`][] by `options.solver`: `(y(t1), DenseOutput or None, status, stats)`."""
    if options.solver == "rkc2":
        return rkc_forward(field, y0, t1, args, options, dense_steps)
    return dense_forward(field, y0, t1, args, options, dense_steps, midpoints=dense_steps is not None)


@eqx.filter_custom_vjp
def _adaptive_adjoint_solve(primal, rule, options):
    """`(y(t1), status)`; undifferentiated, the same solve records nothing."""
    field, y0, t1, args = primal
    y1, _, status, _ = recorded_forward(field, y0, t1, args, options, None)
    return y1, status


@_adaptive_adjoint_solve.def_fwd
def _adaptive_adjoint_fwd(perturbed, primal, rule, options):
    field, y0, t1, args = primal
    y1, dense, status, _ = recorded_forward(field, y0, t1, args, options, rule.dense_steps)
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
        zeros = zeros_for((args, field))
        return nan_if_failed((zeros[1], jax.tree.map(jnp.zeros_like, g), gt1, zeros[0]), status)

    a0, (gargs, gfield), back_status, _ = adjoint_backward(field, dense, t1, args, g, rule, options, wrt)
    if options.throw:
        a0 = raise_if_failed(a0, back_status, rule.max_steps or options.max_steps,
                             "ctmeta.ode.solve (the backward adjoint solve of AdaptiveAdjoint)")
    status = jnp.where(status != SolveStatus.SUCCESS, status, back_status)
    return nan_if_failed((gfield, a0, gt1, gargs), status)
