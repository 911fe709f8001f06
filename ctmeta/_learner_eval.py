"""The evaluation of a [`MetaLearner`][ctmeta.meta.MetaLearner]: the query metric
of the meta-test tasks after 0..K adaptation steps from the learned
initialisation, and the losses along the continuous-time inner flow.

Internal to `ctmeta.meta` (see `ctmeta._learner_tasks`)."""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._errors import InputError, check_positive
from ._learner_checks import check_batch, task_axis_hint
from .adaptation import loss_along_flow
from .evaluation import Evaluation, gd_scores
from .losses import METRICS, apply_loss
from .methods import Adjoint
from .sharding import TASK_AXIS, constrain_replicated, map_over_tasks
from .state import MetaParams, MetaState, params_of

__all__ = ["LearnerEvaluation"]


class LearnerEvaluation:
    """The part of [`MetaLearner`][ctmeta.meta.MetaLearner] that evaluates and looks inside the inner loop."""

    def metric_for(self, batch) -> tuple[Callable, str]:
        """The metric `evaluate` scores `batch` with, and its name: the one
        given (or implied by the loss), else inferred from the query
        targets (integer labels: accuracy; floating-point: nRMSE)."""
        if self.metric is not None:
            return self.metric, self.metric_name
        qy = tuple(batch)[3]
        name = "accuracy" if jnp.issubdtype(jnp.result_type(qy), jnp.integer) else "nrmse"
        return METRICS[name], name

    def _evaluate_chunk(self, params: MetaParams, batch, segments: tuple[int, ...], lr, metric):
        """Per-task metric after sum(segments[:i]) GD steps, for each i (incl. 0);
        the tasks split over the mesh's devices, the result replicated."""
        per_device = map_over_tasks(
            lambda shared, tasks: self._evaluate_tasks(*shared, tasks, segments, metric), self._mesh)
        return constrain_replicated(per_device((params, lr), tuple(batch)), self._mesh)

    def _evaluate_tasks(self, params: MetaParams, lr, batch, segments: tuple[int, ...], metric):
        model = eqx.combine(params.model, self._static)
        flow = self._flow(params)
        return gd_scores(model, batch, segments, lr, metric, loss=self.loss, apply=self.apply, adapt=self.adapt,
                         flow=None if flow.is_gradient else flow)

    def evaluate(
        self,
        state_or_params: MetaState | MetaParams,
        batch,
        steps_list=(0, 50, 200),
        *,
        lr: float | None = None,
        chunk_size: int | None = None,
        progress: Callable[[int], None] | None = None,
        metric: Callable | None = None,
    ) -> Evaluation:
        """Adapt on each task's support set from the learned initialisation by
        plain gradient descent with learning rate `lr` (default: the method's
        `T / K`), or by the learned inner flow's Euler steps of `lr` (Meta-SGD
        with the learned preconditioner, momentum GD with the learned
        friction), recording the query metric after each number of steps in
        `steps_list`.

        `batch` holds the evaluation tasks (a `Batch`, or a `MaskedBatch`
        whose `query_mask` the metric uses). They are processed `chunk_size`
        tasks at a time (all at once by default); `progress(n)` is called
        with the number of tasks done after each chunk. With `adapt="head"`
        only the head adapts, on fixed features. `metric(pred, y, mask=None)`
        scores instead of the learner's metric. Returns an [`Evaluation`][].
        """
        params = params_of(state_or_params)
        check_batch(batch, "evaluate")
        if metric is None:
            metric, metric_name = self.metric_for(batch)
        elif callable(metric):
            metric_name = getattr(metric, "__name__", "metric")
        else:
            raise InputError(f"evaluate: metric must be a function metric(pred, y, mask=None); got {metric!r}")
        steps = sorted({int(s) for s in steps_list})
        if not steps or steps[0] < 0:
            raise InputError(f"evaluate: steps_list must be non-negative ints, got {list(steps_list)!r}")
        if lr is None:
            lr = float(self._horizon(params)) / self.method.inner_steps
        lr = check_positive("evaluate: lr", lr)
        positive = [s for s in steps if s > 0]
        segments = tuple(b - a for a, b in zip([0] + positive[:-1], positive))
        n = jax.tree.leaves(batch)[0].shape[0]
        chunk = n if chunk_size is None else max(1, min(int(chunk_size), n))
        if self._mesh is not None:  # as many tasks on every device (padded below)
            devices = self._mesh.shape[TASK_AXIS]
            chunk = -(-chunk // devices) * devices
        results = []
        (params, lr_arr), _ = self._placed((params, jnp.asarray(lr, self._dtype)))
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            idx = np.minimum(np.arange(start, start + chunk), n - 1)  # pad: fixed shapes
            part = jax.tree.map(lambda a: a[idx], tuple(batch))
            _, part = self._placed(None, type(batch)(*part))
            with task_axis_hint(batch, "evaluate"):
                values = self._compiled(self._evaluate_chunk)(params, part, segments, lr_arr, metric)
            results.append(np.asarray(values)[: stop - start])
            if progress is not None:
                progress(stop)
        values = np.concatenate(results, axis=0)  # column 0: step 0; then `positive`
        columns = [0 if s == 0 else 1 + positive.index(s) for s in steps]
        return Evaluation.from_per_task(steps, values[:, columns], lr, metric_name)

    def evaluate_own_flow(self, state_or_params: MetaState | MetaParams, batch, *, chunk_size: int | None = None,
                          metric: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each task's query metric after adaptation by the learner's own rule
        up to its horizon: what it is meta-trained for, not `evaluate`'s GD.

        For COMLN ([`LinearFlow`][]) the head adapts by its flow
        ([`linear_flow`][ctmeta.linear_flow.linear_flow], Dopri5) to the learned `T` (each task's own
        with `learn_T="per-task"`); for the other rules, by `gradient_flow`
        with the learner's method and flow. Returns `(per_task, status)`,
        each `(tasks,)`: NaN, and the `ctmeta.ode.SolveStatus` code, for a
        task whose solve failed. `chunk_size` tasks at a time (all by default).
        """
        params = params_of(state_or_params)
        check_batch(batch, "evaluate_own_flow")
        if metric is None:
            metric, _ = self.metric_for(batch)
        n = jax.tree.leaves(batch)[0].shape[0]
        chunk = n if chunk_size is None else max(1, min(int(chunk_size), n))
        values, codes = [], []
        for start in range(0, n, chunk):
            idx = np.minimum(np.arange(start, start + chunk), n - 1)  # pad: fixed shapes
            part = tuple(jax.tree.map(lambda a: a[idx], tuple(batch)))
            with task_axis_hint(batch, "evaluate_own_flow"):
                v, c = self._compiled(self._own_flow_chunk)(params, part, metric)
            values.append(np.asarray(v)[: min(chunk, n - start)])
            codes.append(np.asarray(c)[: min(chunk, n - start)])
        return np.concatenate(values), np.concatenate(codes)

    def _own_flow_chunk(self, params: MetaParams, tasks, metric):
        """Per-task `(metric, status)` after the rule's own adaptation (`evaluate_own_flow`)."""

        def one(task):
            pred, _, status = self._adapted_query_pred(params, task, throw=False)
            mask = task[4] if len(task) > 4 else None
            return apply_loss(metric, pred, task[3], mask), status

        return jax.vmap(one)(tasks)

    def loss_along_flow(self, state_or_params: MetaState | MetaParams, batch, ts) -> tuple[np.ndarray, np.ndarray]:
        """The support and the query loss of each task of `batch` at times `ts`
        along its inner flow from the state's initialisation: a look inside the
        inner loop (see [`ctmeta.loss_along_flow`][]; one adaptive forward
        solve per task, read at `ts` from its dense output).

        The flow is the learner's own with its learned meta-parameters, in
        continuous time: the flow A-MAML solves, and the one whose Euler steps
        of `h` MAML's steps are (step `k` is time `k h`). The forward settings
        are the method's when it is an [`Adjoint`][] with Dopri5, else
        `Adjoint()`'s. Returns `(support, query)`, each `(tasks, len(ts))`,
        NaN for a task whose forward solve failed (e.g. a non-smooth ReLU
        network that runs out of dense steps). Not for COMLN's own head flow.
        """
        if self.method.head_only:
            raise InputError(f"loss_along_flow: {type(self.method).__name__} adapts its head by its own flow; "
                             "this reads the gradient flows of `gradient_flow`")
        params = params_of(state_or_params)
        check_batch(batch, "loss_along_flow")
        ts = jnp.asarray(ts, self._dtype)
        # Compiled once per learner (params, tasks and times are arguments): the
        # learned and the random initialisation share one program.
        support, query = self._compiled(self._loss_along_flow_tasks)(params, tuple(batch), ts)
        return np.asarray(support), np.asarray(query)

    def _loss_along_flow_tasks(self, params: MetaParams, tasks: tuple, ts):
        """`(support, query)` losses at `ts` along each task's inner flow (`loss_along_flow`)."""
        method = self.method if isinstance(self.method, Adjoint) and self.method.solver == "dopri5" else Adjoint()
        model = eqx.combine(params.model, self._static)
        T = jnp.maximum(jnp.max(ts), 0)
        inner = self._flow(params)

        def one(task):
            sx, sy, qx, qy = task[:4]
            mask = task[4] if len(task) > 4 else None
            if self.adapt == "all":
                u, support, query = model, (sx, sy), (qx, qy, mask)
            else:
                u, support, query = model.head, (model.features(sx), sy), (model.features(qx), qy, mask)
            out = loss_along_flow(self._inner_loss(), u, support, T, ts, flow=inner, query_data=query,
                                  method=method, throw=False)
            return out.support, out.query

        return jax.vmap(one)(tasks)
