"""A-MAML's stored-state adjoint: the grid, the curvature check, the backward sweep, as a custom VJP."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp

from .._errors import InputError
from ._fields import AbstractVectorField, VectorField, cotangent_like, flat_jtv, literals_as_arrays, tree_axpy, zeros_for
from ._solvers import AbstractSensitivity, forward, last
from ._spectrum import max_curvature
from ._stability import STABILITY_LIMIT, STABILITY_MARGIN
from ._status import SolveStatus, nan_if_failed, raise_if_failed

PyTree = Any


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



def _grid_states(field, y0, t1, args, options, rule: StoredAdjoint):
    """States on the coarse grid that the backward pass starts from, and their status."""
    n = options.steps if rule.checkpoints is None else rule.checkpoints
    ts = jnp.linspace(0.0, 1.0, n + 1, dtype=jnp.result_type(t1, float)) * t1
    return forward(field, y0, 0.0, t1, args, options, ts=ts)


@eqx.filter_custom_vjp
def _stored_adjoint_solve(primal, rule, options):
    """`(y(t1), status)`; the status is an integer output, so it gets no cotangent."""
    field, y0, t1, args = primal
    ys, status = forward(field, y0, 0.0, t1, args, options)
    return last(ys), status


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
        unstable = h * lam > STABILITY_MARGIN * STABILITY_LIMIT[rule.scheme]
        status = jnp.where((status == SolveStatus.SUCCESS) & unstable, SolveStatus.UNSTABLE_ADJOINT, status)
        status = status.astype(jnp.int32)
    return (last(ys), status), (ys, status)


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
    zero_p = zeros_for((args, field))
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
            return (tree_axpy(h, k1, a), tree_axpy(h, p1, acc)), None
        if scheme == "heun":
            k2, p2 = vjp_at(t_prev, y_prev, tree_axpy(h, k1, a))
            a = tree_axpy(h / 2, add(k1, k2), a)
            acc = tree_axpy(h / 2, add(p1, p2), acc)
            return (a, acc), None
        # rk4: f at the later end is carried from the previous step.
        f_next = carry[2]
        f_prev = field(t_prev, y_prev, args)
        y_mid = _hermite_midpoint(y_prev, y_next, f_prev, f_next, h)
        t_mid = t_prev + h / 2
        k2, p2 = vjp_at(t_mid, y_mid, tree_axpy(h / 2, k1, a))
        k3, p3 = vjp_at(t_mid, y_mid, tree_axpy(h / 2, k2, a))
        k4, p4 = vjp_at(t_prev, y_prev, tree_axpy(h, k3, a))
        two = lambda t: jax.tree.map(lambda x: 2 * x, t)
        a = tree_axpy(h / 6, add(k1, two(k2), two(k3), k4), a)
        acc = tree_axpy(h / 6, add(p1, two(p2), two(p3), p4), acc)
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
            fine, fine_status = forward(field, y_start, t_start, t_start + h_coarse, args, seg_options, ts=fine_ts)
            a, seg_acc = adjoint_sweep(field, fine, t_start, h_fine, args, a, rule.scheme, wrt)
            return (a, jax.tree.map(jnp.add, acc, seg_acc), jnp.maximum(seg_status, fine_status)), None

        (a0, (gargs, gfield), seg_status), _ = jax.lax.scan(
            segment, (g, zeros_for((args, field)), jnp.zeros_like(status)), jnp.arange(rule.checkpoints),
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
