r"""What a [`MetaLearner`][] learns and carries from one meta-iteration to
the next.

- [`MetaParams`][]: the meta-parameters $\theta$ (the model's floating-point
  arrays), and $\log T$ (and per-task weights) when the horizon is learned.
- [`MetaState`][]: the meta-parameters with the optimiser's state, the run's
  base key and the number of meta-iterations done; what a checkpoint holds
  (`ctmeta.checkpoint`).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax

PyTree = Any

__all__ = ["MetaParams", "MetaState", "params_of"]


class MetaParams(eqx.Module):
    r"""The meta-parameters.

    - `model`: the model's floating-point arrays (its other leaves are
      `None`; the learner keeps them).
    - `log_T`: $\log T$ when $T$ is learned, else `None`.
    - `T_weights`: `(d,)` when each task gets its own horizon
      $T = \exp(\log T + w \cdot \bar\phi)$, $\bar\phi$ the mean of the
      task's support features; else `None`.
    - `flow`: the inner flow's meta-parameters (its arrays, e.g. the
      $\rho$ of [`Preconditioned`][ctmeta.flows.Preconditioned]; other
      leaves `None`) when a flow with arrays is learned; else `None` (the
      gradient flow has none, so its state and checkpoints are as before).
    """

    model: PyTree
    log_T: jax.Array | None = None
    T_weights: jax.Array | None = None
    flow: PyTree = None


class MetaState(eqx.Module):
    """Everything a run needs to continue: meta-parameters, the optimiser's
    state, the run's base key and the number of meta-iterations done."""

    params: MetaParams
    opt_state: PyTree
    key: jax.Array
    iteration: jax.Array


def params_of(state_or_params: MetaState | MetaParams) -> MetaParams:
    """The [`MetaParams`][] of a state, or the argument itself."""
    return state_or_params.params if isinstance(state_or_params, MetaState) else state_or_params
