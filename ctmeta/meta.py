r"""Meta-learners: a model, a meta-gradient rule and an outer optimiser, jitted.

A [`MetaLearner`][] turns

- a **model** (an equinox module: its floating-point arrays are the learned
  initialisation $\theta$),
- a **method** (a meta-gradient rule from `ctmeta.methods`: [`Adjoint`][]
  for A-MAML, [`Unrolled`][], [`FirstOrder`][], [`Implicit`][], [`Reptile`][];
  or [`LinearFlow`][] for COMLN's head),
- an **optax optimiser** for the outer loop,
- a per-task **loss** `loss(pred, y)` (the same for the inner loop on the
  support set and the outer loss on the query set; `ctmeta.losses`),
- and the **horizon** $T$ (fixed, or learned as $T = e^{\log T}$, COMLN's
  parametrisation)

into `meta_step(state, batch)`: one `eqx.filter_jit`-compiled function that,
for each task of the meta-batch (a `vmap`), adapts on the support set with
`gradient_flow`, takes the outer loss on the query set and its meta-gradient,
then averages over tasks and applies the optimiser. Reptile uses
`reptile_direction` as the "gradient" instead.

Two ways to adapt (the `adapt` argument):

- `"all"`: the whole model adapts (A-MAML, MAML, FOMAML, Reptile, iMAML).
  The model is applied to a set of inputs with `apply(model, x)`, by default
  `ctmeta.models.apply_to_set` (which vmaps a per-example module).
- `"head"`: the model is an [`EmbeddingHead`][ctmeta.models.EmbeddingHead] and only its linear head
  $W$ `(ways, d)` adapts, on the embedded support set (ANIL with `Unrolled`,
  COMLN with [`LinearFlow`][]); the embedding network is meta-learned
  through the features.

What a rule allows (a learned $T$, a head, Reptile's direction) is read off
its capability flags (see `ctmeta.methods`), not its class.

Everything random is a function of the state's key and the iteration:
use [`MetaLearner.iteration_key`][] (`fold_in(key, iteration)`) to sample a
meta-batch, so that a run resumed from a checkpoint draws what an
uninterrupted run would have drawn.

Several devices or hosts: give the learner a mesh with a task axis
(`MetaLearner(..., mesh=ctmeta.sharding.task_mesh())`); the tasks of each
meta-batch are then split over the devices and the meta-parameters kept
replicated (see `ctmeta.sharding`). The results equal one device's up to the
order of the final sum over tasks.

The state ([`MetaState`][], `ctmeta.state`) is saved and loaded without
pickle by [`save_state`][] and [`load_state`][] (`ctmeta.checkpoint`).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ._errors import InputError, NumericalError, check_positive
from ._learner_checks import (check_arguments, check_batch, describe_solve_failures, nonfinite_error, solve_advice,
                              task_axis_hint)
from .adaptation import gradient_flow, loss_along_flow
from .checkpoint import load_state, save_state
from .evaluation import Evaluation, gd_scores
from .flows import AbstractFlow, check_flow
from .losses import METRICS, apply_loss, mse, resolve_metric
from .methods import Adjoint, reptile_direction
from .models import apply_to_set
from .ode import SolveStatus
from .sharding import TASK_AXIS, check_mesh, constrain_replicated, map_over_tasks, place_replicated, place_tasks
from .state import MetaParams, MetaState, params_of


PyTree = Any

__all__ = ["MetaLearner", "SCALAR_METRICS", "TASK_METRICS"]

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


class MetaLearner:
    r"""Meta-learn an initialisation (and optionally the horizon `T`).

    **Arguments:**

    - `model`: an equinox module, the initial meta-parameters. Its
      floating-point arrays are learned; everything else is kept as is.
    - `method`: `Adjoint()`, `Unrolled()`, `FirstOrder()`, `Implicit()`,
      `Reptile()` (from `ctmeta.methods`), or [`LinearFlow`][] (head only).
    - `optimizer`: an optax `GradientTransformation` for the outer loop.
    - `loss`: `loss(pred, y)` or `loss(pred, y, mask)`, the per-task loss
      (e.g. [`mse`][], [`cross_entropy`][]); inner loss on the support set,
      outer loss on the query set.
    - `T`: the horizon (for discrete methods, $h = T / K$, $K$ = `steps`, is
      the inner learning rate), or its initial value when `learn_T=True`.
    - `learn_T`: learn `log_T` with the other meta-parameters (COMLN's
      parametrisation $T = \exp(\log T)$). Only for methods that
      differentiate $T$ (`"T" in method.differentiates`): [`Adjoint`][],
      [`Unrolled`][], [`LinearFlow`][]. `"per-task"` (with
      `adapt="head"`; COMLN's future work) also learns `T_weights`, so that
      each task adapts for its own horizon
      $T = \exp(\log T + w \cdot \frac{1}{K}\sum_m \phi_m)$ read off its
      embedded support set $\phi$, $w$ = `T_weights` (zero at first: every
      task at $T$). Evaluation adapts with the shared $\exp(\log T)$.
    - `metric`: what [`evaluate`][MetaLearner.evaluate] scores on the query
      set: `metric(pred, y, mask=None) -> scalar` per task, or a name:
      `"nrmse"` ([`nrmse_metric`][]), `"accuracy"` ([`accuracy`][]) or
      `"loss"` (the learner's `loss`). Default: `"nrmse"` after [`mse`][],
      `"accuracy"` after [`cross_entropy`][]; after any other loss it is
      inferred from the query targets at each `evaluate` (integer labels:
      accuracy, floating-point targets: nRMSE), and the constructor says so
      with a `UserWarning`. `learner.metric_name` tells which.
    - `apply`: `apply(model, x_set) -> pred_set` (default `apply_to_set`,
      which needs a callable model: for a dict or another pytree of arrays,
      pass your own `apply(params, x_set)`).
    - `adapt`: `"all"` (the whole model adapts) or `"head"` (the model is an
      [`EmbeddingHead`][ctmeta.models.EmbeddingHead]; only its head adapts).
    - `on_nonfinite`: `"raise"` (default): a non-finite meta-gradient leaves
      the state unchanged and raises `NumericalError` naming the iteration.
      `"skip-task"`: tasks whose loss or meta-gradient is not finite are left
      out of the average (the update is skipped when all are); the number
      skipped is reported in the metrics as `skipped`.
    - `task_map`: how the tasks of a meta-batch are mapped (on each device):
      `"vmap"` (default: one batched computation) or `"map"` (`lax.map`, one
      task after the other). Batching pays for small models; for a Conv-4
      whose every task already fills a CPU core it buys nothing, and an
      adaptive solve under `vmap` takes, for every task, the step count of
      the slowest one: on Omniglot 5-way 1-shot A-MAML, `"map"` ran a
      meta-gradient of 4 tasks 1.45x faster (docs/bench.md). The two give the
      same numbers up to float rounding.
    - `flow`: the inner flow (`ctmeta.flows`; default `None`, the gradient
      flow): e.g. `Preconditioned.like(model)` (for `adapt="head"`,
      `Preconditioned.like(model.head)`) or `HeavyBall.with_gamma(1.0)`.
      Its arrays are meta-parameters (`MetaParams.flow`), learned by the
      optimiser beside the initialisation, saved in checkpoints; the
      method must take the flow (`method.takes_flow`) and, to learn it,
      differentiate it (`"flow" in method.differentiates`: [`Adjoint`][],
      [`Unrolled`][]). [`evaluate`][MetaLearner.evaluate] adapts by the
      flow's Euler steps.
    - `learn_flow`: learn the flow's arrays (default True); False keeps
      them fixed (needed with [`FirstOrder`][], which gives them no gradient).
    - `mesh`: a `jax.sharding.Mesh` with a `"tasks"` axis
      (`ctmeta.sharding.task_mesh()`), or `None` (default: one device). With
      a mesh, `meta_step`, `meta_gradient` and `evaluate` split the tasks of
      a batch over the mesh's devices (a `shard_map` of the per-task work),
      keep the meta-parameters and the optimiser's state replicated, and
      return replicated results, readable on every process of a
      multi-process run. The meta-batch must be a multiple of the number of
      devices. The mesh can be set later (`learner.mesh = ...`); that starts
      fresh compilations.
    """

    def __init__(
        self,
        model: PyTree,
        method,
        optimizer: optax.GradientTransformation,
        loss: Callable = mse,
        *,
        T: float = 1.0,
        learn_T: bool | Literal["per-task"] = False,
        metric: Callable | None = None,
        apply: Callable = apply_to_set,
        adapt: Literal["all", "head"] = "all",
        on_nonfinite: Literal["raise", "skip-task"] = "raise",
        task_map: Literal["vmap", "map"] = "vmap",
        flow: AbstractFlow | None = None,
        learn_flow: bool = True,
        mesh: Mesh | None = None,
    ):
        check_arguments(model, method, optimizer, loss, learn_T=learn_T, apply=apply, adapt=adapt,
                        on_nonfinite=on_nonfinite, task_map=task_map)
        params, static = eqx.partition(model, eqx.is_inexact_array)
        if not jax.tree.leaves(params):
            raise InputError("MetaLearner: the model has no floating-point arrays to learn.")
        self.method = method
        self.optimizer = optimizer
        self.loss = loss
        self.T = check_positive("T", T)
        self.learn_T = bool(learn_T)
        self.per_task_T = learn_T == "per-task"
        self.metric, self.metric_name = resolve_metric(metric, loss)
        self.apply = apply
        self.adapt = adapt
        self.on_nonfinite = on_nonfinite
        self.task_map = task_map
        self._init_params = params
        self._static = static
        self._dtype = jnp.result_type(*jax.tree.leaves(params))
        flow = method.check_flow(check_flow(flow, "MetaLearner"))
        if not isinstance(learn_flow, bool):
            raise InputError(f"MetaLearner: learn_flow must be True or False; got {learn_flow!r}")
        # The flow's arrays in the parameters' dtype; learned ones live in MetaParams.flow.
        flow = flow.astype(self._dtype)
        flow_arrays, self._flow_static = eqx.partition(flow, eqx.is_inexact_array)
        self.learn_flow = learn_flow and bool(jax.tree.leaves(flow_arrays))
        if self.learn_flow and "flow" not in method.differentiates:
            raise InputError(
                f"MetaLearner: {type(method).__name__} gives the flow's parameters (flow={type(flow).__name__}) no "
                "gradient: use Adjoint or Unrolled to learn them, or learn_flow=False to keep them fixed.")
        self._init_flow = flow_arrays
        self.flow = flow
        #: How many times `meta_step`'s function was traced (compiled); a run
        #: with fixed shapes traces it once.
        self.num_traces = 0
        self.mesh = mesh

    def metric_for(self, batch) -> tuple[Callable, str]:
        """The metric `evaluate` scores `batch` with, and its name: the one
        given (or implied by the loss), else inferred from the query
        targets (integer labels: accuracy; floating-point: nRMSE)."""
        if self.metric is not None:
            return self.metric, self.metric_name
        qy = tuple(batch)[3]
        name = "accuracy" if jnp.issubdtype(jnp.result_type(qy), jnp.integer) else "nrmse"
        return METRICS[name], name

    @property
    def mesh(self) -> Mesh | None:
        """The device mesh the tasks of a batch are split over (`None`: one device)."""
        return self._mesh

    @mesh.setter
    def mesh(self, mesh: Mesh | None) -> None:
        if mesh is not None:
            check_mesh(mesh)
        self._mesh = mesh
        self._jitted = {}  # the compiled functions depend on the mesh: start afresh

    def _compiled(self, fn: Callable) -> Callable:
        """`eqx.filter_jit(fn)` for a method `fn` of this learner, made once per mesh."""
        name = fn.__name__
        if name not in self._jitted:
            self._jitted[name] = eqx.filter_jit(fn)
        return self._jitted[name]

    def _placed(self, tree, batch=None):
        """`tree` replicated and `batch` split over the mesh (unchanged without one)."""
        if self._mesh is None:
            return tree, batch
        tree = place_replicated(tree, self._mesh)
        return tree, (None if batch is None else place_tasks(batch, self._mesh))

    # -- state ---------------------------------------------------------------

    def init(self, key: jax.Array, model: PyTree | None = None) -> MetaState:
        """A fresh state: the model's arrays (or `model`'s), the optimiser's
        initial state, the run's base `key` and iteration 0."""
        if model is None:
            params = self._init_params
        else:
            params, static = eqx.partition(model, eqx.is_inexact_array)
            if jax.tree.structure(static) != jax.tree.structure(self._static):
                raise InputError("MetaLearner.init: model has a different structure from the learner's.")
        log_T = jnp.log(jnp.asarray(self.T, self._dtype)) if self.learn_T else None
        T_weights = None
        if self.per_task_T:
            T_weights = jnp.zeros(eqx.combine(params, self._static).head.shape[1], self._dtype)
        flow = self._init_flow if self.learn_flow else None
        mp = MetaParams(model=params, log_T=log_T, T_weights=T_weights, flow=flow)
        key = jnp.asarray(key)
        if not (key.dtype == jnp.uint32 and key.shape == (2,)):
            raise InputError("MetaLearner.init: key must be a raw jax.random.PRNGKey(seed) (uint32[2]).")
        return MetaState(
            params=mp,
            opt_state=self.optimizer.init(mp),
            key=key,
            iteration=jnp.asarray(0, jnp.int32),
        )

    def model(self, state_or_params: MetaState | MetaParams) -> PyTree:
        """The full model (learned arrays + the static rest) of a state."""
        params = params_of(state_or_params)
        return eqx.combine(params.model, self._static)

    def horizon(self, state_or_params: MetaState | MetaParams) -> jax.Array:
        """The horizon `T` of a state (`exp(log_T)` when learned)."""
        params = params_of(state_or_params)
        return self._horizon(params)

    def inner_flow(self, state_or_params: MetaState | MetaParams) -> AbstractFlow:
        """The inner flow of a state (with its learned arrays when they are learned)."""
        return self._flow(params_of(state_or_params))

    def _flow(self, params: MetaParams) -> AbstractFlow:
        if params.flow is not None:
            return eqx.combine(params.flow, self._flow_static)
        return self.flow

    def _horizon(self, params: MetaParams):
        if params.log_T is not None:
            return jnp.exp(params.log_T)
        return jnp.asarray(self.T, self._dtype)

    @staticmethod
    def iteration_key(state: MetaState, iteration: int | None = None) -> jax.Array:
        """The key of meta-iteration `iteration` (default: the state's next
        one): `fold_in(state.key, iteration)`, independent of how many
        iterations ran in this process."""
        it = int(state.iteration) if iteration is None else int(iteration)
        # From the host copy of the key: a key local to this process, whatever
        # devices (or processes) the state is replicated over.
        return jax.random.fold_in(np.asarray(state.key), it)

    # -- one task ------------------------------------------------------------

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

    # -- the meta-step ---------------------------------------------------------

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

    def task_objective(self, state_or_params: MetaState | MetaParams, task) -> jax.Array:
        """The query loss of ONE task (no task axis) after adaptation on its
        support set; `jax.grad` of it is that task's meta-gradient."""
        params = params_of(state_or_params)
        return self._task_objective(params, tuple(task))[0]

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

    # -- evaluation ------------------------------------------------------------

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
        ([`linear_flow`][], Dopri5) to the learned `T` (each task's own
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

        support, query = jax.jit(jax.vmap(one))(tuple(batch))
        return np.asarray(support), np.asarray(query)

    # -- persistence -----------------------------------------------------------

    def save(self, path, state: MetaState, metadata: dict | None = None) -> None:
        """[`save_state`][] with this learner's state."""
        save_state(path, state, metadata)

    def load(self, path, *, key: jax.Array | None = None) -> tuple[MetaState, dict]:
        """[`load_state`][] into a template from `self.init` (structure only)."""
        like = self.init(jax.random.PRNGKey(0) if key is None else key)
        return load_state(path, like)
