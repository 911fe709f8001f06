"""Few-shot image tasks: Omniglot and miniImageNet loaders and the N-way k-shot sampler.

Two kinds of tests:

- on small fixtures written into `tmp_path` in the official layouts (and
  broken variants of them), for the loaders' logic and error messages;
- on the real datasets under `../shared/data` (skipped if absent). These use
  the default cache (`$CTMETA_CACHE`, else `~/.cache/ctmeta`): the first run
  decodes 32,460 PNGs and 38,400 JPEGs (about 7 s and 14 s on one free core),
  later runs load the cache in about a second.
"""

import io
import os
import pathlib
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ctmeta._errors import DataError, InputError
from ctmeta.tasks.base import Batch, TaskFamily
from ctmeta.tasks.images import numpy_rng
from ctmeta.tasks.miniimagenet import MiniImageNet
from ctmeta.tasks.omniglot import Omniglot

# One xdist group (pyproject: --dist loadgroup): the real data sets are loaded by
# session fixtures, so once, on one worker, rather than once on each.
pytestmark = pytest.mark.xdist_group("test_tasks_images")

KEY = jax.random.key(0)

# ------------------------------------------------------------------ fixtures

SETS = {"images_background": ["Alpha", "Beta"], "images_evaluation": ["Gamma", "Delta"]}
CHARS, DRAWINGS = 3, 4  # per alphabet, per character: 12 characters, 48 images


def _png(index: int) -> bytes:
    """A 105x105 1-bit drawing: white, with a black square placed by `index`."""
    a = np.ones((105, 105), bool)
    r, c = divmod(index, 7)
    a[10 + 12 * r : 25 + 12 * r, 5 + 14 * c : 20 + 14 * c] = False
    buf = io.BytesIO()
    Image.fromarray(a).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def _omniglot_members(set_name: str):
    """{member name: bytes} for one official set, drawings all distinct."""
    i0 = 0 if set_name == "images_background" else 24
    out = {}
    for a, alphabet in enumerate(SETS[set_name]):
        for c in range(1, CHARS + 1):
            for d in range(1, DRAWINGS + 1):
                index = i0 + (a * CHARS + c - 1) * DRAWINGS + d - 1
                out[f"{set_name}/{alphabet}/character{c:02d}/{index:04d}_{d:02d}.png"] = _png(index % 49)
    return out


def _write_zip(path: pathlib.Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def write_omniglot(root: pathlib.Path, *, extracted: bool = False) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    for set_name in SETS:
        members = _omniglot_members(set_name)
        if extracted:
            for name, data in members.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
        else:
            _write_zip(root / f"{set_name}.zip", members)
    return root


def _jpeg(color, size=(84, 84)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, tuple(int(v) for v in color)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


MINI_SPLITS = {"train": 8, "val": 2, "test": 3}
MINI_IMAGES = 6


def _mini_color(split_index: int, cls: int, img: int):
    return (40 * split_index + 10 * cls, 35 * img + 20, 200 - 15 * cls)


def mini_members(*, layout="flat", prefix="", only_train=False, header="filename,label"):
    """{member: bytes} of a miniImageNet copy: CSVs and solid-colour JPEGs."""
    out = {}
    for s, (split, n_classes) in enumerate(MINI_SPLITS.items()):
        rows = [header]
        for c in range(n_classes):
            wnid = f"n{s}{c:07d}"
            for i in range(MINI_IMAGES):
                filename = f"{wnid}{i:08d}.jpg"
                rows.append(f"{filename},{wnid}")
                if only_train and split != "train":
                    continue
                path = f"images/{wnid}/{filename}" if layout == "nested" else f"images/{filename}"
                size = (100, 90) if (c, i) == (0, 0) else (84, 84)  # one to resize
                out[prefix + path] = _jpeg(_mini_color(s, c, i), size)
        out[prefix + f"{split}.csv"] = ("\n".join(rows) + "\n").encode()
    return out


def write_tree(root: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def omni_dir(tmp_path):
    return write_omniglot(tmp_path / "omniglot")


def small_omniglot(data_dir, cache_dir, **kw):
    kw = {"ways": 3, "shots": 1, "queries": 2, "train_characters": 8, **kw}
    return Omniglot(data_dir, cache_dir=cache_dir, progress=False, **kw)


# ----------------------------------------------------------- Omniglot, small


def test_omniglot_layouts_split_and_classes(omni_dir, tmp_path, cache):
    fam = small_omniglot(omni_dir, cache)
    assert isinstance(fam, TaskFamily) and fam.kind == "classification"
    assert fam.input_shape == (1, 28, 28) and fam.output_size == 3
    assert fam.splits == ("train", "test")
    # 12 characters: 8 for meta-training, 4 for meta-test, each in 4 rotations.
    assert fam.num_classes("train") == 32 and fam.num_classes("test") == 16
    chars = {s: {n.rsplit("/", 1)[0] for n in fam.class_names(s)} for s in fam.splits}
    assert len(chars["train"]) == 8 and len(chars["test"]) == 4
    assert not chars["train"] & chars["test"]
    # The documented rule: sorted character paths, permuted by default_rng(0).
    names = sorted(
        f"{s}/{a}/character{c:02d}" for s, alphabets in SETS.items() for a in alphabets for c in range(1, 4)
    )
    perm = np.random.default_rng(0).permutation(12)
    assert chars["train"] == {names[i] for i in perm[:8]}
    assert {n.rsplit("/", 1)[1] for n in fam.class_names("train")} == {"rot000", "rot090", "rot180", "rot270"}
    # Extracted folders give the same data as the zips.
    folders = Omniglot(
        write_omniglot(tmp_path / "extracted", extracted=True),
        ways=3, queries=2, train_characters=8, cache_dir=tmp_path / "c2", progress=True,
    )
    assert folders.class_names("test") == fam.class_names("test")
    np.testing.assert_array_equal(folders.class_images("test", 5), fam.class_images("test", 5))


def test_omniglot_val_split_and_no_rotations(omni_dir, cache):
    fam = small_omniglot(omni_dir, cache, ways=2, val_characters=2, rotations=False)
    assert fam.splits == ("train", "val", "test")
    assert [fam.num_classes(s) for s in ("train", "val", "test")] == [6, 2, 4]
    assert all(n.endswith("/rot000") for n in fam.class_names("val"))


def test_omniglot_decoding_and_rotations(omni_dir, cache):
    fam = small_omniglot(omni_dir, cache)
    names = fam.class_names("train")
    base = fam.class_images("train", 0)
    assert names[0].endswith("rot000") and names[1].endswith("rot090")
    assert base.shape == (DRAWINGS, 1, 28, 28) and base.dtype == np.float32
    # Ink (the black square) is 1, the white background 0, after resizing.
    assert base.min() == 0.0 and base.max() > 0.9
    assert 0.01 < float(base.mean()) < 0.1
    for k in (1, 2, 3):
        np.testing.assert_array_equal(fam.class_images("train", k), np.rot90(base, k, axes=(2, 3)))
        assert not np.array_equal(fam.class_images("train", k), base)


def test_sampling_layout_and_content(omni_dir, cache):
    fam = small_omniglot(omni_dir, cache, ways=4, shots=2, queries=2)
    batch = fam.sample(KEY, 3, "test")
    assert isinstance(batch, Batch)
    assert batch.support_x.shape == (3, 8, 1, 28, 28) and batch.support_x.dtype == jnp.float32
    assert batch.query_x.shape == (3, 8, 1, 28, 28) and batch.query_y.dtype == jnp.int32
    np.testing.assert_array_equal(batch.support_y, np.tile([0, 0, 1, 1, 2, 2, 3, 3], (3, 1)))
    np.testing.assert_array_equal(batch.query_y, batch.support_y)
    classes = fam.sample_classes(KEY, 3, "test")
    assert classes.shape == (3, 4)
    for b in range(3):
        assert len(set(classes[b])) == 4  # distinct classes within a task
        for i in range(4):
            pool = fam.class_images("test", int(classes[b, i]))
            shown = np.concatenate(
                [np.asarray(batch.support_x[b, 2 * i : 2 * i + 2]), np.asarray(batch.query_x[b, 2 * i : 2 * i + 2])]
            )
            # Every image comes from its class, and no image is used twice.
            rows = [int(np.flatnonzero((pool == img).all(axis=(1, 2, 3)))[0]) for img in shown]
            assert len(set(rows)) == 4


def test_sampling_is_a_pure_function_of_the_key(omni_dir, cache):
    fam = small_omniglot(omni_dir, cache)
    a, b = fam.sample(KEY, 4), fam.sample(jax.random.key(0), 4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # A raw uint32 key with the same bits draws the same tasks.
    raw = fam.sample(jax.random.key_data(KEY), 4)
    np.testing.assert_array_equal(raw.query_x, a.query_x)
    other = fam.sample(jax.random.key(1), 4)
    assert not np.array_equal(other.support_x, a.support_x)
    with pytest.raises(InputError, match="jit"):
        jax.jit(lambda k: numpy_rng(k).random())(KEY)
    with pytest.raises(InputError, match="one key"):
        fam.sample(jax.random.split(KEY, 2), 1)


def test_sampler_argument_errors(omni_dir, cache):
    with pytest.raises(InputError, match="the maximum is 16"):
        small_omniglot(omni_dir, cache, ways=17)  # 4 test characters x 4 rotations
    with pytest.raises(InputError, match="maximum of shots \\+ queries is 4"):
        small_omniglot(omni_dir, cache, shots=2, queries=3)
    with pytest.raises(InputError, match="maximum is 11"):
        small_omniglot(omni_dir, cache, train_characters=12)
    with pytest.raises(InputError, match="shots"):
        small_omniglot(omni_dir, cache, shots=0)
    fam = small_omniglot(omni_dir, cache)
    with pytest.raises(InputError, match="unknown split 'val'"):
        fam.sample(KEY, 1, "val")
    with pytest.raises(InputError, match="meta_batch"):
        fam.sample(KEY, 0)


def test_cache_is_reused_keyed_and_relocatable(omni_dir, cache, monkeypatch):
    small_omniglot(omni_dir, cache)
    files = list(cache.glob("omniglot-28px-*.npy"))
    assert len(files) == 1
    assert not list(cache.glob(".*tmp*"))  # the temporary file was renamed

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr("ctmeta.tasks.omniglot.decode_image", no_decoding)
    small_omniglot(omni_dir, cache)
    # A changed source file (new mtime) changes the key: decoding again.
    monkeypatch.undo()
    zpath = omni_dir / "images_evaluation.zip"
    os.utime(zpath, ns=(zpath.stat().st_atime_ns, zpath.stat().st_mtime_ns + 10**9))
    small_omniglot(omni_dir, cache)
    assert len(list(cache.glob("omniglot-28px-*.npy"))) == 2
    # $CTMETA_CACHE is the default location.
    monkeypatch.setenv("CTMETA_CACHE", str(cache / "env"))
    small_omniglot(omni_dir, None)
    assert len(list((cache / "env").glob("omniglot-*.npy"))) == 1


def test_cache_corrupt_or_unwritable(omni_dir, cache, tmp_path):
    ref = small_omniglot(omni_dir, cache)
    (path,) = cache.glob("omniglot-*.npy")
    path.write_bytes(b"not a numpy file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        fam = small_omniglot(omni_dir, cache)
    np.testing.assert_array_equal(fam.class_images("train", 3), ref.class_images("train", 3))
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.warns(UserWarning, match="cannot write the cache"):
        fam = small_omniglot(omni_dir, blocked / "cache")
    np.testing.assert_array_equal(fam.class_images("train", 3), ref.class_images("train", 3))


def test_omniglot_data_errors(tmp_path, cache):
    with pytest.raises(DataError, match=r"does not exist.*github.com/brendenlake/omniglot"):
        small_omniglot(tmp_path / "nowhere", cache)
    # Only one of the two sets.
    half = tmp_path / "half"
    half.mkdir()
    _write_zip(half / "images_background.zip", _omniglot_members("images_background"))
    with pytest.raises(DataError, match="images_evaluation.zip"):
        small_omniglot(half, cache)
    # A zip without the top folder.
    flat = tmp_path / "flat"
    flat.mkdir()
    for s in SETS:
        _write_zip(flat / f"{s}.zip", {k.split("/", 1)[1]: v for k, v in _omniglot_members(s).items()})
    with pytest.raises(DataError, match="no folder images_background/ at its top level"):
        small_omniglot(flat, cache)
    # A PNG at the wrong depth.
    deep = write_omniglot(tmp_path / "deep", extracted=True)
    (deep / "images_evaluation/Gamma/stray.png").write_bytes(_png(0))
    with pytest.raises(DataError, match="stray.png.*<alphabet>/<characterNN>/<id>.png"):
        small_omniglot(deep, cache)


def test_omniglot_corrupt_image_and_unsafe_archives(tmp_path, cache):
    bad = tmp_path / "bad"
    bad.mkdir()
    members = _omniglot_members("images_background")
    members["images_background/Alpha/character01/0000_01.png"] = b"this is not a PNG"
    _write_zip(bad / "images_background.zip", members)
    _write_zip(bad / "images_evaluation.zip", _omniglot_members("images_evaluation"))
    with pytest.raises(DataError, match=r"images_background.zip:images_background/Alpha/character01/0000_01.png is not a readable image"):
        small_omniglot(bad, cache)
    assert not list(cache.glob("*.npy")) and not list(cache.glob(".*"))  # no partial cache left
    # Zip-slip: a member that would land outside the extraction folder.
    members = _omniglot_members("images_background")
    members["images_background/../../evil.png"] = _png(1)
    _write_zip(bad / "images_background.zip", members)
    with pytest.raises(DataError, match="zip-slip"):
        small_omniglot(bad, cache)
    (bad / "images_background.zip").write_bytes(b"PK but not really a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        small_omniglot(bad, cache)


# ------------------------------------------------------- miniImageNet, small


def small_mini(data_dir, cache_dir, **kw):
    kw = {"ways": 2, "shots": 1, "queries": 3, **kw}
    return MiniImageNet(data_dir, cache_dir=cache_dir, progress=False, **kw)


def test_miniimagenet_ravi_flat_layout(tmp_path, cache):
    root = write_tree(tmp_path / "mini", mini_members(layout="flat"))
    fam = small_mini(root, cache)
    assert fam.splits == ("train", "val", "test")
    assert fam.input_shape == (3, 84, 84)
    assert [fam.num_classes(s) for s in fam.splits] == [8, 2, 3]
    assert fam.class_names("val") == ("n10000000", "n10000001")
    imgs = fam.class_images("test", 2)
    assert imgs.shape == (MINI_IMAGES, 3, 84, 84) and imgs.dtype == np.float32
    # Solid colours survive JPEG and the resize of the odd-sized image, in CSV order.
    for i in range(MINI_IMAGES):
        np.testing.assert_allclose(imgs[i].mean(axis=(1, 2)) * 255, _mini_color(2, 2, i), atol=3)
    first = fam.class_images("train", 0)[0]
    np.testing.assert_allclose(first.mean(axis=(1, 2)) * 255, _mini_color(0, 0, 0), atol=3)
    batch = fam.sample(KEY, 2, "test")
    assert batch.support_x.shape == (2, 2, 3, 84, 84) and batch.query_x.shape == (2, 6, 3, 84, 84)
    assert 0.0 <= float(batch.query_x.min()) and float(batch.query_x.max()) <= 1.0
    np.testing.assert_array_equal(batch.query_y, [[0, 0, 0, 1, 1, 1]] * 2)


def test_miniimagenet_train64_nested_zip(tmp_path, cache):
    parent = tmp_path / "data"
    parent.mkdir()
    _write_zip(parent / "mini-train.zip", mini_members(layout="nested", prefix="miniimagenet/", only_train=True))
    # The parent folder holding the zip, or the zip itself.
    fam = small_mini(parent, cache, protocol="train64")
    same = small_mini(parent / "mini-train.zip", cache, protocol="train64")
    assert fam.splits == ("train", "test")
    wnids = [f"n0{c:07d}" for c in range(8)]
    perm = np.random.default_rng(0).permutation(8)  # the documented rule: last n // 4 are test
    assert fam.class_names("test") == tuple(sorted(wnids[i] for i in perm[6:]))
    assert fam.class_names("train") == tuple(sorted(wnids[i] for i in perm[:6]))
    assert same.class_names("train") == fam.class_names("train")
    i = fam.class_names("train").index("n00000003")
    np.testing.assert_allclose(fam.class_images("train", i)[4].mean(axis=(1, 2)) * 255, _mini_color(0, 3, 4), atol=3)
    # The official protocol needs the val/test images, and says what to do.
    with pytest.raises(DataError, match="protocol='train64'"):
        small_mini(parent, cache)


def test_miniimagenet_data_errors(tmp_path, cache):
    with pytest.raises(DataError, match="does not exist.*meta-learning-lstm"):
        small_mini(tmp_path / "nowhere", cache)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no miniImageNet data"):
        small_mini(empty, cache)
    wrong = write_tree(tmp_path / "wrong", mini_members(header="file,class"))
    with pytest.raises(DataError, match="expected the header 'filename,label', got 'file,class'"):
        small_mini(wrong, cache)
    broken = write_tree(tmp_path / "broken", mini_members())
    (broken / "images" / "n0000000300000002.jpg").write_bytes(b"GIF89a nonsense")
    with pytest.raises(DataError, match="n0000000300000002.jpg is not a readable image"):
        small_mini(broken, cache)
    sneaky = write_tree(tmp_path / "sneaky", mini_members())
    with open(sneaky / "train.csv", "a") as f:
        f.write("../../etc/passwd,n00000000\n")
    with pytest.raises(DataError, match="line 50.*not a plain file name"):
        small_mini(sneaky, cache)
    slip = tmp_path / "slip.zip"
    _write_zip(slip, {**mini_members(), "/abs/evil.jpg": b""})
    with pytest.raises(DataError, match="zip-slip"):
        small_mini(slip, cache)
    nocsv = tmp_path / "nocsv.zip"
    _write_zip(nocsv, {k: v for k, v in mini_members().items() if not k.endswith(".csv")})
    with pytest.raises(DataError, match="expected train.csv"):
        small_mini(nocsv, cache)
    root = write_tree(tmp_path / "ok", mini_members())
    with pytest.raises(InputError, match="maximum of shots \\+ queries is 6"):
        small_mini(root, cache, shots=2, queries=5)
    with pytest.raises(InputError, match="the maximum is 2"):
        small_mini(root, cache, ways=3)  # val has 2 classes
    with pytest.raises(InputError, match="protocol"):
        small_mini(root, cache, protocol="official")


# ------------------------------------------------------------- real datasets


@pytest.fixture(scope="session")
def omniglot_real(data_dir):
    start = time.perf_counter()
    fam = Omniglot(data_dir / "omniglot", ways=20, shots=1, queries=5, progress=False)
    return fam, time.perf_counter() - start


@pytest.fixture(scope="session")
def mini_real(data_dir):
    start = time.perf_counter()
    fam = MiniImageNet(data_dir / "miniimagenet", protocol="train64", ways=5, shots=1, progress=False)
    return fam, time.perf_counter() - start


def test_real_omniglot_20way_1shot(omniglot_real):
    fam, _ = omniglot_real
    assert fam.num_classes("train") == 4 * 1200 and fam.num_classes("test") == 4 * 423
    chars = {s: {n.rsplit("/", 1)[0] for n in fam.class_names(s)} for s in ("train", "test")}
    assert len(chars["train"]) == 1200 and len(chars["test"]) == 423
    assert not chars["train"] & chars["test"]
    assert any(n.startswith("images_evaluation/") for n in chars["train"])  # the sets are pooled
    assert sum(n.endswith("/rot270") for n in fam.class_names("test")) == 423
    i = fam.class_names("train").index(next(n for n in fam.class_names("train") if n.endswith("rot000")))
    base = fam.class_images("train", i)
    assert base.shape == (20, 1, 28, 28)
    assert float(base.mean()) < 0.3  # mostly background, which is 0
    np.testing.assert_array_equal(fam.class_images("train", i + 2), np.rot90(base, 2, axes=(2, 3)))

    # (Sampling speed is a benchmark's business, not a test's: a wall-clock bound here failed under load.)
    batch = fam.sample(KEY, 5, "train")
    assert batch.support_x.shape == (5, 20, 1, 28, 28) and batch.support_x.dtype == jnp.float32
    assert batch.query_x.shape == (5, 100, 1, 28, 28)
    assert batch.support_y.dtype == jnp.int32
    np.testing.assert_array_equal(batch.support_y, np.tile(np.arange(20), (5, 1)))
    assert set(np.unique(batch.query_y)) == set(range(20))
    assert 0.0 <= float(batch.support_x.min()) and float(batch.support_x.max()) <= 1.0
    again = fam.sample(KEY, 5, "train")
    np.testing.assert_array_equal(again.query_x, batch.query_x)
    test = fam.sample(KEY, 5, "test")
    assert test.support_x.shape == (5, 20, 1, 28, 28)


def test_real_miniimagenet_train64_5way_1shot(mini_real, data_dir):
    fam, _ = mini_real
    assert fam.num_classes("train") == 48 and fam.num_classes("test") == 16
    assert not set(fam.class_names("train")) & set(fam.class_names("test"))
    assert all(n.startswith("n") and len(n) == 9 for n in fam.class_names("test"))
    imgs = fam.class_images("test", 0)
    assert imgs.shape == (600, 3, 84, 84)
    batch = fam.sample(KEY, 2, "train")
    assert batch.support_x.shape == (2, 5, 3, 84, 84) and batch.support_x.dtype == jnp.float32
    assert batch.query_x.shape == (2, 75, 3, 84, 84)
    np.testing.assert_array_equal(batch.support_y, [[0, 1, 2, 3, 4]] * 2)
    assert 0.0 <= float(batch.query_x.min()) and float(batch.query_x.max()) <= 1.0
    assert 0.2 < float(batch.query_x.mean()) < 0.8  # natural images, not blank
    np.testing.assert_array_equal(fam.sample(KEY, 2, "train").support_x, batch.support_x)
    with pytest.raises(DataError, match="protocol='train64'"):
        MiniImageNet(data_dir / "miniimagenet", progress=False)  # val/test images absent

