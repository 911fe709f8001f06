"""The meta-step of a [`MetaLearner`][ctmeta.meta.MetaLearner]: every task of a
meta-batch adapted and differentiated (a `vmap` or `lax.map`, split over a
mesh's devices), the per-task meta-gradients combined (the failed tasks left
out with `on_nonfinite="skip-task"`), and the optimiser's update.

Internal to `ctmeta.meta` (see `ctmeta._learner_tasks`)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._errors import NumericalError
from ._learner_checks import check_batch, describe_solve_failures, nonfinite_error, solve_advice, task_axis_hint
from .methods import reptile_direction
from .ode import SolveStatus
from .sharding import constrain_replicated, map_over_tasks
from .state import MetaParams, MetaState, params_of

__all__ = ["MetaSteps", "SCALAR_METRICS", "TASK_METRICS"]

#: The scalar entries of `MetaLearner.meta_step`'s metrics (shape `()`) ...
SCALAR_METRICS = ("meta_loss", "grad_norm", "T", "finite", "skipped")
#: ... and its per-task entries (shape `(tasks,)`).
TASK_METRICS = ("task_finite", "task_status")


def _tree_where(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack(leaves))


class MetaSteps:
    """The part of [`MetaLearner`][ctmeta.meta.MetaLearner] that takes meta-gradients and meta-steps."""

    def _per_task(self, params: MetaParams, batch):
        """Per-task query losses, meta-gradients (Reptile: directions) and inner
        solve statuses, vmapped. The solves do not throw (see
        `_adapted_query_pred`): a failed one is that task's NaN and status."""
        tasks = tuple(batch)
        if self.method.outer_direction:

            def per_task(p, task):
                loss, adapted, status = self._task_objective(p, task, throw=False)
                return loss, MetaParams(model=reptile_direction(p.model, adapted), log_T=None), status

            return self._map_tasks(per_task, params, tasks)

        def loss_and_status(p, task):
            loss, _, status = self._task_objective(p, task, throw=False)
            return loss, status

        grad_fn = jax.value_and_grad(loss_and_status, has_aux=True)
        (losses, status), grads = self._map_tasks(grad_fn, params, tasks)
        return losses, grads, status

    def _map_tasks(self, fn, params, tasks):
        """`fn(params, task)` over the leading axis of `tasks` (see `task_map`)."""
        if self.task_map == "map":
            return jax.lax.map(lambda task: fn(params, task), tasks)
        return jax.vmap(fn, in_axes=(None, 0))(params, tasks)

    def _combine_tasks(self, losses, grads, status=None):
        n = losses.shape[0]
        task_ok = jax.vmap(lambda l, g: jnp.isfinite(l) & _all_finite(g))(losses, grads)
        if status is not None:  # a failed solve is NaN already; its status says so too
            task_ok = task_ok & (status == SolveStatus.SUCCESS)
        if self.on_nonfinite == "skip-task":
            # Hook: drop the tasks whose loss or meta-gradient is not finite.
            weights = task_ok.astype(losses.dtype) / jnp.maximum(jnp.sum(task_ok), 1).astype(losses.dtype)
            grads = jax.tree.map(
                lambda g: jnp.tensordot(weights, jnp.where(task_ok.reshape((n,) + (1,) * (g.ndim - 1)), g, 0.0), 1),
                grads,
            )
            meta_loss = jnp.sum(jnp.where(task_ok, losses, 0.0) * weights)
            skipped = n - jnp.sum(task_ok)
        else:
            grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
            meta_loss = jnp.mean(losses)
            skipped = jnp.asarray(0)
        return meta_loss, grads, task_ok, skipped

    def _meta_gradient(self, params: MetaParams, batch):
        losses, grads, status = map_over_tasks(self._per_task, self._mesh)(params, tuple(batch))
        meta_loss, grads, _, _ = self._combine_tasks(losses, grads, status)
        return constrain_replicated((meta_loss, grads, status), self._mesh)

    def meta_gradient(self, state_or_params: MetaState | MetaParams, batch) -> tuple[jax.Array, MetaParams]:
        """The meta-loss and the meta-gradient (for Reptile, the direction
        `theta - u_K`) averaged over the tasks of `batch`, without updating.
        Same computation as `meta_step`'s (a `vmap` over tasks).

        A task whose inner solve fails raises `NumericalError` naming it
        (`on_nonfinite="raise"`) or is left out (`"skip-task"`)."""
        params = params_of(state_or_params)
        check_batch(batch, "meta_gradient")
        with task_axis_hint(batch, "meta_gradient"):
            meta_loss, grads, status = self._compiled(self._meta_gradient)(*self._placed(params, batch))
        if self.on_nonfinite == "raise" and np.any(np.asarray(status) != SolveStatus.SUCCESS):
            raise NumericalError(f"meta_gradient: {self.solve_failures(status)}. {solve_advice(status)}.")
        return meta_loss, grads

    def solve_failures(self, status) -> str:
        """Which tasks' inner solves failed and why, grouped by cause; "" if none did.

        **Arguments:**

        - `status`: per-task `ctmeta.ode.SolveStatus` codes, e.g. the
          `task_status` entry of `meta_step`'s metrics.

        **Returns:** e.g. "the inner solve of task 1 of the meta-batch
        exhausted its step budget (max_steps=64) before reaching the horizon".
        """
        return describe_solve_failures(status, self.method)

    def _step(self, state: MetaState, batch):
        self.num_traces += 1  # Python side effect: runs once per trace
        params = state.params
        losses, grads, status = map_over_tasks(self._per_task, self._mesh)(params, tuple(batch))
        meta_loss, grads, task_ok, skipped = self._combine_tasks(losses, grads, status)
        finite = _all_finite(grads) & jnp.isfinite(meta_loss)
        if self.on_nonfinite == "skip-task":
            finite = finite & jnp.any(task_ok)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, params)
        new_params = eqx.apply_updates(params, updates)
        # Never let a non-finite gradient into the parameters.
        new_params = _tree_where(finite, new_params, params)
        opt_state = _tree_where(finite, opt_state, state.opt_state)
        new_state = MetaState(
            params=new_params,
            opt_state=opt_state,
            key=state.key,
            iteration=state.iteration + finite.astype(state.iteration.dtype),
        )
        metrics = {
            "meta_loss": meta_loss,
            "grad_norm": optax.tree.norm(grads),
            "T": self._horizon(params),
            "finite": finite,
            "skipped": skipped,
            "task_finite": task_ok,
            "task_status": status,  # each task's inner solve, a `ctmeta.ode.SolveStatus` code
        }
        return constrain_replicated((new_state, metrics), self._mesh)

    def meta_step(self, state: MetaState, batch, *, check: bool = True) -> tuple[MetaState, dict]:
        """One meta-iteration on `batch` (a `Batch` with a leading task axis).

        Returns the new state and a dict of metrics, JAX arrays of two kinds:

        - scalars (shape `()`, the names in `SCALAR_METRICS`): `meta_loss`
          (mean query loss after adaptation), `grad_norm` (of the averaged
          meta-gradient or Reptile direction), `T` (the horizon used),
          `finite` (the update was applied) and `skipped` (tasks left out);
        - per task (shape `(tasks,)`, the names in `TASK_METRICS`):
          `task_finite` and `task_status` (finite, and the inner solve's
          `ctmeta.ode.SolveStatus` code).

        So `{k: float(metrics[k]) for k in SCALAR_METRICS}` is the row to log.
        The underlying function is compiled once per shape.

        The inner solves do not throw: a task whose solve fails (step budget
        `max_steps` exhausted, non-finite state; or, for A-MAML, an unstable
        backward adjoint sweep, see `Adjoint(stability_check=...)`) gets a
        NaN loss or meta-gradient, so `on_nonfinite="skip-task"` leaves out
        that task alone. With `check=True` (default), a non-finite
        meta-gradient raises `NumericalError` naming the iteration and the
        tasks, and for a failed solve its cause; the parameters are never
        updated with non-finite values either way.
        """
        check_batch(batch, "meta_step")
        it = int(state.iteration) + 1
        try:
            with task_axis_hint(batch, "meta_step"):
                # `_step` (above), compiled once per shape (and mesh).
                new_state, metrics = self._compiled(self._step)(*self._placed(state, batch))
            finite = bool(metrics["finite"]) if check else True
        except (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError) as err:
            msg = str(err).strip().splitlines()
            msg = next((line for line in msg if line.strip()), type(err).__name__)
            what = f"meta-iteration {it}: the inner solve failed: {msg}"
            raise NumericalError(what, iteration=it, what=what) from err
        if check and not finite:
            raise nonfinite_error(metrics, it, self.method, self.on_nonfinite)
        return new_state, metrics
