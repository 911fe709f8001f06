"""Meta-training and evaluating one (setting, method) of an experiment, resumable and reusable."""

from __future__ import annotations

import json
import pathlib
import shutil
import time
import traceback


from ..._errors import CtmetaError, DataError, InputError, NumericalError
from ..._io import atomic_write_text
from ..._paths import dataset_dir
from ..._record import RUN_RECORD_KEYS, run_record
from .context import Context, RunResult
from .report import md_table

#: Left in a run's directory when it failed numerically: a later call lists it as failed
#: without attempting it again (`--retry-failed` does).
FAILED_MARKER = "failed.json"


def data_dir_for(ctx: Context, benchmark: str) -> str | None:
    from ...presets import BENCHMARKS

    sub = BENCHMARKS[benchmark].data_subdir
    if sub is None:
        return None
    return str(dataset_dir(sub, ctx.data_root))


def presets_kind(benchmark: str) -> str:
    """`"regression"`, `"ratings"` or `"images"`: the preset's kind."""
    from ...presets import BENCHMARKS

    return BENCHMARKS[benchmark].kind


def _evaluate_again(ctx: Context, path: pathlib.Path, benchmark: str, label: str, tasks: int) -> dict:
    """Evaluate a finished run (written before results.json kept each task's
    error) again from its final checkpoint: same test tasks, same numbers,
    now with `per_task` for the paired tests."""
    from ... import presets
    from ...runs import Reporter, RunDir, evaluate_run

    run = RunDir.open(path)
    config = run.read_config()
    config["data_dir"] = data_dir_for(ctx, benchmark)
    ctx.log(f"[{label}] evaluating the final checkpoint again, keeping each task's error")
    exp = presets.build(config, progress=False, log=lambda *a: None)
    exp.limit_eval_tasks(tasks)  # the tasks the first evaluation scored
    state, _, _ = run.load_latest(exp.learner.init(exp.run_key), warn=ctx.log, config=config)
    return evaluate_run(exp, run, state, reporter=ctx.reporter or Reporter(quiet=True))


def run_method(
    ctx: Context,
    label: str,
    benchmark: str,
    method: str,
    *,
    T: float | None = None,
    steps: int | None = None,
    shots: int | None = None,
    ways: int | None = None,
    meta_iterations: int,
    meta_batch: int | None = None,
    eval_tasks: int | None = None,
    eval_steps: tuple[int, ...] | None = None,
    eval_every: int | None = None,
    learn_T: bool | None = None,
    optimizer: str | None = None,
    meta_lr: float | None = None,
    lr_schedule: str | None = None,
    backbone: str | None = None,
    data_options: dict | None = None,
    method_options: dict | None = None,
    seed: int = 0,
    flow: str | None = None,
    keep_checkpoints: tuple[int, ...] = (),
) -> RunResult:
    """Meta-train and evaluate one configuration in `OUT/<experiment>/<label>/`.

    `optimizer`, `meta_lr`, `lr_schedule` and `backbone` are those of
    `presets.resolve_config` (`ctmeta train --optimizer ...`); left out, the
    presets' defaults (each paper's protocol for the method); `flow` the inner
    flow (`ctmeta train --flow`). `method_options`
    overrides entries of the configuration's `method_options` (e.g. A-MAML's
    `atol`); `keep_checkpoints` the meta-iterations whose checkpoints the run
    keeps (`ctmeta train --keep-checkpoints`), to be evaluated later."""
    from ... import presets
    from ...runs import RunDir, evaluate_run, train

    path = ctx.out / label
    done = path / "results.json"
    if ctx.methods is not None and label.rsplit("/", 1)[-1] not in ctx.methods and not done.is_file():
        return RunResult(label, "not run", "not selected by --methods")
    if done.is_file():
        try:
            results = json.loads(done.read_text())
            metrics = RunDir(path).read_metrics()
            ctx.log(f"[{label}] reusing the finished run in {path}")
            ratings = presets_kind(benchmark) == "ratings"
            if "per_task" not in results.get("learned", {}) or (ratings and "other_metrics" not in results):
                results = _evaluate_again(ctx, path, benchmark, label, int(results["tasks"]))
            return RunResult(label, "ok", results=results, metrics=metrics, train_seconds=_train_seconds(metrics),
                             eval_seconds=results.get("eval_seconds"), run_dir=str(path))
        except CtmetaError:
            raise  # e.g. its config.json cannot be read: say so, never train it anew over its files
        except (OSError, ValueError):
            pass
    failed = path / FAILED_MARKER
    if failed.is_file() and not ctx.retry_failed and not ctx.estimate:
        try:
            msg = json.loads(failed.read_text())["error"]
        except (OSError, ValueError, KeyError):
            msg = None
        if msg is not None:
            ctx.note(f"FAILED {label} (an earlier attempt; --retry-failed attempts it again): {msg}")
            return RunResult(label, "failed", msg, run_dir=str(path))
    try:
        config = presets.resolve_config(
            benchmark, method, T=T, steps=steps, meta_iterations=meta_iterations, meta_batch=meta_batch,
            ways=ways, shots=shots, data_dir=data_dir_for(ctx, benchmark), seed=seed,
            optimizer=optimizer, meta_lr=meta_lr, lr_schedule=lr_schedule, backbone=backbone, flow=flow,
        )
    except DataError as err:
        msg = f"skipped {label}: {err}"
        ctx.note(msg)
        return RunResult(label, "skipped", str(err))
    ev = config["eval"]
    if eval_tasks is not None:
        ev["tasks"] = int(eval_tasks)
    if eval_steps is not None:
        ev["steps"] = [int(s) for s in eval_steps]
    every = int(eval_every) if eval_every is not None else None
    if eval_steps is not None or every is not None:
        every = every or max(1, max(ev["steps"]) // 20)
        ev["curve"] = sorted(set(range(0, max(ev["steps"]) + 1, every)) | set(ev["steps"]))
    if learn_T is not None:
        config["learn_T"] = bool(learn_T)
    if data_options:
        config["data_options"] = dict(data_options)
    if method_options:
        config["method_options"] = {**config.get("method_options", {}), **method_options}
    config["reproduce"] = {"experiment": ctx.name, "scale": ctx.scale, "label": label}
    keep = sorted(int(k) for k in keep_checkpoints if int(k) < int(config["meta_iterations"]))
    if keep:
        config["keep_checkpoints"] = keep
    # Long runs checkpoint often: a stopped reproduction continues from the last one.
    config["checkpoint_every"] = min(int(config["checkpoint_every"]), 250)
    from ...runs import Reporter, resume_point

    _check_unfinished_config(path)
    reporter = ctx.reporter or Reporter(quiet=ctx.quiet)
    try:
        exp = presets.build(config, progress=not ctx.quiet, log=reporter.log)
        if ev.get("tasks") is not None and hasattr(exp.family, "test_batch") and eval_tasks is not None:
            exp.limit_eval_tasks(int(eval_tasks))
        if ctx.estimate:
            return _estimate_run(ctx, label, exp)
        state, seconds, run = None, 0.0, _unfinished_run(path, config, exp, ctx)
        if run is not None:  # an unfinished run of an earlier call: continue it from its checkpoint
            # metrics.csv checked against the checkpoint: lost rows written again, or the gap said (`resume_point`)
            state, meta, ckpt, _ = resume_point(run, exp.learner.init(exp.run_key), run.read_config(), warn=ctx.log)
            rows = run.truncate_metrics(int(state.iteration))
            seconds = float(meta.get("seconds", rows[-1]["seconds"] if rows else 0.0))
            ctx.log(f"\n=== {ctx.name} / {label}: resuming {path} from {ckpt.name}")
        else:
            if path.exists():
                shutil.rmtree(path)  # unfinished with no checkpoint to resume from
            config.update(run_record(exp.family, ["reproduce", *ctx.argv]))
            run = RunDir.create(path, config)
            ctx.log(f"\n=== {ctx.name} / {label}: {benchmark} {method}, {config['meta_iterations']} "
                    f"meta-iterations -> {path}")
        state = train(exp, run, state=state, seconds_offset=seconds, reporter=reporter)
        results = evaluate_run(exp, run, state, reporter=reporter)
    except DataError as err:
        ctx.note(f"skipped {label}: {err}")
        return RunResult(label, "skipped", str(err))
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 -- one failed run must not lose the others
        msg = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
        ctx.note(f"FAILED {label}: {msg}")
        if isinstance(err, NumericalError) and path.is_dir():
            # Deterministic from the same checkpoint: not attempted again unless asked.
            atomic_write_text(failed, json.dumps({"error": msg}, indent=1) + "\n")
        if ctx.debug:
            traceback.print_exc()
        return RunResult(label, "failed", msg, run_dir=str(path))
    failed.unlink(missing_ok=True)  # a retry that succeeded
    metrics = RunDir(path).read_metrics()
    return RunResult(label, "ok", results=results, metrics=metrics, train_seconds=_train_seconds(metrics),
                     eval_seconds=results.get("eval_seconds"), run_dir=str(path))


def _train_seconds(metrics: list) -> float:
    """A run's meta-training wall time over all its sessions (metrics.csv's cumulative `seconds`)."""
    return float(metrics[-1]["seconds"]) if metrics else float("nan")


def _estimate_run(ctx: Context, label: str, exp) -> RunResult:
    """Time `ctx.estimate` meta-iterations of a run (after one that compiles)
    and record its projected meta-training wall time; nothing is written."""
    learner, family = exp.learner, exp.family
    total, batch_size = int(exp.config["meta_iterations"]), int(exp.config["meta_batch"])
    state = learner.init(exp.run_key)
    t0 = time.perf_counter()
    times = []
    for it in range(1 + ctx.estimate):
        state, m = learner.meta_step(state, family.sample(learner.iteration_key(state, it), batch_size, "train"))
        float(m["meta_loss"])  # wait for the result
        times.append(time.perf_counter() - t0)
    per_it = (times[-1] - times[0]) / ctx.estimate
    est = {"label": label, "meta_iterations": total, "compile_s": times[0], "s_per_iteration": per_it,
           "projected_s": times[0] + per_it * (total - 1)}
    ctx.estimates.append(est)
    ctx.log(f"[{label}] {per_it:.3g} s a meta-iteration (first, compiling: {times[0]:.1f} s): "
            f"{total} meta-iterations projected at {_duration(est['projected_s'])}, evaluation not included")
    return RunResult(label, "not run", "estimate only")


def _duration(seconds: float) -> str:
    from ...runs import format_duration

    return format_duration(seconds)


def estimate_table(estimates: list[dict]) -> str:
    """The projected meta-training wall times of `--estimate`, one row a run and the total."""
    rows = [[e["label"], str(e["meta_iterations"]), f"{e['s_per_iteration']:.3g}", f"{e['compile_s']:.1f}",
             _duration(e["projected_s"])] for e in estimates]
    rows.append(["total", str(sum(e["meta_iterations"] for e in estimates)), "", "",
                 _duration(sum(e["projected_s"] for e in estimates))])
    return md_table(["run", "meta-iterations", "s / meta-iteration", "first (compiling) s",
                     "projected meta-training"], rows)


def _check_unfinished_config(path: pathlib.Path) -> None:
    """Stop the command (a `CheckpointError`, exit 2) on an unfinished run at
    `path` whose config.json cannot be used (a missing or bad entry): its
    checkpoints are neither continued nor deleted."""
    from ...runs import RunDir

    run = RunDir(path)
    if run.config_path.is_file() and run.checkpoints():
        try:
            run.read_config()
        except CtmetaError as err:
            raise type(err)(f"{err}; the unfinished run in {path} (checkpoint {run.checkpoints()[-1][1].name}) "
                            "is kept: repair its config.json, or remove that directory to start it again") from None


def _unfinished_run(path: pathlib.Path, config: dict, exp, ctx: Context):
    """The run directory at `path` if it holds an unfinished run of this same
    configuration with a checkpoint to continue from; None if there is nothing
    there to continue. An unfinished run of another configuration (another
    budget, dtype, ...) is hours of meta-training that a rerun must not delete
    silently: that is an error naming what differs."""
    from ...runs import RunDir, dtype_name

    run = RunDir(path)
    if not run.config_path.is_file() or not run.checkpoints():
        return None
    try:
        saved = run.read_config()
    except CtmetaError:  # never delete checkpoints whose configuration cannot be read
        _check_unfinished_config(path)
        raise
    same = lambda c: {k: v for k, v in c.items() if k not in RUN_RECORD_KEYS}
    now, then = same(json.loads(json.dumps(config))), same(saved)
    differ = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
    if saved.get("dtype") != dtype_name():
        differ.append(f"dtype ({saved.get('dtype')} there, {dtype_name()} now)")
    if differ:
        raise InputError(f"the unfinished run in {path} (checkpoint {run.checkpoints()[-1][1].name}) was made with "
                         f"another configuration (differs in {', '.join(differ)}): remove that directory "
                         "to start it again, or restore the configuration that made it")
    run.remove_temporaries()
    return run
