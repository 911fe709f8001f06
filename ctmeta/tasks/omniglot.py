"""Omniglot (Lake et al., 2015) few-shot classification, from the official archives.

**Data.** `data_dir` holds the two official sets, each either as its zip or
extracted (the folder wins if both exist):

    data_dir/images_background.zip   or   data_dir/images_background/
    data_dir/images_evaluation.zip   or   data_dir/images_evaluation/

with the layout `images_background/<alphabet>/<characterNN>/<id>.png`
(105x105 1-bit PNGs, 20 drawings per character): 964 + 659 = 1623 characters,
32,460 images. Get them from github.com/brendenlake/omniglot, folder `python/`.
Zips are read in place, not extracted. Files other than `.png` and OS
metadata (`__MACOSX/`, dot files) are ignored.

**Images.** Each drawing is converted to greyscale, resized to
`image_size x image_size` (28 by default) with PIL's Lanczos filter and
inverted, so that ink is 1 and background 0 (as in Finn et al., 2017;
zero padding in the convolutions then matches the background). A task's
images are float32 `(1, 28, 28)` in [0, 1].

**Split** (the protocol of Santoro et al., 2016, Vinyals et al., 2016 and
Finn et al., 2017: 1200 characters for meta-training, the other 423 for
meta-test, background and evaluation sets pooled). Exact rule: the 1623
characters are sorted by their path `<set>/<alphabet>/<character>` (e.g.
`images_background/Alphabet_of_the_Magi/character01`) and permuted by
`np.random.default_rng(split_seed).permutation(1623)` (`split_seed=0`); the
first `train_characters` (1200) are meta-training characters, the rest
meta-test. With `val_characters=v > 0`, the last `v` of the 1200 form a
`"val"` split instead (MAML used 1100 + 100). The published shuffles depend on
Python's `random` module and on file-listing order, so the characters differ
from theirs; the protocol is the same.

**Rotations.** With `rotations=True` (the default, as in the papers above),
each character turned by 0, 90, 180 and 270 degrees gives four classes, in
every split: 4800 meta-training classes and 1692 meta-test classes. Class
names are `<character>/rot<degrees>`, e.g. `.../character01/rot090`.

The decoded images (1623 x 20 x 28 x 28 uint8, 25 MB) are cached, see
`ctmeta.tasks.images`; the first load decodes 32,460 PNGs (about ten
seconds on one core).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from .._errors import DataError, InputError, check_int
from ._archive import DirTree, FileTree, ZipTree, is_hidden
from .images import ClassPool, FewShotClassification, cached_array, decode_image, progress_bar

__all__ = ["Omniglot"]

_SETS = ("images_background", "images_evaluation")
_WHERE = (
    "get images_background.zip and images_evaluation.zip from "
    "https://github.com/brendenlake/omniglot (folder python/)"
)
_LAYOUT = "<set>/<alphabet>/<characterNN>/<id>.png"


def _open_set(data_dir: pathlib.Path, name: str) -> FileTree:
    folder, archive = data_dir / name, data_dir / f"{name}.zip"
    if folder.is_dir():
        return DirTree(folder)
    if archive.is_file():
        tree = ZipTree(archive, name + "/")
        if not tree.files():
            top = tree.top_level()
            tree.close()
            raise DataError(
                f"{archive} has no folder {name}/ at its top level (found: {top[:5]}); "
                f"expected the official layout {name}/<alphabet>/<characterNN>/<id>.png"
            )
        return tree
    raise DataError(
        f"Omniglot: found neither {folder}{os.sep} nor {archive}; expected the official "
        f"layout {_LAYOUT} in data_dir={data_dir}; {_WHERE}"
    )


def _list_characters(tree: FileTree, set_name: str) -> dict[str, list[str]]:
    """`{"<set>/<alphabet>/<character>": [member, ...]}`, members sorted."""
    chars: dict[str, list[str]] = {}
    for name in tree.files():
        if is_hidden(name) or not name.lower().endswith(".png"):
            continue
        parts = name.split("/")
        if len(parts) != 3:
            raise DataError(
                f"unexpected file {tree.where(name)}: Omniglot images must be at "
                f"{set_name}/<alphabet>/<characterNN>/<id>.png"
            )
        chars.setdefault(f"{set_name}/{parts[0]}/{parts[1]}", []).append(name)
    if not chars:
        raise DataError(f"no PNG images in {tree.location}; expected the layout {_LAYOUT}; {_WHERE}")
    return chars


class Omniglot(FewShotClassification):
    """Omniglot N-way k-shot tasks; see the module docstring for data and splits.

    **Arguments:**

    - `data_dir`: folder with `images_background(.zip)` and `images_evaluation(.zip)`.
    - `ways`, `shots`: classes per task and support images per class.
    - `queries`: query images per class (default 5; at most `20 - shots`).
    - `rotations`: rotated characters are extra classes (default True).
    - `train_characters`, `val_characters`, `split_seed`: the split rule.
    - `image_size`: side of the resized images (default 28).
    - `cache_dir`: where decoded images are cached (see `ctmeta.tasks.images`).
    - `progress`: show a progress bar while decoding.

    Splits: `"train"`, `"test"` and, with `val_characters > 0`, `"val"`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        ways: int = 5,
        shots: int = 1,
        queries: int = 5,
        rotations: bool = True,
        train_characters: int = 1200,
        val_characters: int = 0,
        split_seed: int = 0,
        image_size: int = 28,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ):
        super().__init__(ways, shots, queries)
        train_characters = check_int("train_characters", train_characters)
        val_characters = check_int("val_characters", val_characters, minimum=0)
        split_seed = check_int("split_seed", split_seed, minimum=0)
        image_size = check_int("image_size", image_size)
        if val_characters >= train_characters:
            raise InputError(
                f"val_characters={val_characters} must be smaller than "
                f"train_characters={train_characters} (the val characters come out of them)"
            )
        data_dir = pathlib.Path(data_dir).expanduser()
        if data_dir.is_file():
            raise DataError(
                f"Omniglot data directory {data_dir} is a file, not a directory; pass the folder that "
                f"holds images_background.zip and images_evaluation.zip (or the extracted folders); {_WHERE}"
            )
        if not data_dir.is_dir():
            raise DataError(
                f"Omniglot data directory {data_dir} does not exist; it should hold "
                f"images_background.zip and images_evaluation.zip (or the extracted "
                f"folders, layout {_LAYOUT}); {_WHERE}"
            )

        trees = []
        try:
            for name in _SETS:
                trees.append(_open_set(data_dir, name))
            chars: dict[str, tuple[FileTree, list[str]]] = {}
            for tree, name in zip(trees, _SETS):
                for char, members in _list_characters(tree, name).items():
                    chars[char] = (tree, sorted(members))
            names = sorted(chars)
            counts = np.array([len(chars[c][1]) for c in names], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            # The split and the task sizes, from the file listing alone: a task
            # too large fails before a single image is decoded.
            split_chars = self._split_characters(len(names), train_characters, val_characters, split_seed)
            turns = (0, 1, 2, 3) if rotations else (0,)
            self._check_sizes({
                split: (tuple(f"{names[c]}/rot{90 * r:03d}" for c in np.sort(idx) for r in turns),
                        np.repeat(counts[np.sort(idx)], len(turns)))
                for split, idx in split_chars.items()
            })

            def fill(out: np.ndarray) -> None:
                with progress_bar(len(out), "decoding Omniglot", progress) as advance:
                    i = 0
                    for char in names:
                        tree, members = chars[char]
                        for m in members:
                            img = decode_image(tree.read(m), tree.where(m), mode="L", size=image_size)
                            out[i, :, :, 0] = 255 - img  # ink 1, background 0
                            i += 1
                            advance()

            key_material = {
                "sources": [t.fingerprint() for t in trees],
                "image_size": image_size,
                "decode": "L-lanczos-inverted",
                "counts": counts.tolist(),
            }
            images = cached_array(
                f"omniglot-{image_size}px",
                key_material,
                (int(counts.sum()), image_size, image_size, 1),
                fill,
                cache_dir=cache_dir,
            )
        finally:
            for tree in trees:
                tree.close()

        pools = {}
        for split, idx in split_chars.items():
            idx = np.repeat(np.sort(idx), len(turns))
            rot = np.tile(np.array(turns, dtype=np.int64), len(idx) // len(turns))
            pools[split] = ClassPool(
                images=images,
                start=starts[idx],
                count=counts[idx],
                rot=rot,
                names=tuple(f"{names[c]}/rot{90 * r:03d}" for c, r in zip(idx, rot)),
            )
        self.data_dir = data_dir
        self.rotations = bool(rotations)
        self._set_pools(pools)

    @staticmethod
    def _split_characters(total: int, train_characters: int, val_characters: int, split_seed: int):
        """`{split: character indices}` of the split rule (see the module docstring)."""
        if train_characters >= total:
            raise InputError(
                f"train_characters={train_characters} leaves no meta-test characters: the "
                f"data has {total} characters; the maximum is {total - 1}"
            )
        perm = np.random.default_rng(split_seed).permutation(total)
        n_fit = train_characters - val_characters
        split_chars = {"train": perm[:n_fit]}
        if val_characters:
            split_chars["val"] = perm[n_fit:train_characters]
        split_chars["test"] = perm[train_characters:]
        return split_chars
