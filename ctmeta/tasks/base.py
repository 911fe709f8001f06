"""The contract every task family meets.

A task family samples *fixed-shape* arrays, so that a meta-batch is one pytree
with a leading task axis that `jax.vmap` maps over and `jax.sharding` splits.
Sampling is a pure function of a JAX key (no hidden sampler state), so a run
that is resumed from a checkpoint draws exactly the tasks it would have drawn.
"""

from __future__ import annotations

import abc
from typing import Literal, NamedTuple

import jax


class Batch(NamedTuple):
    """A batch of tasks, each split into a support (adaptation) and a query set.

    Regression: `support_x (B, K, D)`, `support_y (B, K, 1)`.
    Classification: `support_x (B, K, C, H, W)` images in [0, 1],
    `support_y (B, K)` integer labels in `[0, ways)`.
    The query arrays have the same trailing shapes with `Q` rows.
    A single task is the same structure without the leading `B`.
    """

    support_x: jax.Array
    support_y: jax.Array
    query_x: jax.Array
    query_y: jax.Array


class TaskFamily(abc.ABC):
    """A distribution over tasks.

    Subclasses set `kind` and implement `sample`. `split` is `"train"` for
    meta-training tasks and `"test"` for held-out meta-test tasks (and
    `"val"` where the benchmark has one).
    """

    kind: Literal["regression", "classification"]

    @abc.abstractmethod
    def sample(self, key: jax.Array, meta_batch: int, split: str = "train") -> Batch:
        """Draw `meta_batch` tasks, deterministically from `key`."""

    @property
    @abc.abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example (e.g. `(2,)` or `(1, 28, 28)`)."""

    @property
    @abc.abstractmethod
    def output_size(self) -> int:
        """Width of the model's output: 1 for regression, `ways` for classification."""
