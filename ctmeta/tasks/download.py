"""Fetch a benchmark's official files into a data directory, only when asked.

Nothing in ctmeta touches the network by itself: `ctmeta train --download`
and `ctmeta download BENCHMARK` call [`download`][], which fetches the files
the loaders read, from their official addresses, into the folder the
loaders look in:

| benchmark | files | from |
| --- | --- | --- |
| `movielens` | `ml-100k.zip` | GroupLens |
| `movielens-1m` | `ml-1m.zip` | GroupLens |
| `jester` | `jester-data-1.xls` (from `jester_dataset_1_1.zip`) | Berkeley (Eigentaste) |
| `omniglot` | `images_background.zip`, `images_evaluation.zip` | github.com/brendenlake/omniglot |
| `miniimagenet` | none: derived from ImageNet, whose terms forbid redistribution | |

A file already present is left alone. Each download goes to a temporary file
that becomes the final one (atomic rename) only once it is a readable zip
whose members all pass their CRC check, so an interrupted or corrupted
download never leaves a file a loader would take for data. Archives are
never extracted wholesale: the loaders read zips directly, and for Jester
the one spreadsheet is copied out under a fixed name (no member name from
the archive becomes a path, so no zip-slip). The datasets' licences apply
(MovieLens and Jester: research use, cite the authors; no redistribution).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
import zipfile
from typing import Callable

from .._errors import DataError, DownloadError
from .._io import fsync_dir

__all__ = ["Source", "SOURCES", "DownloadError", "download"]


@dataclasses.dataclass(frozen=True)
class Source:
    """One file to fetch.

    - `url`: the official address.
    - `filename`: the name it is saved under in the data directory.
    - `member`: if set, the archive at `url` is kept only to copy this one
      member (matched by its base name) out as `filename`.
    """

    url: str
    filename: str
    member: str | None = None


_GROUPLENS = "https://files.grouplens.org/datasets/movielens"
_OMNIGLOT = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"

#: What each benchmark needs, by benchmark name (`None`: cannot be downloaded).
SOURCES: dict[str, tuple[Source, ...] | None] = {
    "movielens": (Source(f"{_GROUPLENS}/ml-100k.zip", "ml-100k.zip"),),
    "movielens-1m": (Source(f"{_GROUPLENS}/ml-1m.zip", "ml-1m.zip"),),
    "jester": (
        Source("https://eigentaste.berkeley.edu/dataset/jester_dataset_1_1.zip", "jester-data-1.xls",
               member="jester-data-1.xls"),
    ),
    "omniglot": (
        Source(f"{_OMNIGLOT}/images_background.zip", "images_background.zip"),
        Source(f"{_OMNIGLOT}/images_evaluation.zip", "images_evaluation.zip"),
    ),
    "miniimagenet": None,
}

_MINIIMAGENET = (
    "miniImageNet cannot be downloaded by ctmeta: its images come from ImageNet, whose terms forbid "
    "redistribution. Build it from ImageNet with the Ravi & Larochelle split (train.csv, val.csv, "
    "test.csv from https://github.com/twitter/meta-learning-lstm, data/miniImagenet/) into "
    "DIR/images/<file>.jpg or DIR/images/<wnid>/<file>.jpg beside the three CSVs, then pass `data_dir` DIR"
)

_CHUNK = 1 << 20


def _check_zip(path: pathlib.Path, url: str) -> None:
    """Refuse anything but a complete zip (a truncated body, an HTML error page)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise DownloadError(f"{url} did not give a readable zip archive ({err}); nothing was saved") from err
    if bad is not None:
        raise DownloadError(f"{url}: member {bad!r} of the downloaded zip fails its CRC check; nothing was saved")


def _fetch(url: str, into: pathlib.Path, *, timeout: float, progress: Callable[[int, int | None], None] | None):
    """Stream `url` into the file `into`; `DownloadError` naming the URL on any failure."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(into, "wb") as out:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            done = 0
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            if total is not None and done != total:
                raise DownloadError(f"download of {url} stopped after {done} of {total} bytes; nothing was saved")
            out.flush()
            os.fsync(out.fileno())
    except urllib.error.HTTPError as err:
        raise DownloadError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise DownloadError(f"download of {url} failed: {err.reason} (no network, or the server is down?)") from err
    except (socket.timeout, TimeoutError) as err:
        raise DownloadError(f"download of {url} failed: no answer within {timeout:g} s") from err
    except OSError as err:
        raise DownloadError(f"download of {url} failed: {err}") from err


def _copy_member(archive_path: pathlib.Path, member: str, target: pathlib.Path, url: str) -> None:
    with zipfile.ZipFile(archive_path) as archive:
        names = [n for n in archive.namelist() if n.replace("\\", "/").rsplit("/", 1)[-1] == member]
        if len(names) != 1:
            raise DownloadError(
                f"{url}: expected one {member} in the archive, found {len(names)}; nothing was saved"
            )
        with archive.open(names[0]) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
            out.flush()
            os.fsync(out.fileno())


def download(
    benchmark: str,
    data_dir: str | os.PathLike,
    *,
    timeout: float = 60.0,
    log: Callable[[str], None] = print,
    progress: Callable[[str, int, int | None], None] | None = None,
    sources: tuple[Source, ...] | None = None,
) -> list[pathlib.Path]:
    """Fetch what `benchmark` needs into `data_dir` (created if missing).

    **Arguments:**

    - `benchmark`: a key of [`SOURCES`][].
    - `data_dir`: the folder the benchmark's loader reads.
    - `timeout`: seconds to wait for the server at each read.
    - `log`: where one line per file goes.
    - `progress`: `progress(filename, bytes_done, bytes_total_or_None)`.
    - `sources`: the files to fetch instead of `SOURCES[benchmark]` (tests,
      mirrors).

    **Returns:** the paths of the benchmark's files in `data_dir`, fetched
    now or already there.

    **Raises:** `DataError` for a benchmark that cannot be downloaded, or a
    `data_dir` that cannot be written; `DownloadError` when a download fails
    (nothing is left behind but the files completed before it).
    """
    if sources is None:
        if benchmark not in SOURCES:
            raise DataError(f"unknown benchmark {benchmark!r} to download; choose one of {', '.join(SOURCES)}")
        sources = SOURCES[benchmark]
        if sources is None:
            raise DataError(_MINIIMAGENET)
        if not sources:  # pragma: no cover - every entry names its files
            return []
    root = pathlib.Path(data_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the data directory {root}: {err}") from err
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; pass `data_dir` DIR, a folder for the downloaded files")
    paths = []
    for source in sources:
        target = root / source.filename
        paths.append(target)
        if target.exists():
            log(f"{target} is already there; not downloading it")
            continue
        log(f"downloading {source.url} -> {target}")
        report = None if progress is None else (lambda done, total, name=source.filename: progress(name, done, total))
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            fetched = pathlib.Path(tmp) / "archive.part"
            _fetch(source.url, fetched, timeout=timeout, progress=report)
            _check_zip(fetched, source.url)
            if source.member is None:
                os.replace(fetched, target)
            else:
                extracted = pathlib.Path(tmp) / "member.part"
                _copy_member(fetched, source.member, extracted, source.url)
                os.replace(extracted, target)
        fsync_dir(root)
    return paths

