"""Collaborative-filtering tasks (A-MAML Sec. 5.3): loaders, task construction, sampling.

Real data: MovieLens-100K from the official zip and the first 4,000 users of
Jester-1 (.xlsx) under `../shared/data`. MovieLens-1M and the .xls/.csv forms
of Jester are not available there; they are tested on small fixtures written
in the official layouts into `tmp_path`.
"""

import re
import zipfile

import jax
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ctmeta._errors import DataError, InputError
from ctmeta.tasks.base import Batch
from ctmeta.tasks.metrics import nrmse
from ctmeta.tasks.ratings import (
    Jester,
    MaskedBatch,
    MovieLens,
    RatingsFamily,
    RatingsTable,
    load_jester,
    load_movielens,
)

# -- fixtures: real data ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k_zip(data_dir):
    path = data_dir / "movielens" / "ml-100k.zip"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="module")
def ml100k_table(ml100k_zip):
    return load_movielens(ml100k_zip)


@pytest.fixture(scope="module")
def ml100k(ml100k_zip):
    return MovieLens(ml100k_zip)


@pytest.fixture(scope="module")
def jester_xlsx(data_dir):
    path = data_dir / "jester" / "jester-data-1-first4000users.xlsx"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="module")
def jester_table(jester_xlsx):
    # Reading the 4,000 x 100 spreadsheet takes seconds: read it once.
    return load_jester(jester_xlsx)


def _ratings_by_user(table: RatingsTable) -> dict[int, dict[int, float]]:
    out: dict[int, dict[int, float]] = {}
    for u, i, r in zip(table.users.tolist(), table.items.tolist(), table.ratings.tolist()):
        out.setdefault(u, {})[i] = r
    return out


def _decode(family: RatingsFamily, x, y, mask=None) -> dict[int, float]:
    """The {item id: rating} pairs of one task's rows (one-hot -> item id)."""
    x, y = np.asarray(x), np.asarray(y)[:, 0]
    if mask is None:
        mask = np.ones(len(x), bool)
    assert np.all(x[mask].sum(-1) == 1) and np.all(np.isin(x, (0.0, 1.0)))
    items = family.item_ids[x[mask].argmax(-1)]
    assert len(set(items.tolist())) == len(items), "an item appears twice in a task"
    return dict(zip(items.tolist(), y[mask].tolist()))


# -- fixtures: synthetic data in the official formats -------------------------------------


def _synthetic(seed=0, n_users=40, n_items=60, low=1, high=5, step=1.0):
    """A random ratings table: every user rates 25..n_items distinct items."""
    rng = np.random.default_rng(seed)
    users, items, ratings = [], [], []
    for u in range(1, n_users + 1):
        k = rng.integers(25, n_items + 1)
        chosen = rng.choice(np.arange(1, n_items + 1), k, replace=False)
        users += [u] * k
        items += chosen.tolist()
        ratings += (np.round(rng.uniform(low, high, k) / step) * step).tolist()
    return np.array(users), np.array(items), np.array(ratings)


def _movielens_lines(users, items, ratings, sep):
    return "".join(
        f"{u}{sep}{i}{sep}{int(r)}{sep}{874965758 + n}\n"
        for n, (u, i, r) in enumerate(zip(users, items, ratings))
    )


def _jester_matrix(seed=0, n_users=30):
    """`(n_users, 100)` Jester ratings, 99 = not rated, each user >= 36 ratings."""
    rng = np.random.default_rng(seed)
    values = np.round(rng.uniform(-10, 10, (n_users, 100)), 2)
    for row in values:
        row[rng.choice(100, rng.integers(0, 65), replace=False)] = 99
    return values


def _with_count(values):
    return np.column_stack([(values != 99).sum(1), values])


def _write_xlsx(path, matrix):
    pd.DataFrame(matrix).to_excel(path, header=False, index=False)


def _write_xls(path, matrix):
    xlwt = pytest.importorskip("xlwt")
    book = xlwt.Workbook()
    sheet = book.add_sheet("jester-data-1")
    for r, row in enumerate(matrix):
        for c, v in enumerate(row):
            sheet.write(r, c, float(v))
    book.save(str(path))


def _assert_same_table(table, values):
    rows, cols = np.nonzero(values != 99)
    np.testing.assert_array_equal(table.users, rows + 1)
    np.testing.assert_array_equal(table.items, cols + 1)
    np.testing.assert_allclose(table.ratings, values[rows, cols])


# -- MovieLens-100K, real -----------------------------------------------------------------


def test_ml100k_loads_from_the_official_zip(ml100k_table):
    t = ml100k_table
    assert len(t.ratings) == 100_000
    assert len(np.unique(t.users)) == 943 and len(np.unique(t.items)) == 1682
    assert set(np.unique(t.ratings).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    # The first line of u.data is `196 242 3 881250949`.
    assert (t.users[0], t.items[0], t.ratings[0]) == (196, 242, 3.0)
    assert t.source.endswith("ml-100k/u.data")


def test_ml100k_task_construction(ml100k, ml100k_table):
    family = ml100k
    counts = pd.Series(ml100k_table.items).value_counts()
    # The one-hot columns are the 100 most-rated movies, most rated first.
    assert len(family.item_ids) == 100 and family.input_shape == (100,)
    item_counts = counts[family.item_ids].to_numpy()
    assert np.all(np.diff(item_counts) <= 0)
    assert item_counts.min() >= counts.drop(family.item_ids).max()
    # 575 users have >= 20 ratings among them (the paper reports 489 tasks).
    assert len(family.user_ids) == 575
    assert family.user_counts.min() >= 20
    assert len(family.test_user_ids) == 100 and len(family.train_user_ids) == 475
    assert not set(family.test_user_ids) & set(family.train_user_ids)
    assert set(family.test_user_ids) | set(family.train_user_ids) == set(family.user_ids)
    # Only users with >= shots + queries = 25 ratings are drawn for training.
    by_user = dict(zip(family.user_ids, family.user_counts))
    assert all(by_user[u] >= 25 for u in family.sampled_user_ids)
    assert len(family.sampled_user_ids) == sum(by_user[u] >= 25 for u in family.train_user_ids)


def test_ml100k_training_tasks_are_real_users(ml100k, ml100k_table):
    family = ml100k
    data = _ratings_by_user(ml100k_table)
    batch = family.sample(jax.random.key(0), 8)
    assert isinstance(batch, Batch)
    assert batch.support_x.shape == (8, 10, 100) and batch.support_y.shape == (8, 10, 1)
    assert batch.query_x.shape == (8, 15, 100) and batch.query_y.shape == (8, 15, 1)
    owners = []
    for b in range(8):
        x = np.concatenate([batch.support_x[b], batch.query_x[b]])
        y = np.concatenate([batch.support_y[b], batch.query_y[b]])
        pairs = _decode(family, x, y)  # also: one-hot rows, 25 distinct movies
        assert set(pairs.values()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
        # The 25 (movie, rating) pairs are ratings of one meta-training user.
        users = [u for u in family.user_ids if pairs.items() <= data[u].items()]
        assert len(users) == 1 and users[0] in set(family.sampled_user_ids)
        owners.append(users[0])
    assert len(set(owners)) == 8, "a meta-batch holds distinct users"


def test_ml100k_sampling_is_a_pure_function_of_the_key(ml100k):
    a = ml100k.sample(jax.random.key(3), 5)
    b = ml100k.sample(jax.random.key(3), 5)
    c = ml100k.sample(jax.random.key(4), 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.support_x, c.support_x)
    jitted = jax.jit(ml100k.sample, static_argnums=(1, 2))(jax.random.key(3), 5)
    for x, y in zip(a, jitted):
        np.testing.assert_array_equal(x, y)


def test_ml100k_test_tasks(ml100k, ml100k_table):
    family = ml100k
    data = _ratings_by_user(ml100k_table)
    test = family.test_batch()
    assert isinstance(test, MaskedBatch)
    by_user = dict(zip(family.user_ids, family.user_counts))
    longest = max(by_user[u] for u in family.test_user_ids) - 10
    assert test.support_x.shape == (100, 10, 100)
    assert test.query_x.shape == (100, longest, 100) and test.query_mask.shape == (100, longest)
    mask = np.asarray(test.query_mask)
    for t, user in enumerate(family.test_user_ids):
        # Support = 10 ratings, query = all the others, padding after them.
        n = by_user[user]
        assert mask[t].sum() == n - 10 and mask[t, : n - 10].all()
        support = _decode(family, test.support_x[t], test.support_y[t])
        query = _decode(family, test.query_x[t], test.query_y[t], mask[t])
        assert not support.keys() & query.keys()
        top = {i: r for i, r in data[user].items() if i in set(family.item_ids.tolist())}
        assert {**support, **query} == top
        assert np.all(np.asarray(test.query_x[t])[~mask[t]] == 0)
        assert np.all(np.asarray(test.query_y[t])[~mask[t]] == 0)
    # Test batches are fixed, and sampled from the same fixed tasks.
    again = family.test_batch()
    for x, y in zip(test, again):
        np.testing.assert_array_equal(x, y)
    drawn = family.sample(jax.random.key(0), 7, split="test")
    assert isinstance(drawn, MaskedBatch) and drawn.query_mask.shape == (7, longest)
    rows = [np.flatnonzero((np.asarray(test.support_x) == np.asarray(s)).all((1, 2)))
            for s in drawn.support_x]
    assert all(len(r) == 1 for r in rows) and len({int(r[0]) for r in rows}) == 7
    # The masked nRMSE of a perfect prediction is 0 for every test user.
    np.testing.assert_allclose(nrmse(test.query_y, test.query_y, test.query_mask), 0.0)


def test_ml100k_other_settings(ml100k_table, ml100k):
    family = RatingsFamily(ml100k_table, shots=20, queries=30)
    by_user = dict(zip(family.user_ids, family.user_counts))
    assert all(by_user[u] >= 50 for u in family.sampled_user_ids)
    # Every test user keeps a non-empty query: more than 20 ratings.
    assert all(by_user[u] > 20 for u in family.test_user_ids)
    assert np.all(np.asarray(family.test_batch().query_mask).sum(1) >= 1)
    # The same seed holds out mostly the same users across settings.
    assert len(set(family.test_user_ids) & set(ml100k.test_user_ids)) >= 90
    batch = family.sample(jax.random.key(0), 5)
    assert batch.support_x.shape == (5, 20, 100) and batch.query_x.shape == (5, 30, 100)
    other_seed = RatingsFamily(ml100k_table, seed=1)
    assert set(other_seed.test_user_ids) != set(ml100k.test_user_ids)


def test_ml100k_from_a_folder_holding_the_zip(ml100k_zip, ml100k):
    family = MovieLens(ml100k_zip.parent, variant="100k")
    np.testing.assert_array_equal(family.test_user_ids, ml100k.test_user_ids)


def test_ml100k_limits(ml100k_table, ml100k):
    most = int(max(c for u, c in zip(ml100k.user_ids, ml100k.user_counts)
                   if u in set(ml100k.train_user_ids)))
    with pytest.raises(InputError, match=f"maximum is shots \\+ queries = {most}"):
        RatingsFamily(ml100k_table, shots=10, queries=most)
    with pytest.raises(InputError, match="meta_batch <= "):
        ml100k.sample(jax.random.key(0), 10_000)
    with pytest.raises(InputError, match="meta_batch <= 100"):
        ml100k.sample(jax.random.key(0), 101, split="test")
    with pytest.raises(InputError, match="top_items <= 1682"):
        RatingsFamily(ml100k_table, top_items=2000)
    with pytest.raises(InputError, match="split"):
        ml100k.sample(jax.random.key(0), 5, split="val")
    with pytest.raises(InputError, match="variant"):
        MovieLens("unused", variant="10m")


# -- MovieLens layouts on fixtures ---------------------------------------------------------


def test_ml100k_layouts(tmp_path):
    users, items, ratings = _synthetic()
    text = _movielens_lines(users, items, ratings, "\t")
    (tmp_path / "extracted" / "ml-100k").mkdir(parents=True)
    (tmp_path / "extracted" / "ml-100k" / "u.data").write_text(text)
    with zipfile.ZipFile(tmp_path / "ml-100k.zip", "w") as archive:
        archive.writestr("ml-100k/u.data", text)
    for path in [
        tmp_path / "extracted",
        tmp_path / "extracted" / "ml-100k",
        tmp_path / "extracted" / "ml-100k" / "u.data",
        tmp_path / "ml-100k.zip",
        tmp_path,  # the folder that holds ml-100k.zip
    ]:
        table = load_movielens(path)
        np.testing.assert_array_equal(table.users, users)
        np.testing.assert_array_equal(table.items, items)
        np.testing.assert_array_equal(table.ratings, ratings)


def test_ml1m_format(tmp_path):
    users, items, ratings = _synthetic(seed=1, n_users=50)
    text = _movielens_lines(users, items, ratings, "::")
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "ratings.dat").write_text(text)
    with zipfile.ZipFile(tmp_path / "ml-1m.zip", "w") as archive:
        archive.writestr("ml-1m/ratings.dat", text)
    for path in [tmp_path, tmp_path / "ml-1m.zip"]:
        table = load_movielens(path, variant="1m")
        np.testing.assert_array_equal(table.users, users)
        np.testing.assert_array_equal(table.ratings, ratings)
    family = MovieLens(tmp_path, variant="1m", top_items=30, min_ratings=10, num_test_users=5,
                       shots=5, queries=5)
    assert family.input_shape == (30,)
    assert len(family.test_user_ids) == 5
    assert family.sample(jax.random.key(0), 4).query_x.shape == (4, 5, 30)
    # The ML-100K reader does not take the 1M file.
    with pytest.raises(DataError, match="u.data"):
        load_movielens(tmp_path / "ml-1m", variant="100k")


def test_crlf_and_blank_lines_are_tolerated(tmp_path):
    path = tmp_path / "u.data"
    path.write_bytes(b"1\t2\t3\t4\r\n\r\n2\t2\t5\t4\r\n")
    table = load_movielens(path)
    np.testing.assert_array_equal(table.ratings, [3.0, 5.0])


# -- malformed MovieLens -------------------------------------------------------------------


def test_missing_movielens_says_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match="grouplens.org") as err:
        load_movielens(tmp_path / "nowhere")
    assert "does not exist" in str(err.value)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "ml-100k" / "u.data"))):
        MovieLens(tmp_path)
    with zipfile.ZipFile(tmp_path / "ml-100k.zip", "w") as archive:
        archive.writestr("ml-100k/u.item", "1|Toy Story\n")
    with pytest.raises(DataError, match="holds no ml-100k/u.data"):
        load_movielens(tmp_path / "ml-100k.zip")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("7\t8\t3", "line 3: expected `user<TAB>item<TAB>rating<TAB>timestamp`"),
        ("7\t8\tthree\t99", "line 3: expected"),
        ("7 8 3 99", "line 3: expected"),
        ("7\t8\t3.5\t99", "line 3: expected"),
        ("7\t8\t-3\t99", "line 3: expected"),
        ("7\t8\t6\t99", "line 3: rating 6 is outside 1..5"),
        ("7\t8\t0\t99", "line 3: rating 0 is outside 1..5"),
        ("1\t2\t4\t99", "line 3: user 1 rates item 2 a second time \\(first on line 1\\)"),
        ("7\t8\t3\t" + "9" * 40, "line 3: expected"),
    ],
)
def test_malformed_u_data(tmp_path, bad_line, message):
    path = tmp_path / "u.data"
    path.write_text(f"1\t2\t3\t4\n5\t6\t1\t4\n{bad_line}\n9\t9\t1\t1\n")
    with pytest.raises(DataError, match=message) as err:
        load_movielens(path)
    assert str(path) in str(err.value)


def test_empty_and_binary_files(tmp_path):
    (tmp_path / "u.data").write_text("\n\n")
    with pytest.raises(DataError, match="holds no ratings"):
        load_movielens(tmp_path / "u.data")
    (tmp_path / "ml-100k.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError):
        load_movielens(tmp_path / "ml-100k.zip")


_VALID = [f"{u}\t{100 + u}\t{1 + u % 5}\t88125094{u % 10}" for u in range(1, 21)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=40), where=st.integers(0, len(_VALID)))
def test_garbage_line_is_a_data_error(tmp_path, garbage, where):
    line = garbage.decode("latin-1")
    assume("\n" not in line)
    stripped = line.strip()
    # The oracle: a non-blank line that is not four ASCII integers is garbage.
    assume(stripped and not re.fullmatch(r"[0-9]+\t[0-9]+\t[0-9]+\t[0-9]+", stripped))
    lines = _VALID[:where] + [line] + _VALID[where:]
    path = tmp_path / "u.data"
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=f"line {where + 1}:"):
        load_movielens(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(["1", "2", "5", "0", "9" * 20, "\t", "::", " ", "\n", "\r", "x", "-"]),
             max_size=60).map(lambda parts: "".join(parts).encode()),
))
def test_any_content_loads_or_raises_data_error(tmp_path, content):
    path = tmp_path / "u.data"
    path.write_bytes(content)
    try:
        table = load_movielens(path)
    except DataError:
        return
    assert len(table.ratings) > 0
    assert np.all((table.ratings >= 1) & (table.ratings <= 5))


# -- Jester, real .xlsx (no count column) ---------------------------------------------------


def test_jester_xlsx_real(jester_table, jester_xlsx):
    t = jester_table
    assert len(np.unique(t.users)) == 4000 and t.users.max() == 4000
    assert set(np.unique(t.items).tolist()) == set(range(1, 101))
    # The data README says 283,023, but the file holds 285,709 cells != 99
    # (openpyxl agrees; its trailing empty row is not a user).
    assert len(t.ratings) == 285_709
    assert np.all((t.ratings >= -10) & (t.ratings <= 10))
    # No count column: the first value of user 1 is joke 1's rating -7.82.
    assert (t.users[0], t.items[0], t.ratings[0]) == (1, 1, -7.82)
    # Every Jester-1 user rated at least 36 jokes (Goldberg et al.).
    assert np.bincount(t.users)[1:].min() >= 36


def test_jester_family_real(jester_table, jester_xlsx):
    family = RatingsFamily(jester_table)
    assert len(family.user_ids) == 4000  # all users have >= 36 >= 20 ratings
    assert len(family.test_user_ids) == 100 and len(family.train_user_ids) == 3900
    assert not set(family.test_user_ids) & set(family.train_user_ids)
    assert sorted(family.item_ids.tolist()) == list(range(1, 101))
    batch = family.sample(jax.random.key(0), 5)
    assert batch.support_x.shape == (5, 10, 100) and batch.query_y.shape == (5, 15, 1)
    y = np.concatenate([batch.support_y, batch.query_y], axis=1)
    assert np.all(np.abs(y) <= 10)
    test = family.test_batch()
    assert test.support_x.shape[:2] == (100, 10)
    assert np.all(np.asarray(test.query_mask).sum(1) >= 26)  # >= 36 - 10


def test_jester_real_20shot_30val(jester_table):
    family = RatingsFamily(jester_table, shots=20, queries=30)
    counts = dict(zip(family.user_ids, family.user_counts))
    assert all(counts[u] >= 50 for u in family.sampled_user_ids)
    assert family.sample(jax.random.key(0), 3).query_x.shape == (3, 30, 100)


def test_jester_found_in_its_folder(tmp_path):
    # Like ../shared/data/jester: one file named jester-data-1*.xlsx.
    values = _jester_matrix(seed=4)
    _write_xlsx(tmp_path / "jester-data-1-first30users.xlsx", values)
    _assert_same_table(load_jester(tmp_path), values)
    _write_xlsx(tmp_path / "jester-data-1-copy.xlsx", values)
    with pytest.raises(DataError, match="several Jester-1 files"):
        load_jester(tmp_path)


# -- Jester fixtures: .xls, .xlsx, .csv, with and without the count column ----------------------


def test_jester_count_column_detection_xlsx(tmp_path):
    values = _jester_matrix()
    _write_xlsx(tmp_path / "with.xlsx", _with_count(values))
    _write_xlsx(tmp_path / "without.xlsx", values)
    _assert_same_table(load_jester(tmp_path / "with.xlsx"), values)
    _assert_same_table(load_jester(tmp_path / "without.xlsx"), values)


def test_jester_official_xls(tmp_path):
    values = _jester_matrix(seed=2)
    _write_xls(tmp_path / "jester-data-1.xls", _with_count(values))
    _assert_same_table(load_jester(tmp_path / "jester-data-1.xls"), values)
    # From the folder, by its official name; then as a task family.
    family = Jester(tmp_path, num_test_users=5, shots=5, queries=10)
    assert len(family.user_ids) == 30 and len(family.test_user_ids) == 5
    assert family.sample(jax.random.key(0), 4).support_x.shape == (4, 5, 100)


def test_jester_csv(tmp_path):
    values = _jester_matrix(seed=3)
    np.savetxt(tmp_path / "a.csv", _with_count(values), delimiter=",", fmt="%g")
    np.savetxt(tmp_path / "b.csv", values, delimiter=",", fmt="%g")
    _assert_same_table(load_jester(tmp_path / "a.csv"), values)
    _assert_same_table(load_jester(tmp_path / "b.csv"), values)


# -- malformed Jester ----------------------------------------------------------------------------


def test_jester_missing_says_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match="goldberg.berkeley.edu/jester-data"):
        load_jester(tmp_path / "jester-data-1.xls")
    with pytest.raises(DataError, match="jester-data-1.xls"):
        Jester(tmp_path)
    (tmp_path / "jester-data-1.txt").write_text("1,2,3")
    with pytest.raises(DataError, match="unknown Jester file type"):
        load_jester(tmp_path / "jester-data-1.txt")


def test_jester_wrong_count_column(tmp_path):
    matrix = _with_count(_jester_matrix())
    matrix[4, 0] += 1
    _write_xlsx(tmp_path / "j.xlsx", matrix)
    with pytest.raises(DataError, match="column 1 is not the number of rated jokes: row 5"):
        load_jester(tmp_path / "j.xlsx")


def test_jester_wrong_number_of_columns(tmp_path):
    _write_xlsx(tmp_path / "j.xlsx", _jester_matrix()[:, :99])
    with pytest.raises(DataError, match="99 columns; expected 101") as err:
        load_jester(tmp_path / "j.xlsx")
    assert "j.xlsx" in str(err.value)


def test_jester_out_of_range(tmp_path):
    values = _jester_matrix()
    values[2, 6] = 10.5
    np.savetxt(tmp_path / "j.csv", _with_count(values), delimiter=",", fmt="%g")
    with pytest.raises(DataError, match=r"row 3, column 8: rating 10.5 is outside \[-10, 10\]"):
        load_jester(tmp_path / "j.csv")


def test_jester_non_numeric_and_empty(tmp_path):
    frame = pd.DataFrame(_jester_matrix()).astype(object)
    frame.iat[3, 10] = "funny"
    frame.to_excel(tmp_path / "j.xlsx", header=False, index=False)
    with pytest.raises(DataError, match="row 4, column 11: 'funny' is not a number"):
        load_jester(tmp_path / "j.xlsx")
    lines = [",".join(f"{v:g}" for v in row) for row in _jester_matrix()]
    lines[1] = lines[1].replace(",", ",,", 1).rsplit(",", 1)[0]  # an empty cell, 100 columns
    (tmp_path / "j.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="row 2, column 2: an empty cell"):
        load_jester(tmp_path / "j.csv")


def test_jester_corrupt_file(tmp_path):
    (tmp_path / "jester-data-1.xlsx").write_bytes(b"this is not a spreadsheet")
    with pytest.raises(DataError, match="could not read .*jester-data-1.xlsx"):
        load_jester(tmp_path)
    (tmp_path / "jester-data-1.xls").write_bytes(b"\xd0\xcf\x11\xe0 corrupt")
    with pytest.raises(DataError, match="could not read"):
        load_jester(tmp_path / "jester-data-1.xls")


def test_jester_shots_too_large(tmp_path):
    values = _jester_matrix()
    _write_xlsx(tmp_path / "j.xlsx", values)
    most = int((values != 99).sum(1).max())
    with pytest.raises(InputError, match="maximum is shots \\+ queries = "):
        Jester(tmp_path / "j.xlsx", num_test_users=5, shots=10, queries=most)
    with pytest.raises(InputError, match="leaves no meta-training users.*num_test_users <= 29"):
        Jester(tmp_path / "j.xlsx", num_test_users=30)
    # Test users need more than `shots` ratings, to have a query.
    counts = (values != 99).sum(1)
    shots = int(np.sort(counts)[-3])  # only two users have more ratings than this
    assert (counts > shots).sum() < 5
    with pytest.raises(InputError, match="fewer than num_test_users=5"):
        Jester(tmp_path / "j.xlsx", num_test_users=5, shots=shots, queries=1)


@pytest.mark.parametrize("kwargs", [{"shots": 0}, {"queries": 1.5}, {"min_ratings": -1},
                                    {"num_test_users": 0}, {"seed": -2}, {"top_items": True}])
def test_bad_arguments(kwargs):
    users, items, ratings = _synthetic()
    with pytest.raises(InputError):
        RatingsFamily(RatingsTable(users, items, ratings, "synthetic"), **kwargs)


# -- the other scales of the ratings tables, and the predictors that learn no user ------------


def test_rmse_and_relative_squared_error_against_closed_forms():
    from ctmeta.tasks.metrics import RelativeSquaredError, rmse

    y = np.array([[[1.0], [3.0], [5.0], [2.0]]])
    pred = np.array([[[2.0], [3.0], [3.0], [9.0]]])
    mask = np.array([[True, True, True, False]])  # the last row is padding
    np.testing.assert_allclose(rmse(pred, y, mask), [np.sqrt((1 + 0 + 4) / 3)], rtol=1e-12)
    rse = RelativeSquaredError(3.0)
    np.testing.assert_allclose(rse(pred, y, mask), [(1 + 0 + 4) / (4 + 0 + 4)], rtol=1e-12)
    np.testing.assert_allclose(rse(np.full_like(y, 3.0), y, mask), [1.0])  # predicting m scores 1
    with pytest.raises(InputError, match="same shape"):
        rmse(pred[:, :3], y)


def test_trivial_predictions_are_item_means_of_the_training_users():
    users, items, ratings = _synthetic()
    family = RatingsFamily(RatingsTable(users, items, ratings, "synthetic"), shots=5, queries=5, top_items=30,
                           min_ratings=15, num_test_users=10)
    means = family.item_means()
    # By hand, from the meta-training users' own ratings of the kept items.
    sampled = np.isin(users, family.sampled_user_ids)
    for rank in (0, 7, 29):
        item = family.item_ids[rank]
        rated = ratings[sampled & (items == item)]
        np.testing.assert_allclose(means[rank], rated.mean() if rated.size else family.mean_rating(), rtol=1e-12)
    test = family.test_batch()
    preds = family.trivial_predictions()
    q = np.asarray(test.query_x).argmax(-1)
    np.testing.assert_allclose(preds["item mean"][..., 0], means[q])
    offset = (np.asarray(test.support_y)[..., 0] - means[np.asarray(test.support_x).argmax(-1)]).mean(1)
    np.testing.assert_allclose(preds["item mean + user offset"][..., 0], means[q] + offset[:, None])
