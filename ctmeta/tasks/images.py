"""Few-shot image classification: the N-way k-shot sampler and the image cache.

[`FewShotClassification`][] is the sampler that [`ctmeta.tasks.omniglot.Omniglot`][]
and [`ctmeta.tasks.miniimagenet.MiniImageNet`][] share. A dataset is
decoded once into one uint8 array `images (N, H, W, C)` in which every class
is a contiguous run of rows; a *split* (`"train"`, `"test"`, ...) is a list of
classes, each a run `start, count` of rows and a rotation `rot` (quarter
turns counter-clockwise; Omniglot's rotated classes share rows).

**A task** (`ways`-way, `shots`-shot, `queries` query images per class):
draw `ways` distinct classes of the split, then `shots + queries` distinct
images of each; the first `shots` go to the support set, the rest to the
query set. Class `i` of the draw gets label `i`. Layout, class-major:

- `support_x (B, ways * shots, C, H, W)` float32 in [0, 1], row `i * shots + j`
  is image `j` of class `i`; `support_y (B, ways * shots)` int32,
  `support_y[b, i * shots + j] = i`.
- `query_x (B, ways * queries, C, H, W)`, `query_y (B, ways * queries)`, the
  same with `queries`.

Since the classes are drawn in random order, the label of a class is random;
the order of the rows carries no information beyond the labels.

**Sampling is a pure function of the key.** The key's bits seed a numpy
generator, which picks indices into the cached array (milliseconds for a
batch). `sample` therefore runs outside `jax.jit` (it needs the key's value)
and returns JAX arrays; the same key always gives the same batch.

**Cache.** Decoding tens of thousands of PNG/JPEG files takes seconds to
minutes, so the decoded array is stored as a `.npy` file in the cache folder:
the `cache_dir` argument, else `$CTMETA_CACHE`, else `$XDG_CACHE_HOME/ctmeta`,
else `~/.cache/ctmeta`. Its name holds a hash of the source files' names,
sizes and modification times and of the decoding settings, so changed data is
decoded again (stale files are left for the user to delete). It is written to
a temporary file and renamed, so an interrupted run never leaves a truncated
cache; if the folder is not writable, the data is decoded in memory with a
warning. Large arrays (miniImageNet, ~800 MB) are memory-mapped read-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
import secrets
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import DataError, InputError, check_int
from .base import Batch, TaskFamily

__all__ = [
    "ClassPool",
    "FewShotClassification",
    "cached_array",
    "decode_image",
    "default_cache_dir",
    "numpy_rng",
]

# Bump when the decoding changes, so old caches are not reused.
_CACHE_VERSION = 1
# Anything larger than this is not a dataset image but a decompression bomb.
_MAX_PIXELS = 4096 * 4096




# ----------------------------------------------------------------------- keys


def numpy_rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded by the bits of the JAX key `key`.

    Accepts a typed key (`jax.random.key`) or a raw `uint32` key
    (`jax.random.PRNGKey`). Equal keys give equal streams; the key must be a
    concrete value (not traced inside `jit`).
    """
    if isinstance(key, jax.core.Tracer):
        raise InputError(
            "image task sampling reads the key's value, so it cannot run inside "
            "jax.jit/vmap; sample outside and pass the Batch in"
        )
    try:
        dtype = key.dtype
    except AttributeError:
        raise InputError(f"key must be a JAX PRNG key, got {type(key).__name__}") from None
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise InputError(f"sample takes one key, got a key array of shape {key.shape}")
        data = jax.random.key_data(key)
    elif dtype == np.uint32 and np.ndim(key) == 1:
        data = key
    else:
        raise InputError(
            f"key must be a JAX PRNG key (jax.random.key(seed)), got dtype {dtype} "
            f"shape {np.shape(key)}"
        )
    return np.random.default_rng([int(v) for v in np.asarray(data).ravel()])


# ---------------------------------------------------------------------- cache


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """`cache_dir`, else `$CTMETA_CACHE`, else `$XDG_CACHE_HOME/ctmeta`, else `~/.cache/ctmeta`."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    if os.environ.get("CTMETA_CACHE"):
        return pathlib.Path(os.environ["CTMETA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ctmeta"
    return pathlib.Path.home() / ".cache" / "ctmeta"


def _cache_path(root: pathlib.Path, name: str, key_material) -> pathlib.Path:
    blob = json.dumps([_CACHE_VERSION, name, key_material], sort_keys=True).encode()
    return root / f"{name}-{hashlib.sha256(blob).hexdigest()[:20]}.npy"


def cached_array(
    name: str,
    key_material,
    shape: tuple[int, ...],
    fill: Callable[[np.ndarray], None],
    *,
    cache_dir: str | os.PathLike | None = None,
    mmap: bool = False,
) -> np.ndarray:
    """A uint8 array of `shape`, from the cache or built by `fill(out)` and cached.

    `key_material` (JSON-serialisable) identifies the contents: the source
    files' fingerprints and every decoding setting. `fill` writes every entry
    of the preallocated `out`; when caching, `out` is a memory map of the
    temporary file, so building a large array does not need it all in RAM.
    With `mmap`, the result is a read-only memory map, else an in-memory array.
    """
    root = default_cache_dir(cache_dir)
    path = _cache_path(root, name, key_material)
    mode = "r" if mmap else None
    if path.exists():
        try:
            arr = np.load(path, mmap_mode=mode, allow_pickle=False)
            if arr.shape == tuple(shape) and arr.dtype == np.uint8:
                return arr
            reason = f"shape {arr.shape} {arr.dtype}, expected {tuple(shape)} uint8"
        except (OSError, ValueError, EOFError) as e:
            reason = str(e)
        warnings.warn(f"ignoring unreadable cache file {path} ({reason}); decoding again")

    tmp = root / f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp.npy"
    try:
        root.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=tuple(shape))
    except OSError as e:
        warnings.warn(f"cannot write the cache in {root} ({e}); decoding into memory")
        out = np.empty(shape, np.uint8)
        fill(out)
        return out
    try:
        fill(out)
        out.flush()
        del out
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return np.load(path, mmap_mode=mode, allow_pickle=False)


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr; yields `advance()`. A no-op when disabled."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


# --------------------------------------------------------------------- decode


def decode_image(data: bytes, where: str, *, mode: str, size: int) -> np.ndarray:
    """Decode image bytes to uint8 `(size, size)` (`mode="L"`) or `(size, size, 3)` (`"RGB"`).

    PIL converts to `mode` (1-bit images become 0/255) and resizes with the
    Lanczos filter when the image is not already `size x size`. A file that is
    not a readable image raises a DataError naming `where`.
    """
    from PIL import Image, UnidentifiedImageError

    problem = None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > _MAX_PIXELS:
                problem = f"{im.width}x{im.height} pixels is too large for a dataset image"
            else:
                im = im.convert(mode)
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.LANCZOS)
                return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    raise DataError(f"{where} is not a readable image ({problem})")


# -------------------------------------------------------------------- sampler


class ClassPool(NamedTuple):
    """The classes of one split.

    `images (N, H, W, C)` uint8 is shared by all splits; class `i` is rows
    `start[i] : start[i] + count[i]`, turned `rot[i]` quarter turns
    counter-clockwise, and named `names[i]`.
    """

    images: np.ndarray
    start: np.ndarray
    count: np.ndarray
    rot: np.ndarray
    names: tuple[str, ...]


class FewShotClassification(TaskFamily):
    """N-way k-shot classification tasks over the classes of a dataset's splits.

    Subclasses load their data and call `_set_pools` with one
    `ClassPool` per split. See the module docstring for the layout of a
    [`ctmeta.tasks.base.Batch`][].

    **Arguments:**

    - `ways`: classes per task (`output_size`).
    - `shots`: support images per class.
    - `queries`: query images per class.
    """

    kind = "classification"

    def __init__(self, ways: int, shots: int, queries: int):
        self.ways = check_int("ways", ways, minimum=2)
        self.shots = check_int("shots", shots)
        self.queries = check_int("queries", queries)
        self._pools: dict[str, ClassPool] = {}

    def _check_sizes(self, splits: dict[str, tuple[tuple[str, ...], np.ndarray]]) -> None:
        """Check that every split, given as `(class names, images per class)`,
        can make a task: `ways` classes of `shots + queries` images. Called
        before the images are decoded, so that a task too large fails at once."""
        per_class = self.shots + self.queries
        for split, (names, counts) in splits.items():
            n = len(names)
            if self.ways > n:
                raise InputError(
                    f"ways={self.ways} exceeds the {n} classes of split {split!r} of "
                    f"{type(self).__name__}; the maximum is {n}"
                )
            counts = np.asarray(counts)
            smallest = int(counts.min())
            if per_class > smallest:
                name = names[int(counts.argmin())]
                raise InputError(
                    f"shots + queries = {self.shots} + {self.queries} = {per_class} exceeds "
                    f"the {smallest} images of class {name!r} in split {split!r}; "
                    f"the maximum of shots + queries is {smallest}"
                )

    def _set_pools(self, pools: dict[str, ClassPool]) -> None:
        """Install the splits, checking that every split can make a task."""
        self._check_sizes({split: (pool.names, pool.count) for split, pool in pools.items()})
        for pool in pools.values():
            if np.any(pool.rot != 0) and pool.images.shape[1] != pool.images.shape[2]:
                raise DataError("rotated classes need square images")
        self._pools = dict(pools)

    # -------------------------------------------------------------- queries

    @property
    def splits(self) -> tuple[str, ...]:
        """The split names `sample` accepts."""
        return tuple(self._pools)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        _, h, w, c = next(iter(self._pools.values())).images.shape
        return (c, h, w)

    @property
    def output_size(self) -> int:
        return self.ways

    def _pool(self, split: str) -> ClassPool:
        try:
            return self._pools[split]
        except (KeyError, TypeError):
            raise InputError(
                f"unknown split {split!r} for {type(self).__name__}; choose from {list(self._pools)}"
            ) from None

    def num_classes(self, split: str = "train") -> int:
        """The number of classes in `split`."""
        return len(self._pool(split).names)

    def class_names(self, split: str = "train") -> tuple[str, ...]:
        """The classes of `split`, in the order `sample_classes` indexes them."""
        return self._pool(split).names

    def class_images(self, split: str, index: int) -> np.ndarray:
        """Every image of class `index` of `split`, `(count, C, H, W)` float32 in [0, 1]."""
        pool = self._pool(split)
        index = check_int("index", index, minimum=0)
        if index >= len(pool.names):
            raise InputError(
                f"class index {index} out of range for split {split!r} ({len(pool.names)} classes)"
            )
        x = np.asarray(pool.images[pool.start[index] : pool.start[index] + pool.count[index]])
        x = np.rot90(x, int(pool.rot[index]), axes=(1, 2))
        return np.multiply(x.transpose(0, 3, 1, 2), 1 / 255, dtype=np.float32)

    # ------------------------------------------------------------- sampling

    def _draw(self, key, meta_batch, split):
        pool = self._pool(split)
        meta_batch = check_int("meta_batch", meta_batch)
        rng = numpy_rng(key)
        n = len(pool.names)
        classes = np.stack([rng.choice(n, self.ways, replace=False) for _ in range(meta_batch)])
        # Distinct images per class, all classes at once: sort random keys and
        # push the slots past each class's count to the end.
        count = pool.count[classes]
        slots = np.arange(int(count.max()))
        u = rng.random((meta_batch, self.ways, slots.size))
        u[slots >= count[..., None]] = 2.0
        picks = np.argsort(u, axis=-1)[..., : self.shots + self.queries]
        return pool, classes, pool.start[classes][..., None] + picks

    def sample_classes(self, key: jax.Array, meta_batch: int, split: str = "train") -> np.ndarray:
        """The classes `sample(key, meta_batch, split)` draws: indices into
        `class_names(split)`, `(meta_batch, ways)`; column `i` has label `i`."""
        return self._draw(key, meta_batch, split)[1]

    def sample(self, key: jax.Array, meta_batch: int, split: str = "train") -> Batch:
        """Draw `meta_batch` tasks from `split`, deterministically from `key`.

        Returns a [`Batch`][] of JAX arrays (float32 images, int32 labels);
        see the module docstring for the layout. Call it outside `jit`.
        """
        pool, classes, rows = self._draw(key, meta_batch, split)
        # Fancy indexing copies, so the rotations below never touch the cache.
        x = pool.images[rows.ravel()].reshape(*rows.shape, *pool.images.shape[1:])
        # x: (B, ways, shots + queries, H, W, C)
        rot = pool.rot[classes]
        for k in (1, 2, 3):
            sel = rot == k
            if sel.any():
                x[sel] = np.rot90(x[sel], k, axes=(2, 3))
        x = np.multiply(x.transpose(0, 1, 2, 5, 3, 4), 1 / 255, dtype=np.float32)
        b, s, q = meta_batch, self.shots, self.queries
        shape = x.shape[3:]
        support_x = x[:, :, :s].reshape(b, self.ways * s, *shape)
        query_x = x[:, :, s:].reshape(b, self.ways * q, *shape)
        labels = np.arange(self.ways, dtype=np.int32)
        support_y = np.broadcast_to(np.repeat(labels, s), (b, self.ways * s))
        query_y = np.broadcast_to(np.repeat(labels, q), (b, self.ways * q))
        return Batch(
            jnp.asarray(support_x), jnp.asarray(support_y), jnp.asarray(query_x), jnp.asarray(query_y)
        )

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(p.names)}" for k, p in self._pools.items())
        return (
            f"{type(self).__name__}(ways={self.ways}, shots={self.shots}, "
            f"queries={self.queries}, classes: {sizes})"
        )
