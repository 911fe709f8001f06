r"""Meta-learners: a model, a meta-gradient rule and an outer optimiser, jitted.

A [`MetaLearner`][] turns

- a **model** (an equinox module: its floating-point arrays are the learned
  initialisation $\theta$),
- a **method** (a meta-gradient rule from `ctmeta.methods`: [`Adjoint`][]
  for A-MAML, [`Unrolled`][], [`FirstOrder`][], [`Implicit`][], [`Reptile`][];
  or [`LinearFlow`][] for COMLN's head),
- an **optax optimiser** for the outer loop,
- a per-task **loss** `loss(pred, y)` (the same for the inner loop on the
  support set and the outer loss on the query set),
- and the **horizon** `T` (fixed, or learned as $T = e^{\log T}$, COMLN's
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
- `"head"`: the model is an [`EmbeddingHead`][] and only its linear head
  `W (ways, d)` adapts, on the embedded support set (ANIL with `Unrolled`,
  COMLN with [`LinearFlow`][]); the embedding network is meta-learned
  through the features.

Everything random is a function of the state's key and the iteration:
use [`MetaLearner.iteration_key`][] (`fold_in(key, iteration)`) to sample a
meta-batch, so that a run resumed from a checkpoint draws what an
uninterrupted run would have drawn.

Several devices or hosts: give the learner a mesh with a task axis
(`MetaLearner(..., mesh=ctmeta.sharding.task_mesh())`); the tasks of each
meta-batch are then split over the devices and the meta-parameters kept
replicated (see `ctmeta.sharding`). The results equal one device's up to the
order of the final sum over tasks.

Checkpoints are written without pickle: [`save_state`][] stores the state's
arrays with `eqx.tree_serialise_leaves` plus a JSON sidecar, atomically, and
[`load_state`][] reads them back into a like-structured template (for
instance `learner.init(key)`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import tempfile
from typing import Any, Callable, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from . import __version__
from ._errors import CheckpointError, InputError, NumericalError, check_positive
from .adaptation import gradient_flow
from .methods import AbstractMethod, FirstOrder, Implicit, Reptile, reptile_direction
from .models import SetModule, apply_to_set
from .ode import SolveStatus
from .sharding import TASK_AXIS, check_mesh, constrain_replicated, map_over_tasks, place_replicated, place_tasks

PyTree = Any

__all__ = [
    "EmbeddingHead",
    "Evaluation",
    "InputScale",
    "LinearFlow",
    "METRICS",
    "MetaLearner",
    "MetaParams",
    "MetaState",
    "accuracy",
    "cross_entropy",
    "load_state",
    "mse",
    "nrmse_metric",
    "SCALAR_METRICS",
    "TASK_METRICS",
    "save_state",
    "summarize",
]


# --------------------------------------------------------------------------- #
# Losses and metrics (per task: pred (K, O), y (K, O) or labels (K,))
# --------------------------------------------------------------------------- #


def _masked_mean(values, mask):
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _check_regression_shapes(name: str, pred, y) -> None:
    if jnp.shape(pred) != jnp.shape(y):
        raise InputError(
            f"{name}: the predictions have shape {jnp.shape(pred)} but the targets have shape {jnp.shape(y)} "
            "(one task: (K, outputs) each); give targets of the model's output shape, or a model with as many "
            "outputs as the targets have columns"
        )


def _check_class_shapes(name: str, logits, labels) -> None:
    lshape, yshape = jnp.shape(logits), jnp.shape(labels)
    if len(lshape) < 1 or yshape != lshape[:-1]:
        extra = ""
        if yshape == lshape:
            extra = " (these look like one-hot labels: pass the integer labels, jnp.argmax(onehot, axis=-1))"
        raise InputError(
            f"{name}: the logits have shape {lshape} but the labels have shape {yshape}; one task takes logits "
            f"(K, ways) and integer labels (K,){extra}"
        )


def mse(pred: jax.Array, y: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean squared error of one task, `pred (K, O)`, `y (K, O)` (the same
    shape: no broadcasting); `mask (K,)` optional."""
    _check_regression_shapes("mse", pred, y)
    err = jnp.mean(jnp.square(pred - y), axis=-1)
    if mask is not None:
        err = jnp.where(mask, err, 0.0)
    return _masked_mean(err, mask)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean softmax cross-entropy of one task, `logits (K, ways)`, integer `labels (K,)`."""
    _check_class_shapes("cross_entropy", logits, labels)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
    return _masked_mean(ce, mask)


def nrmse_metric(pred: jax.Array, y: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Normalised RMSE of one task (`ctmeta.tasks.metrics.nrmse`), lower is better."""
    from .tasks.metrics import nrmse

    return nrmse(pred, y, mask)


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Fraction of correctly classified examples of one task, higher is better."""
    _check_class_shapes("accuracy", logits, labels)
    hit = (jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype)
    return _masked_mean(hit, mask)


#: The scalar entries of `MetaLearner.meta_step`'s metrics (shape `()`) ...
SCALAR_METRICS = ("meta_loss", "grad_norm", "T", "finite", "skipped")
#: ... and its per-task entries (shape `(tasks,)`).
TASK_METRICS = ("task_finite", "task_status")
#: The metrics `MetaLearner(metric=...)` knows by name ("loss": the learner's own loss).
METRICS = {"nrmse": nrmse_metric, "accuracy": accuracy}
#: The metric that goes with each of ctmeta's losses.
_METRIC_OF_LOSS = {mse: "nrmse", cross_entropy: "accuracy"}


def summarize(values) -> tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval over tasks."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    mean = float(np.mean(values))
    half = float(1.96 * np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return mean, half


# --------------------------------------------------------------------------- #
# Models and methods that only the meta-learner knows about
# --------------------------------------------------------------------------- #


class EmbeddingHead(SetModule):
    """An embedding network followed by a bias-free linear head `W (ways, d)`.

    Applied to a set `x (K, ...)`: `logits = apply_to_set(embedding, x) @ W.T`.
    With `adapt="head"` only `head` adapts in the inner loop (ANIL, COMLN);
    with `adapt="all"` the whole module does (MAML on this network).
    """

    embedding: Any
    head: jax.Array

    def __call__(self, x):
        return self.features(x) @ self.head.T

    def features(self, x):
        feats = apply_to_set(self.embedding, x)
        return feats.reshape(feats.shape[0], -1)


class InputScale(eqx.Module):
    """`model(x * scale)`: a fixed (not learned) rescaling of one example's input.

    Keeps the inputs of a per-example model of order one (Alpine's
    `[-10, 10]^2` becomes `[-1, 1]^2`), which keeps the Hessian of the task
    loss, hence the stiffness of the gradient flow, moderate.
    """

    model: Any
    scale: float = eqx.field(static=True)

    def __call__(self, x):
        return self.model(x * self.scale)


class LinearFlow(eqx.Module):
    """COMLN: adapt a linear softmax head by `ctmeta.linear_flow.linear_flow`.

    Exact meta-gradients in the head's initialisation, the embedding and `T`
    by forward sensitivity, in memory independent of `T`. Use with an
    [`EmbeddingHead`][], `adapt="head"` and the cross-entropy loss (the
    flow's inner loss is cross-entropy by construction).

    - `lam`: proximal strength around `W0`.
    - `solver`: `"dopri5"` (adaptive) or `"euler"` (then `steps` fixed steps,
      which is ANIL with learning rate `T/steps`).
    """

    lam: float = eqx.field(default=0.0, static=True)
    solver: str = eqx.field(default="dopri5", static=True)
    steps: int | None = eqx.field(default=None, static=True)
    rtol: float = eqx.field(default=1e-6, static=True)
    atol: float = eqx.field(default=1e-8, static=True)
    max_steps: int = eqx.field(default=4096, static=True)

    def __check_init__(self):
        if self.solver not in ("dopri5", "euler"):
            raise InputError(f"LinearFlow(solver={self.solver!r}): use 'dopri5' or 'euler'.")
        if self.solver == "euler" and (not isinstance(self.steps, int) or self.steps < 1):
            raise InputError("LinearFlow(solver='euler') needs steps, a positive int.")
        if not self.lam >= 0:
            raise InputError(f"LinearFlow(lam={self.lam!r}): the proximal strength must be >= 0.")

    @property
    def inner_steps(self) -> int:
        return self.steps if self.steps is not None else 100

    def adapt_head(self, W0, features, labels_onehot, T, throw: bool = True):
        """`W(T)`; with `throw=False`, `(W(T), status)` (see `linear_flow`)."""
        from .linear_flow import linear_flow

        return linear_flow(
            W0,
            features,
            labels_onehot,
            T,
            lam=self.lam,
            solver=self.solver,
            steps=self.steps if self.solver == "euler" else None,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
            throw=throw,
        )


# --------------------------------------------------------------------------- #
# State
# --------------------------------------------------------------------------- #


class MetaParams(eqx.Module):
    """The meta-parameters: the model's floating-point arrays (its other
    leaves are `None`; the learner keeps them), `log_T` when `T` is learned,
    and `T_weights (d,)` when each task gets its own horizon
    `T = exp(log_T + T_weights . mean(support features))`."""

    model: PyTree
    log_T: jax.Array | None = None
    T_weights: jax.Array | None = None


class MetaState(eqx.Module):
    """Everything a run needs to continue: meta-parameters, the optimiser's
    state, the run's base key and the number of meta-iterations done."""

    params: MetaParams
    opt_state: PyTree
    key: jax.Array
    iteration: jax.Array


class Evaluation(NamedTuple):
    """Query error after each number of adaptation steps.

    `steps (S,)`; `per_task (n_tasks, S)`; `mean (S,)` and `ci95 (S,)` (the
    half-width of the normal 95% interval over tasks); `lr` the GD step;
    `metric` the name of the metric (`"nrmse"`, `"accuracy"`, `"loss"` or
    the function's name).
    """

    steps: np.ndarray
    per_task: np.ndarray
    mean: np.ndarray
    ci95: np.ndarray
    lr: float
    metric: str = ""

    def at(self, step: int) -> tuple[float, float]:
        """`(mean, ci95)` after `step` adaptation steps."""
        where = np.flatnonzero(self.steps == step)
        if where.size == 0:
            raise InputError(f"step {step} was not evaluated; evaluated steps: {self.steps.tolist()}")
        i = int(where[0])
        return float(self.mean[i]), float(self.ci95[i])


_SOLVE_ADVICE = ("Raise the method's max_steps, loosen its rtol/atol or lower the horizon T "
                 "(a stiff or diverging inner flow)")
_UNSTABLE_ADVICE = ("Raise the method's steps (more stored states, a smaller h = T/steps), lower the horizon T, "
                    "use scheme='rk4' if the sweep is Heun's, or the adaptive rule (Adjoint() without steps, "
                    "whose step follows the curvature) (an unstable backward adjoint sweep)")


_DENSE_ADVICE = ("Raise the method's dense_steps (Adjoint(dense_steps=...): the forward's accepted steps it can "
                 "hold), loosen its rtol/atol or lower the horizon T (a forward that needs more steps than its "
                 "dense output holds)")


def _solve_advice(status) -> str:
    """What to change for the failed inner solves among `status`, without the final full stop."""
    codes = set(np.asarray(status).reshape(-1).tolist()) - {int(SolveStatus.SUCCESS)}
    special = {int(SolveStatus.UNSTABLE_ADJOINT), int(SolveStatus.DENSE_OVERFLOW)}
    parts = ([_SOLVE_ADVICE] if codes - special else []) + (
        [_UNSTABLE_ADVICE] if int(SolveStatus.UNSTABLE_ADJOINT) in codes else []) + (
        [_DENSE_ADVICE] if int(SolveStatus.DENSE_OVERFLOW) in codes else [])
    return "; ".join(parts) if parts else _SOLVE_ADVICE


def _tree_where(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack(leaves))



_TASK_AXIS = ("takes a batch with a leading task axis: support_x (tasks, K, ...), support_y (tasks, K, ...), "
              "query_x (tasks, Q, ...), query_y (tasks, Q, ...); for one task add the axis with "
              "jax.tree.map(lambda a: a[None], task)")


def _check_batch(batch, where: str) -> None:
    """Refuse, with a message that says so, a batch without its leading task axis."""
    names = ("support_x", "support_y", "query_x", "query_y", "query_mask")
    try:
        arrays = tuple(batch)
    except TypeError:
        arrays = ()
    if len(arrays) < 4:
        raise InputError(f"{where} {_TASK_AXIS}; got {type(batch).__name__} with {len(arrays)} arrays")
    shapes = [tuple(jnp.shape(a)) for a in arrays[:5]]
    for name, shape in zip(names, shapes):
        if len(shape) < 2:
            raise InputError(f"{where} {_TASK_AXIS}; got {name} of shape {shape}")
    if len({shape[0] for shape in shapes}) > 1:
        got = ", ".join(f"{n} {sh}" for n, sh in zip(names, shapes))
        raise InputError(f"{where}: the arrays of the batch disagree on the number of tasks (axis 0): {got}; "
                         f"{where} {_TASK_AXIS}")
    for x, y in ((0, 1), (2, 3)) + (((2, 4),) if len(shapes) > 4 else ()):
        if shapes[x][1] != shapes[y][1]:
            raise InputError(
                f"{where}: {names[x]} {shapes[x]} and {names[y]} {shapes[y]} disagree on the number of "
                f"examples (axis 1); {where} {_TASK_AXIS}"
            )


class _task_axis_hint:
    """Say, in an `InputError` raised while tracing the per-task work (a
    model refusing its input, a loss refusing its targets), what one task's
    arrays were: the leading axis of the batch is the task axis."""

    def __init__(self, batch, where: str):
        self.batch, self.where = batch, where

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is None or not issubclass(kind, InputError) or getattr(err, "_ctmeta_hinted", False):
            return False
        sx = jnp.shape(tuple(self.batch)[0])
        new = InputError(f"{err} (in {self.where}, which maps over the leading task axis of the batch: "
                         f"support_x {sx} is {sx[0]} tasks of inputs {sx[1:]})")
        new._ctmeta_hinted = True
        raise new from None


# --------------------------------------------------------------------------- #
# The meta-learner
# --------------------------------------------------------------------------- #


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
    - `T`: the horizon (for discrete methods, `h = T / steps` is the inner
      learning rate), or its initial value when `learn_T=True`.
    - `learn_T`: learn `log_T` with the other meta-parameters (COMLN's
      parametrisation `T = exp(log_T)`). Only for methods that differentiate
      `T`: `Adjoint`, `Unrolled`, `LinearFlow`. `"per-task"` (with
      `adapt="head"`; COMLN's future work) also learns `T_weights`, so that
      each task adapts for its own horizon
      `T = exp(log_T + T_weights . mean_m phi_m)` read off its embedded
      support set; `T_weights` starts at zero (every task at `T`).
      Evaluation adapts with the shared `exp(log_T)`.
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
      [`EmbeddingHead`][]; only its head adapts).
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
        mesh: Mesh | None = None,
    ):
        if not isinstance(method, (AbstractMethod, LinearFlow)):
            raise InputError(
                "MetaLearner: method must be Adjoint(), Unrolled(), FirstOrder(), Implicit(), "
                f"Reptile() or LinearFlow(); got {method!r}"
            )
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise InputError(f"MetaLearner: optimizer must be an optax GradientTransformation; got {optimizer!r}")
        if not callable(loss):
            raise InputError(f"MetaLearner: loss must be callable loss(pred, y); got {loss!r}")
        if adapt not in ("all", "head"):
            raise InputError(f"MetaLearner: adapt must be 'all' or 'head'; got {adapt!r}")
        if on_nonfinite not in ("raise", "skip-task"):
            raise InputError(f"MetaLearner: on_nonfinite must be 'raise' or 'skip-task'; got {on_nonfinite!r}")
        if task_map not in ("vmap", "map"):
            raise InputError(f"MetaLearner: task_map must be 'vmap' or 'map'; got {task_map!r}")
        if adapt == "head" and not isinstance(model, EmbeddingHead):
            raise InputError("MetaLearner(adapt='head') needs an EmbeddingHead(embedding, head) model.")
        if isinstance(method, LinearFlow) and adapt != "head":
            raise InputError("LinearFlow (COMLN) adapts a linear head: use adapt='head' with an EmbeddingHead.")
        if isinstance(method, Reptile) and adapt == "head":
            raise InputError("Reptile with adapt='head' is not supported; use adapt='all'.")
        if learn_T not in (False, True, "per-task"):
            raise InputError(f"MetaLearner: learn_T must be False, True or 'per-task'; got {learn_T!r}")
        if learn_T == "per-task" and adapt != "head":
            raise InputError("MetaLearner(learn_T='per-task') reads each task's horizon off its support "
                             "features: use adapt='head' with an EmbeddingHead.")
        if learn_T and isinstance(method, (FirstOrder, Implicit, Reptile)):
            raise InputError(
                f"learn_T=True needs a method that differentiates T (Adjoint, Unrolled, LinearFlow); "
                f"{type(method).__name__} does not."
            )
        if not callable(apply):
            raise InputError(f"MetaLearner: apply must be callable apply(model, x_set) -> predictions; got {apply!r}")
        if apply is apply_to_set and adapt == "all" and not callable(model):
            raise InputError(
                f"MetaLearner: the model is a {type(model).__name__}, not callable, so the default "
                "apply=ctmeta.models.apply_to_set cannot run it; pass apply=lambda params, x_set: ... "
                "(the predictions of a set of inputs x_set (K, ...) under params)"
            )
        params, static = eqx.partition(model, eqx.is_inexact_array)
        if not jax.tree.leaves(params):
            raise InputError("MetaLearner: the model has no floating-point arrays to learn.")
        self.method = method
        self.optimizer = optimizer
        self.loss = loss
        self.T = check_positive("T", T)
        self.learn_T = bool(learn_T)
        self.per_task_T = learn_T == "per-task"
        self.metric, self.metric_name = self._resolve_metric(metric, loss)
        self.apply = apply
        self.adapt = adapt
        self.on_nonfinite = on_nonfinite
        self.task_map = task_map
        self._init_params = params
        self._static = static
        self._dtype = jnp.result_type(*jax.tree.leaves(params))
        #: How many times `meta_step`'s function was traced (compiled); a run
        #: with fixed shapes traces it once.
        self.num_traces = 0
        self.mesh = mesh  # also compiles (lazily) meta_step, meta_gradient, evaluate

    @staticmethod
    def _resolve_metric(metric, loss) -> tuple[Callable | None, str]:
        """`(metric function, name)`; `(None, "inferred")` when `evaluate`
        infers it from the targets."""
        if metric is None:
            name = _METRIC_OF_LOSS.get(loss)
            if name is not None:
                return METRICS[name], name
            import warnings

            loss_name = getattr(loss, "__name__", type(loss).__name__)
            warnings.warn(
                f"MetaLearner: no metric given for the loss {loss_name}; evaluate() will score accuracy when "
                "the query targets are integer labels and nRMSE when they are floating-point: pass "
                "metric='accuracy', 'nrmse', 'loss' or metric(pred, y, mask=None) to choose",
                UserWarning,
                stacklevel=3,
            )
            return None, "inferred"
        if isinstance(metric, str):
            if metric == "loss":
                return loss, "loss"
            if metric not in METRICS:
                raise InputError(
                    f"MetaLearner: unknown metric {metric!r}; use 'nrmse', 'accuracy', 'loss' or a function "
                    "metric(pred, y, mask=None)"
                )
            return METRICS[metric], metric
        if not callable(metric):
            raise InputError(f"MetaLearner: metric must be a name or a function metric(pred, y, mask=None); "
                             f"got {metric!r}")
        return metric, getattr(metric, "__name__", type(metric).__name__)

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
        # The compiled functions depend on the mesh: start afresh.
        self._step_jit = eqx.filter_jit(self._step)
        self._eval_jit = eqx.filter_jit(self._evaluate_chunk)
        self._grad_jit = eqx.filter_jit(self._meta_gradient)

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
        mp = MetaParams(model=params, log_T=log_T, T_weights=T_weights)
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
        params = state_or_params.params if isinstance(state_or_params, MetaState) else state_or_params
        return eqx.combine(params.model, self._static)

    def horizon(self, state_or_params: MetaState | MetaParams) -> jax.Array:
        """The horizon `T` of a state (`exp(log_T)` when learned)."""
        params = state_or_params.params if isinstance(state_or_params, MetaState) else state_or_params
        return self._horizon(params)

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

    def _call_loss(self, fn, pred, y, mask):
        return fn(pred, y) if mask is None else fn(pred, y, mask)

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

        def flow(loss, u, data, T):
            out = gradient_flow(loss, u, data, T, method=self.method, throw=throw)
            return (out, jnp.asarray(SolveStatus.SUCCESS, jnp.int32)) if throw else out

        if self.adapt == "all":

            def inner_loss(m, data):
                x, y = data
                return self.loss(self.apply(m, x), y)

            adapted, status = flow(inner_loss, model, (sx, sy), T)
            return self.apply(adapted, qx), eqx.filter(adapted, eqx.is_inexact_array), status
        # Head only: the embedding is meta-learned through the features.
        fs = model.features(sx)
        fq = model.features(qx)
        if params.T_weights is not None:  # this task's own horizon
            T = jnp.exp(params.log_T + jnp.dot(params.T_weights, jnp.mean(fs, axis=0)))
        if isinstance(self.method, LinearFlow):
            labels = jax.nn.one_hot(sy, model.head.shape[0], dtype=fs.dtype)
            W = self.method.adapt_head(model.head, fs, labels, T.astype(fs.dtype), throw=throw)
            W, status = (W, jnp.asarray(SolveStatus.SUCCESS, jnp.int32)) if throw else W
        else:

            def head_loss(W, data):
                f, y = data
                return self.loss(f @ W.T, y)

            W, status = flow(head_loss, model.head, (fs, sy), T)
        return fq @ W.T, W, status

    def _task_objective(self, params: MetaParams, task, throw: bool = True):
        """`(query loss, adapted arrays, inner solve status)` of one task."""
        pred, adapted, status = self._adapted_query_pred(params, task, throw)
        mask = task[4] if len(task) > 4 else None
        return self._call_loss(self.loss, pred, task[3], mask), adapted, status

    # -- the meta-step ---------------------------------------------------------

    def _per_task(self, params: MetaParams, batch):
        """Per-task query losses, meta-gradients (Reptile: directions) and inner
        solve statuses, vmapped. The solves do not throw (see
        `_adapted_query_pred`): a failed one is that task's NaN and status."""
        tasks = tuple(batch)
        if isinstance(self.method, Reptile):

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
        params = state_or_params.params if isinstance(state_or_params, MetaState) else state_or_params
        _check_batch(batch, "meta_gradient")
        with _task_axis_hint(batch, "meta_gradient"):
            meta_loss, grads, status = self._grad_jit(*self._placed(params, batch))
        if self.on_nonfinite == "raise" and np.any(np.asarray(status) != SolveStatus.SUCCESS):
            raise NumericalError(f"meta_gradient: {self._solve_failures(status)}. {_solve_advice(status)}.")
        return meta_loss, grads

    def _solve_failures(self, status) -> str:
        """Which tasks' inner solves failed and why, grouped by cause; "" if none did.

        E.g. "the inner solve of task 1 of the meta-batch exhausted its step
        budget (max_steps=64) before reaching the horizon".
        """
        status = np.asarray(status).reshape(-1)
        max_steps = getattr(self.method, "max_steps", None)
        sweep = {"steps": getattr(self.method, "steps", None), "scheme": getattr(self.method, "scheme", None),
                 "dense_steps": getattr(self.method, "dense_steps", None)}
        parts = []
        for code in sorted(set(status.tolist()) - {int(SolveStatus.SUCCESS)}):
            tasks = np.flatnonzero(status == code).tolist()
            parts.append(
                f"the inner solve of task{'s' if len(tasks) > 1 else ''} {', '.join(map(str, tasks))} "
                f"of the meta-batch {SolveStatus(code).describe(max_steps, **sweep)}"
            )
        return "; ".join(parts)

    def task_objective(self, state_or_params: MetaState | MetaParams, task) -> jax.Array:
        """The query loss of ONE task (no task axis) after adaptation on its
        support set; `jax.grad` of it is that task's meta-gradient."""
        params = state_or_params.params if isinstance(state_or_params, MetaState) else state_or_params
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
        _check_batch(batch, "meta_step")
        it = int(state.iteration) + 1
        try:
            with _task_axis_hint(batch, "meta_step"):
                new_state, metrics = self._step_jit(*self._placed(state, batch))
            finite = bool(metrics["finite"]) if check else True
        except (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError) as err:
            msg = str(err).strip().splitlines()
            msg = next((line for line in msg if line.strip()), type(err).__name__)
            what = f"meta-iteration {it}: the inner solve failed: {msg}"
            raise NumericalError(what, iteration=it, what=what) from err
        if check and not finite:
            status = np.asarray(metrics["task_status"])
            task_finite = np.asarray(metrics["task_finite"]).reshape(-1)
            all_tasks = not bool(np.any(task_finite))
            failed_solves = self._solve_failures(status)
            bad = np.flatnonzero(~task_finite & (status.reshape(-1) == SolveStatus.SUCCESS)).tolist()
            where = f"task{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of the meta-batch" if bad else ""
            if self.on_nonfinite == "skip-task":
                what = (f"meta-iteration {it}: every task of the meta-batch gave a non-finite loss or "
                        f"meta-gradient{' (' + failed_solves + ')' if failed_solves else ''}; "
                        "the parameters were left unchanged")
                raise NumericalError(what + ".", iteration=it, what=what, all_tasks=True)
            if failed_solves:
                others = f"; {where} gave a non-finite loss or meta-gradient" if where else ""
                what = f"meta-iteration {it}: {failed_solves}{others}; the parameters were left unchanged"
                advice = f"{_solve_advice(status)}" + ("." if all_tasks else ", or use on_nonfinite='skip-task'.")
                raise NumericalError(f"{what}. {advice}", iteration=it, what=what, all_tasks=all_tasks)
            what = (f"meta-iteration {it}: non-finite meta-gradient or meta-loss "
                    f"(meta-loss {float(metrics['meta_loss']):.4g}{'; ' + where if where else ''}); "
                    "the parameters were left unchanged")
            advice = "Lower the horizon T or the outer learning rate" + (
                "." if all_tasks else ", or use on_nonfinite='skip-task'.")
            raise NumericalError(f"{what}. {advice}", iteration=it, what=what, all_tasks=all_tasks)
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
        tasks = tuple(batch)

        def one(task):
            sx, sy, qx, qy = task[:4]
            mask = task[4] if len(task) > 4 else None
            if self.adapt == "all":
                u, static = eqx.partition(model, eqx.is_inexact_array)

                def support_loss(u):
                    return self.loss(self.apply(eqx.combine(u, static), sx), sy)

                def score(u):
                    return self._call_loss(metric, self.apply(eqx.combine(u, static), qx), qy, mask)

            else:
                fs = jax.lax.stop_gradient(model.features(sx))
                fq = model.features(qx)
                u = model.head

                def support_loss(W):
                    return self.loss(fs @ W.T, sy)

                def score(W):
                    return self._call_loss(metric, fq @ W.T, qy, mask)

            def gd(u, _):
                g = jax.grad(support_loss)(u)
                return jax.tree.map(lambda a, b: a - lr * b, u, g), None

            out = [score(u)]
            for k in segments:
                u, _ = jax.lax.scan(gd, u, None, length=k)
                out.append(score(u))
            return jnp.stack(out)

        return jax.vmap(one)(tasks)

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
        `T / K`), recording the query metric after each number of steps in
        `steps_list`.

        `batch` holds the evaluation tasks (a `Batch`, or a `MaskedBatch`
        whose `query_mask` the metric uses). They are processed `chunk_size`
        tasks at a time (all at once by default); `progress(n)` is called
        with the number of tasks done after each chunk. With `adapt="head"`
        only the head adapts, on fixed features. `metric(pred, y, mask=None)`
        scores instead of the learner's metric. Returns an [`Evaluation`][].
        """
        params = state_or_params.params if isinstance(state_or_params, MetaState) else state_or_params
        _check_batch(batch, "evaluate")
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
            with _task_axis_hint(batch, "evaluate"):
                values = self._eval_jit(params, part, segments, lr_arr, metric)
            results.append(np.asarray(values)[: stop - start])
            if progress is not None:
                progress(stop)
        values = np.concatenate(results, axis=0)  # column 0: step 0; then `positive`
        columns = [0 if s == 0 else 1 + positive.index(s) for s in steps]
        per_task = values[:, columns]
        stats = [summarize(per_task[:, i]) for i in range(per_task.shape[1])]
        return Evaluation(
            steps=np.asarray(steps),
            per_task=per_task,
            mean=np.asarray([m for m, _ in stats]),
            ci95=np.asarray([c for _, c in stats]),
            lr=lr,
            metric=metric_name,
        )

    # -- persistence -----------------------------------------------------------

    def save(self, path, state: MetaState, metadata: dict | None = None) -> None:
        """[`save_state`][] with this learner's state."""
        save_state(path, state, metadata)

    def load(self, path, *, key: jax.Array | None = None) -> tuple[MetaState, dict]:
        """[`load_state`][] into a template from `self.init` (structure only)."""
        like = self.init(jax.random.PRNGKey(0) if key is None else key)
        return load_state(path, like)


# --------------------------------------------------------------------------- #
# Save / load without pickle
# --------------------------------------------------------------------------- #

_FORMAT = "ctmeta-state/1"


def _leaf_specs(tree) -> list[str]:
    """`"float32[32,2]"` for each array leaf, in order."""
    specs = []
    for leaf in jax.tree.leaves(tree):
        arr = np.asarray(leaf)
        specs.append(f"{arr.dtype}[{','.join(str(d) for d in arr.shape)}]")
    return specs


def fsync_dir(directory: pathlib.Path) -> None:
    """fsync a directory, so that a rename into it survives a crash (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """This process's umask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync and rename.

    The file gets the mode a plain `open(path, "w")` would give it
    (`0o666` less the umask), not the temporary file's private `0o600`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        except (AttributeError, OSError):  # pragma: no cover (not POSIX)
            pass
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def sidecar_path(path: str | os.PathLike) -> pathlib.Path:
    """The JSON sidecar of a state file: `ckpt-100.eqx` -> `ckpt-100.json`."""
    return pathlib.Path(path).with_suffix(".json")


def save_state(path: str | os.PathLike, state: MetaState, metadata: dict | None = None) -> None:
    """Save a learner state to `path` (arrays, `eqx.tree_serialise_leaves`)
    and `path.json` (iteration, shapes, checksum, `metadata`), atomically.

    No pickle: loading needs a like-structured template ([`load_state`][]).
    The JSON sidecar is written last, so a complete sidecar means a complete
    state file.
    """
    import io

    path = pathlib.Path(path)
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, state)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    side = {
        "format": _FORMAT,
        "ctmeta_version": __version__,
        "file": path.name,
        "iteration": int(state.iteration),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "leaves": _leaf_specs(state),
        "metadata": metadata or {},
    }
    atomic_write_bytes(sidecar_path(path), (json.dumps(side, indent=2) + "\n").encode())


def read_sidecar(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a saved state, checked for format."""
    side_path = sidecar_path(path)
    try:
        side = json.loads(side_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: its sidecar {side_path} is missing (an interrupted save?)") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: cannot read {side_path}: {err}") from None
    if not isinstance(side, dict) or side.get("format") != _FORMAT:
        raise CheckpointError(f"checkpoint {path}: {side_path} is not a ctmeta state sidecar ({_FORMAT}).")
    return side


def load_state(path: str | os.PathLike, like: MetaState) -> tuple[MetaState, dict]:
    """Load a state saved by [`save_state`][] into the structure of `like`.

    Checks the checksum and that every array has the template's shape and
    dtype; raises `CheckpointError` saying what does not match. Returns the
    state and the sidecar's `metadata`.
    """
    import io

    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a state file saved by save_state")
    side = read_sidecar(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from None
    if hashlib.sha256(data).hexdigest() != side.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated (checksum mismatch).")
    expected = _leaf_specs(like)
    if side.get("leaves") != expected:
        got = side.get("leaves") or []
        detail = f"{len(got)} arrays saved, {len(expected)} expected"
        for i, (a, b) in enumerate(zip(got, expected)):
            if a != b:
                detail = f"array {i} is {a} in the checkpoint but {b} here"
                break
        raise CheckpointError(
            f"checkpoint {path} does not match this model/optimiser ({detail}); "
            "was it written with a different configuration or dtype?"
        )
    try:
        state = eqx.tree_deserialise_leaves(io.BytesIO(data), like)
    except Exception as err:  # malformed payload despite the checksum
        raise CheckpointError(f"checkpoint {path} cannot be deserialised: {err}") from None
    return state, side.get("metadata", {})
