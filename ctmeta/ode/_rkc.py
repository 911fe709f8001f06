r"""Runge-Kutta-Chebyshev (RKC2): a stabilized explicit solver for flows with a real spectrum.

A gradient flow $\dot u = -\nabla L(u)$ has the symmetric Jacobian $-H$: its
spectrum is real, in $[-\rho, 0]$ where the loss is locally convex. An
explicit Runge-Kutta method of fixed stage count (Dopri5) is stable only
for $h\rho \lesssim 3.3$, so when meta-training makes $\rho$ grow its steps
are set by stability, not accuracy. RKC2 (Sommeijer, Shampine & Verwer
1998) spends $s$ evaluations a step on a shifted Chebyshev polynomial whose
stability interval $[-\beta(s), 0]$, $\beta(s) \approx 0.65\,s^2$, grows
quadratically with $s$: the cost of a step grows like $\sqrt{h\rho}$, not
$h\rho$.

**The step.** With damping $\epsilon = 2/13$, $w_0 = 1 + \epsilon/s^2$,
$w_1 = T_s'(w_0)/T_s''(w_0)$ ($T_j$ the Chebyshev polynomials),
$b_j = T_j''(w_0)/T_j'(w_0)^2$ ($j \ge 2$; $b_0 = b_1 = b_2$) and
$c_j = w_1 T_j''(w_0)/T_j'(w_0)$ ($c_1 = c_2/T_2'(w_0)$):

$$Y_0 = y_n, \quad Y_1 = Y_0 + \tilde\mu_1 h F_0, \quad
  Y_j = (1 - \mu_j - \nu_j) Y_0 + \mu_j Y_{j-1} + \nu_j Y_{j-2}
        + \tilde\mu_j h F_{j-1} + \tilde\gamma_j h F_0,$$

$\tilde\mu_1 = b_1 w_1$, $\mu_j = 2 b_j w_0/b_{j-1}$, $\nu_j = -b_j/b_{j-2}$,
$\tilde\mu_j = 2 b_j w_1/b_{j-1}$, $\tilde\gamma_j = -(1 - b_{j-1}T_{j-1}(w_0))\tilde\mu_j$,
$F_j = f(t_n + c_j h, Y_j)$, and $y_{n+1} = Y_s$: second order, $s$
evaluations a step ($F(y_{n+1})$ is the next step's $F_0$). The recurrences
need only three states at a time, whatever $s$.

**Stages and spectral radius.** Each step takes
$s = 1 + \lfloor\sqrt{1 + 1.54\,h\rho}\rfloor$ stages (RKC's own rule,
which keeps $h\rho$ inside $[-\beta(s), 0]$ with a margin), at most
`max_stages`; when $h\rho$ would need more, $h$ is cut to what
`max_stages` allows. $\rho$ is the largest $|\lambda|$ of $\partial f/\partial y$,
estimated by power iteration on Jacobian-vector products (one
Hessian-vector product each for a gradient flow), warm-started from the
previous step's vector: `power_iterations` at the start, one at each later
step, two more after a rejection, times a safety factor. The estimate is
valid because the Jacobian is symmetric (a field's `symmetric_jacobian`
flag); for a non-normal Jacobian it says nothing about the stability of the
step.

**Error control.** The embedded estimate of SSV98,
$\text{est} = \tfrac{1}{15}\big(12(y_n - y_{n+1}) + 6h(F_0 + F(y_{n+1}))\big)$,
is measured in the RMS norm with weights $\text{atol} + \text{rtol}\,
\max(|y_n - r|, |y_{n+1} - r|)$, where $r = 0$ (error relative to the
state, as every ODE library) or $r = y_0$ (error relative to the
*displacement* $y - y_0$: what a meta-gradient depends on when adaptation
moves the parameters little). Step sizes follow RKC's predictive controller.

**Dense output.** Cubic Hermite on $(y_n, F_n, y_{n+1}, F_{n+1})$, third
order, with the $\rho$ used by each step, so an adjoint solved backward over
the same trajectory (same Jacobian, transposed) needs no spectral estimate of
its own.
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from ._status import SolveStatus, all_finite

PyTree = Any

#: Damping of the Chebyshev polynomial (SSV98's): stability interval ~0.653 s^2 with |R(z)| up to
#: ~0.95 on its stiff part. Stronger damping (1, 4, 8, 16: |R| down to ~0.3, interval down to
#: ~0.37 s^2) changed the steps of the stiff quadratic of docs/bench.md by under 4%: they are set by
#: the accuracy of the transients, not by undamped stiff modes.
DAMPING = 2.0 / 13.0


def stability_interval(s: int, damping: float = DAMPING) -> float:
    r"""$\beta(s) = (1 + w_0)/w_1$: RKC2 with `s` stages is stable on $[-\beta(s), 0]$ (NumPy, for tests and docs)."""
    w0 = 1.0 + damping / s ** 2
    T, dT, ddT = _chebyshev_np(s, w0)
    return (1.0 + w0) * ddT / dT


def _interval_per_stage2(damping: float) -> float:
    """`min_{s >= 2} beta(s) / s^2` (attained at the smallest s): stages s with c s^2 >= h rho are stable."""
    return min(stability_interval(s, damping) / s ** 2 for s in range(2, 64))


def stages_for(h_rho, max_stages: int, damping: float = DAMPING):
    """The fewest stages (at least 2, at most `max_stages`) whose stability interval holds `h * rho`."""
    c = _interval_per_stage2(damping)
    s = jnp.ceil(jnp.sqrt(jnp.maximum(h_rho, 0.0) / c))
    return jnp.clip(s, 2, max_stages).astype(jnp.int32)


def max_step_for(rho, max_stages: int, damping: float = DAMPING):
    """The largest `h` that `max_stages` stages keep stable for spectral radius `rho` (inverse of `stages_for`)."""
    c = _interval_per_stage2(damping)
    return jnp.where(rho > 0, c * max_stages ** 2 / jnp.where(rho > 0, rho, 1.0), jnp.inf)


def _chebyshev_np(s, w0):
    t = [1.0, w0]
    dt = [0.0, 1.0]
    ddt = [0.0, 0.0]
    for _ in range(2, s + 1):
        t, dt, ddt = ([t[1], 2 * w0 * t[1] - t[0]], [dt[1], 2 * t[1] + 2 * w0 * dt[1] - dt[0]],
                      [ddt[1], 4 * dt[1] + 2 * w0 * ddt[1] - ddt[0]])
    return t[1], dt[1], ddt[1]


def _chebyshev(s, w0):
    """`(T_s(w0), T_s'(w0), T_s''(w0))` by the three-term recurrences, for a traced `s`."""

    def body(_, c):
        t0, t1, d0, d1, dd0, dd1 = c
        return (t1, 2 * w0 * t1 - t0, d1, 2 * t1 + 2 * w0 * d1 - d0, dd1, 4 * d1 + 2 * w0 * dd1 - dd0)

    one, zero = jnp.ones_like(w0), jnp.zeros_like(w0)
    c = jax.lax.fori_loop(2, s + 1, body, (one, w0, zero, one, zero, zero))
    return c[1], c[3], c[5]


def _axpys(coeffs, trees):
    """`sum_k coeffs[k] * trees[k]` leaf by leaf, in each leaf's dtype."""
    return jax.tree.map(lambda *xs: sum(c.astype(xs[0].dtype) * x for c, x in zip(coeffs, xs)), *trees)


def rkc2_step(rhs: Callable, t, y, f0, h, s, damping: float = DAMPING):
    r"""One RKC2 step of `s` stages (a traced int >= 2) from `(t, y)` with $F_0 = f(t, y)$ given: $y_{n+1}$."""
    dtype = jnp.result_type(h)
    w0 = 1 + damping / s.astype(dtype) ** 2
    _, dTs, ddTs = _chebyshev(s, w0)
    w1 = dTs / ddTs
    b2 = 1 / (4 * w0 ** 2)  # T_2'' / T_2'^2 = 4 / (4 w0)^2
    y1 = _axpys((jnp.ones((), dtype), b2 * w1 * h), (y, f0))
    c1 = b2 * w1  # = c_2 / T_2'(w0), with c_2 = w1 / w0

    def cond(c):
        return c[0] <= s

    def body(c):
        j, y_prev2, y_prev, c_prev, t_prev, t_prev2, d_prev, d_prev2, dd_prev, dd_prev2, b_prev, b_prev2 = c
        t_j = 2 * w0 * t_prev - t_prev2
        d_j = 2 * t_prev + 2 * w0 * d_prev - d_prev2
        dd_j = 4 * d_prev + 2 * w0 * dd_prev - dd_prev2
        b_j = dd_j / d_j ** 2
        mu, nu = 2 * b_j * w0 / b_prev, -b_j / b_prev2
        mu_t = 2 * b_j * w1 / b_prev
        gamma_t = -(1 - b_prev * t_prev) * mu_t
        f = rhs(t + c_prev * h, y_prev)
        y_j = _axpys((1 - mu - nu, mu, nu, mu_t * h, gamma_t * h), (y, y_prev, y_prev2, f, f0))
        c_j = w1 * dd_j / d_j
        return (j + 1, y_prev, y_j, c_j, t_j, t_prev, d_j, d_prev, dd_j, dd_prev, b_j, b_prev)

    one, zero = jnp.ones((), dtype), jnp.zeros((), dtype)
    carry = (jnp.asarray(2, jnp.int32), y, y1, c1, w0, one, one, zero, zero, zero, b2, b2)
    return jax.lax.while_loop(cond, body, carry)[2]


def _rms(tree, weights) -> jax.Array:
    leaves = jax.tree.leaves(jax.tree.map(lambda e, w: jnp.sum(jnp.square(e.astype(w.dtype) / w)), tree, weights))
    size = sum(x.size for x in jax.tree.leaves(tree))
    return jnp.sqrt(sum(leaves) / max(size, 1))


class RKCStats(eqx.Module):
    """Counts of one RKC2 solve (int32 scalars, one per element under `vmap`)."""

    steps: jax.Array  # step attempts, accepted and rejected
    accepted_steps: jax.Array
    evaluations: jax.Array  # of the vector field (gradients, for a gradient flow)
    matvecs: jax.Array  # Jacobian-vector products of the spectral estimate (HVPs)
    max_stages: jax.Array
    max_rho: jax.Array  # the largest spectral-radius estimate used (with its safety factor)


def rkc2_solve(
    rhs: Callable,
    y0: PyTree,
    t1,
    *,
    rtol: float,
    atol: float,
    max_steps: int,
    max_stages: int,
    rho_fn: Callable,
    rho_state: PyTree,
    displacement: bool = False,
    dense_steps: int | None = None,
    damping: float = DAMPING,
    refresh: int = 1,
):
    r"""Integrate $\dot y = $ `rhs(t, y)` on $[0, t_1]$ by adaptive RKC2.

    `rho_fn(t, y, h, rho_state, iterations) -> (rho, rho_state, matvecs)`
    gives the spectral radius for a step of size `h` from `(t, y)` (already
    with its safety factor); `iterations` is 0 for "the last estimate is
    fine", more when a fresh one is wanted (every `refresh` accepted steps,
    after a rejection), -1 at the start.

    Returns `(y(t1), dense, status, stats, rho_state)`: `dense` the
    `(ts, ys, fs, rhos, n)` of the accepted steps when `dense_steps` is an
    int (else None).
    """
    dtype = jnp.result_type(t1)
    t0 = jnp.zeros((), dtype)
    f_0 = rhs(t0, y0)
    ref = y0 if displacement else jax.tree.map(jnp.zeros_like, y0)
    record = dense_steps is not None

    def weights(ya, yb):
        return jax.tree.map(lambda a, b, r: (atol + rtol * jnp.maximum(jnp.abs(a - r), jnp.abs(b - r))).astype(
            jnp.promote_types(a.dtype, jnp.float32)), ya, yb, ref)

    rho, rho_state, mv0 = rho_fn(t0, y0, t1, rho_state, -1)  # -1: the start's estimate
    # First step (RKC): h = min(t1, 1/rho), then h^2 |y''| ~ 0.01 h with y'' ~ (F(y0 + h F0) - F0)/h;
    # with `displacement` the scale is that of the displacement of a step, |h F0|.
    h = jnp.minimum(t1, jnp.where(rho > 0, 1 / jnp.where(rho > 0, rho, 1), t1))
    y_trial = _axpys((jnp.ones((), dtype), h), (y0, f_0))
    f_trial = rhs(t0 + h, y_trial)
    w_first = weights(y0, y_trial) if not displacement else jax.tree.map(
        lambda f: (atol + rtol * jnp.abs(h * f)).astype(jnp.promote_types(f.dtype, jnp.float32)), f_0)
    est = _rms(jax.tree.map(lambda a, b: (a - b) / h, f_trial, f_0), w_first)
    h = jnp.where(h * est > 0.01, 0.01 / jnp.where(est > 0, est, 1), h)
    h = jnp.where(jnp.isfinite(h) & (h > 0), h, t1 * 1e-3)

    if record:
        slots = dense_steps + 1
        buf = (jnp.full((slots,), t1, dtype).at[0].set(t0),
               jax.tree.map(lambda x: jnp.zeros((slots,) + x.shape, x.dtype).at[0].set(x), y0),
               jax.tree.map(lambda x, f: jnp.zeros((slots,) + x.shape, x.dtype).at[0].set(f.astype(x.dtype)), y0, f_0),
               jnp.zeros((slots,), dtype))
    else:
        buf = None
    capacity = dense_steps if record else np.iinfo(np.int32).max
    zero = jnp.zeros((), jnp.int32)
    clip_floor = t1 - 100 * jnp.finfo(dtype).eps * jnp.abs(t1)
    err_prev = jnp.ones((), dtype)
    h_prev = h

    def cond(c):
        t, _, _, _, _, _, _, _, n_steps, n_acc, _, _, _, _, _, _, good = c
        return (t < t1) & (n_steps < max_steps) & (n_acc < capacity) & good

    def body(c):
        (t, h, y, f, rho, rho_state, err_prev, h_prev, n_steps, n_acc, evals, matvecs, s_max_seen, rho_max,
         rejected, buf, good) = c
        # A fresh estimate after a rejection (the old one may have been too low), else the cheap update.
        iterations = jnp.where(rejected, 2, jnp.where(n_acc % refresh == 0, 1, 0))
        rho_new, rho_state, mv = rho_fn(t, y, h, rho_state, iterations)
        rho = jnp.where(iterations > 0, rho_new, rho)
        h = jnp.minimum(h, max_step_for(rho, max_stages, damping))
        h = jnp.where(t + h > clip_floor, t1 - t, h)  # no sliver of a last step
        s = stages_for(h * rho, max_stages, damping)
        y_new = rkc2_step(rhs, t, y, f, h, s, damping)
        f_new = rhs(t + h, y_new)
        est = jax.tree.map(lambda a, b, fa, fb: (12 * (a - b) + 6 * h * (fa + fb)) / 15, y, y_new, f, f_new)
        err = _rms(est, weights(y, y_new)).astype(dtype)
        err = jnp.where(jnp.isfinite(err), err, jnp.inf)
        keep = err <= 1
        # RKC's controller: predictive after an accepted step, at most x10, at least x0.1, no growth after a rejection.
        safe_err = jnp.maximum(err, 1e-10)
        fac_first = 0.8 / safe_err ** (1 / 3)
        fac_pred = 0.8 * (h / h_prev) * err_prev ** (1 / 3) / safe_err ** (2 / 3)
        fac = jnp.where(keep & (n_acc > 0), jnp.minimum(fac_first, fac_pred), fac_first)
        fac = jnp.clip(jnp.where(jnp.isfinite(fac), fac, 0.1), 0.1, jnp.where(rejected, 1.0, 10.0))
        h_next = h * fac
        if buf is not None:
            ts, ys, fs, rhos = buf
            j = n_acc + 1
            put = lambda new, arr, at=j: arr.at[at].set(new.astype(arr.dtype), pred=keep)
            buf = (put(t + h, ts), jax.tree.map(put, y_new, ys), jax.tree.map(put, f_new, fs), put(rho, rhos, n_acc))
        sel = lambda a, b: jnp.where(keep, a, b)
        t_next = jnp.where(keep, jnp.where(t + h >= clip_floor, t1, t + h), t)
        good = good & jnp.isfinite(rho)
        return (t_next, h_next, jax.tree.map(sel, y_new, y), jax.tree.map(sel, f_new, f), rho, rho_state,
                sel(err, err_prev), sel(h, h_prev), n_steps + 1, n_acc + keep.astype(jnp.int32), evals + s,
                matvecs + mv, jnp.maximum(s_max_seen, s), jnp.maximum(rho_max, rho), ~keep, buf, good)

    carry = (t0, h, y0, f_0, rho, rho_state, err_prev, h_prev, zero, zero, jnp.asarray(2, jnp.int32),
             jnp.asarray(mv0, jnp.int32), zero, rho, jnp.array(False), buf, jnp.isfinite(rho))
    out = eqxi.while_loop(cond, body, carry, buffers=(lambda c: c[15]) if record else None, kind="lax")
    t, _, y, _, _, rho_state, _, _, n_steps, n_acc, evals, matvecs, s_seen, rho_max, _, buf, good = out
    done = t >= t1
    status = jnp.where(
        done & good,
        jnp.where(all_finite(y), SolveStatus.SUCCESS, SolveStatus.NONFINITE),
        jnp.where(~good, SolveStatus.SPECTRAL_ESTIMATE,
                  jnp.where(n_steps >= max_steps, SolveStatus.MAX_STEPS, SolveStatus.DENSE_OVERFLOW)),
    ).astype(jnp.int32)
    stats = RKCStats(n_steps, n_acc, evals, matvecs, s_seen, rho_max)
    dense = (buf[0], buf[1], buf[2], buf[3], n_acc) if record else None
    return y, dense, status, stats, rho_state


def power_iteration(matvec: Callable, v, iterations):
    """`(rho, v)`: `iterations` (traced) power-iteration steps on `matvec` from `v`; `rho = |matvec(v)|` at the last.

    For a symmetric matrix, `|M v|` with `|v| = 1` is a lower bound of the
    spectral radius converging to it; `v` comes back normalised, for a warm start.
    """

    def body(_, c):
        v, _ = c
        w = matvec(v)
        norm = jnp.linalg.norm(w)
        ok = jnp.isfinite(norm) & (norm > 0)
        return jnp.where(ok, w / jnp.where(ok, norm, 1), v), jnp.where(jnp.isfinite(norm), norm, jnp.nan)

    return jax.lax.fori_loop(0, iterations, body, (v, jnp.zeros((), v.dtype)))[::-1]
