"""Readers of the ratings data sets in their official distributions.

MovieLens-100K `ml-100k/u.data`, MovieLens-1M `ml-1m/ratings.dat` (from a
directory or the zip) and Jester-1 `jester-data-1.xls` (also `.xlsx`/`.csv`
exports of it), each read into a [`RatingsTable`][ctmeta.tasks.ratings_files.RatingsTable]
of parallel arrays, with a one-line `DataError` naming the file and what to
do when it is missing or malformed. The task family is `ctmeta.tasks.ratings`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import warnings
import zipfile
from typing import NamedTuple

import numpy as np

from .._errors import DataError, InputError

__all__ = ["JESTER_URL", "MOVIELENS_URL", "RatingsTable", "load_jester", "load_movielens"]

MOVIELENS_URL = "https://grouplens.org/datasets/movielens/"
JESTER_URL = "https://goldberg.berkeley.edu/jester-data/"

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
