r"""Meta-test evaluation: adapt by plain gradient descent, score the query set.

From an initialisation, each task's differentiable parameters $u$ (the whole
model, or a head $W$ on fixed support features) take $K$ steps of
$u \leftarrow u - \eta\, \nabla_u L_\text{support}(u)$, and the query
metric is recorded after each number of steps asked for. This is the
protocol of A-MAML's and COMLN's tables, whatever rule meta-trained the
initialisation. [`MetaLearner.evaluate`][] runs it over chunks of tasks and
devices and returns an [`Evaluation`][].
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._errors import InputError
from .losses import apply_loss, summarize

__all__ = ["Evaluation", "gd_scores"]


class Evaluation(NamedTuple):
    """Query error after each number of adaptation steps.

    - `steps`: `(S,)`, the numbers of steps.
    - `per_task`: `(n_tasks, S)`.
    - `mean`, `ci95`: `(S,)` each, the mean and the half-width of the
      normal 95% interval over tasks ([`summarize`][]).
    - `lr`: the gradient-descent step.
    - `metric`: the name of the metric (`"nrmse"`, `"accuracy"`, `"loss"` or
      the function's name).
    """

    steps: np.ndarray
    per_task: np.ndarray
    mean: np.ndarray
    ci95: np.ndarray
    lr: float
    metric: str = ""

    @classmethod
    def from_per_task(cls, steps, per_task, lr: float, metric: str) -> "Evaluation":
        """The evaluation of the per-task values `per_task (n_tasks, S)` at `steps (S,)`."""
        stats = [summarize(per_task[:, i]) for i in range(per_task.shape[1])]
        return cls(
            steps=np.asarray(steps),
            per_task=per_task,
            mean=np.asarray([m for m, _ in stats]),
            ci95=np.asarray([c for _, c in stats]),
            lr=lr,
            metric=metric,
        )

    def at(self, step: int) -> tuple[float, float]:
        """`(mean, ci95)` after `step` adaptation steps."""
        where = np.flatnonzero(self.steps == step)
        if where.size == 0:
            raise InputError(f"step {step} was not evaluated; evaluated steps: {self.steps.tolist()}")
        i = int(where[0])
        return float(self.mean[i]), float(self.ci95[i])


def gd_scores(model, tasks, segments: tuple[int, ...], lr, metric: Callable, *, loss: Callable, apply: Callable,
              adapt: str, flow=None) -> jax.Array:
    r"""Per-task query metric after $\sum_{j<i}$ `segments[j]` gradient steps, for each $i$ (incl. 0).

    **Arguments:**

    - `model`: the initialisation (an [`EmbeddingHead`][ctmeta.models.EmbeddingHead] for `adapt="head"`).
    - `tasks`: `(support_x, support_y, query_x, query_y[, query_mask])`, each
      with a leading task axis.
    - `segments`: the numbers of steps between two recorded scores.
    - `lr`: the gradient-descent step $\eta$.
    - `metric`: `metric(pred, y[, mask])`, the query score.
    - `loss`: `loss(pred, y)`, the support loss descended.
    - `apply`: `apply(model, x_set)` (for `adapt="all"`).
    - `adapt`: `"all"` (the whole model) or `"head"` (the head, on fixed
      support features).
    - `flow`: an inner flow (`ctmeta.flows`) whose explicit Euler steps of
      `lr` replace gradient descent (`None`: gradient descent).

    **Returns:** `(tasks, 1 + len(segments))`.
    """

    def one(task):
        sx, sy, qx, qy = task[:4]
        mask = task[4] if len(task) > 4 else None
        if adapt == "all":
            u, static = eqx.partition(model, eqx.is_inexact_array)

            def support_loss(u):
                return loss(apply(eqx.combine(u, static), sx), sy)

            def score(u):
                return apply_loss(metric, apply(eqx.combine(u, static), qx), qy, mask)

        else:
            fs = jax.lax.stop_gradient(model.features(sx))
            fq = model.features(qx)
            u = model.head

            def support_loss(W):
                return loss(fs @ W.T, sy)

            def score(W):
                return apply_loss(metric, fq @ W.T, qy, mask)

        if flow is not None:  # the flow's Euler steps, on its own state
            field = flow.field(lambda w, _: support_loss(w))

            def step(y, _):
                return flow.euler_step(field, y, None, lr), None

            y = flow.init_state(u)
            out = [score(u)]
            for k in segments:
                y, _ = jax.lax.scan(step, y, None, length=k)
                out.append(score(flow.params_of(y)))
            return jnp.stack(out)

        def gd(u, _):
            g = jax.grad(support_loss)(u)
            return jax.tree.map(lambda a, b: a - lr * b, u, g), None

        out = [score(u)]
        for k in segments:
            u, _ = jax.lax.scan(gd, u, None, length=k)
            out.append(score(u))
        return jnp.stack(out)

    return jax.vmap(one)(tuple(tasks))
