"""Property tests: malformed inputs end in ctmeta's own errors, never another exception.

- Loaders and samplers fed random bytes (u.data, a Jester csv, zip members,
  a whole "zip"), and random shots / queries / meta-batch / split values,
  either work or raise a `CtmetaError` subclass.
- The CLI fed an invalid value for one flag exits 2 with one line on stderr
  naming the flag, before any JAX work.

Every input tried is tallied (`TALLY`); the summary is printed at the end of
the module (run with `-s` to see it) and written to `$CTMETA_FUZZ_REPORT` if set.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctmeta._errors import CtmetaError
from ctmeta.cli import main

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# (test, outcome) -> count; outcome is "exit 2", "DataError", "accepted", ...
TALLY: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    total = sum(TALLY.values())
    lines = [f"fuzz: {total} inputs tried"]
    by_test = collections.defaultdict(dict)
    for (test, outcome), n in sorted(TALLY.items()):
        by_test[test][outcome] = n
    for test, outcomes in by_test.items():
        lines.append(f"  {test}: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
    print("\n" + "\n".join(lines))
    path = os.environ.get("CTMETA_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"total": total, "by_test": by_test}, f, indent=2)


def _run(test: str, fn, *args, **kwargs):
    """Call fn; tally the outcome; fail on anything but success or a CtmetaError."""
    try:
        result = fn(*args, **kwargs)
    except CtmetaError as err:
        assert str(err).strip(), "an error without a message"
        TALLY[(test, type(err).__name__)] += 1
        return err
    except Exception as err:  # noqa: BLE001
        TALLY[(test, f"UNEXPECTED {type(err).__name__}")] += 1
        raise AssertionError(f"{test}: {type(err).__name__}: {err}") from err
    TALLY[(test, "accepted")] += 1
    return result


# ------------------------------------------------------------------ loaders

LINE = st.one_of(
    st.binary(max_size=60),
    st.lists(st.one_of(st.integers(-5, 2000).map(str), st.text(max_size=4), st.just("nan"), st.just("")),
             min_size=1, max_size=6).map(lambda fields: "\t".join(fields).encode("utf-8", "replace")),
)
FILE_BYTES = st.one_of(st.binary(max_size=400), st.lists(LINE, max_size=30).map(b"\n".join))


@SETTINGS
@given(data=FILE_BYTES)
def test_movielens_u_data_random_bytes(tmp_path_factory, data):
    from ctmeta.tasks.ratings import RatingsFamily, load_movielens

    d = tmp_path_factory.mktemp("ml")
    (d / "u.data").write_bytes(data)
    table = _run("movielens u.data", load_movielens, d, "100k")
    if not isinstance(table, Exception):
        _run("movielens family on fuzzed table", RatingsFamily, table, shots=2, queries=2,
             top_items=3, min_ratings=1, num_test_users=1)


CSV_CELL = st.one_of(st.integers(-20, 120).map(str), st.floats(allow_nan=True).map(repr), st.text(max_size=3))
CSV = st.one_of(
    st.binary(max_size=300),
    st.lists(st.lists(CSV_CELL, min_size=1, max_size=8).map(",".join), max_size=12)
    .map(lambda rows: "\n".join(rows).encode("utf-8", "replace")),
)


@SETTINGS
@given(data=CSV)
def test_jester_csv_random_content(tmp_path_factory, data):
    from ctmeta.tasks.ratings import RatingsFamily, load_jester

    d = tmp_path_factory.mktemp("jester")
    (d / "jester-data-1.csv").write_bytes(data)
    table = _run("jester csv", load_jester, d)
    if not isinstance(table, Exception):
        _run("jester family on fuzzed table", RatingsFamily, table, shots=2, queries=2,
             top_items=3, min_ratings=1, num_test_users=1)


MEMBER_NAME = st.one_of(
    st.text(min_size=1, max_size=20),
    st.sampled_from(["../evil.png", "/abs/evil.png", "a/../../evil", "C:evil", "ml-100k/u.data",
                     "ml-100k/../../u.data", "u.data", "a\\..\\b", "x\x00y", "__MACOSX/._u.data"]),
)


def _zip_bytes(members) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as z:
        warnings.simplefilter("ignore")  # duplicate names are part of the fuzz
        for name, payload in members:
            try:
                z.writestr(name, payload)
            except (ValueError, UnicodeEncodeError):
                pass  # zipfile itself refuses a few names (NUL...); leave them out
    return buf.getvalue()


ZIPS = st.one_of(
    st.binary(max_size=300),  # not a zip at all
    st.lists(st.tuples(MEMBER_NAME, FILE_BYTES), max_size=5).map(_zip_bytes),
    # a valid zip, truncated or with a flipped byte
    st.tuples(st.lists(st.tuples(MEMBER_NAME, FILE_BYTES), min_size=1, max_size=3).map(_zip_bytes),
              st.floats(0, 1), st.booleans()).map(
        lambda t: t[0][: int(len(t[0]) * t[1])] if t[2] else
        t[0][: int(len(t[0]) * t[1])] + bytes([t[0][int(len(t[0]) * t[1]) % len(t[0])] ^ 0xFF])
        + t[0][int(len(t[0]) * t[1]) + 1:]),
)


@SETTINGS
@given(data=ZIPS)
def test_zip_archives_random_members(tmp_path_factory, data):
    from ctmeta.tasks._archive import ZipTree
    from ctmeta.tasks.ratings import load_movielens

    d = tmp_path_factory.mktemp("zip")
    path = d / "ml-100k.zip"
    path.write_bytes(data)

    def read_all():
        tree = ZipTree(path)
        try:
            for name in tree.files():
                tree.read(name)
        finally:
            tree.close()

    # A zip whose member name is not UTF-8 although its header says so once
    # escaped as UnicodeDecodeError (test_zip_member_name_not_utf8_is_a_data_error).
    _run("zip tree (list + read every member)", read_all)
    _run("movielens from fuzzed zip", load_movielens, path, "100k")


# The central directory of a zip with one member whose name is the bytes
# b"\x80" while flag bit 11 (UTF-8 names) is set: found by the test above.
NON_UTF8_NAME_ZIP = (
    b"PK\x01\x02\x00\x00\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x80PK\x05\x06\x00\x00\x00\x00\x00\x00\x00\x003\x00\x00\x00\x00\x00\x00\x00"
    b"\x00\x00"
)


@pytest.mark.parametrize("reader", ["ZipTree", "load_movielens"])
def test_zip_member_name_not_utf8_is_a_data_error(tmp_path, reader):
    from ctmeta._errors import DataError
    from ctmeta.tasks._archive import ZipTree
    from ctmeta.tasks.ratings import load_movielens

    path = tmp_path / "ml-100k.zip"
    path.write_bytes(NON_UTF8_NAME_ZIP)
    with pytest.raises(DataError):
        ZipTree(path).files() if reader == "ZipTree" else load_movielens(path, "100k")


# ------------------------------------------------------------------ samplers

NOT_POSITIVE_INT = st.one_of(
    st.integers(max_value=0), st.floats(allow_nan=True), st.text(max_size=5), st.none(), st.booleans(),
    st.just([3]),
)


@SETTINGS
@given(shots=st.one_of(NOT_POSITIVE_INT, st.integers(1, 60)), queries=st.one_of(NOT_POSITIVE_INT, st.integers(1, 60)))
def test_regression_family_random_sizes(shots, queries):
    from ctmeta.tasks.regression import CosMixture

    _run("cosmixture(shots, queries)", CosMixture, shots=shots, queries=queries)


@pytest.fixture(scope="module")
def families():
    from ctmeta.tasks.ratings import RatingsTable
    from ctmeta.tasks.ratings import RatingsFamily
    from ctmeta.tasks.regression import CosMixture

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(40), 30)
    items = np.concatenate([rng.choice(60, 30, replace=False) for _ in range(40)])
    table = RatingsTable(users, items, rng.integers(1, 6, users.size).astype(float), "synthetic")
    ratings = RatingsFamily(table, shots=5, queries=5, top_items=20, min_ratings=5, num_test_users=10)
    return {"cosmixture": CosMixture(shots=5, queries=5), "ratings": ratings}


@SETTINGS
@given(
    which=st.sampled_from(["cosmixture", "ratings"]),
    meta_batch=st.one_of(NOT_POSITIVE_INT, st.integers(1, 10**7)),
    split=st.one_of(st.sampled_from(["train", "test", "val", "TRAIN", ""]), st.text(max_size=5), st.integers()),
)
def test_samplers_random_arguments(families, which, meta_batch, split):
    import jax

    _run(f"{which}.sample(meta_batch, split)", families[which].sample, jax.random.PRNGKey(0), meta_batch, split)


@SETTINGS
@given(shots=st.one_of(NOT_POSITIVE_INT, st.integers(1, 400)), queries=st.one_of(NOT_POSITIVE_INT, st.integers(1, 400)),
       top_items=st.one_of(NOT_POSITIVE_INT, st.integers(1, 500)))
def test_ratings_family_random_sizes(shots, queries, top_items):
    from ctmeta.tasks.ratings import RatingsFamily, RatingsTable

    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(30), 20)
    items = np.concatenate([rng.choice(50, 20, replace=False) for _ in range(30)])
    table = RatingsTable(users, items, rng.integers(1, 6, users.size).astype(float), "synthetic")
    _run("ratings family(shots, queries, top_items)", RatingsFamily, table, shots=shots, queries=queries,
         top_items=top_items, min_ratings=1, num_test_users=5)


# ------------------------------------------------------------------ CLI flags


def _parses(s: str, kind) -> bool:
    try:
        kind(s)
        return True
    except (ValueError, OverflowError):
        return False


def _bad_int(limit: int, minimum: int = 1):
    return st.one_of(
        st.text(max_size=8).filter(lambda s: not _parses(s, int)),
        st.integers(max_value=minimum - 1).map(str),
        st.integers(min_value=limit + 1, max_value=10**40).map(str),
        st.floats(allow_nan=True).map(repr),
    )


BAD = {
    "--T": st.one_of(
        st.text(max_size=8).filter(lambda s: not _parses(s, float)),
        st.floats(max_value=0.0).map(repr),
        st.sampled_from(["nan", "inf", "-inf", "1e7", "1e308", "-0.0", "0"]),
        st.floats(min_value=1e6, exclude_min=True, allow_infinity=True).map(repr),
    ),
    "--steps": _bad_int(10**6),
    "--meta-batch": _bad_int(10**5),
    "--meta-iterations": _bad_int(10**9),
    "--checkpoint-every": _bad_int(10**9),
    "--seed": _bad_int(2**32 - 1, minimum=0),
    "--shots": _bad_int(10**5),
    # --ways on a regression benchmark is wrong whatever its value.
    "--ways": st.one_of(_bad_int(10**4), st.integers(2, 100).map(str)),
    "--benchmark": st.text(max_size=10).filter(lambda s: s not in ("cosmixture", "alpine", "movielens", "movielens-1m",
                                                                  "jester", "omniglot", "miniimagenet")),
    "--method": st.text(max_size=10).filter(lambda s: s not in ("amaml", "maml", "fomaml", "reptile", "imaml",
                                                               "anil", "comln")),
    "--on-nonfinite": st.text(max_size=10).filter(lambda s: s not in ("error", "skip-task")),
}


@pytest.mark.parametrize("flag", sorted(BAD))
@SETTINGS
@given(data=st.data())
def test_cli_invalid_flag_values_exit_2_with_one_line(flag, data, capsys, tmp_path):
    value = data.draw(BAD[flag], label=flag)
    argv = ["train", f"{flag}={value}", "--out", str(tmp_path / "never"), "--quiet"]
    code = main(argv)
    err = capsys.readouterr().err
    TALLY[(f"cli {flag}", f"exit {code}")] += 1
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], (argv, err)
    assert "Traceback" not in err
    assert not (tmp_path / "never").exists()  # refused before creating anything


@SETTINGS
@given(benchmark=st.sampled_from(["movielens", "jester", "omniglot", "miniimagenet"]),
       where=st.sampled_from(["missing", "file", "empty-dir"]))
def test_cli_missing_or_wrong_data_dir(benchmark, where, capsys, tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    path = {"missing": d / "nope", "file": d / "a-file", "empty-dir": d}[where]
    if where == "file":
        path.write_bytes(b"not a dataset")
    argv = ["train", "--benchmark", benchmark, "--data-dir", str(path), "--out", str(d / "run"),
            "--meta-iterations", "1", "--quiet"]
    code = main(argv)
    err = capsys.readouterr().err
    TALLY[(f"cli --data-dir ({benchmark})", f"exit {code}")] += 1
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("ctmeta: error:") and str(path.name) in lines[-1], err
    assert "Traceback" not in err
