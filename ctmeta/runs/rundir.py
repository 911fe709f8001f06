"""The files of a run directory (see `ctmeta.runs`), and what a run records about
the process that made it."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _dt
import json
import os
import pathlib
import re

from .._errors import CheckpointError, InputError
from .._io import atomic_write_text

__all__ = ["CHECKPOINT_CONFIG_FIELDS", "KEEP_CHECKPOINTS", "METRIC_COLUMNS", "MetricsDamage", "NONFINITE_POLICIES",
           "RESUME_SOLVERS", "RunDir", "check_writable", "default_run_dir", "dtype_name", "package_versions"]

METRIC_COLUMNS = ("iteration", "meta_loss", "grad_norm", "T", "seconds", "skipped")
_OPTIONAL_COLUMNS = {"skipped": 0.0}  # absent from runs written before the column existed
#: Configuration entries absent from runs written before they existed, read as
#: the value that run had (so such a run resumes, and compares equal to its
#: configuration as written today).
_OPTIONAL_CONFIG = {"flow": {"name": "gradient"}}
#: The fields of the configuration a checkpoint must agree with to be resumed.
CHECKPOINT_CONFIG_FIELDS = ("benchmark", "method", "T", "learn_T", "steps", "meta_batch", "ways", "shots",
                            "queries", "seed", "model", "optimizer", "method_options", "flow")
NONFINITE_POLICIES = {"error": "raise", "skip-task": "skip-task"}
KEEP_CHECKPOINTS = 2
_CKPT = re.compile(r"^ckpt-(\d+)\.eqx$")


#: A-MAML's adaptive solvers: a run may change from one to the other on resume (`ctmeta train --resume
#: --solver`: the same flow to the same tolerances), so its checkpoints load across the change.
RESUME_SOLVERS = ("dopri5", "rkc2")


def _resumable_as(name: str, value):
    """A configuration entry as a checkpoint must agree with it: A-MAML's adaptive solver (one of
    `RESUME_SOLVERS`) is left out."""
    if name == "method_options" and isinstance(value, dict) and value.get("solver", "dopri5") in RESUME_SOLVERS:
        return {k: v for k, v in value.items() if k != "solver"}
    return value


_HELD_LOCKS: dict[str, int] = {}  # run directory -> open, flock'ed file descriptor


def default_run_dir(benchmark: str, method: str) -> pathlib.Path:
    """`runs/<benchmark>-<method>-<timestamp>`, made unique."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = pathlib.Path("runs") / f"{benchmark}-{method}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Raise `InputError` ("`what` ... is not writable") unless a file can be
    created in the directory `path`, or, if it does not exist yet, `path` can
    be made under its nearest existing parent. `what` names it for the user,
    e.g. `"--out runs/x"`. Tried for real (a temporary file), since a
    read-only file system or root's permissions defeat `os.access`."""
    import errno
    import tempfile

    target = pathlib.Path(path)
    probe = target
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            raise InputError(f"{what} is a broken symbolic link")
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if not probe.is_dir():
        if probe == target:
            raise InputError(f"{what} is a file, not a directory")
        raise InputError(f"{what}: its parent {probe} is a file, not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ctmeta-write-check.", suffix=".tmp", dir=probe)
    except OSError as err:
        why = {errno.EROFS: "a read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.ENOSPC: "no space left",
               errno.EDQUOT: "disk quota exceeded"}.get(err.errno, err.strerror or type(err).__name__)
        where = "" if probe == target else f" (its parent {probe} does not allow creating it)"
        raise InputError(f"{what} is not writable: {why}{where}; choose a directory you can write to") from None
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:
        pass


def _ranges(values) -> str:
    """`[12, 13, 14, 20]` as "12..14, 20"."""
    values = sorted(values)
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(v) if v == start else f"{start}..{v}")
            start = None
    return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class MetricsDamage:
    """The rows metrics.csv lacks of iterations 1..`upto`: `missing` (the
    iterations without a whole row) and `torn` (the iterations of rows cut
    short, `None` where not even that reads). False when there is none."""

    upto: int
    missing: tuple[int, ...]
    torn: tuple[int | None, ...]

    def __bool__(self) -> bool:
        return bool(self.missing or self.torn)

    def describe(self) -> str:
        """E.g. "metrics.csv lacks the rows of iterations 12..60 (49 of the 60 up to the checkpoint; the row of
        iteration 12 is torn)"."""
        torn = [t for t in self.torn if t is not None]
        unreadable = len(self.torn) - len(torn)
        notes = []
        if torn:
            notes.append(f"the row{'s' if len(torn) > 1 else ''} of iteration{'s' if len(torn) > 1 else ''} "
                         f"{_ranges(torn)} {'are' if len(torn) > 1 else 'is'} torn")
        if unreadable:
            notes.append(f"{unreadable} line{'s' if unreadable > 1 else ''} unreadable")
        if not self.missing:
            return f"metrics.csv has {' and '.join(notes)}"
        return (f"metrics.csv lacks the rows of iterations {_ranges(self.missing)} ({len(self.missing)} of the "
                f"{self.upto} up to the checkpoint" + (f"; {'; '.join(notes)}" if notes else "") + ")")


class RunDir:
    """The files of one run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)

    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.csv")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")
    figure_dir = property(lambda self: self.path / "figures")
    results_path = property(lambda self: self.path / "results.md")

    # -- creation / opening ------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, config: dict) -> "RunDir":
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise InputError(f"`out` {run.path} exists and is not a directory")
        if run.config_path.exists():
            raise InputError(
                f"`out` {run.path} already holds a run; continue it with `resume` {run.path} "
                "or choose another `out`"
            )
        run.path.mkdir(parents=True, exist_ok=True)
        run.checkpoint_dir.mkdir(exist_ok=True)
        run.write_config(config)
        atomic_write_text(run.metrics_path, ",".join(METRIC_COLUMNS) + "\n")
        return run

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunDir":
        run = cls(path)
        if str(path) == "":
            raise InputError("the run directory is an empty string; give the directory ctmeta train wrote")
        if run.path.exists() and not run.path.is_dir():
            raise InputError(f"run directory {run.path} is a file, not a directory; give the directory "
                             "ctmeta train wrote (it holds config.json)")
        if not run.path.is_dir():
            raise InputError(f"run directory {run.path} does not exist")
        if not run.config_path.is_file():
            raise CheckpointError(f"{run.path} is not a ctmeta run directory: config.json is missing")
        return run

    def read_config(self) -> dict:
        """The run's configuration, checked ([`check_config`][ctmeta.presets.check_config]):
        a `CheckpointError` names an entry that is missing or has a value the
        commands cannot use, and what was expected."""
        try:
            config = json.loads(self.config_path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {self.config_path}: {err}") from None
        if not isinstance(config, dict) or "benchmark" not in config or "method" not in config:
            raise CheckpointError(f"{self.config_path} is not a ctmeta run configuration")
        from ..presets import check_config

        return check_config({**_OPTIONAL_CONFIG, **config}, str(self.config_path), CheckpointError)

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.config_path, json.dumps(config, indent=2, sort_keys=False) + "\n")

    # -- metrics -------------------------------------------------------------------

    def read_metrics(self) -> list[dict[str, float]]:
        """The rows of metrics.csv that read whole; a torn or unreadable row is
        left out (see [`metrics_damage`][ctmeta.runs.RunDir.metrics_damage])."""
        return [row for row in self._parsed_rows() if isinstance(row, dict)]

    def _parsed_rows(self) -> list[dict[str, float] | str]:
        """Each data line of metrics.csv: its row, or (torn, unreadable) its text."""
        if not self.metrics_path.is_file():
            return []
        with open(self.metrics_path, newline="") as f:
            lines = f.read().splitlines()
        if not lines:
            return []
        header = lines[0].split(",")
        out: list[dict[str, float] | str] = []
        for line in lines[1:]:
            if not line.strip():
                continue
            values = next(csv.reader([line]))
            row = dict(zip(header, values)) if len(values) == len(header) else {}
            try:
                out.append({
                    k: float(_OPTIONAL_COLUMNS[k] if k in _OPTIONAL_COLUMNS and row.get(k) is None else row[k])
                    for k in METRIC_COLUMNS
                })
            except (KeyError, TypeError, ValueError):
                out.append(line)  # a torn row: a crash mid-write, or a damaged file
        return out

    def metrics_damage(self, upto: int) -> "MetricsDamage":
        """What metrics.csv lacks of the rows of iterations 1..`upto` (a
        checkpoint's iteration, whose rows were all written before it): the
        iterations without a whole row, and the torn rows among them."""
        rows = self._parsed_rows()
        have = {int(r["iteration"]) for r in rows if isinstance(r, dict)}
        torn = []
        for r in rows:
            if isinstance(r, str):
                head = r.split(",", 1)[0].strip()
                it = int(head) if head.isdigit() else None
                if it is None or (it <= upto and it not in have):
                    torn.append(it)
        missing = tuple(i for i in range(1, upto + 1) if i not in have)
        return MetricsDamage(upto, missing, tuple(torn))

    def truncate_metrics(self, iteration: int) -> list[dict[str, float]]:
        """Keep the rows up to `iteration` (the resumed checkpoint's); return them."""
        if not self.metrics_path.is_file():
            atomic_write_text(self.metrics_path, ",".join(METRIC_COLUMNS) + "\n")
            return []
        with open(self.metrics_path, newline="") as f:
            lines = f.read().splitlines()
        keep = [lines[0]] if lines and lines[0].startswith("iteration,") else [",".join(METRIC_COLUMNS)]
        commas = keep[0].count(",")
        for line in lines[1:]:
            head = line.split(",", 1)[0]
            try:
                if int(head) <= iteration and line.count(",") == commas and line.split(",")[-1].strip():
                    keep.append(line)
            except ValueError:
                continue
        atomic_write_text(self.metrics_path, "\n".join(keep) + "\n")
        return self.read_metrics()

    # -- exclusive use, leftovers -------------------------------------------------

    def lock(self) -> None:
        """Take an exclusive lock on the run directory for this process's
        lifetime (released by the OS on exit, `kill -9` included); raise
        `InputError` if another process holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover (not POSIX)
            return
        where = str(self.path.resolve())
        if where in _HELD_LOCKS:  # this process already holds it (in-process reruns)
            return
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(
                f"run directory {self.path} is in use by another ctmeta process; wait for it to end "
                "or stop it first"
            ) from None
        _HELD_LOCKS[where] = fd  # kept open: the lock lives as long as the process

    def unlock(self) -> None:
        """Release the lock `lock` took (if this process holds it)."""
        fd = _HELD_LOCKS.pop(str(self.path.resolve()), None)
        if fd is not None:
            os.close(fd)

    def remove_temporaries(self) -> list[pathlib.Path]:
        """Delete the `.<name>.<random>.tmp` files an interrupted atomic write left."""
        removed = []
        for folder in (self.path, self.checkpoint_dir, self.figure_dir):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                    try:
                        p.unlink()
                        removed.append(p)
                    except OSError:
                        pass
        return removed

    # -- checkpoints ---------------------------------------------------------------

    @staticmethod
    def _load_checked(it: int | None, path: pathlib.Path, like, config: dict | None):
        from ..checkpoint import load_state

        state, meta = load_state(path, like)
        if it is not None and int(state.iteration) != it:
            raise CheckpointError(f"checkpoint {path} holds iteration {int(state.iteration)}, not {it} (renamed?)")
        saved = meta.get("config") if isinstance(meta, dict) else None
        if config is not None and isinstance(saved, dict):
            for name in CHECKPOINT_CONFIG_FIELDS:
                if name in saved and _resumable_as(name, saved[name]) != _resumable_as(name, config.get(name)):
                    raise CheckpointError(
                        f"checkpoint {path} was written with {name}={saved[name]!r} but the run's "
                        f"config.json has {config.get(name)!r} (incompatible)"
                    )
        return state, meta

    def load_checkpoint(self, which: str, like, *, config: dict | None = None):
        """The checkpoint `which` (an iteration number, or the path of a
        `.eqx` file), checked as in `load_latest` but with no fallback:
        `(state, metadata, path)`."""
        text = str(which).strip()
        if text.isdigit():
            it = int(text)
            path = self.checkpoint_dir / f"ckpt-{it}.eqx"
            if not path.is_file():
                have = ", ".join(str(i) for i, _ in self.checkpoints()) or "none"
                raise CheckpointError(f"`checkpoint` {text}: {self.path} has no checkpoint of iteration {it} "
                                      f"(it has: {have})")
        else:
            path = pathlib.Path(text).expanduser()
            if not path.exists() and not path.is_absolute() and (self.checkpoint_dir / text).exists():
                path = self.checkpoint_dir / text
            m = _CKPT.match(path.name)
            it = int(m.group(1)) if m else None
            if not path.is_file():
                what = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
                raise CheckpointError(f"`checkpoint` {path} {what}")
        state, meta = self._load_checked(it, path, like, config)
        return state, meta, path

    @contextlib.contextmanager
    def locked(self):
        """`lock()` for the duration of a block, released after it unless
        this process held the lock already."""
        held = str(self.path.resolve()) in _HELD_LOCKS
        self.lock()
        try:
            yield self
        finally:
            if not held:
                self.unlock()

    def checkpoints(self) -> list[tuple[int, pathlib.Path]]:
        """`(iteration, path)` of the checkpoints, oldest first."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = []
        for p in self.checkpoint_dir.iterdir():
            m = _CKPT.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save_checkpoint(self, state, metadata: dict, keep=()) -> pathlib.Path:
        """Save `state` as `ckpt-<iteration>.eqx` and prune the older ones: the
        newest `KEEP_CHECKPOINTS` stay, and so do the iterations in `keep`
        (those a run evaluates later, e.g. 150, 500 and 1000)."""
        from ..checkpoint import save_state, sidecar_path

        it = int(state.iteration)
        path = self.checkpoint_dir / f"ckpt-{it}.eqx"
        save_state(path, state, metadata)
        keep = {int(k) for k in keep}
        for old_it, old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
            if old_it in keep:
                continue
            for p in (old, sidecar_path(old)):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
        return path

    def load_latest(self, like, *, warn=print, config: dict | None = None):
        """The newest checkpoint that loads; falls back to the one before it,
        saying so through `warn`. A checkpoint is refused when its file is
        truncated or corrupted (sha256), its sidecar is missing or malformed,
        its arrays do not match `like`'s shapes and dtypes, it holds another
        iteration than its name, or (given `config`) its saved configuration
        differs from `config` in `CHECKPOINT_CONFIG_FIELDS`."""
        ckpts = self.checkpoints()
        if not ckpts:
            raise CheckpointError(
                f"{self.path} has no checkpoint to resume from (expected {self.checkpoint_dir}/ckpt-<i>.eqx "
                "with its ckpt-<i>.json); start a new run instead"
            )
        errors = []
        for n, (it, path) in enumerate(reversed(ckpts)):
            try:
                state, meta = self._load_checked(it, path, like, config)
            except CheckpointError as err:
                errors.append(str(err))
                older = "; falling back to the previous checkpoint" if n + 1 < len(ckpts) else ""
                warn(f"warning: skipping {path.name}: {err}{older}")
                continue
            if errors:
                warn(f"warning: resuming from {path.name} (iteration {it}), the newest usable checkpoint; "
                     f"{len(errors)} newer one{'s' if len(errors) > 1 else ''} skipped")
            return state, meta, path
        raise CheckpointError(
            f"no usable checkpoint in {self.checkpoint_dir} ({len(errors)} tried, none loads); the newest: "
            f"{errors[0]} -- restore a good checkpoint or start a new run"
        )


def dtype_name() -> str:
    """`"float64"` or `"float32"`: the floating-point precision of this
    process's JAX arrays (`jax_enable_x64`). A run records it, and a resumed
    run must match it, since checkpoints hold arrays of that dtype."""
    import jax

    return "float64" if jax.config.jax_enable_x64 else "float32"


def package_versions() -> dict[str, str]:
    """The versions of Python and of the packages a run's numbers depend on
    (jax, jaxlib, equinox, diffrax, optax, numpy), for its config.json."""
    import sys
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "equinox", "diffrax", "optax", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
