"""Collaborative filtering as few-shot regression (A-MAML Sec. 5.3).

One user is one task: predict the user's rating of an item from the item's
one-hot id, after seeing a few of the user's ratings. Following A-MAML (after
Denevi et al.), only the `top_items` most-rated items of the whole dataset are
used (ties broken by the smaller item id), and only users with at least
`min_ratings` ratings among them are kept.

Layout of a task (`D = top_items`):
`x (K, D)` one-hot over the kept items, in order of popularity (column `j` is
item `item_ids[j]`); `y (K, 1)` the rating, a float on the dataset's own scale
(MovieLens 1..5, Jester [-10, 10]).

Splits. `num_test_users` users are held out for meta-testing, chosen with
`seed`; the other kept users are the meta-training tasks.

- `"train"`: a task is a training user with at least `shots + queries`
  ratings (users with fewer are never drawn, the paper's "re-sample a new
  task"), and `shots + queries` of their ratings drawn without replacement:
  the first `shots` are the support, the rest the query. A `Batch`.
- `"test"`: the support is `shots` of the user's ratings, and the query is
  *all the others*, so its size varies between users. The queries are padded
  to the largest size with zero rows and returned with a mask: a
  `MaskedBatch`. The support/query split of each test user is fixed by
  `seed`, so `test_batch()` is the same every time.

Sampling is a pure function of the JAX key (jittable, with `meta_batch` and
`split` static): the per-user rating lists are precomputed as padded arrays.

Loaders (in `ctmeta.tasks.ratings_files`, re-exported here) read the official distributions: MovieLens-100K `ml-100k/u.data`,
MovieLens-1M `ml-1m/ratings.dat` (from a directory or the zip) and Jester-1
`jester-data-1.xls` (also `.xlsx`/`.csv` exports of it).
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import InputError, check_int
from .base import Batch, TaskFamily
from .ratings_files import RatingsTable, load_jester, load_movielens

__all__ = [
    "Jester",
    "MaskedBatch",
    "MovieLens",
    "RatingsFamily",
]
# RatingsTable, load_jester and load_movielens are ctmeta.tasks.ratings_files', imported above.


class MaskedBatch(NamedTuple):
    """A `Batch` whose query sets have different sizes, padded to one length.

    `support_x (B, K, D)`, `support_y (B, K, 1)` as in `Batch`;
    `query_x (B, Q, D)`, `query_y (B, Q, 1)` padded with zero rows;
    `query_mask (B, Q)` bool, True for the real query examples.
    Losses and metrics on the query must weight by the mask
    (`ctmeta.tasks.metrics.nrmse(pred, y, mask)` does).
    """

    support_x: jax.Array
    support_y: jax.Array
    query_x: jax.Array
    query_y: jax.Array
    query_mask: jax.Array



# ---------------------------------------------------------------------------
# The task family


class RatingsFamily(TaskFamily):
    """Users of a ratings table as few-shot regression tasks (see the module doc).

    Attributes after construction (numpy):
    `item_ids (top_items,)` the dataset ids of the one-hot columns, most rated
    first; `user_ids (U,)` the kept users; `user_counts (U,)` their numbers
    of ratings among the top items; `test_user_ids`, `train_user_ids`, and
    `sampled_user_ids`, the training users with at least `shots + queries`
    ratings, the only ones `sample(..., "train")` draws.
    """

    kind = "regression"

    def __init__(
        self,
        table: RatingsTable,
        *,
        shots: int = 10,
        queries: int = 15,
        top_items: int = 100,
        min_ratings: int = 20,
        num_test_users: int = 100,
        seed: int = 0,
    ):
        self.shots = check_int("shots", shots)
        self.queries = check_int("queries", queries)
        self.top_items = check_int("top_items", top_items)
        self.min_ratings = check_int("min_ratings", min_ratings)
        self.num_test_users = check_int("num_test_users", num_test_users)
        self.seed = check_int("seed", seed, minimum=0)
        self.source = table.source
        users = np.asarray(table.users, dtype=np.int64)
        items = np.asarray(table.items, dtype=np.int64)
        ratings = np.asarray(table.ratings, dtype=np.float64)

        # Most-rated items, ties to the smaller id; rank = one-hot column.
        item_ids, item_counts = np.unique(items, return_counts=True)
        if self.top_items > item_ids.size:
            raise InputError(
                f"top_items={self.top_items} but {self.source} has only {item_ids.size} "
                f"distinct items; use top_items <= {item_ids.size}"
            )
        popular = np.lexsort((item_ids, -item_counts))[: self.top_items]
        self.item_ids = item_ids[popular]
        rank_of = np.full(item_ids.size, -1)
        rank_of[popular] = np.arange(self.top_items)
        rank = rank_of[np.searchsorted(item_ids, items)]
        keep = rank >= 0
        users, rank, ratings = users[keep], rank[keep], ratings[keep]

        # Users with enough ratings among those items.
        user_ids, user_counts = np.unique(users, return_counts=True)
        enough = user_counts >= self.min_ratings
        if not enough.any():
            raise InputError(
                f"no user of {self.source} has min_ratings={self.min_ratings} ratings among "
                f"the {self.top_items} most-rated items; the most any has is "
                f"{user_counts.max()}"
            )
        self.user_ids, self.user_counts = user_ids[enough], user_counts[enough]
        keep = np.isin(users, self.user_ids)
        users, rank, ratings = users[keep], rank[keep], ratings[keep]
        # Per-user lists, users in id order, each list in item-rank order.
        order = np.lexsort((rank, users))
        row = np.searchsorted(self.user_ids, users[order])
        starts = np.concatenate([[0], np.cumsum(self.user_counts)[:-1]])
        col = np.arange(order.size) - starts[row]
        width = int(self.user_counts.max())
        item_table = np.full((self.user_ids.size, width), -1, dtype=np.int64)
        rating_table = np.zeros((self.user_ids.size, width))
        item_table[row, col] = rank[order]
        rating_table[row, col] = ratings[order]

        if self.num_test_users >= self.user_ids.size:
            raise InputError(
                f"num_test_users={self.num_test_users} leaves no meta-training users: "
                f"{self.source} has {self.user_ids.size} users with >= {self.min_ratings} "
                f"ratings; use num_test_users <= {self.user_ids.size - 1}"
            )
        # Test users: the first num_test_users, in a seeded random order, that
        # have more than `shots` ratings (so each has a non-empty query). With
        # shots < min_ratings this is a seeded subset the same for all settings.
        user_stream, split_stream = (
            np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(2)
        )
        shuffled = user_stream.permutation(self.user_ids.size)
        testable = shuffled[self.user_counts[shuffled] > self.shots]
        if testable.size < self.num_test_users:
            raise InputError(
                f"only {testable.size} users of {self.source} have more than shots="
                f"{self.shots} ratings, fewer than num_test_users={self.num_test_users}: "
                "lower shots or num_test_users"
            )
        test_rows = np.sort(testable[: self.num_test_users])
        train_rows = np.setdiff1d(np.arange(self.user_ids.size), test_rows)
        self.test_user_ids = self.user_ids[test_rows]
        self.train_user_ids = self.user_ids[train_rows]

        needed = self.shots + self.queries
        sampled_rows = train_rows[self.user_counts[train_rows] >= needed]
        if sampled_rows.size == 0:
            most = int(self.user_counts[train_rows].max()) if train_rows.size else 0
            raise InputError(
                f"shots + queries = {needed} exceeds the ratings of every meta-training "
                f"user of {self.source}; the maximum is shots + queries = {most}"
            )
        self.sampled_user_ids = self.user_ids[sampled_rows]

        # Training pool, padded to the longest list (padding never drawn).
        self._items = jnp.asarray(item_table[sampled_rows], dtype=jnp.int32)
        self._ratings = jnp.asarray(rating_table[sampled_rows])
        self._counts = jnp.asarray(self.user_counts[sampled_rows], dtype=jnp.int32)

        # Fixed test split: a seeded permutation of each test user's ratings.
        counts = self.user_counts[test_rows]
        query_len = int(counts.max()) - self.shots
        support_items = np.empty((test_rows.size, self.shots), dtype=np.int64)
        support_ratings = np.empty((test_rows.size, self.shots))
        query_items = np.full((test_rows.size, query_len), -1, dtype=np.int64)
        query_ratings = np.zeros((test_rows.size, query_len))
        for i, (r, n) in enumerate(zip(test_rows, counts)):
            perm = split_stream.permutation(n)
            support, query = perm[: self.shots], perm[self.shots :]
            support_items[i], support_ratings[i] = item_table[r, support], rating_table[r, support]
            query_items[i, : query.size] = item_table[r, query]
            query_ratings[i, : query.size] = rating_table[r, query]
        self._test = MaskedBatch(
            support_x=self._one_hot(jnp.asarray(support_items)),
            support_y=jnp.asarray(support_ratings)[..., None],
            query_x=self._one_hot(jnp.asarray(query_items)),
            query_y=jnp.asarray(query_ratings)[..., None],
            query_mask=jnp.asarray(query_items >= 0),
        )

    # -- the TaskFamily contract ----------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.top_items,)

    @property
    def output_size(self) -> int:
        return 1

    def sample(
        self, key: jax.Array, meta_batch: int, split: str = "train"
    ) -> Batch | MaskedBatch:
        """`meta_batch` distinct users, chosen uniformly with `key`.

        `"train"`: a `Batch` with `shots` support and `queries` query ratings
        per user, drawn afresh with the key. `"test"`: a `MaskedBatch` of test
        users with their fixed support and padded, masked query.
        """
        meta_batch = check_int("meta_batch", meta_batch)
        if split == "test":
            n = self._test.query_mask.shape[0]
            self._check_batch(meta_batch, n, "test users")
            pick = jax.random.choice(key, n, (meta_batch,), replace=False)
            return jax.tree.map(lambda a: a[pick], self._test)
        if split != "train":
            raise InputError(
                f"split must be 'train' or 'test' for {type(self).__name__} "
                f"(the benchmark has no validation split), got {split!r}"
            )
        n, width = self._items.shape
        self._check_batch(meta_batch, n, f"training users with >= {self.shots + self.queries} ratings")
        user_key, item_key = jax.random.split(key)
        pick = jax.random.choice(user_key, n, (meta_batch,), replace=False)
        items, ratings, counts = self._items[pick], self._ratings[pick], self._counts[pick]
        # A uniformly random subset in random order: sort i.i.d. uniform keys,
        # with the padding pushed past every real entry.
        noise = jax.random.uniform(item_key, (meta_batch, width))
        noise = jnp.where(jnp.arange(width) < counts[:, None], noise, 2.0)
        order = jnp.argsort(noise, axis=1)[:, : self.shots + self.queries]
        x = self._one_hot(jnp.take_along_axis(items, order, axis=1))
        y = jnp.take_along_axis(ratings, order, axis=1)[..., None]
        s = self.shots
        return Batch(x[:, :s], y[:, :s], x[:, s:], y[:, s:])

    def test_batch(self) -> MaskedBatch:
        """All test users, in id order, with their fixed support/query split."""
        return self._test

    def mean_rating(self) -> float:
        """The meta-training users' mean rating (over the kept items)."""
        items, ratings = np.asarray(self._items), np.asarray(self._ratings)
        return float(ratings[items >= 0].mean())

    def item_means(self) -> np.ndarray:
        """Each kept item's mean rating over the meta-training users' ratings
        (`(top_items,)`, in popularity-rank order; the overall mean for an item
        none of them rated): what a predictor learns that learns no user."""
        items, ratings = np.asarray(self._items), np.asarray(self._ratings)
        valid = items >= 0
        overall = ratings[valid].mean()
        total = np.bincount(items[valid], ratings[valid], self.top_items)
        count = np.bincount(items[valid], minlength=self.top_items)
        return np.where(count > 0, total / np.maximum(count, 1), overall)

    def trivial_predictions(self, batch: MaskedBatch | None = None) -> dict[str, np.ndarray]:
        """Query predictions of the predictors that adapt nothing but a mean,
        for `batch` (default: the test users), each shaped like `query_y`:

        - `"item mean"`: the item's mean rating over the meta-training users;
        - `"item mean + user offset"`: plus the user's mean offset from the
          item means on their support ratings.

        The floor a meta-learned rating predictor has to beat (A-MAML
        Tables 1-2 leave it out)."""
        batch = self.test_batch() if batch is None else batch
        means = self.item_means()
        support_items = np.asarray(batch.support_x).argmax(-1)
        query_items = np.asarray(batch.query_x).argmax(-1)
        offset = (np.asarray(batch.support_y)[..., 0] - means[support_items]).mean(axis=1, keepdims=True)
        item = means[query_items][..., None]
        return {"item mean": item, "item mean + user offset": item + offset[..., None]}

    # -- internals --------------------------------------------------------------------

    def _one_hot(self, ranks: jax.Array) -> jax.Array:
        # jax.nn.one_hot maps the padding index -1 to an all-zero row.
        # Same float dtype as the stored ratings (float64 only under x64).
        return jax.nn.one_hot(ranks, self.top_items, dtype=self._ratings.dtype)

    @staticmethod
    def _check_batch(meta_batch: int, available: int, what: str) -> None:
        if meta_batch > available:
            raise InputError(
                f"meta_batch={meta_batch} exceeds the {available} {what}; "
                f"use meta_batch <= {available}"
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.source!r}, shots={self.shots}, "
            f"queries={self.queries}, top_items={self.top_items}, "
            f"min_ratings={self.min_ratings}, num_test_users={self.num_test_users}, "
            f"seed={self.seed}; {self.user_ids.size} users kept)"
        )


class MovieLens(RatingsFamily):
    """MovieLens-100K (`variant="100k"`) or -1M (`"1m"`) users as tasks.

    `data_dir` is the official zip, a folder holding it, or the extracted
    folder (see `load_movielens`). Ratings are integers 1..5.
    """

    def __init__(
        self,
        data_dir: str | pathlib.Path,
        variant: str = "100k",
        shots: int = 10,
        queries: int = 15,
        top_items: int = 100,
        min_ratings: int = 20,
        num_test_users: int = 100,
        seed: int = 0,
    ):
        self.variant = variant
        super().__init__(
            load_movielens(data_dir, variant),
            shots=shots,
            queries=queries,
            top_items=top_items,
            min_ratings=min_ratings,
            num_test_users=num_test_users,
            seed=seed,
        )


class Jester(RatingsFamily):
    """Jester-1 users as tasks; the items are the 100 jokes, ratings in [-10, 10].

    `path` is `jester-data-1.xls` (or an .xlsx/.csv export), or a folder
    holding it (see `load_jester`).
    """

    def __init__(
        self,
        path: str | pathlib.Path,
        shots: int = 10,
        queries: int = 15,
        top_items: int = 100,
        min_ratings: int = 20,
        num_test_users: int = 100,
        seed: int = 0,
    ):
        super().__init__(
            load_jester(path),
            shots=shots,
            queries=queries,
            top_items=top_items,
            min_ratings=min_ratings,
            num_test_users=num_test_users,
            seed=seed,
        )
