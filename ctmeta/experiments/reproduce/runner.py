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
    checkpoint_every: int | None = None,
) -> RunResult:
    """Meta-train and evaluate one configuration in `OUT/<experiment>/<label>/`.

    `optimizer`, `meta_lr`, `lr_schedule` and `backbone` are those of
    `presets.resolve_config` (`ctmeta train --optimizer ...`); left out, the
    presets' defaults (each paper's protocol for the method); `flow` the inner
    flow (`ctmeta train --flow`). `method_options`
    overrides entries of the configuration's `method_options` (e.g. A-MAML's
    `atol`); `keep_checkpoints` the meta-iterations whose checkpoints the run
    keeps (`ctmeta train --keep-checkpoints`), to be evaluated later;
    `checkpoint_every` how often it saves one (default: the presets', at most 250).

    A finished run (results.json) is reused; one that finished short of
    `meta_iterations` (the budget was raised since) is continued from its
    last checkpoint when it is selected (`--methods`) and its configuration
    is otherwise the same, as `ctmeta train --resume --meta-iterations` does
    (its own results move to `RUN/evaluations/<name>/` first:
    `runs.evaluations.keep_own_evaluation`); else it is reused as it is."""
    from ... import presets
    from ...runs import RunDir, evaluate_run, train

    path = ctx.out / label
    done = path / "results.json"
    selected = ctx.methods is None or label.rsplit("/", 1)[-1] in ctx.methods
    if not selected and not done.is_file():
        return RunResult(label, "not run", "not selected by --methods")
    extend = None  # a finished run to continue to the raised budget: its results.json
    if done.is_file():
        try:
            results = json.loads(done.read_text())
            short = int(results.get("iteration", meta_iterations)) < int(meta_iterations)
            if short and selected and RunDir(path).checkpoints():
                extend = results
            else:
                if short:
                    why = ("not selected by --methods" if not selected else "no checkpoint to continue from")
                    # A run being continued elsewhere may have trained past its evaluation: say both.
                    newest = max((it for it, _ in RunDir(path).checkpoints()), default=None)
                    where = (f"is evaluated at meta-iteration {results.get('iteration')} and trained to {newest} "
                             if newest is not None and newest > int(results.get("iteration", 0))
                             else f"ended at meta-iteration {results.get('iteration')} ")
                    ctx.note(f"{label}: its run {where}of the {meta_iterations} asked ({why}): read as it is")
                return _reuse(ctx, path, label, benchmark, results)
        except CtmetaError:
            raise  # e.g. its config.json cannot be read: say so, never train it anew over its files
        except (OSError, ValueError, TypeError):
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
    saved = _saved_config(path)
    if saved is not None and saved.get("keep_checkpoints"):  # a continued run keeps what it kept
        keep = sorted(set(keep) | {int(k) for k in saved["keep_checkpoints"]})
    if keep:
        config["keep_checkpoints"] = keep
    # Long runs checkpoint often: a stopped reproduction continues from the last one.
    config["checkpoint_every"] = (int(checkpoint_every) if checkpoint_every is not None
                                  else min(int(config["checkpoint_every"]), 250))
    from ...runs import Reporter, resolve_evaluation, resume_point
    from ...runs.evaluations import keep_own_evaluation

    _check_unfinished_config(path)
    if extend is not None and saved is not None and config_differences(config, saved):
        ctx.note(f"{label}: its run ended at meta-iteration {extend.get('iteration')} of the {meta_iterations} "
                 f"asked, with another configuration (differs in {', '.join(config_differences(config, saved))}): "
                 "read as it is")
        return _reuse(ctx, path, label, benchmark, extend)
    reporter = ctx.reporter or Reporter(quiet=ctx.quiet)
    try:
        exp = presets.build(config, progress=not ctx.quiet, log=reporter.log)
        if extend is not None and not ctx.estimate:
            # The evaluation it ended with is kept beside the one its continuation will end with, under the
            # name `ctmeta evaluate RUN --checkpoint N` gives it (the run's own test tasks, before the cut).
            defaults = resolve_evaluation(exp, exp.learner.init(exp.run_key))
            kept = keep_own_evaluation(RunDir(path), defaults)
            if kept is not None:
                ctx.log(f"[{label}] continuing the finished run from meta-iteration {extend.get('iteration')} to "
                        f"{meta_iterations}; its evaluation moved to {kept}")
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
            _record_resume(ctx, run, config, int(state.iteration))
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
    finally:
        # The next run compiles its own programs. XLA on CPU keeps each live one in
        # ~3 memory maps, and a process past the kernel's vm.max_map_count (65,530 by
        # default) segfaults in its next compile: the test suite reached that in 30 min.
        import jax

        jax.clear_caches()
    failed.unlink(missing_ok=True)  # a retry that succeeded
    metrics = RunDir(path).read_metrics()
    return RunResult(label, "ok", results=results, metrics=metrics, train_seconds=_train_seconds(metrics),
                     eval_seconds=results.get("eval_seconds"), run_dir=str(path))


def _reuse(ctx: Context, path: pathlib.Path, label: str, benchmark: str, results: dict) -> RunResult:
    """The finished run in `path` read back (evaluated again if its results.json predates per-task errors)."""
    from ...runs import RunDir

    metrics = RunDir(path).read_metrics()
    ctx.log(f"[{label}] reusing the finished run in {path}")
    ratings = presets_kind(benchmark) == "ratings"
    if "per_task" not in results.get("learned", {}) or (ratings and "other_metrics" not in results):
        results = _evaluate_again(ctx, path, benchmark, label, int(results["tasks"]))
    return RunResult(label, "ok", results=results, metrics=metrics, train_seconds=_train_seconds(metrics),
                     eval_seconds=results.get("eval_seconds"), run_dir=str(path))


#: The configuration entries a continued run may change: those of `ctmeta train
#: --resume` (`--meta-iterations`, raised only here, `--checkpoint-every`,
#: `--keep-checkpoints`, `--on-nonfinite`). Anything else that differs is
#: another run.
RESUMABLE = ("meta_iterations", "checkpoint_every", "keep_checkpoints", "on_nonfinite")


def config_differences(config: dict, saved: dict) -> list[str]:
    """The entries in which `config` (what a call asks for) differs from a
    run's `saved` configuration so that the run cannot be continued to it:
    all but the run record and `RESUMABLE`, and a lowered `meta_iterations`."""
    from ...runs import dtype_name

    same = lambda c: {k: v for k, v in c.items() if k not in RUN_RECORD_KEYS and k not in RESUMABLE}
    now, then = same(json.loads(json.dumps(config))), same(saved)
    differ = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
    if int(config.get("meta_iterations") or 0) < int(saved.get("meta_iterations") or 0):
        differ.append("meta_iterations")
    if saved.get("dtype") != dtype_name():
        differ.append(f"dtype ({saved.get('dtype')} there, {dtype_name()} now)")
    return differ


def _saved_config(path: pathlib.Path) -> dict | None:
    """The configuration of the run in `path` (None: none there, or unreadable)."""
    from ...runs import RunDir

    run = RunDir(path)
    if not run.config_path.is_file():
        return None
    try:
        return run.read_config()
    except CtmetaError:
        return None


def _record_resume(ctx: Context, run, config: dict, iteration: int) -> None:
    """Write into a continued run's config.json the `RESUMABLE` entries this
    call changed (a raised budget, ...), with a `resumes` record as `ctmeta
    train --resume` writes; nothing when none changed."""
    import datetime as _dt

    saved = run.read_config()
    changed = {k: config[k] for k in RESUMABLE if k in config and config[k] != saved.get(k)}
    if not changed:
        return
    resumes = list(saved.get("resumes", []))
    resumes.append({"from_iteration": iteration, "at": _dt.datetime.now().isoformat(timespec="seconds"),
                    "argv": ["reproduce", *ctx.argv], "changed": {k: saved.get(k) for k in changed}})
    run.write_config({**saved, **changed, "resumes": resumes})


def evaluations_of(label: str, path: pathlib.Path, step: int | None = None) -> dict[int, RunResult]:
    """The evaluations of the run in `path` on its own meta-test tasks, by the
    meta-iteration of the checkpoint evaluated: its own results.json, and
    each `RUN/evaluations/<name>/results.json` (`ctmeta evaluate RUN
    --checkpoint N`) with the run's number of test tasks (so the same tasks),
    learning rate and table steps, or, given `step`, any table steps that
    include it (`ctmeta evaluate RUN --checkpoint N --steps 0,5`: a pairing at
    one horizon needs no 100-step table); a finished run's own results come first,
    then the folders in name order. Each is a `RunResult` (status "ok",
    `run_dir` the folder it came from); `{}` when there are none. Unreadable
    files are left out, never an error."""
    from ...runs.evaluations import EVALUATIONS

    try:
        ev = json.loads((path / "config.json").read_text()).get("eval") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    want = {"tasks": ev.get("tasks"), "lr": ev.get("lr"), "table_steps": ev.get("steps")}
    found: dict[int, RunResult] = {}
    folders = [path] + sorted(p for p in (path / EVALUATIONS).glob("*") if p.is_dir())
    for folder in folders:
        try:
            results = json.loads((folder / "results.json").read_text())
            it = int(results["iteration"])
            if step is not None:  # a pairing at one horizon: any table that has it
                steps_match = int(step) in [int(s) for s in results["table_steps"]]
            else:
                steps_match = (want["table_steps"] is None or [int(s) for s in results["table_steps"]]
                               == [int(s) for s in want["table_steps"]])
            same = ((want["tasks"] is None or int(results["tasks"]) == int(want["tasks"]))
                    and (want["lr"] is None or float(results["lr"]) == float(want["lr"])) and steps_match)
            if not same or it in found or "per_task" not in results["learned"]:
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found[it] = RunResult(label, "ok", results=results, eval_seconds=results.get("eval_seconds"),
                              run_dir=str(folder))
    return dict(sorted(found.items()))


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
    there to continue. An unfinished run of another configuration (a lowered
    budget, another dtype, ...) is hours of meta-training that a rerun must not delete
    silently: that is an error naming what differs. A raised `meta_iterations`
    (and the other `RESUMABLE` entries) is the same run, continued."""
    from ...runs import RunDir

    run = RunDir(path)
    if not run.config_path.is_file() or not run.checkpoints():
        return None
    try:
        saved = run.read_config()
    except CtmetaError:  # never delete checkpoints whose configuration cannot be read
        _check_unfinished_config(path)
        raise
    differ = config_differences(config, saved)  # a raised budget, another checkpoint_every... continue it
    if differ:
        raise InputError(f"the unfinished run in {path} (checkpoint {run.checkpoints()[-1][1].name}) was made with "
                         f"another configuration (differs in {', '.join(differ)}): remove that directory "
                         "to start it again, or restore the configuration that made it")
    run.remove_temporaries()
    return run
