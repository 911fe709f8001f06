r"""Spectral estimates of a symmetric Jacobian from Jacobian-vector products: the curvature range by Lanczos.

For a gradient flow $f = -\nabla L$ the Jacobian is $-H$, and the eigenvalues
of $H$ say what a solver faces: a large positive $\lambda_{\max}$ makes the
flow *stiff* (fast decaying modes; an explicit solver's step is bounded by
its stability interval, $h\lambda_{\max} \lesssim 3.3$ for Dopri5), a
negative $\lambda_{\min}$ makes it *unstable* there (modes that grow like
$e^{|\lambda_{\min}| t}$, which any solver must resolve to be accurate:
stabilized and exponential methods do not lift that bound). Both ends come
from one Lanczos process.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ._fields import AbstractVectorField, VectorField, flat_jtv
from ._stability import LANCZOS_STEPS


def curvature_range(field: Callable | AbstractVectorField, t, y, args,
                    iterations: int = LANCZOS_STEPS) -> tuple[jax.Array, jax.Array]:
    r"""`(lambda_min, lambda_max)`: the extreme Ritz values of $M = -\partial f/\partial y$ at `(t, y)`, by Lanczos.

    For a field with a symmetric Jacobian only (a gradient flow: the extreme
    eigenvalues of the Hessian of the loss). `iterations` steps of the
    Lanczos process on $M$ from a fixed pseudo-random start, one `field.vjp`
    each (one Hessian-vector product for [`GradientField`][]), then the
    eigenvalues of the `iterations`-square tridiagonal matrix. Its extreme
    Ritz values lie in $[\lambda_{\min}(M), \lambda_{\max}(M)]$ and converge
    to the ends from inside, whatever the signs: unlike power iteration,
    which finds the eigenvalue of largest magnitude, both ends come out, so
    a negative curvature beside a large positive one is seen. No
    reorthogonalisation (memory: three vectors of the state's size); a lost
    orthogonality only repeats converged Ritz values. On a breakdown (an
    invariant Krylov space, e.g. a state of fewer than `iterations` numbers)
    the process stops: the remaining Ritz values are 0, inside the range of
    a matrix whose spectrum holds 0 and otherwise never beyond a converged end.
    """
    field = field if isinstance(field, AbstractVectorField) else VectorField(field)
    jtv, shape, dtype = flat_jtv(field, t, y, args)
    matvec = lambda v: -jtv(v)  # M = -df/dy

    q0 = jax.random.normal(jax.random.PRNGKey(0), shape, dtype)
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
        # leaves Rayleigh-Ritz values on a smaller space, still inside the range.
        ok = beta > tol * w_norm
        beta = jnp.where(ok, beta, 0.0)
        q_next = jnp.where(ok, w / jnp.where(ok, beta, 1.0), 0.0)
        return (q, q_next, beta), (alpha, beta)

    zero = jnp.zeros((), dtype)
    _, (alphas, betas) = jax.lax.scan(step, (jnp.zeros_like(q0), q0, zero), None, length=iterations)
    off = betas[:-1]
    ritz = jnp.linalg.eigvalsh(jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1))
    return ritz[0], ritz[-1]


def max_curvature(field: Callable | AbstractVectorField, t, y, args, iterations: int = LANCZOS_STEPS) -> jax.Array:
    r"""A lower bound of the largest eigenvalue of $-\partial f/\partial y$ at `(t, y)`: [`curvature_range`][]'s upper end.

    For a gradient flow, the largest curvature $\lambda_{\max}$ of the loss,
    which bounds the stable step of an explicit solver or backward sweep.
    """
    return curvature_range(field, t, y, args, iterations)[1]
