"""Vector fields that know their transposed Jacobian, and the pytree helpers of their cotangents."""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp

PyTree = Any


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
        _, pullback = jax.vjp(lambda d: call_field(eqx.combine(d, nondiff), t), diff)
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


def call_field(triple, t):
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



def tree_axpy(alpha, x, y):
    """`alpha * x + y` over pytrees whose non-differentiable leaves are None."""
    return jax.tree.map(lambda xi, yi: alpha * xi + yi, x, y)


def zeros_for(tree):
    return jax.tree.map(jnp.zeros_like, eqx.filter(tree, eqx.is_inexact_array))


def cotangent_like(cot, tree):
    """Give `cot` the structure of `tree`'s inexact leaves, zeros where `cot` is None."""
    return jax.tree.map(
        lambda c, x: c if c is not None else (None if x is None else jnp.zeros_like(x)),
        cot,
        eqx.filter(tree, eqx.is_inexact_array),
        is_leaf=lambda c: c is None,
    )


def flat_jtv(field, t, y, args):
    """`(v -> (df/dy)^T v, flat size, dtype)` on flat vectors of `y`'s size, in at least float32.

    One `field.vjp` a product (a Hessian-vector product for a gradient flow); for
    a symmetric Jacobian it is `df/dy v`. Used by the curvature check (Lanczos)
    and by RKC2's spectral estimate (power iteration).
    """
    flat, unravel = jax.flatten_util.ravel_pytree(y)
    dtype = jnp.promote_types(flat.dtype, jnp.float32)  # half-precision states: the process in float32

    def matvec(v):
        jtv = field.vjp(t, y, args, unravel(v.astype(flat.dtype)), (False, False))[0]
        return jax.flatten_util.ravel_pytree(cotangent_like(jtv, y))[0].astype(dtype)

    return matvec, flat.shape, dtype
