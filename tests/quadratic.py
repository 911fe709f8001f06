"""A quadratic training loss with known curvatures, shared by the adjoint tests:
L(u) = 1/2 u^T A u - b^T u, A = q diag(eigs) q^T, whose gradient flow has the
closed form u(T) = u* + q e^{-diag(eigs) T} q^T (u0 - u*), u* = A^{-1} b."""

import jax
import jax.numpy as jnp


def quadratic(eigs, key=jax.random.PRNGKey(0)):
    """`(A, b, u0, c, q)`: the loss's matrix and vector, a start, a target, the eigenvectors."""
    q, _ = jnp.linalg.qr(jax.random.normal(key, (4, 4)))
    A = q @ jnp.diag(eigs) @ q.T
    b = jnp.array([1.0, -1.0, 0.5, 2.0])
    u0 = jnp.array([0.3, -0.2, 1.0, 0.5])
    c = jnp.array([0.1, 0.2, -0.3, 0.4])
    return A, b, u0, c, q


def loss(u, data):
    A, b = data
    return 0.5 * u @ A @ u - b @ u
