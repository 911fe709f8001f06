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

from ._errors import InputError, check_positive
from ._learner_checks import check_arguments
from ._learner_eval import LearnerEvaluation
from ._learner_step import SCALAR_METRICS, TASK_METRICS, MetaSteps
from ._learner_tasks import TaskAdaptation
from .checkpoint import load_state, save_state
from .flows import AbstractFlow, check_flow
from .losses import mse, resolve_metric
from .models import apply_to_set
from .sharding import check_mesh, place_replicated, place_tasks
from .state import MetaParams, MetaState, params_of


PyTree = Any

__all__ = ["MetaLearner", "SCALAR_METRICS", "TASK_METRICS"]


class MetaLearner(TaskAdaptation, MetaSteps, LearnerEvaluation):
    r"""Meta-learn an initialisation (and optionally the horizon `T`).

    **Arguments:**

    - `model`: an equinox module, the initial meta-parameters. Its
      floating-point arrays are learned; everything else is kept as is.
    - `method`: `Adjoint()`, `Unrolled(steps=K)`, `FirstOrder()`, `Implicit()`,
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
        flow.check_like(model if adapt == "all" else model.head, "MetaLearner")
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

    # -- persistence -----------------------------------------------------------

    def save(self, path, state: MetaState, metadata: dict | None = None) -> None:
        """[`save_state`][] with this learner's state."""
        save_state(path, state, metadata)

    def load(self, path, *, key: jax.Array | None = None) -> tuple[MetaState, dict]:
        """[`load_state`][] into a template from `self.init` (structure only)."""
        like = self.init(jax.random.PRNGKey(0) if key is None else key)
        return load_state(path, like)
