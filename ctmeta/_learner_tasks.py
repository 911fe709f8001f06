"""The adaptation of one task by a [`MetaLearner`][ctmeta.meta.MetaLearner]: its
inner flow on the support set (the whole model, or the head on embedded
features) and its query loss.

Internal to `ctmeta.meta`, which assembles `MetaLearner` from this part, its
meta-step (`ctmeta._learner_step`) and its evaluation (`ctmeta._learner_eval`);
each part reads the attributes that `MetaLearner.__init__` sets."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .adaptation import gradient_flow
from .losses import apply_loss
from .ode import SolveStatus
from .state import MetaParams, MetaState, params_of

__all__ = ["TaskAdaptation"]


class TaskAdaptation:
    """The part of [`MetaLearner`][ctmeta.meta.MetaLearner] that adapts one task."""

    def _adapted_query_pred(self, params: MetaParams, task, throw: bool = True):
        """Adapt on the task's support set; return (query prediction, adapted
        arrays, the inner solve's `SolveStatus` code).

        `throw=False` is the meta-batch's mode: a failed inner solve raises
        nothing (under `vmap` it would stop every task) but makes this task's
        prediction and meta-gradient NaN, and its status says why.
        """
        sx, sy, qx = task[0], task[1], task[2]
        model = eqx.combine(params.model, self._static)
        T = self._horizon(params)
        inner = self._flow(params)

        def flow(loss, u, data, T):
            out = gradient_flow(loss, u, data, T, method=self.method, flow=inner, throw=throw)
            return (out, jnp.asarray(SolveStatus.SUCCESS, jnp.int32)) if throw else out

        if self.adapt == "all":
            adapted, status = flow(self._inner_loss(), model, (sx, sy), T)
            return self.apply(adapted, qx), eqx.filter(adapted, eqx.is_inexact_array), status
        # Head only: the embedding is meta-learned through the features.
        fs = model.features(sx)
        fq = model.features(qx)
        if params.T_weights is not None:  # this task's own horizon
            T = jnp.exp(params.log_T + jnp.dot(params.T_weights, jnp.mean(fs, axis=0)))
        if self.method.head_only:  # its own flow (COMLN): the cross-entropy of a softmax head
            labels = jax.nn.one_hot(sy, model.head.shape[0], dtype=fs.dtype)
            W = self.method.adapt_head(model.head, fs, labels, T.astype(fs.dtype), throw=throw)
            W, status = (W, jnp.asarray(SolveStatus.SUCCESS, jnp.int32)) if throw else W
        else:
            W, status = flow(self._inner_loss(), model.head, (fs, sy), T)
        return fq @ W.T, W, status

    def _inner_loss(self):
        """The inner loss `L(u, (x, y[, mask]))` of what adapts: the whole model
        on inputs, or (head only) the linear head `W` on features `x`."""
        if self.adapt == "all":
            return lambda m, data: apply_loss(self.loss, self.apply(m, data[0]), data[1], *data[2:])
        return lambda W, data: apply_loss(self.loss, data[0] @ W.T, data[1], *data[2:])

    def _task_objective(self, params: MetaParams, task, throw: bool = True):
        """`(query loss, adapted arrays, inner solve status)` of one task."""
        pred, adapted, status = self._adapted_query_pred(params, task, throw)
        mask = task[4] if len(task) > 4 else None
        return apply_loss(self.loss, pred, task[3], mask), adapted, status

    def task_objective(self, state_or_params: MetaState | MetaParams, task) -> jax.Array:
        """The query loss of ONE task (no task axis) after adaptation on its
        support set; `jax.grad` of it is that task's meta-gradient."""
        params = params_of(state_or_params)
        return self._task_objective(params, tuple(task))[0]
