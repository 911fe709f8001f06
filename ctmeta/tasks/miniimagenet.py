"""miniImageNet (Vinyals et al., 2016; Ravi & Larochelle, 2017 split) few-shot tasks.

**Data.** A root holding `train.csv`, `val.csv`, `test.csv` (header
`filename,label`, one image per row, `label` the ImageNet wnid) and the
images, in either layout:

    images/<filename>            (the original release, flat)
    images/<label>/<filename>    (one folder per class)

`data_dir` is that root, a folder with exactly one sub-folder that is such a
root (e.g. `miniimagenet/`), a zip whose top level or single top folder is
such a root, or a folder holding exactly one such zip, e.g.
`../shared/data/miniimagenet` with `miniimagenet-train64.zip`. Zips are read
in place. Get the CSVs of the Ravi & Larochelle split from
github.com/twitter/meta-learning-lstm (`data/miniImagenet/`) and the images
from ImageNet (ILSVRC-2012), resized to 84x84.

**Images.** RGB, resized to `image_size x image_size` (84) with PIL's
Lanczos filter if they are not already that size; a task's images are
float32 `(3, 84, 84)` in [0, 1], not mean-normalised (the models' batch norm
takes care of scale). Classes are sorted by wnid; a class's images keep their
CSV order.

**Protocols.**

- `protocol="ravi"`: the standard split, 64 meta-training classes
  (`train.csv`), 16 validation (`val.csv`) and 20 meta-test (`test.csv`);
  splits `"train"`, `"val"`, `"test"`. Needs all their images.
- `protocol="train64"`: for copies holding only the 64 training classes'
  images. The classes of `train.csv`, sorted by wnid, are permuted by
  `np.random.default_rng(split_seed).permutation(n)` (`split_seed=0`); the
  last `n // 4` are meta-test classes and the others meta-training classes:
  48 / 16 of the 64. Splits `"train"` and `"test"`. Results are comparable
  between methods, not with published miniImageNet numbers.

Each CSV's images are decoded once into a cached uint8 array (64 x 600
images = 813 MB for `train.csv`), memory-mapped read-only; the first load
decodes 38,400 JPEGs (tens of seconds), later loads take milliseconds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pathlib
from typing import Literal

import numpy as np

from .._errors import DataError, InputError, check_int
from ._archive import DirTree, FileTree, ZipTree
from .images import ClassPool, FewShotClassification, cached_array, decode_image, progress_bar

__all__ = ["MiniImageNet"]

_CSVS = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
_WHERE = (
    "miniImageNet uses the Ravi & Larochelle split: the CSV files from "
    "https://github.com/twitter/meta-learning-lstm (data/miniImagenet/) and the "
    "images from ImageNet, resized to 84x84"
)
_LAYOUT = "train.csv, val.csv, test.csv and images/<filename> or images/<label>/<filename>"


def _is_root(folder: pathlib.Path) -> bool:
    return (folder / "train.csv").is_file() or (folder / "images").is_dir()


def _open_zip_root(path: pathlib.Path) -> FileTree:
    tree = ZipTree(path)
    files = tree.files()
    prefixes = sorted(
        f[: -len("train.csv")]
        for f in files
        if f == "train.csv" or (f.endswith("/train.csv") and f.count("/") == 1)
    )
    if len(prefixes) != 1:
        top = tree.top_level()
        tree.close()
        found = "none" if not prefixes else ", ".join(p or "<top>" for p in prefixes)
        raise DataError(
            f"{path}: expected train.csv at the top level or in one top folder (found: "
            f"{found}; top-level entries: {top[:5]}); the layout is {_LAYOUT}"
        )
    tree.chroot(prefixes[0])
    return tree


def _open_root(data_dir: pathlib.Path) -> FileTree:
    if data_dir.is_file():
        return _open_zip_root(data_dir)
    if not data_dir.is_dir():
        raise DataError(
            f"miniImageNet data {data_dir} does not exist; expected a folder or zip with "
            f"{_LAYOUT}; {_WHERE}"
        )
    if _is_root(data_dir):
        return DirTree(data_dir)
    subs = [d for d in sorted(data_dir.iterdir()) if d.is_dir() and _is_root(d)]
    if len(subs) == 1:
        return DirTree(subs[0])
    zips = sorted(data_dir.glob("*.zip"))
    if not subs and len(zips) == 1:
        return _open_zip_root(zips[0])
    if len(subs) + len(zips) > 1:
        raise DataError(
            f"{data_dir} holds several candidate miniImageNet copies "
            f"({[p.name for p in subs + zips]}); pass the one to use as data_dir"
        )
    raise DataError(
        f"no miniImageNet data in {data_dir}: expected {_LAYOUT} there, in one "
        f"sub-folder, or in a zip; {_WHERE}"
    )


def _read_csv(tree: FileTree, csv_name: str, files: set[str]) -> dict[str, list[str]]:
    """`{label: [filename, ...]}` from a `filename,label` CSV, in file order."""
    where = tree.where(csv_name)
    if csv_name not in files:
        raise DataError(f"{where} is missing; expected {_LAYOUT}; {_WHERE}")
    try:
        text = tree.read(csv_name).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not a UTF-8 text file ({e})") from None
    rows = list(csv.reader(io.StringIO(text)))
    header = [h.strip() for h in rows[0]] if rows else []
    if header != ["filename", "label"]:
        raise DataError(f"{where}: expected the header 'filename,label', got {','.join(header)!r}")
    classes: dict[str, list[str]] = {}
    seen: set[str] = set()
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        fields = [c.strip() for c in row]
        if len(fields) != 2 or not all(fields):
            raise DataError(f"{where}, line {line}: expected 'filename,label', got {row}")
        filename, label = fields
        # Names, not paths: a '/' or '..' in a CSV must not reach outside images/.
        if any(s in part for part in fields for s in ("/", "\\")) or ".." in fields:
            raise DataError(f"{where}, line {line}: {row} is not a plain file name and label")
        if filename in seen:
            raise DataError(f"{where}, line {line}: {filename} is listed twice")
        seen.add(filename)
        classes.setdefault(label, []).append(filename)
    if not classes:
        raise DataError(f"{where} lists no images")
    return classes


def _resolve(classes: dict[str, list[str]], files: set[str]):
    """Find each CSV row's image: `(labels, members, counts, missing)`.

    `labels` sorted; `members` the images' paths, class after class in that
    order; `counts[i]` the images of `labels[i]`; `missing` the absent files.
    """
    labels = sorted(classes)
    members, counts, missing = [], [], []
    for label in labels:
        for filename in classes[label]:
            for candidate in (f"images/{label}/{filename}", f"images/{filename}"):
                if candidate in files:
                    members.append(candidate)
                    break
            else:
                missing.append(filename)
        counts.append(len(classes[label]))
    return labels, members, np.array(counts, dtype=np.int64), missing


class MiniImageNet(FewShotClassification):
    """miniImageNet N-way k-shot tasks; see the module docstring for data and protocols.

    **Arguments:**

    - `data_dir`: root folder, parent folder or zip (see the module docstring).
    - `ways`, `shots`: classes per task and support images per class.
    - `queries`: query images per class (default 15, the usual protocol).
    - `protocol`: `"ravi"` (train/val/test CSVs) or `"train64"` (48/16 of the 64
      training classes).
    - `split_seed`: the permutation seed of `"train64"`.
    - `image_size`: side of the images (default 84).
    - `cache_dir`: where decoded images are cached (see `ctmeta.tasks.images`).
    - `progress`: show a progress bar while decoding.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        protocol: Literal["ravi", "train64"] = "ravi",
        split_seed: int = 0,
        image_size: int = 84,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ):
        super().__init__(ways, shots, queries)
        if protocol not in ("ravi", "train64"):
            raise InputError(f"protocol must be 'ravi' or 'train64', got {protocol!r}")
        split_seed = check_int("split_seed", split_seed, minimum=0)
        image_size = check_int("image_size", image_size)
        data_dir = pathlib.Path(data_dir).expanduser()

        csv_splits = ("train", "val", "test") if protocol == "ravi" else ("train",)
        with _open_root(data_dir) as tree:
            files = set(tree.files())
            # Resolve every CSV before decoding anything, so a missing image
            # fails in a second, not after minutes of decoding.
            resolved = {
                split: _resolve(_read_csv(tree, _CSVS[split], files), files)
                for split in csv_splits
            }
            broken = {s: r[3] for s, r in resolved.items() if r[3]}
            if broken:
                raise DataError(self._missing_message(tree, resolved, broken))
            # The task sizes too: `ways` and `shots + queries` against the
            # splits' classes, from the CSVs alone.
            if protocol == "ravi":
                self._check_sizes({s: (tuple(r[0]), r[2]) for s, r in resolved.items()})
            else:
                labels, _, counts, _ = resolved["train"]
                if len(labels) >= 4:
                    perm = np.random.default_rng(split_seed).permutation(len(labels))
                    n_test = len(labels) // 4
                    self._check_sizes({
                        split: (tuple(labels[i] for i in np.sort(idx)), counts[np.sort(idx)])
                        for split, idx in (("train", perm[: len(labels) - n_test]),
                                           ("test", perm[len(labels) - n_test :]))
                    })
            arrays = {
                split: self._decode(tree, split, r[1], image_size, cache_dir, progress)
                for split, r in resolved.items()
            }

        if protocol == "ravi":
            final = {s: self._class_pool(arrays[s], r[0], r[2]) for s, r in resolved.items()}
        else:
            labels, _, counts, _ = resolved["train"]
            n = len(labels)
            if n < 4:
                raise DataError(f"protocol='train64' needs at least 4 classes in train.csv, found {n}")
            perm = np.random.default_rng(split_seed).permutation(n)
            n_test = n // 4
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            final = {}
            for split, idx in (("train", perm[: n - n_test]), ("test", perm[n - n_test :])):
                idx = np.sort(idx)
                final[split] = self._class_pool(
                    arrays["train"], [labels[i] for i in idx], counts[idx], starts[idx]
                )
        self.data_dir = data_dir
        self.protocol = protocol
        self._set_pools(final)

    @staticmethod
    def _class_pool(images, labels, counts, starts=None) -> ClassPool:
        """Classes `labels` with `counts` images from rows `starts` (default: contiguous from 0)."""
        counts = np.asarray(counts, dtype=np.int64)
        if starts is None:
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return ClassPool(
            images=images,
            start=np.asarray(starts, dtype=np.int64),
            count=counts,
            rot=np.zeros(len(labels), dtype=np.int64),
            names=tuple(labels),
        )

    @staticmethod
    def _missing_message(tree, resolved, broken) -> str:
        parts = [
            f"{len(missing)} of {int(resolved[s][2].sum())} images of {_CSVS[s]} "
            f"(e.g. {missing[0]})"
            for s, missing in broken.items()
        ]
        msg = (
            f"missing from {tree.location}images/: " + "; ".join(parts) + ". Expected "
            "images/<filename> or images/<label>/<filename> for every CSV row"
        )
        if "train" not in broken and all(not resolved[s][1] for s in broken):
            msg += (
                ". Only the training classes' images are present (a train-only copy such as "
                "miniimagenet-train64.zip): use protocol='train64'"
            )
        return msg

    @staticmethod
    def _decode(tree, split, members, image_size, cache_dir, progress) -> np.ndarray:
        def fill(out: np.ndarray) -> None:
            with progress_bar(len(out), f"decoding miniImageNet {split}", progress) as advance:
                for i, m in enumerate(members):
                    out[i] = decode_image(tree.read(m), tree.where(m), mode="RGB", size=image_size)
                    advance()

        key_material = {
            "source": tree.fingerprint(),
            "csv": _CSVS[split],
            "members": hashlib.sha256(json.dumps(members).encode()).hexdigest(),
            "image_size": image_size,
            "decode": "RGB-lanczos",
        }
        return cached_array(
            f"miniimagenet-{image_size}px-{split}",
            key_material,
            (len(members), image_size, image_size, 3),
            fill,
            cache_dir=cache_dir,
            mmap=True,
        )
