"""Meta-training a run: one metrics row per meta-iteration, checkpoints, and signals."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time

from .._errors import CheckpointError, InputError, NumericalError
from .console import Reporter, format_duration
from .rundir import CHECKPOINT_CONFIG_FIELDS, NONFINITE_POLICIES, RunDir

__all__ = ["Interrupted", "init_from_run", "metrics_warning", "resume_point", "train"]


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


def init_from_run(exp, source, *, warn=print):
    """A fresh state of `exp`'s learner that starts from the model of run `source`.

    The warm start of a meta-training: another run's meta-learned
    initialisation (say Reptile's) meta-trained further by `exp`'s rule. The
    model's arrays come from `source`'s newest loadable checkpoint; the rest is
    `exp`'s own fresh state (its optimiser state, key, iteration 0, and its
    `T` and flow if it learns them). The two models must match in structure,
    shapes and dtypes, else `InputError`.

    **Arguments:** `exp` from `presets.build`; `source` a run directory (path
    or [`RunDir`][]) written by `ctmeta train` or `ctmeta reproduce`.

    **Returns:** `(state, record)`, `record` the run, checkpoint and
    iteration it came from (kept in the new run's `config.json`).
    """
    import equinox as eqx
    import jax

    from ..presets import build

    run = source if isinstance(source, RunDir) else RunDir.open(source)
    config = run.read_config()
    src = build(config, progress=False, log=lambda *_: None)
    state, _, path = run.load_latest(src.learner.init(src.run_key), warn=warn, config=config)
    model = src.learner.model(state)
    mine = exp.learner.model(exp.learner.init(exp.run_key))

    def layout(m):
        params, static = eqx.partition(m, eqx.is_inexact_array)
        return jax.tree.structure(static), jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), params)

    if layout(model) != layout(mine):
        def name(cfg):
            return f"{(cfg.get('model') or {}).get('name', '?')} on {cfg.get('benchmark', '?')}"
        raise InputError(f"cannot start from {run.path}: its model ({name(config)}) differs from this run's "
                         f"({name(exp.config)}) in its layers, shapes or dtypes")
    record = {"run": str(run.path), "checkpoint": path.name, "iteration": int(state.iteration),
              "method": config.get("method")}
    return exp.learner.init(exp.run_key, model=model), record


def resume_point(run: RunDir, like, config: dict, *, warn=print):
    """The checkpoint a resumed run continues from, with metrics.csv checked against it.

    The newest checkpoint that loads (`RunDir.load_latest`), unless
    metrics.csv lacks rows of the iterations up to it (cut, torn: see
    `RunDir.metrics_damage`). Then the newest kept checkpoint before the first
    missing row is taken instead, so that training from it writes those rows
    again (a resumed run is deterministic: the same rows, up to their seconds);
    if none precedes them, the run continues from the newest and the gap is
    said through `warn` and recorded. Either way `warn` says what is missing
    and what resuming does.

    **Returns:** `(state, metadata, path, gap)`, `gap` the iterations whose
    rows stay missing (`[]` when none).
    """
    state, meta, path = run.load_latest(like, warn=warn, config=config)
    newest = int(state.iteration)
    damage = run.metrics_damage(newest)
    if not damage:
        return state, meta, path, []
    if not damage.missing:  # torn lines beside whole rows of the same iterations: dropped on resume
        warn(f"warning: {damage.describe()}; every iteration up to {path.name} has a whole row, so the torn "
             "lines are dropped")
        return state, meta, path, []
    first = damage.missing[0]
    for it, older in reversed(run.checkpoints()):
        if it >= first:
            continue
        try:
            state_c, meta_c, path_c = run.load_checkpoint(str(it), like, config=config)
        except CheckpointError as err:
            warn(f"warning: cannot rebuild the missing rows from {older.name}: {err}")
            continue
        warn(f"warning: {damage.describe()}; resuming from {path_c.name} instead of {path.name} to write them "
             f"again (iterations {it + 1}..{newest} recomputed, deterministically: the same rows, up to their "
             "seconds)")
        return state_c, meta_c, path_c, []
    kept = ", ".join(p.name for _, p in run.checkpoints()) or "none"
    warn(f"warning: {damage.describe()}; no kept checkpoint precedes them ({kept}), so they cannot be rebuilt: "
         f"resuming from {path.name} continues at iteration {newest + 1} and metrics.csv keeps the gap (recorded "
         "in config.json, resumes[-1].metrics_gap)")
    return state, meta, path, list(damage.missing)


def metrics_warning(run: RunDir) -> str | None:
    """What metrics.csv lacks of the rows up to the newest checkpoint, and
    whether `ctmeta train --resume` can write them again; `None` if nothing."""
    ckpts = run.checkpoints()
    if not ckpts:
        return None
    newest = ckpts[-1][0]
    damage = run.metrics_damage(newest)
    if not damage:
        return None
    if not damage.missing:
        return f"warning: {damage.describe()} (left out of figures/meta_loss.png)"
    before = [p.name for it, p in ckpts if it < damage.missing[0]]
    fix = (f"ctmeta train --resume {run.path} writes them again from {before[-1]}" if before else
           f"no kept checkpoint precedes them ({', '.join(p.name for _, p in ckpts)}), so they cannot be rebuilt")
    return f"warning: {damage.describe()}; {fix}"


def _checkpoint_config(cfg: dict) -> dict:
    return {k: cfg.get(k) for k in CHECKPOINT_CONFIG_FIELDS}


def _adaptive(cfg: dict) -> str:
    """`adaptive (SOLVER)`: the forward solver of an adaptive rule (A-MAML's or COMLN's; dopri5 if unnamed)."""
    return f"adaptive ({(cfg.get('method_options') or {}).get('solver') or 'dopri5'})"


def train(exp, run: RunDir, *, state=None, seconds_offset: float = 0.0, reporter: Reporter | None = None):
    """Meta-train from `state` (default: a fresh one) up to the configured
    number of meta-iterations, writing one metrics row per iteration and a
    checkpoint every `checkpoint_every` iterations, at each iteration of
    `keep_checkpoints` (kept for good) and at the end. Returns the final state.

    SIGINT and SIGTERM save a checkpoint of the last completed iteration and
    raise [`Interrupted`][]; a `NumericalError` (a non-finite meta-gradient,
    or a solve out of steps, under `on_nonfinite="error"`) saves the last
    good state the same way before propagating. `config["on_nonfinite"]`
    (`"error"`, default, or `"skip-task"`) sets the learner's policy.

    In a multi-process run (`ctmeta.sharding`) every process calls `train`
    and computes; process 0 alone writes metrics rows and checkpoints."""
    from ..sharding import is_main_process

    writes = is_main_process()

    reporter = reporter or Reporter()
    cfg = exp.config
    learner, family = exp.learner, exp.family
    total = int(cfg["meta_iterations"])
    every = int(cfg["checkpoint_every"])
    keep = frozenset(int(k) for k in cfg.get("keep_checkpoints") or ())
    meta_batch = int(cfg["meta_batch"])
    policy = cfg.get("on_nonfinite") or "error"
    if policy not in NONFINITE_POLICIES:
        raise InputError(f"`on_nonfinite` must be one of {', '.join(NONFINITE_POLICIES)}, got {policy!r}")
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
        f"steps {cfg['steps'] if cfg['steps'] is not None else _adaptive(cfg)}"
        + (", skipping non-finite tasks" if policy == "skip-task" else "")
    )
    signals = _Signals()
    signals.install()
    f = open(run.metrics_path if writes else os.devnull, "a", newline="")
    try:
        if writes and start == 0 and not run.checkpoints():
            with signals.critical():  # so that `--resume` works however early the run stops
                run.save_checkpoint(state, metadata(seconds_offset), keep)
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
                    if writes and (done % every == 0 or done == total or done in keep):
                        run.save_checkpoint(state, metadata(elapsed), keep)
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
                run.save_checkpoint(state, metadata(seconds_offset + (time.perf_counter() - t0)), keep)
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


def _fmt(x: float) -> str:
    return f"{x:.4e}" if (x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4)) else f"{x:.4f}"
