"""The helpers shared by the commands: the exit-status map, the data root, the run record."""

import errno
import pathlib

from ctmeta._errors import DataError, InputError, NumericalError, exit_code
from ctmeta._paths import data_root, dataset_dir
from ctmeta._record import RUN_RECORD_KEYS, run_record
from ctmeta.tasks.download import DownloadError


def test_exit_code_is_one_map_for_every_command():
    assert exit_code(InputError("x")) == exit_code(DataError("x")) == 2
    assert exit_code(NumericalError("x")) == exit_code(DownloadError("x")) == 1
    assert exit_code(OSError(errno.EACCES, "denied")) == 2 and exit_code(OSError(errno.ENOENT, "no")) == 1
    assert exit_code(KeyboardInterrupt()) == 130 and exit_code(RuntimeError("bug")) == 1
    err = KeyboardInterrupt()
    err.signum = 15
    assert exit_code(err) == 143


def test_data_root_is_the_flag_else_the_environment_else_data(monkeypatch, tmp_path):
    monkeypatch.delenv("CTMETA_DATA", raising=False)
    assert data_root() == pathlib.Path("data")
    monkeypatch.setenv("CTMETA_DATA", str(tmp_path))
    assert data_root() == tmp_path and dataset_dir("omniglot") == tmp_path / "omniglot"
    assert data_root(tmp_path / "x") == tmp_path / "x"


def test_run_record_holds_the_record_keys():
    record = run_record("family", ["train", "--quiet"])
    assert set(record) <= set(RUN_RECORD_KEYS) and record["argv"] == ["train", "--quiet"]
    assert record["dtype"] in ("float32", "float64") and "jax" in record["versions"]


def test_data_dir_means_the_root_for_every_command_and_takes_a_data_sets_own_folder(tmp_path):
    from ctmeta import presets

    root = tmp_path / "data"
    (root / "omniglot").mkdir(parents=True)
    (root / "jester").mkdir()
    assert dataset_dir("omniglot", root) == root / "omniglot"  # the root ...
    assert dataset_dir("omniglot", root / "omniglot") == root / "omniglot"  # ... or the data set's folder
    own = tmp_path / "my-omniglot-copy"  # an existing folder without omniglot/ inside holds the files itself
    own.mkdir()
    assert dataset_dir("omniglot", own) == own
    # A download's target may not exist yet: only the name decides.
    assert dataset_dir("movielens", tmp_path / "new", for_writing=True) == tmp_path / "new" / "movielens"
    assert dataset_dir("movielens", tmp_path / "movielens", for_writing=True) == tmp_path / "movielens"
    # train (through the presets) resolves --data-dir the same way as reproduce and bench.
    for given in (root, root / "omniglot"):
        config = presets.resolve_config("omniglot", "maml", data_dir=str(given))
        assert config["data_dir"] == str((root / "omniglot").resolve())
    assert presets.resolve_config("jester", "maml", data_dir=str(root))["data_dir"] == str((root / "jester").resolve())
