"""How a solve ended: status codes, NaN on failure, errors raised at run time."""

from __future__ import annotations

import enum
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from ._stability import STABILITY_LIMIT, STABILITY_MARGIN, UNSTABLE_ADVICE

PyTree = Any


class SolveStatus(enum.IntEnum):
    r"""How a forward solve ended: the int32 codes `solve(..., throw=False)` returns.

    - `SUCCESS` (0): it reached $t_1$ with finite states.
    - `MAX_STEPS` (1): it used its whole step budget `max_steps` before $t_1$.
      A stiff flow does this; so does a diverging one under an adaptive
      solver, which rejects non-finite steps and shrinks the step until the
      budget runs out.
    - `NONFINITE` (2): it reached $t_1$ but a stored or final state is NaN or
      infinite (a fixed-step solver on a diverging flow; non-finite inputs).
    - `FAILED` (3): any other failure the solver reports.
    - `DENSE_OVERFLOW` (5): the forward solve of [`AdaptiveAdjoint`][]
      accepted as many steps as its dense output holds (`dense_steps`)
      before $t_1$; raise `dense_steps` (memory: three states a step).
    - `SPECTRAL_ESTIMATE` (6): the spectral-radius estimate of the `"rkc2"`
      solver (power iteration on Jacobian-vector products) was not finite,
      so no stable stage count could be chosen (non-finite curvature).
    - `UNSTABLE_ADJOINT` (4): the forward solve succeeded, but the backward
      adjoint sweep of [`StoredAdjoint`][] over its stored states would be
      unstable, $h\,\lambda_{\max} > 0.95\,c$ (see there), so its
      meta-gradient would be wrong (finite, or overflowing). Only a solve
      being differentiated can end so (the check runs in the custom VJP's
      forward rule): its value $y(t_1)$ is kept, its derivatives are NaN.
    """

    SUCCESS = 0
    MAX_STEPS = 1
    NONFINITE = 2
    FAILED = 3
    UNSTABLE_ADJOINT = 4
    DENSE_OVERFLOW = 5
    SPECTRAL_ESTIMATE = 6

    def describe(self, max_steps: int | None = None, *, steps: int | None = None, scheme: str | None = None,
                 dense_steps: int | None = None) -> str:
        r"""What went wrong, as the end of a sentence ("the inner solve ...").

        `max_steps` names the forward step budget; `steps` (the stored grid's
        intervals, $h = t_1/\text{steps}$) and `scheme` (of the backward sweep)
        make the text of `UNSTABLE_ADJOINT` say what to change.
        """
        budget = f" (max_steps={max_steps})" if max_steps is not None else " (max_steps)"
        return {
            SolveStatus.SUCCESS: "succeeded",
            SolveStatus.MAX_STEPS: f"exhausted its step budget{budget} before reaching the horizon",
            SolveStatus.NONFINITE: "produced a non-finite state (NaN or inf)",
            SolveStatus.FAILED: "failed (the solver stopped before reaching the horizon)",
            SolveStatus.UNSTABLE_ADJOINT: _describe_unstable(steps, scheme),
            SolveStatus.DENSE_OVERFLOW: "filled its dense output"
            + (f" (dense_steps={dense_steps} accepted steps)" if dense_steps is not None else " (dense_steps)")
            + " before reaching the horizon",
            SolveStatus.SPECTRAL_ESTIMATE: "got a non-finite spectral-radius estimate (Hessian-vector products), "
            "so RKC2 could not choose its stages",
        }[self]


def _describe_unstable(steps, scheme) -> str:
    limit = STABILITY_LIMIT.get(scheme)
    bound = (f"h*lambda_max > {STABILITY_MARGIN * limit:.3g} where the {scheme} sweep is stable only below "
             f"{limit:.4g}" if limit is not None else "h*lambda_max above the scheme's stability limit")
    grid = f"h = T/steps with steps={steps}" if steps is not None else "h = T/steps"
    return (f"has an unstable backward adjoint sweep: {bound} ({grid}; lambda_max: the largest curvature "
            "of the loss, estimated at stored states of the flow), so its meta-gradient would be wrong")


def all_finite(tree) -> jax.Array:
    """Whether every inexact leaf of `tree` is finite.

    As `isfinite(max |x|)` (the max propagates NaN): a reduction XLA fuses with
    `abs`, whereas `all(isfinite(x))` materialises a boolean mask as large as
    `x`, a quarter of the stored states in float32.
    """
    leaves = [jnp.isfinite(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
              if x.size]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def solve_status(result, ys) -> jax.Array:
    """The [`SolveStatus`][] of one diffrax solve: its result, then whether `ys` is finite.

    A reduction over `ys`, so no copy of the stored states is made (an
    `eqx.error_if` on them would copy them all through its callback).
    """
    code = jnp.where(
        result == diffrax.RESULTS.successful,
        SolveStatus.SUCCESS,
        jnp.where(result == diffrax.RESULTS.max_steps_reached, SolveStatus.MAX_STEPS, SolveStatus.FAILED),
    )
    code = jnp.where((code == SolveStatus.SUCCESS) & jnp.logical_not(all_finite(ys)), SolveStatus.NONFINITE, code)
    return code.astype(jnp.int32)


@jax.custom_jvp
def _nan_if(failed, x):
    """`x`, or NaN where `failed`; derivatives through it are NaN there too.

    (`jnp.where` alone would give a failed solve a zero derivative, which looks
    like a valid one.) The tangent rule is linear in the tangent, so reverse
    mode transposes it: cotangents are multiplied by NaN where `failed`.
    """
    return jnp.where(failed, jnp.nan, x)


@_nan_if.defjvp
def _nan_if_jvp(primals, tangents):
    failed, x = primals
    _, tx = tangents
    return _nan_if(failed, x), tx * jnp.where(failed, jnp.nan, 1.0).astype(tx.dtype)


def nan_if_failed(tree, status):
    """Every inexact leaf of `tree` NaN, value and derivatives, where `status` is not `SUCCESS`."""
    failed = status != SolveStatus.SUCCESS
    return jax.tree.map(lambda x: _nan_if(failed, x) if eqx.is_inexact_array(x) else x, tree)


def nan_if_forward_failed(tree, status):
    """As `nan_if_failed`, but only for a failed forward solve.

    `UNSTABLE_ADJOINT` leaves the value alone (the forward solve is fine);
    the custom VJP makes its derivatives NaN.
    """
    return nan_if_failed(tree, jnp.where(status == SolveStatus.UNSTABLE_ADJOINT, SolveStatus.SUCCESS, status))


def raise_if_failed(tree, status, max_steps: int | None = None, where: str = "ctmeta.ode.solve", *,
                    steps: int | None = None, scheme: str | None = None, dense_steps: int | None = None):
    """`tree`, raising at run time (inside `jit` too) if `status` is not `SUCCESS`.

    The check is attached to `tree`, so keep it small (the final state, not
    the stored grid): `eqx.error_if` passes what it guards through a callback.
    `steps` and `scheme` complete the text for `UNSTABLE_ADJOINT`.
    """
    advice = {
        SolveStatus.MAX_STEPS: "The flow is stiff or diverging: raise max_steps, loosen rtol/atol, "
        "shorten the horizon t1, or rescale the loss.",
        SolveStatus.NONFINITE: "The ODE diverged: shorten the horizon t1, rescale the loss, or check the data.",
        SolveStatus.FAILED: "Check the vector field and the horizon.",
        SolveStatus.UNSTABLE_ADJOINT: UNSTABLE_ADVICE,
        SolveStatus.DENSE_OVERFLOW: "Raise dense_steps (AdaptiveAdjoint, or Adjoint(dense_steps=...)), loosen "
        "rtol/atol, or shorten the horizon t1.",
        SolveStatus.SPECTRAL_ESTIMATE: "The loss's curvature is not finite along the flow: check the loss and "
        "the data, or use solver='dopri5'.",
    }
    # One `error_if` per cause rather than `branched_error_if`, whose vmapped
    # index has no differentiation rule (the status is an output of a custom VJP).
    for code, text in advice.items():
        what = "solve" if code == SolveStatus.UNSTABLE_ADJOINT else "forward solve"
        tree = eqx.error_if(tree, status == code,
                            f"{where}: the {what} "
                            f"{code.describe(max_steps, steps=steps, scheme=scheme, dense_steps=dense_steps)}. {text}")
    return tree
