"""Where ctmeta looks for its data sets.

One meaning of a data directory everywhere: the *root* folder that holds one
folder per data set (`omniglot/`, `miniimagenet/`, `movielens/`, `jester/`).
"""

from __future__ import annotations

import os
import pathlib

__all__ = ["data_root", "dataset_dir"]


def data_root(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The data root: `data_dir` if given, else `$CTMETA_DATA`, else `./data`."""
    if data_dir is not None:
        return pathlib.Path(data_dir).expanduser()
    env = os.environ.get("CTMETA_DATA")
    return pathlib.Path(env).expanduser() if env else pathlib.Path("data")


def dataset_dir(subdir: str, data_dir: str | os.PathLike | None = None, *, for_writing: bool = False) -> pathlib.Path:
    """The folder of one data set, `subdir` (e.g. `"omniglot"`), under the
    [`data_root`][ctmeta._paths.data_root] `data_dir`.

    `data_dir` is a root; a data set's own folder is accepted as well, so that
    `data/omniglot` and `data` mean the same for Omniglot: a `data_dir` named
    `subdir` is that folder, and so is an existing `data_dir` without a
    `subdir` inside (its files are the data set's). With `for_writing` (a
    download's target) only the name decides, since the folder may not exist yet.
    """
    root = data_root(data_dir)
    if data_dir is None:
        return root / subdir
    if root.name == subdir:
        return root
    if not for_writing and not (root / subdir).exists() and root.exists():
        return root
    return root / subdir
