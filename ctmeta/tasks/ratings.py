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

Loaders read the official distributions: MovieLens-100K `ml-100k/u.data`,
MovieLens-1M `ml-1m/ratings.dat` (from a directory or the zip) and Jester-1
`jester-data-1.xls` (also `.xlsx`/`.csv` exports of it).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import warnings
import zipfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import DataError, InputError, check_int
from .base import Batch, TaskFamily

__all__ = [
    "Jester",
    "MaskedBatch",
    "MovieLens",
    "RatingsFamily",
    "RatingsTable",
    "load_jester",
    "load_movielens",
]

MOVIELENS_URL = "https://grouplens.org/datasets/movielens/"
JESTER_URL = "https://goldberg.berkeley.edu/jester-data/"


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


class RatingsTable(NamedTuple):
    """Ratings as parallel arrays, one entry per (user, item) pair.

    `users (R,)` and `items (R,)` int64 ids as the dataset numbers them,
    `ratings (R,)` float64; `source` names the file, for messages.
    """

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    source: str




# ---------------------------------------------------------------------------
# MovieLens


@dataclasses.dataclass(frozen=True)
class _MovieLensFormat:
    title: str
    folder: str  # the folder inside the official zip, and the zip's stem
    filename: str
    sep: str
    layout: str


_MOVIELENS = {
    "100k": _MovieLensFormat(
        "MovieLens-100K", "ml-100k", "u.data", "\t", "user<TAB>item<TAB>rating<TAB>timestamp"
    ),
    "1m": _MovieLensFormat(
        "MovieLens-1M", "ml-1m", "ratings.dat", "::", "UserID::MovieID::Rating::Timestamp"
    ),
}


def _movielens_format(variant: str) -> _MovieLensFormat:
    if variant not in _MOVIELENS:
        raise InputError(f"variant must be one of {sorted(_MOVIELENS)}, got {variant!r}")
    return _MOVIELENS[variant]


def _movielens_help(fmt: _MovieLensFormat) -> str:
    return (
        f"{fmt.title} is distributed by GroupLens as {fmt.folder}.zip ({MOVIELENS_URL}); "
        f"pass the zip, the folder that holds it or {fmt.folder}/, or {fmt.folder}/ itself"
    )


def _read_movielens_bytes(path: pathlib.Path, fmt: _MovieLensFormat) -> tuple[bytes, str]:
    """The ratings file's bytes and a name for it, from a folder, a zip or the file."""
    member = f"{fmt.folder}/{fmt.filename}"
    if path.is_dir():
        candidates = [path / fmt.filename, path / member, path / f"{fmt.folder}.zip"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            looked = ", ".join(str(c) for c in candidates)
            raise DataError(
                f"no {fmt.title} ratings under {path}: looked for {looked}. "
                f"{_movielens_help(fmt)}"
            )
        path = found
    elif not path.is_file():
        raise DataError(f"{path} does not exist. {_movielens_help(fmt)}")

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                # The official zip has `ml-100k/u.data`; accept a flat zip too.
                match = next(
                    (n for n in names if n == member or n == fmt.filename), None
                ) or next((n for n in names if n.endswith("/" + fmt.filename)), None)
                if match is None:
                    raise DataError(
                        f"{path} holds no {member} (the official layout). {_movielens_help(fmt)}"
                    )
                return archive.read(match), f"{path}:{match}"
        return path.read_bytes(), str(path)
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise DataError(f"could not read {path}: {err}") from err


def _parse_movielens(
    data: bytes, name: str, fmt: _MovieLensFormat, rating_range: tuple[int, int] = (1, 5)
) -> RatingsTable:
    """Parse `user SEP item SEP rating SEP timestamp` lines, strictly.

    Every non-blank line must be four unsigned integers (at most 18 digits, so
    no overflow) joined by the separator; ratings must lie in `rating_range`;
    a (user, item) pair may appear once. Anything else is a DataError that
    names the file and the 1-based line.
    """
    # latin-1 decodes any bytes; non-ASCII characters then fail the pattern.
    text = data.decode("latin-1")
    field = "([0-9]{1,18})"
    line_re = re.compile(re.escape(fmt.sep).join([field] * 4))
    lines, numbers = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if line_re.fullmatch(line) is None:
            # Slow path only for the unusual line: CRLF endings, padding, blanks.
            line = line.strip()
            if not line:
                continue
            if line_re.fullmatch(line) is None:
                shown = line if len(line) <= 80 else line[:77] + "..."
                raise DataError(
                    f"{name}, line {number}: expected `{fmt.layout}` (four non-negative "
                    f"integers separated by {fmt.sep!r}), got {shown!r}. "
                    f"Is this the {fmt.title} ratings file? {_movielens_help(fmt)}"
                )
        lines.append(line)
        numbers.append(number)
    if not lines:
        raise DataError(f"{name} holds no ratings. {_movielens_help(fmt)}")

    # The lines are validated, so splitting on the separator gives 4 ints each.
    values = np.array(
        " ".join(lines).replace(fmt.sep, " ").split(), dtype=np.int64
    ).reshape(-1, 4)
    numbers = np.asarray(numbers)
    users, items, ratings = values[:, 0], values[:, 1], values[:, 2]

    low, high = rating_range
    bad = np.flatnonzero((ratings < low) | (ratings > high))
    if bad.size:
        i = bad[0]
        raise DataError(
            f"{name}, line {numbers[i]}: rating {ratings[i]} is outside {low}..{high}"
        )
    # A repeated (user, item) pair would put one item twice in a task.
    order = np.lexsort((items, users))
    same = (np.diff(users[order]) == 0) & (np.diff(items[order]) == 0)
    if same.any():
        j = np.flatnonzero(same)[0]
        first, second = sorted(order[j : j + 2])
        raise DataError(
            f"{name}, line {numbers[second]}: user {users[second]} rates item "
            f"{items[second]} a second time (first on line {numbers[first]})"
        )
    return RatingsTable(users, items, ratings.astype(np.float64), name)


def load_movielens(path: str | pathlib.Path, variant: str = "100k") -> RatingsTable:
    """Read MovieLens-100K (`ml-100k/u.data`) or -1M (`ml-1m/ratings.dat`).

    `path` is the official zip (`ml-100k.zip`, `ml-1m.zip`), a folder holding
    it, the extracted `ml-100k/` (`ml-1m/`) folder or its parent, or the
    ratings file itself. Raises DataError when it is missing or malformed.
    """
    fmt = _movielens_format(variant)
    data, name = _read_movielens_bytes(pathlib.Path(path), fmt)
    return _parse_movielens(data, name, fmt)


# ---------------------------------------------------------------------------
# Jester

_JESTER_NAMES = ("jester-data-1.xls", "jester-data-1.xlsx", "jester-data-1.csv")
_JESTER_LAYOUT = (
    "one row per user, no header: the number of jokes the user rated, then 100 "
    "joke columns with ratings in [-10, 10] and 99 for 'not rated' (a file with "
    "the 100 joke columns only is accepted too)"
)
_JESTER_HELP = (
    f"Jester-1 is jester-data-1.xls inside jester_dataset_1_1.zip at {JESTER_URL} "
    "(unzip it); .xlsx and .csv exports with the same layout work too"
)


def _find_jester_file(path: pathlib.Path) -> pathlib.Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"{path} does not exist. {_JESTER_HELP}")
    for name in _JESTER_NAMES:
        if (path / name).is_file():
            return path / name
    # Renamed copies such as jester-data-1-first4000users.xlsx.
    found = sorted(
        p for p in path.glob("jester-data-1*") if p.suffix.lower() in (".xls", ".xlsx", ".csv")
    )
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(p.name for p in found)
        raise DataError(f"several Jester-1 files in {path} ({names}); pass the one to use")
    raise DataError(
        f"no Jester-1 ratings in {path}: looked for {', '.join(_JESTER_NAMES)} "
        f"(or jester-data-1*.xls/.xlsx/.csv). {_JESTER_HELP}"
    )


def _read_jester_frame(path: pathlib.Path):
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".xls":
            with warnings.catch_warnings():
                # pandas 3 deprecates xlrd in favour of python-calamine, which is
                # not a dependency; xlrd is still the reader of .xls here.
                warnings.filterwarnings("ignore", message=".*xlrd engine is deprecated")
                return pd.read_excel(path, header=None, engine="xlrd")
        if suffix == ".xlsx":
            return pd.read_excel(path, header=None, engine="openpyxl")
        if suffix == ".csv":
            return pd.read_csv(path, header=None)
    # The readers raise their own zoo of exceptions on a corrupt file (xlrd,
    # zipfile, openpyxl, pandas parser errors); all mean "not a valid file".
    except Exception as err:  # noqa: BLE001
        raise DataError(
            f"could not read {path} as a Jester-1 {suffix} file "
            f"({type(err).__name__}: {err}). Expected layout: {_JESTER_LAYOUT}. {_JESTER_HELP}"
        ) from err
    raise DataError(
        f"{path}: unknown Jester file type {suffix!r}; expected .xls, .xlsx or .csv. "
        f"{_JESTER_HELP}"
    )


def _jester_ratings(frame, name: str) -> np.ndarray:
    """The `(users, 100)` float64 ratings of a Jester frame, 99 = not rated."""
    import pandas as pd

    n_rows, n_cols = frame.shape
    if n_rows == 0:
        raise DataError(f"{name} holds no rows. Expected layout: {_JESTER_LAYOUT}")
    if n_cols not in (100, 101):
        raise DataError(
            f"{name} has {n_cols} columns; expected 101 (rating count + 100 jokes) or "
            f"100 (jokes only). Expected layout: {_JESTER_LAYOUT}. {_JESTER_HELP}"
        )
    numeric = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.argwhere(np.isnan(numeric))
    if bad.size:
        row, col = bad[0]
        raw = frame.iat[row, col]
        what = "an empty cell" if pd.isna(raw) else f"{raw!r} is not a number"
        raise DataError(
            f"{name}, row {row + 1}, column {col + 1}: {what}. Expected layout: {_JESTER_LAYOUT}"
        )

    offset = 0
    if n_cols == 101:
        # The official file's first column counts the rated jokes; check that
        # it does before dropping it, so a shifted file is not misread.
        counts = numeric[:, 0]
        rated = (numeric[:, 1:] != 99).sum(axis=1)
        wrong = np.flatnonzero(counts != rated)
        if wrong.size:
            row = wrong[0]
            raise DataError(
                f"{name} has 101 columns but column 1 is not the number of rated jokes: "
                f"row {row + 1} says {counts[row]:g}, its 100 joke columns hold {rated[row]} "
                f"ratings. Expected layout: {_JESTER_LAYOUT}"
            )
        numeric, offset = numeric[:, 1:], 1

    valid = ((numeric >= -10) & (numeric <= 10)) | (numeric == 99)
    bad = np.argwhere(~valid)
    if bad.size:
        row, col = bad[0]
        raise DataError(
            f"{name}, row {row + 1}, column {col + 1 + offset}: rating {numeric[row, col]:g} "
            "is outside [-10, 10] and is not 99 (not rated)"
        )
    return numeric


def load_jester(path: str | pathlib.Path) -> RatingsTable:
    """Read Jester-1 ratings from `jester-data-1.xls` (or an .xlsx/.csv export).

    `path` is the file or a folder holding it. Users are numbered by row from
    1, jokes by column from 1. The leading count column of the official file
    is detected (101 columns whose first equals each row's number of ratings)
    and dropped; a file of the 100 joke columns alone is read as is.
    """
    file = _find_jester_file(pathlib.Path(path))
    values = _jester_ratings(_read_jester_frame(file), str(file))
    users, jokes = np.nonzero(values != 99)
    return RatingsTable(users + 1, jokes + 1, values[users, jokes], str(file))


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
