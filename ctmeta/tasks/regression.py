r"""2-D function regression: the CosMixture and Alpine families of A-MAML (Sec. 5.1).

Each task is one random instance of a test function on a square domain; the
learner sees `shots` noiseless samples `(x, f(x))` and is scored on others.

- CosMixture (A-MAML eq. 9), $x \in [-1, 1]^2$:
  $f(x) = -0.1 \sum_i A \cos(\omega x_i + \varphi) - \sum_i x_i^2$,
  with $A \sim U[0.1, 1]$, $\omega \sim U[\pi/2, 2\pi]$, $\varphi \sim U[3, 6]$ per task.
- Alpine (A-MAML eq. 10), $x \in [-10, 10]^2$ (the paper prints $[10, 10]$):
  $f(x) = \sum_i |x_i \sin(x_i + \varphi_i) + 0.1 x_i|$,
  with $\varphi_1, \varphi_2 \sim U[-5\pi/12, 5\pi/12]$ per task.

The protocol is the paper's: a *fixed* set of meta-training tasks, each with
its own fixed support (`shots`) and validation (`queries`) points, and a fixed
set of test tasks with `shots` support points and `test_queries` evaluation
points. All points are drawn uniformly on the domain, independently, so the
support and query sets of a task do not share points (with probability one).
Everything is generated once, in float64 numpy, from `seed`; the arrays are
then stored as JAX arrays, which are float32 unless `jax_enable_x64` was on
when the family was built.

`sample(key, meta_batch)` picks tasks from these fixed sets with the key, so it
is a pure function of the key and can be called inside `jax.jit`
(`meta_batch` and `split` static).
"""

from __future__ import annotations

import abc
import math

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import InputError, check_int
from .base import Batch, TaskFamily
from .metrics import nrmse

__all__ = ["Alpine", "CosMixture", "FunctionRegression", "nrmse"]




class FunctionRegression(TaskFamily):
    """A fixed train/test set of instances of a parametrised 2-D function.

    Subclasses give the domain `[low, high]^2`, the number of parameters per
    task, how to draw them and the function itself.

    Arrays (JAX, leading task axis):
    `train_support_x (N, shots, 2)`, `train_support_y (N, shots, 1)`,
    `train_query_x (N, queries, 2)`, `train_query_y (N, queries, 1)`,
    `test_support_x (M, shots, 2)`, ..., `test_query_x (M, test_queries, 2)`.
    The task parameters are kept as float64 numpy arrays `train_params (N, P)`
    and `test_params (M, P)`; `function(params, x)` evaluates the targets.
    """

    kind = "regression"
    low: float
    high: float
    num_params: int

    def __init__(
        self,
        shots: int = 50,
        queries: int = 50,
        num_train_tasks: int = 100,
        num_test_tasks: int = 100,
        test_queries: int = 100,
        seed: int = 0,
    ):
        self.shots = check_int("shots", shots)
        self.queries = check_int("queries", queries)
        self.num_train_tasks = check_int("num_train_tasks", num_train_tasks)
        self.num_test_tasks = check_int("num_test_tasks", num_test_tasks)
        self.test_queries = check_int("test_queries", test_queries)
        self.seed = check_int("seed", seed, minimum=0)

        # Separate streams for the task parameters and for the points, so that
        # the same seed gives the same functions whatever shots/queries are.
        train_params, train_points, test_params, test_points = [
            np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(4)
        ]
        self.train_params = self._draw_params(train_params, self.num_train_tasks)
        self.test_params = self._draw_params(test_params, self.num_test_tasks)
        self._train = self._make_tasks(
            train_points, self.train_params, self.shots, self.queries
        )
        self._test = self._make_tasks(
            test_points, self.test_params, self.shots, self.test_queries
        )

    # -- what a subclass defines ------------------------------------------------

    @abc.abstractmethod
    def _draw_params(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` independent task parameter vectors, shape `(n, num_params)`."""

    @abc.abstractmethod
    def function(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Targets `f(x)` of shape `(n, K)` for `params (n, P)` and `x (n, K, 2)`."""

    # -- the TaskFamily contract ------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (2,)

    @property
    def output_size(self) -> int:
        return 1

    def sample(self, key: jax.Array, meta_batch: int, split: str = "train") -> Batch:
        """`meta_batch` distinct tasks of `split`, chosen uniformly with `key`.

        `"train"` draws from the fixed meta-training tasks (support `shots`,
        query `queries` points); `"test"` from the fixed test tasks (support
        `shots`, query `test_queries` points). Tasks are drawn without
        replacement, so a batch never holds the same task twice.
        """
        tasks = self._split(split)
        n = tasks.support_x.shape[0]
        meta_batch = check_int("meta_batch", meta_batch)
        if meta_batch > n:
            raise InputError(
                f"meta_batch={meta_batch} exceeds the {n} {split} tasks of "
                f"{type(self).__name__}; use at most {n}"
            )
        idx = jax.random.choice(key, n, (meta_batch,), replace=False)
        return jax.tree.map(lambda a: a[idx], tasks)

    def test_batch(self) -> Batch:
        """All `num_test_tasks` test tasks as one Batch, in a fixed order."""
        return self._test

    def train_batch(self) -> Batch:
        """All `num_train_tasks` meta-training tasks as one Batch."""
        return self._train

    # -- internals ---------------------------------------------------------------

    def _split(self, split: str) -> Batch:
        if split == "train":
            return self._train
        if split == "test":
            return self._test
        raise InputError(
            f"split must be 'train' or 'test' for {type(self).__name__} "
            f"(the benchmark has no validation split), got {split!r}"
        )

    def _make_tasks(
        self, rng: np.random.Generator, params: np.ndarray, shots: int, queries: int
    ) -> Batch:
        # One draw of shots + queries points per task, then split: the support
        # and query points of a task are distinct independent uniform draws.
        x = rng.uniform(self.low, self.high, size=(params.shape[0], shots + queries, 2))
        y = self.function(params, x)[..., None]
        return Batch(
            support_x=jnp.asarray(x[:, :shots]),
            support_y=jnp.asarray(y[:, :shots]),
            query_x=jnp.asarray(x[:, shots:]),
            query_y=jnp.asarray(y[:, shots:]),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shots={self.shots}, queries={self.queries}, "
            f"num_train_tasks={self.num_train_tasks}, num_test_tasks={self.num_test_tasks}, "
            f"test_queries={self.test_queries}, seed={self.seed})"
        )


class CosMixture(FunctionRegression):
    r"""$f(x) = -0.1 \sum_i A \cos(\omega x_i + \varphi) - \sum_i x_i^2$ on $[-1, 1]^2$.

    Parameters per task, columns of `params`: `A ~ U[0.1, 1]`,
    `omega ~ U[pi/2, 2 pi]`, `phi ~ U[3, 6]` (shared by both coordinates).
    Values lie in `[-2.2, 0.2]`.
    """

    low, high = -1.0, 1.0
    num_params = 3

    def _draw_params(self, rng, n):
        amplitude = rng.uniform(0.1, 1.0, n)
        omega = rng.uniform(0.5 * math.pi, 2.0 * math.pi, n)
        phase = rng.uniform(3.0, 6.0, n)
        return np.stack([amplitude, omega, phase], axis=-1)

    def function(self, params, x):
        params = np.asarray(params, dtype=np.float64)
        x = np.asarray(x, dtype=np.float64)
        amplitude, omega, phase = (params[:, i, None, None] for i in range(3))
        waves = amplitude * np.cos(omega * x + phase)
        return -0.1 * waves.sum(-1) - np.square(x).sum(-1)


class Alpine(FunctionRegression):
    r"""$f(x) = \sum_i |x_i \sin(x_i + \varphi_i) + 0.1 x_i|$ on $[-10, 10]^2$.

    Parameters per task, columns of `params`: `phi_1, phi_2 ~ U[-5 pi/12, 5 pi/12]`.
    Values lie in `[0, 22]`.
    """

    low, high = -10.0, 10.0
    num_params = 2

    def _draw_params(self, rng, n):
        bound = 5.0 * math.pi / 12.0
        return rng.uniform(-bound, bound, (n, 2))

    def function(self, params, x):
        params = np.asarray(params, dtype=np.float64)
        x = np.asarray(x, dtype=np.float64)
        phase = params[:, None, :]
        return np.abs(x * np.sin(x + phase) + 0.1 * x).sum(-1)
