"""Run directories: configuration, metrics, checkpoints, figures and results.

A run directory holds

    config.json               everything needed to rerun (resolved defaults, version)
    metrics.csv               one row per meta-iteration: iteration, meta_loss, grad_norm, T, seconds,
                              skipped (tasks left out as non-finite with --on-nonfinite skip-task)
    checkpoints/ckpt-<i>.eqx  the learner state after i meta-iterations (+ ckpt-<i>.json: shapes,
                              sha256, the configuration and the sampler's rule); the last 2 kept
    figures/meta_loss.png     the meta-loss curve
    figures/error_vs_steps.png  meta-test error against adaptation steps, learned vs random init
    results.md, results.json  the final table

and is written so that an interrupted run can continue: every file is
replaced atomically, the metrics rows after the last checkpoint are dropped
on resume, and the meta-batch of iteration `i` is drawn with
`fold_in(key, i)`, so a resumed run ends exactly as an uninterrupted one.

`train` checkpoints every `checkpoint_every` iterations and when it receives
SIGINT or SIGTERM (then raises [`Interrupted`][], a `KeyboardInterrupt`);
a signal that arrives while a metrics row or a checkpoint is being written
takes effect once it is written. After `kill -9`, `load_latest` skips a
checkpoint that is truncated, corrupted or incompatible and says so, falling
back to the previous one.

In a multi-process run (`ctmeta.sharding`) every process trains and
evaluates, and process 0 alone writes the run directory; `--resume` has
every process read the same checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import math
import os
import pathlib
import re
import signal
import threading
import time

from ._errors import CheckpointError, InputError, NumericalError
from ._io import atomic_write_bytes, atomic_write_text

__all__ = ["Interrupted", "RunDir", "default_run_dir", "dtype_name", "evaluate_run", "package_versions", "save_figure",
           "train"]

METRIC_COLUMNS = ("iteration", "meta_loss", "grad_norm", "T", "seconds", "skipped")
_OPTIONAL_COLUMNS = {"skipped": 0.0}  # absent from runs written before the column existed
#: The fields of the configuration a checkpoint must agree with to be resumed.
CHECKPOINT_CONFIG_FIELDS = ("benchmark", "method", "T", "learn_T", "steps", "meta_batch", "ways", "shots",
                            "queries", "seed", "model", "optimizer", "method_options")
NONFINITE_POLICIES = {"error": "raise", "skip-task": "skip-task"}
KEEP_CHECKPOINTS = 2
_CKPT = re.compile(r"^ckpt-(\d+)\.eqx$")


_HELD_LOCKS: dict[str, int] = {}  # run directory -> open, flock'ed file descriptor


def _atomic_text(path: pathlib.Path, text: str) -> None:
    atomic_write_text(path, text)


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
            raise InputError(f"--out {run.path} exists and is not a directory")
        if run.config_path.exists():
            raise InputError(
                f"--out {run.path} already holds a run; continue it with --resume {run.path} "
                "or choose another --out"
            )
        run.path.mkdir(parents=True, exist_ok=True)
        run.checkpoint_dir.mkdir(exist_ok=True)
        run.write_config(config)
        _atomic_text(run.metrics_path, ",".join(METRIC_COLUMNS) + "\n")
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
        try:
            config = json.loads(self.config_path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {self.config_path}: {err}") from None
        if not isinstance(config, dict) or "benchmark" not in config or "method" not in config:
            raise CheckpointError(f"{self.config_path} is not a ctmeta run configuration")
        return config

    def write_config(self, config: dict) -> None:
        _atomic_text(self.config_path, json.dumps(config, indent=2, sort_keys=False) + "\n")

    # -- metrics -------------------------------------------------------------------

    def read_metrics(self) -> list[dict[str, float]]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        with open(self.metrics_path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    rows.append({
                        k: float(_OPTIONAL_COLUMNS[k] if k in _OPTIONAL_COLUMNS and row.get(k) is None else row[k])
                        for k in METRIC_COLUMNS
                    })
                except (KeyError, TypeError, ValueError):
                    break  # a torn last line from a crash
        return rows

    def truncate_metrics(self, iteration: int) -> list[dict[str, float]]:
        """Keep the rows up to `iteration` (the resumed checkpoint's); return them."""
        if not self.metrics_path.is_file():
            _atomic_text(self.metrics_path, ",".join(METRIC_COLUMNS) + "\n")
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
        _atomic_text(self.metrics_path, "\n".join(keep) + "\n")
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
        from .checkpoint import load_state

        state, meta = load_state(path, like)
        if it is not None and int(state.iteration) != it:
            raise CheckpointError(f"checkpoint {path} holds iteration {int(state.iteration)}, not {it} (renamed?)")
        saved = meta.get("config") if isinstance(meta, dict) else None
        if config is not None and isinstance(saved, dict):
            for name in CHECKPOINT_CONFIG_FIELDS:
                if name in saved and saved[name] != config.get(name):
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
                raise CheckpointError(f"--checkpoint {text}: {self.path} has no checkpoint of iteration {it} "
                                      f"(it has: {have})")
        else:
            path = pathlib.Path(text).expanduser()
            if not path.exists() and not path.is_absolute() and (self.checkpoint_dir / text).exists():
                path = self.checkpoint_dir / text
            m = _CKPT.match(path.name)
            it = int(m.group(1)) if m else None
            if not path.is_file():
                what = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
                raise CheckpointError(f"--checkpoint {path} {what}")
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

    def save_checkpoint(self, state, metadata: dict) -> pathlib.Path:
        from .checkpoint import save_state, sidecar_path

        it = int(state.iteration)
        path = self.checkpoint_dir / f"ckpt-{it}.eqx"
        save_state(path, state, metadata)
        for old_it, old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
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


# --------------------------------------------------------------------------- #
# Console output
# --------------------------------------------------------------------------- #


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Reporter:
    """Progress bars (rich, on stderr) and log lines (stdout).

    The bars are drawn only when stderr is a terminal: written to a file or
    a pipe, the output is the log lines alone (as with `quiet`)."""

    def __init__(self, quiet: bool = False, silent: bool = False):
        import sys

        self.quiet = quiet or silent or not _is_terminal(sys.stderr)
        #: Print nothing at all (the processes other than 0 of a multi-process run).
        self.silent = silent

    def log(self, message: str) -> None:
        if not self.silent:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        """`ctmeta: warning: <message>` on stderr, on one line."""
        if not self.silent:
            import sys

            print(f"ctmeta: warning: {one_line(message)}", file=sys.stderr, flush=True)

    def progress(self, description: str, total: int, completed: int = 0):
        return _Bar(description, total, completed, enabled=not self.quiet)


class _Bar:
    def __init__(self, description, total, completed, enabled):
        self.enabled = enabled
        self.description = description
        self.total = total
        self.completed = completed
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class RateColumn(ProgressColumn):
                def render(self, task):
                    speed = task.finished_speed or task.speed
                    if speed is None:
                        return Text("-- it/s", style="progress.data.speed")
                    if speed < 1:
                        return Text(f"{1 / speed:.2f} s/it", style="progress.data.speed")
                    return Text(f"{speed:.1f} it/s", style="progress.data.speed")

            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                RateColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, completed=self.completed)
        return self

    def update(self, completed: int) -> None:
        self.completed = completed
        if self._progress is not None:
            self._progress.update(self._task, completed=completed)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False


def one_line(message) -> str:
    """`message` on one line: its lines joined by "; " (or a space after a
    full stop, nothing before a closing bracket), for a library's multi-line
    error text, say."""
    out = ""
    for line in (line.strip() for line in str(message).strip().splitlines()):
        if not line:
            continue
        if not out:
            out = line
        elif line[0] in ")]}.,;:" or out[-1] in "([{":
            out += line
        elif out[-1] in ".;:,":
            out += " " + line
        else:
            out += "; " + line
    return out


def _fmt(x: float) -> str:
    return f"{x:.4e}" if (x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4)) else f"{x:.4f}"


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


class Interrupted(KeyboardInterrupt):
    """`train` stopped on SIGINT or SIGTERM after saving a checkpoint; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


class _Signals:
    """SIGINT/SIGTERM -> `Interrupted`, deferred while a `critical()` block runs."""

    def __init__(self):
        self.pending: int | None = None
        self.depth = 0
        self.previous: dict = {}

    def _handler(self, signum, frame):
        if self.depth:
            self.pending = signum
            return
        raise Interrupted(signum)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except (ValueError, OSError):  # pragma: no cover
                pass

    def restore(self) -> None:
        for sig, old in self.previous.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError, TypeError):  # pragma: no cover
                pass
        self.previous = {}

    @contextlib.contextmanager
    def critical(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                raise Interrupted(signum)


def _checkpoint_config(cfg: dict) -> dict:
    return {k: cfg.get(k) for k in CHECKPOINT_CONFIG_FIELDS}


def train(exp, run: RunDir, *, state=None, seconds_offset: float = 0.0, reporter: Reporter | None = None):
    """Meta-train from `state` (default: a fresh one) up to the configured
    number of meta-iterations, writing one metrics row per iteration and a
    checkpoint every `checkpoint_every` iterations and at the end. Returns
    the final state.

    SIGINT and SIGTERM save a checkpoint of the last completed iteration and
    raise [`Interrupted`][]; a `NumericalError` (a non-finite meta-gradient,
    or a solve out of steps, under `on_nonfinite="error"`) saves the last
    good state the same way before propagating. `config["on_nonfinite"]`
    (`"error"`, default, or `"skip-task"`) sets the learner's policy.

    In a multi-process run (`ctmeta.sharding`) every process calls `train`
    and computes; process 0 alone writes metrics rows and checkpoints."""
    from .sharding import is_main_process

    writes = is_main_process()

    reporter = reporter or Reporter()
    cfg = exp.config
    learner, family = exp.learner, exp.family
    total = int(cfg["meta_iterations"])
    every = int(cfg["checkpoint_every"])
    meta_batch = int(cfg["meta_batch"])
    policy = cfg.get("on_nonfinite") or "error"
    if policy not in NONFINITE_POLICIES:
        raise InputError(f"--on-nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {policy!r}")
    if learner.on_nonfinite != NONFINITE_POLICIES[policy]:
        if learner.num_traces:
            raise InputError("train: the learner was already compiled with another on_nonfinite policy")
        learner.on_nonfinite = NONFINITE_POLICIES[policy]
    if state is None:
        state = learner.init(exp.run_key)
    start = int(state.iteration)
    log_every = max(1, total // 10)
    t0 = time.perf_counter()
    last_saved = start
    skipped_total = 0
    skipped_iterations = 0
    causes_seen: set[str] = set()

    def metadata(elapsed):
        return {
            "seconds": elapsed,
            "benchmark": cfg["benchmark"],
            "method": cfg["method"],
            "config": _checkpoint_config(cfg),
            # The sampler has no state of its own: iteration i's meta-batch is
            # family.sample(fold_in(state.key, i), meta_batch, "train").
            "sampler": {"rule": "fold_in(key, iteration)", "meta_batch": meta_batch, "split": "train"},
            "on_nonfinite": policy,
        }

    if start >= total:
        reporter.log(f"already at meta-iteration {start} of {total}; nothing to train")
        return state
    reporter.log(
        f"meta-training {cfg['benchmark']} with {cfg['method']}: iterations {start + 1}..{total}, "
        f"meta-batch {meta_batch}, T {cfg['T']:g}{' (learned)' if cfg.get('learn_T') else ''}, "
        f"steps {cfg['steps'] if cfg['steps'] is not None else 'adaptive (dopri5)'}"
        + (", skipping non-finite tasks" if policy == "skip-task" else "")
    )
    signals = _Signals()
    signals.install()
    f = open(run.metrics_path if writes else os.devnull, "a", newline="")
    try:
        if writes and start == 0 and not run.checkpoints():
            with signals.critical():  # so that `--resume` works however early the run stops
                run.save_checkpoint(state, metadata(seconds_offset))
        with reporter.progress("meta-training", total, start) as bar:
            for it in range(start, total):
                key = learner.iteration_key(state, it)
                batch = family.sample(key, meta_batch, "train")
                new_state, m = learner.meta_step(state, batch)
                done = it + 1
                elapsed = seconds_offset + (time.perf_counter() - t0)
                skipped = int(m["skipped"])
                row = (done, float(m["meta_loss"]), float(m["grad_norm"]), float(m["T"]), elapsed)
                line = ",".join([str(done)] + [repr(x) for x in row[1:4]] + [f"{elapsed:.3f}", str(skipped)])
                with signals.critical():  # the state, its metrics row and its checkpoint go together
                    state = new_state
                    f.write(line + "\n")
                    f.flush()
                    if writes and (done % every == 0 or done == total):
                        run.save_checkpoint(state, metadata(elapsed))
                        last_saved = done
                skipped_total += skipped
                if skipped:
                    skipped_iterations += 1
                    why = learner.solve_failures(m["task_status"])  # "" unless an inner solve failed
                    cause = re.sub(r"tasks? [\d, ]+ of the meta-batch", "", why)
                    if cause not in causes_seen:  # once per cause: the count goes on in the log lines
                        causes_seen.add(cause)
                        reporter.warn(f"meta-iteration {done}: skipped {skipped} of {meta_batch} tasks "
                                      "with a non-finite loss or meta-gradient" + (f" ({why})" if why else "")
                                      + "; later skips are counted in the log lines and in metrics.csv "
                                      "(column skipped)")
                bar.update(done)
                if done == start + 1:
                    t_first = time.perf_counter()  # the rate leaves out the compilation
                if done == start + 1 + _PROJECTION_AFTER and total - done >= _PROJECTION_AFTER:
                    per_it = (time.perf_counter() - t_first) / _PROJECTION_AFTER
                    reporter.log(f"measured {per_it:.3g} s a meta-iteration over iterations {start + 2}..{done} "
                                 f"(compilation excluded): projected {format_duration(per_it * (total - done))} for the "
                                 f"remaining {total - done} of {total} meta-iterations, evaluation not included")
                if done == start + 1:
                    reporter.log(
                        f"[iter {done:>{len(str(total))}}/{total}] meta-loss {_fmt(row[1])}  "
                        f"grad-norm {_fmt(row[2])}  T {row[3]:.4g}  "
                        f"(compiled and ran in {time.perf_counter() - t0:.1f} s)"
                    )
                elif done % log_every == 0 or done == total:
                    rate = (done - start - 1) / max(time.perf_counter() - t_first, 1e-9)
                    eta = (total - done) / rate if rate > 0 else float("nan")
                    reporter.log(
                        f"[iter {done:>{len(str(total))}}/{total}] meta-loss {_fmt(row[1])}  "
                        f"grad-norm {_fmt(row[2])}  T {row[3]:.4g}  {rate:.2f} it/s  "
                        f"ETA {format_duration(eta)}"
                        + (f"  skipped tasks {skipped_total}" if skipped_total else "")
                    )
    except (KeyboardInterrupt, NumericalError):
        # Keep the last completed iteration: a resumed run continues from it.
        f.flush()
        if writes and int(state.iteration) > last_saved:
            with signals.critical():
                run.save_checkpoint(state, metadata(seconds_offset + (time.perf_counter() - t0)))
        raise
    finally:
        f.close()
        signals.restore()
    if skipped_total:
        reporter.warn(f"skipped {skipped_total} tasks in {skipped_iterations} of the {total - start} meta-iterations "
                      "run (--on-nonfinite skip-task; per iteration in metrics.csv, column skipped)")
    return state


# Iterations after the first (compiling) one over which a run's time per
# meta-iteration is measured for its projected wall time.
_PROJECTION_AFTER = 10


def format_duration(seconds: float) -> str:
    """`H:MM:SS` (or `M:SS` under an hour); `--:--` for a non-finite duration."""
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# --------------------------------------------------------------------------- #
# Evaluation, results and figures
# --------------------------------------------------------------------------- #


def eval_curve(table_steps, every: int | None = None) -> list[int]:
    """The steps of the error-vs-steps curve for the table's `table_steps`:
    every `every` steps from 0 to the largest (default: about 20 points),
    plus the table's own."""
    table_steps = sorted({int(x) for x in table_steps})
    top = table_steps[-1]
    if every is None:
        every = max(1, top // 20)
    return sorted(set(range(0, top + 1, max(1, int(every)))) | set(table_steps) | {0})


def evaluate_run(exp, run: RunDir, state, *, reporter: Reporter | None = None, steps=None, tasks: int | None = None,
                 lr: float | None = None, log_y: bool = False) -> dict:
    """Evaluate the learned and a random initialisation on the meta-test
    tasks; print the table, then write results.md, results.json and the
    figures (process 0 of a multi-process run only; all of them evaluate).

    `steps` (the table's adaptation steps), `tasks` (the first `tasks`
    meta-test tasks) and `lr` (the GD learning rate) override the run's
    configuration; `log_y` draws the error-vs-steps figure on a log scale."""
    from .sharding import is_main_process

    reporter = reporter or Reporter()
    cfg = exp.config
    learner = exp.learner
    ev = cfg["eval"]
    if steps is None:
        table_steps = [int(x) for x in ev["steps"]]
        curve = [int(x) for x in ev["curve"]]
    else:
        table_steps = sorted({int(x) for x in steps})
        old = [int(x) for x in ev.get("curve") or []]
        every = old[1] - old[0] if len(old) > 1 else None
        curve = eval_curve(table_steps, every)
    lr = float(ev["lr"]) if lr is None else float(lr)
    batch = exp.eval_batch()
    import jax

    available = jax.tree.leaves(batch)[0].shape[0]
    if tasks is not None:
        if tasks > available:
            raise InputError(f"--tasks {tasks} exceeds the {available} meta-test tasks of {cfg['benchmark']}; "
                             f"the maximum is {available}")
        batch = type(batch)(*(a[:tasks] for a in batch))
    n_tasks = jax.tree.leaves(batch)[0].shape[0]
    evaluations = {}
    inits = {"learned": state, "random": learner.init(exp.run_key)}
    for name, st in inits.items():
        with reporter.progress(f"evaluating {name} init", n_tasks) as bar:
            evaluations[name] = learner.evaluate(
                st, batch, curve, lr=lr, chunk_size=exp.eval_chunk, progress=bar.update
            )
    T_learned = float(learner.horizon(state))
    # Ratings: the other scales a reader of "nRMSE" may assume, at the table's steps.
    other = {}
    from .presets import BENCHMARKS

    preset = BENCHMARKS.get(cfg["benchmark"])
    if preset is not None and preset.kind == "ratings" and hasattr(exp.family, "mean_rating"):
        from .tasks.metrics import RelativeSquaredError, rmse

        rse = RelativeSquaredError(exp.family.mean_rating())
        for metric_name, fn in (("rmse", rmse), ("relative_squared_error", rse)):
            other[metric_name] = {}
            for name, st in inits.items():
                e = learner.evaluate(st, batch, table_steps, lr=lr, chunk_size=exp.eval_chunk, metric=fn)
                other[metric_name][name] = {"steps": e.steps.tolist(), "mean": e.mean.tolist(),
                                            "ci95": e.ci95.tolist(),
                                            "per_task": {str(int(s)): e.per_task[:, i].tolist()
                                                         for i, s in enumerate(e.steps)}}
    results = {
        "benchmark": cfg["benchmark"],
        "method": cfg["method"],
        "iteration": int(state.iteration),
        "metric": exp.metric_name,
        "lower_is_better": exp.lower_is_better,
        "tasks": int(n_tasks),
        "lr": lr,
        "T": T_learned,
        "table_steps": table_steps,
        "curve_steps": curve,
        **{
            name: {"mean": e.mean.tolist(), "ci95": e.ci95.tolist(),
                   # each task's error at the table's steps, for paired tests between methods
                   "per_task": {str(st): e.per_task[:, curve.index(st)].tolist() for st in table_steps}}
            for name, e in evaluations.items()
        },
    }
    if other:
        results["other_metrics"] = other  # {metric: {init: {steps, mean, ci95, per_task}}}
    # The table first: whatever happens to the files, the numbers are on screen.
    reporter.log("")
    reporter.log(results_text(results))
    if is_main_process():
        _atomic_text(run.path / "results.json", json.dumps(results, indent=2) + "\n")
        _atomic_text(run.results_path, results_markdown(results))
        try:
            write_figures(run, results, log_y=log_y)
        except Exception as err:  # figures are a convenience; never lose a run over them
            reporter.warn(f"could not draw the figures: {type(err).__name__}: {err}")
    reporter.log(f"\nrun directory: {run.path}")
    return results


def _cell(results: dict, name: str, step: int) -> str:
    i = results["curve_steps"].index(step)
    mean, ci = results[name]["mean"][i], results[name]["ci95"][i]
    if results["metric"] == "accuracy":
        return f"{100 * mean:.2f} ± {100 * ci:.2f}%"
    return f"{mean:.4f} ± {ci:.4f}"


def _table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    steps = results["table_steps"]
    header = ["initialisation"] + [f"{s} steps" for s in steps]
    rows = [
        [f"learned ({results['method']})"] + [_cell(results, "learned", s) for s in steps],
        ["random"] + [_cell(results, "random", s) for s in steps],
    ]
    return header, rows


def _caption(results: dict) -> str:
    better = "lower" if results["lower_is_better"] else "higher"
    return (
        f"Meta-test {results['metric']} ({better} is better) on {results['tasks']} test tasks of "
        f"{results['benchmark']} after {results['iteration']} meta-iterations of {results['method']} "
        f"(T = {results['T']:.4g}); gradient descent with learning rate {results['lr']:g} on each "
        "task's support set; mean ± 95% CI over tasks."
    )


def results_markdown(results: dict) -> str:
    header, rows = _table_rows(results)
    lines = [f"# {results['benchmark']} / {results['method']}", "", _caption(results), ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * len(header)) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def results_text(results: dict) -> str:
    header, rows = _table_rows(results)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([_caption(results), "", fmt(header), sep] + [fmt(r) for r in rows])


def _run_title(run: RunDir, results: dict | None) -> str:
    """"<benchmark> / <method>, T = ..." from the results, else config.json."""
    info = results
    if info is None:
        try:
            info = run.read_config()
        except CheckpointError:
            return run.path.name
    T = info.get("T")
    horizon = f", T = {T:.4g}" if isinstance(T, (int, float)) else ""
    return f"{info.get('benchmark', '?')} / {info.get('method', '?')}{horizon}"


def write_figures(run: RunDir, results: dict | None, *, log_y: bool = False) -> None:
    """figures/meta_loss.png (from metrics.csv) and, given `results`,
    figures/error_vs_steps.png (mean and 95% CI band over the test tasks;
    `log_y`: a logarithmic error axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run.figure_dir.mkdir(exist_ok=True)
    rows = run.read_metrics()
    title = _run_title(run, results)
    if rows:
        it = np.array([r["iteration"] for r in rows])
        loss = np.array([r["meta_loss"] for r in rows])
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(it, loss, lw=0.6, alpha=0.4, label="per iteration")
        if len(loss) >= 10:
            w = max(5, len(loss) // 50)
            smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
            ax.plot(it[w - 1 :], smooth, lw=1.5, label=f"moving average ({w})")
        if np.all(loss > 0):
            ax.set_yscale("log")
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel("meta-loss (query loss after adaptation)")
        ax.set_title(f"meta-training: {title}")
        ax.legend()
        ax.grid(alpha=0.3)
        save_figure(fig, run.figure_dir / "meta_loss.png")
        plt.close(fig)
    if results is not None:
        steps = np.array(results["curve_steps"])
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, label in (("learned", f"learned ({results['method']})"), ("random", "random init")):
            mean = np.array(results[name]["mean"])
            ci = np.nan_to_num(np.array(results[name]["ci95"]))  # one task: no interval
            (line,) = ax.plot(steps, mean, marker="o", ms=3, label=label)
            ax.fill_between(steps, mean - ci, mean + ci, color=line.get_color(), alpha=0.3, lw=0,
                            label=f"{label}: 95% CI")
            for edge in (mean - ci, mean + ci):  # the band's edges, visible even when it is thin
                ax.plot(steps, edge, color=line.get_color(), lw=0.6, ls="--", alpha=0.8)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(f"adaptation steps (GD, lr {results['lr']:g})")
        ax.set_ylabel(f"meta-test {results['metric']}")
        ax.set_title(f"{title}: {results['tasks']} test tasks, iteration {results['iteration']}")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3, which="both" if log_y else "major")
        save_figure(fig, run.figure_dir / "error_vs_steps.png")
        plt.close(fig)


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a matplotlib figure as a PNG (120 dpi, tight), atomically: an
    interrupted write leaves the previous file, never a torn one."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(pathlib.Path(path), buf.getvalue())


# --------------------------------------------------------------------------- #
# What a run records about the process that made it
# --------------------------------------------------------------------------- #


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
