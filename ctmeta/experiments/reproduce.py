"""`ctmeta reproduce`: the papers' experiments, one command each.

    ctmeta reproduce --list
    ctmeta reproduce EXPERIMENT [--scale quick|cpu|paper] [--out DIR] [--data-dir DIR] [--quiet]

Every experiment writes into `OUT/<experiment>/`: one run directory per
(setting, method) made by the ordinary `ctmeta train` machinery
(`runs.train` + `runs.evaluate_run`: config.json, metrics.csv, checkpoints,
figures, results.md), plus the experiment's own `results.md` (our table, the
paper's numbers beside it with the table reference, and every deviation from
the paper's protocol) and its PNG figures.

Scales: `paper` follows the papers' protocols (and lists what still differs);
`cpu` is `paper` for every experiment but the image ones, whose paper budget
(60,000 meta-iterations of a Conv-4 or ResNet-12) needs a GPU: there it runs
Omniglot only, with 1,000-2,000 meta-iterations (A-MAML: what its cost
allows), a few hours on 2 CPU cores; `quick` cuts meta-iterations, evaluation
tasks and settings so that each experiment finishes in minutes on 2 CPU cores
(each cut is listed in results.md); `test` (hidden) is a seconds-long smoke
scale for the tests. Every run prints its measured time per meta-iteration
and its projected wall time once it has run a few iterations.

A finished run directory (one with results.json) is reused when the command is
run again with the same `--out`, so an interrupted reproduction resumes at
the first unfinished run. A run that fails (missing data, a numerical error)
is reported in results.md and the others go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np

from .._errors import CtmetaError, DataError, InputError

__all__ = ["EXPERIMENTS", "SCALES", "main", "run_experiment"]

SCALES = ("quick", "cpu", "paper", "test")  # "test" is hidden from --help


# --------------------------------------------------------------------------- #
# The papers' numbers
# --------------------------------------------------------------------------- #

# A-MAML Table 1 (50 inner GD steps; MAML 5) and Table 2 (100 steps; MAML 10):
# meta-test nRMSE, mean ± std over 100 test tasks.
# {table: {dataset: {setting: {method: (mean, std)}}}}
_T12_METHODS = ("amaml", "imaml", "maml", "fomaml", "reptile")
_T12_RAW = {
    1: {
        "jester": [(0.074, 0.005, 0.027, 0.002), (0.114, 0.007, 0.050, 0.003), (0.120, 0.001, 0.036, 0.000),
                   (0.292, 0.012, 0.115, 0.004), (0.270, 0.012, 0.106, 0.004)],
        "movielens": [(0.053, 0.005, 0.023, 0.003), (0.082, 0.004, 0.033, 0.002), (0.123, 0.001, 0.050, 0.003),
                      (0.174, 0.008, 0.068, 0.004), (0.166, 0.008, 0.063, 0.003)],
        "movielens-1m": [(0.094, 0.008, 0.035, 0.004), (0.138, 0.010, 0.052, 0.004), (0.140, 0.002, 0.059, 0.001),
                         (0.270, 0.011, 0.104, 0.006), (0.266, 0.011, 0.101, 0.006)],
    },
    2: {
        "jester": [(0.069, 0.005, 0.044, 0.003), (0.190, 0.010, 0.103, 0.005), (0.154, 0.001, 0.061, 0.002),
                   (0.273, 0.012, 0.077, 0.004), (0.290, 0.012, 0.100, 0.004)],
        "movielens": [(0.057, 0.006, 0.021, 0.002), (0.168, 0.007, 0.046, 0.002), (0.123, 0.001, 0.050, 0.002),
                      (0.191, 0.007, 0.071, 0.004), (0.171, 0.008, 0.066, 0.004)],
        "movielens-1m": [(0.105, 0.009, 0.035, 0.004), (0.130, 0.007, 0.045, 0.004), (0.197, 0.002, 0.083, 0.001),
                         (0.395, 0.010, 0.119, 0.005), (0.408, 0.011, 0.128, 0.006)],
    },
}
PAPER_AMAML_TABLE12 = {
    table: {
        ds: {
            "10shot-15val": {m: (r[0], r[1]) for m, r in zip(_T12_METHODS, rows)},
            "20shot-30val": {m: (r[2], r[3]) for m, r in zip(_T12_METHODS, rows)},
        }
        for ds, rows in per_ds.items()
    }
    for table, per_ds in _T12_RAW.items()
}

# A-MAML Table 3: meta-test accuracy (%) ± 95% CI.
PAPER_AMAML_TABLE3 = {
    "omniglot": {"MAML": (95.8, 0.3), "FOMAML": (89.4, 0.5), "Reptile": (89.43, 0.14),
                 "iMAML-GD": (94.46, 0.42), "iMAML-HF": (96.18, 0.36),
                 "A-MAML (T=0.5)": (96.36, 0.39), "A-MAML (T=1.0)": (96.79, 0.34)},
    "miniimagenet": {"MAML": (48.70, 1.84), "FOMAML": (48.07, 1.75), "Reptile": (49.97, 0.32),
                     "iMAML-GD": (48.96, 1.84), "iMAML-HF": (49.30, 1.88),
                     "A-MAML (T=0.5)": (49.43, 1.64), "A-MAML (T=1.0)": (49.47, 1.77)},
}

# A-MAML Table 5: relative L2 error of the A-MAML meta-gradient on CosMixture
# against the 1000-state gradient, mean ± std over 20 random initialisations.
PAPER_AMAML_TABLE5 = {
    0.1: {10: (7.62e-4, 2.04e-4), 20: (3.55e-4, 9.49e-5), 50: (1.33e-4, 3.55e-5), 100: (6.24e-5, 1.67e-5),
          200: (2.76e-5, 7.34e-6), 500: (6.87e-6, 1.83e-6)},
    0.3: {10: (4.82e-3, 9.07e-4), 20: (2.26e-3, 4.21e-4), 50: (8.63e-4, 1.61e-4), 100: (4.19e-4, 7.79e-5),
          200: (2.01e-4, 3.74e-5), 500: (7.16e-5, 1.33e-5)},
    0.5: {10: (1.17e-2, 2.17e-3), 20: (5.46e-3, 1.01e-3), 50: (2.09e-3, 3.85e-4), 100: (1.03e-3, 1.88e-4),
          200: (4.99e-4, 9.16e-5), 500: (1.87e-4, 3.42e-5)},
}

# COMLN Table 2 (Conv-4 and ResNet-12 rows, miniImageNet 5-way): accuracy (%) ± 95% CI.
PAPER_COMLN_TABLE2 = {
    "conv4": {"maml": {1: (48.70, 1.84), 5: (63.11, 0.92)}, "anil": {1: (46.30, 0.40), 5: (61.00, 0.60)},
              "comln": {1: (53.01, 0.62), 5: (70.54, 0.54)}},
    "resnet12": {"maml": {1: (49.92, 0.65), 5: (63.93, 0.59)}, "anil": {1: (49.65, 0.65), 5: (59.51, 0.56)},
                 "comln": {1: (59.26, 0.65), 5: (77.26, 0.49)}},
}

# COMLN Table 4 (Appendix E.1): miniImageNet 5-way, Conv-4, accuracy (%) ± 95% CI.
PAPER_COMLN_TABLE4 = {"dopri5": {1: (53.01, 0.62), 5: (70.54, 0.54)}, "euler": {1: (53.00, 0.83), 5: (70.50, 0.72)}}


# --------------------------------------------------------------------------- #
# Running one (setting, method)
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Context:
    """Where and how an experiment runs."""

    name: str
    scale: str
    out: pathlib.Path
    data_root: pathlib.Path | None
    quiet: bool
    argv: list[str]
    reporter: Any = None
    methods: frozenset[str] | None = None  # run only these (the label's last part); None: all
    #: Time this many meta-iterations of every run (finished or not) and
    #: project its wall time instead of running it (nothing is written); 0: run.
    estimate: int = 0
    estimates: list[dict] = dataclasses.field(default_factory=list)
    deviations: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def log(self, msg: str) -> None:
        self.reporter.log(msg)

    def deviate(self, msg: str) -> None:
        if msg not in self.deviations:
            self.deviations.append(msg)

    def note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)
        self.log(msg)


@dataclasses.dataclass
class RunResult:
    label: str
    status: str  # "ok" | "skipped" | "failed" | "not run" (left out by --methods)
    message: str = ""
    results: dict | None = None
    metrics: list | None = None
    seconds: float = float("nan")
    run_dir: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def nearest_step(self, step: int) -> int:
        """The evaluated step closest to `step` (a tie goes to the longer adaptation)."""
        return min(self.results["curve_steps"], key=lambda s: (abs(s - step), -s))

    def value(self, step: int, which: str = "learned") -> tuple[float, float]:
        """Mean and 95% CI half-width after `step` GD steps (the nearest evaluated step)."""
        r = self.results
        i = r["curve_steps"].index(self.nearest_step(step))
        return float(r[which]["mean"][i]), float(r[which]["ci95"][i])

    def curve(self, which: str = "learned"):
        return self.results["curve_steps"], self.results[which]["mean"], self.results[which]["ci95"]

    def nearest_table_step(self, step: int) -> int:
        """The table step (one with per-task errors kept) closest to `step`."""
        return min((int(k) for k in self.results["learned"]["per_task"]), key=lambda s: (abs(s - step), -s))

    def per_task(self, step: int, which: str = "learned") -> np.ndarray:
        """Each meta-test task's error after `step` steps (a table step), in task order."""
        return np.asarray(self.results[which]["per_task"][str(step)], dtype=float)


def paired_test(a, b) -> dict:
    """Paired comparison of two methods' errors on the same tasks, `a - b`.

    `mean_diff` (with its normal 95% half-width), the two-sided p-values of
    the paired t-test and of the Wilcoxon signed-rank test (the latter makes
    no normality assumption; per-task errors are skewed), and the number of
    tasks on which `a` is lower."""
    from scipy import stats

    from ..meta import summarize

    a, b = np.asarray(a, float), np.asarray(b, float)
    d = a - b
    n = d.size
    _, half = summarize(d)  # the same normal 95% half-width as every table's
    t_p = float(stats.ttest_rel(a, b).pvalue) if n > 1 and np.any(d != 0) else 1.0
    w_p = float(stats.wilcoxon(a, b).pvalue) if n > 1 and np.any(d != 0) else 1.0
    return {"mean_diff": float(d.mean()), "ci95": half, "t_p": t_p, "wilcoxon_p": w_p,
            "a_lower": int(np.sum(d < 0)), "n": int(n)}


def paired_table(reference: RunResult, others, step, lower_is_better: bool = True, name: str = "A-MAML") -> list[str]:
    """Markdown rows: `reference` (A-MAML) against each other finished run on the
    same test tasks. `step`: the table step of every run, or a function of the
    run (each method at its own meta-test horizon)."""
    step_of = step if callable(step) else (lambda r: step)
    rows = []
    a = reference.per_task(step_of(reference))
    for r in others:
        if not r.ok or r is reference:
            continue
        b = r.per_task(step_of(r))
        t = paired_test(a, b)
        wins = t["a_lower"] if lower_is_better else int(np.sum(a > b))
        better = t["mean_diff"] < 0 if lower_is_better else t["mean_diff"] > 0
        verdict = f"{name} better" if better else f"{name} worse"
        verdict = verdict if t["wilcoxon_p"] < 0.05 else "no significant difference"
        label = r.label.split("/")[-1]
        rows.append([_LABEL.get(label, label), f"{t['mean_diff']:+.4f} ± {t['ci95']:.4f}", _p(t["t_p"]),
                     _p(t["wilcoxon_p"]), f"{wins}/{t['n']}", verdict])
    header = [f"{name} vs", f"mean difference ({name} - it)", "p (paired t)", "p (Wilcoxon)",
              f"tasks where {name} is {'lower' if lower_is_better else 'higher'}", "at p < 0.05"]
    return [md_table(header, rows)] if rows else []


def _p(p: float) -> str:
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def _data_dir_for(ctx: Context, benchmark: str) -> str | None:
    from ..presets import BENCHMARKS

    sub = BENCHMARKS[benchmark].data_subdir
    if sub is None:
        return None
    root = ctx.data_root
    if root is None:
        env = os.environ.get("CTMETA_DATA")
        root = pathlib.Path(env).expanduser() if env else pathlib.Path("data")
    return str(root / sub)


def presets_kind(benchmark: str) -> str:
    """`"regression"`, `"ratings"` or `"images"`: the preset's kind."""
    from ..presets import BENCHMARKS

    return BENCHMARKS[benchmark].kind


def _evaluate_again(ctx: Context, path: pathlib.Path, benchmark: str, label: str, tasks: int) -> dict:
    """Evaluate a finished run (written before results.json kept each task's
    error) again from its final checkpoint: same test tasks, same numbers,
    now with `per_task` for the paired tests."""
    from .. import presets
    from ..runs import Reporter, RunDir, evaluate_run

    run = RunDir.open(path)
    config = run.read_config()
    config["data_dir"] = _data_dir_for(ctx, benchmark)
    ctx.log(f"[{label}] evaluating the final checkpoint again, keeping each task's error")
    exp = presets.build(config, progress=False, log=lambda *a: None)
    _limit_eval_tasks(exp, tasks)  # the tasks the first evaluation scored
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
) -> RunResult:
    """Meta-train and evaluate one configuration in `OUT/<experiment>/<label>/`.

    `optimizer`, `meta_lr`, `lr_schedule` and `backbone` are those of
    `presets.resolve_config` (`ctmeta train --optimizer ...`); left out, the
    presets' defaults (each paper's protocol for the method). `method_options`
    overrides entries of the configuration's `method_options` (e.g. A-MAML's
    `atol`)."""
    from .. import presets
    from ..runs import RunDir, dtype_name, evaluate_run, package_versions, train

    path = ctx.out / label
    done = path / "results.json"
    if ctx.methods is not None and label.rsplit("/", 1)[-1] not in ctx.methods and not done.is_file():
        return RunResult(label, "not run", "not selected by --methods")
    if done.is_file():
        try:
            results = json.loads(done.read_text())
            metrics = RunDir(path).read_metrics()
            secs = metrics[-1]["seconds"] if metrics else float("nan")
            ctx.log(f"[{label}] reusing the finished run in {path}")
            ratings = presets_kind(benchmark) == "ratings"
            if "per_task" not in results.get("learned", {}) or (ratings and "other_metrics" not in results):
                results = _evaluate_again(ctx, path, benchmark, label, int(results["tasks"]))
            return RunResult(label, "ok", results=results, metrics=metrics, seconds=secs, run_dir=str(path))
        except (OSError, ValueError):
            pass
    try:
        config = presets.resolve_config(
            benchmark, method, T=T, steps=steps, meta_iterations=meta_iterations, meta_batch=meta_batch,
            ways=ways, shots=shots, data_dir=_data_dir_for(ctx, benchmark), seed=seed,
            optimizer=optimizer, meta_lr=meta_lr, lr_schedule=lr_schedule, backbone=backbone,
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
    # Long runs checkpoint often: a stopped reproduction continues from the last one.
    config["checkpoint_every"] = min(int(config["checkpoint_every"]), 250)
    from ..runs import Reporter

    reporter = ctx.reporter or Reporter(quiet=ctx.quiet)
    t0 = time.perf_counter()
    try:
        exp = presets.build(config, progress=not ctx.quiet, log=reporter.log)
        if ev.get("tasks") is not None and hasattr(exp.family, "test_batch") and eval_tasks is not None:
            _limit_eval_tasks(exp, int(eval_tasks))
        if ctx.estimate:
            return _estimate_run(ctx, label, exp)
        import datetime as _dt

        state, seconds, run = None, 0.0, _unfinished_run(path, config, exp, ctx)
        if run is not None:  # an unfinished run of an earlier call: continue it from its checkpoint
            state, meta, ckpt = run.load_latest(exp.learner.init(exp.run_key), warn=ctx.log, config=run.read_config())
            rows = run.truncate_metrics(int(state.iteration))
            seconds = float(meta.get("seconds", rows[-1]["seconds"] if rows else 0.0))
            ctx.log(f"\n=== {ctx.name} / {label}: resuming {path} from {ckpt.name}")
        else:
            if path.exists():
                shutil.rmtree(path)  # unfinished with nothing to resume, or of another configuration
            config["dtype"] = dtype_name()
            config["task_family"] = repr(exp.family)
            config["versions"] = package_versions()
            config["created"] = _dt.datetime.now().isoformat(timespec="seconds")
            config["argv"] = ["reproduce", *ctx.argv]
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
        if os.environ.get("CTMETA_DEBUG"):
            traceback.print_exc()
        return RunResult(label, "failed", msg, run_dir=str(path))
    metrics = RunDir(path).read_metrics()
    return RunResult(label, "ok", results=results, metrics=metrics, seconds=time.perf_counter() - t0,
                     run_dir=str(path))


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
    from ..runs import format_duration

    return format_duration(seconds)


def estimate_table(estimates: list[dict]) -> str:
    """The projected meta-training wall times of `--estimate`, one row a run and the total."""
    rows = [[e["label"], str(e["meta_iterations"]), f"{e['s_per_iteration']:.3g}", f"{e['compile_s']:.1f}",
             _duration(e["projected_s"])] for e in estimates]
    rows.append(["total", str(sum(e["meta_iterations"] for e in estimates)), "", "",
                 _duration(sum(e["projected_s"] for e in estimates))])
    return md_table(["run", "meta-iterations", "s / meta-iteration", "first (compiling) s",
                     "projected meta-training"], rows)


# Keys of a run's config.json that record where and when it ran, not what it computes.
_RUN_RECORD_KEYS = ("dtype", "task_family", "versions", "created", "argv", "resumes", "devices", "processes")


def _unfinished_run(path: pathlib.Path, config: dict, exp, ctx: Context):
    """The run directory at `path` if it holds an unfinished run of this same
    configuration with a checkpoint to continue from; else None."""
    from ..runs import RunDir, dtype_name

    run = RunDir(path)
    if not run.config_path.is_file() or not run.checkpoints():
        return None
    try:
        saved = run.read_config()
    except CtmetaError:
        return None
    same = lambda c: {k: v for k, v in c.items() if k not in _RUN_RECORD_KEYS}
    if same(json.loads(json.dumps(config))) != same(saved) or saved.get("dtype") != dtype_name():
        ctx.log(f"[{path.name}] the unfinished run in {path} has another configuration: starting it again")
        return None
    run.remove_temporaries()
    return run


def _limit_eval_tasks(exp, n: int) -> None:
    """Keep the first `n` of a family's fixed meta-test tasks."""
    import jax

    batch = exp.eval_batch()
    total = jax.tree.leaves(batch)[0].shape[0]
    if n < total:
        exp._eval_batch = type(batch)(*jax.tree.map(lambda a: a[:n], tuple(batch)))


# --------------------------------------------------------------------------- #
# Markdown and figures
# --------------------------------------------------------------------------- #


def _f(x: float, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "nan"
    return f"{x:.{digits}f}"


def _pm(mean: float, ci: float, digits: int = 4) -> str:
    return f"{_f(mean, digits)} ± {_f(ci, digits)}"


def _acc(mean: float, ci: float) -> str:
    return f"{100 * mean:.2f} ± {100 * ci:.2f}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_results(ctx: Context, title: str, reproduces: str, body: list[str], runs: list[RunResult] = ()) -> pathlib.Path:
    if ctx.estimate:  # an estimate writes nothing
        return ctx.out / "results.md"
    from ..meta import atomic_write_bytes

    lines = [f"# {title}", "", f"Reproduces: {reproduces}.", "",
             f"Command: `ctmeta {' '.join(['reproduce', *ctx.argv])}` (scale `{ctx.scale}`).", ""]
    lines += body
    if ctx.deviations:
        lines += ["", "## Differences from the paper's protocol", ""] + [f"- {d}" for d in ctx.deviations]
    if ctx.notes:
        lines += ["", "## Notes (skipped or failed runs)", ""] + [f"- {n}" for n in ctx.notes]
    if runs:
        lines += ["", "## Runs", "", md_table(
            ["run", "status", "meta-iterations", "train+eval seconds", "directory"],
            [[r.label, r.status if r.ok else f"{r.status}: {r.message[:120]}",
              str(r.results["iteration"]) if r.ok else "-", _f(r.seconds, 1) if r.ok else "-",
              f"`{pathlib.Path(r.run_dir).name}/`" if r.run_dir else "-"] for r in runs])]
    path = ctx.out / "results.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    ctx.log(f"\nwrote {path}")
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, path: pathlib.Path) -> None:
    from ..runs import save_figure

    save_figure(fig, path)
    _plt().close(fig)


def plot_curves(path: pathlib.Path, panels: list[tuple[str, list[RunResult]]], ylabel: str, *, random_from=None,
                xlabel: str = "meta-test adaptation steps (GD, lr 0.01)", logy: bool = False) -> bool:
    """One panel per setting; one line per method (learned init), mean ± 95% CI."""
    panels = [(t, [r for r in rs if r.ok]) for t, rs in panels]
    panels = [(t, rs) for t, rs in panels if rs]
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, rs) in zip(axes[0], panels):
        for r in rs:
            x, m, c = r.curve()
            ax.plot(x, m, marker="o", ms=2, label=r.label.split("/")[-1])
            ax.fill_between(x, [a - b for a, b in zip(m, c)], [a + b for a, b in zip(m, c)], alpha=0.15)
        x, m, _ = rs[0].curve("random")
        ax.plot(x, m, ls="--", color="gray", label="random init")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, path)
    return True


# --------------------------------------------------------------------------- #
# A-MAML Fig. 2: CosMixture and Alpine
# --------------------------------------------------------------------------- #

_FIG2_SETTINGS = {
    # setting: (shots, A-MAML T, steps of FOMAML/Reptile/iMAML (= A-MAML states), MAML steps, meta-test steps)
    "50shot-50val": (50, 2.0, 200, 20, 200),
    "100shot-100val": (100, 5.0, 500, 50, 500),
}
_FIG2_METHODS = ("amaml", "maml", "maml-1", "fomaml", "reptile", "imaml")
_LABEL = {"amaml": "A-MAML", "maml": "MAML", "maml-1": "MAML-1", "fomaml": "FOMAML", "reptile": "Reptile",
          "imaml": "iMAML", "comln": "COMLN", "anil": "ANIL"}


def _fig2(ctx: Context, benchmark: str) -> None:
    scale = ctx.scale
    settings = dict(_FIG2_SETTINGS)
    methods = _FIG2_METHODS
    iters = {"paper": 5000, "quick": 300, "test": 2}[scale]
    iters_100 = {"paper": 5000, "quick": 150, "test": 2}[scale]
    eval_tasks = {"paper": 100, "quick": 100, "test": 4}[scale]
    if scale == "test":
        settings = {"50shot-50val": (50, 0.1, 10, 2, 10)}
        methods = ("amaml", "maml")
        ctx.deviate("test scale: 50shot-50val only, A-MAML T=0.1 (10 states), MAML 2 steps, 2 meta-iterations, "
                    "4 test tasks")
    elif scale == "quick":
        ctx.deviate(f"meta-iterations: {iters} (50shot-50val) and {iters_100} (100shot-100val) instead of the "
                    "paper's 5,000, to finish in minutes on 2 CPU cores")
    ctx.deviate("the networks are ctmeta's MLP 2x32 tanh in float32, JAX instead of PyTorch; the error bars are "
                "95% CIs over test tasks, not standard deviations")
    if benchmark == "alpine":
        ctx.deviate("Alpine inputs are divided by 10 inside the model (presets: unscaled, the task Hessian exceeds "
                    "2/h and GD at lr 0.01 diverges)")
    runs_by_setting = {}
    for setting, (shots, T, steps, maml_steps, test_steps) in settings.items():
        n = iters if shots == 50 else iters_100
        rs = []
        for m in methods:
            kwargs = dict(meta_iterations=n, shots=shots, eval_tasks=eval_tasks,
                          eval_steps=(0, test_steps // 4, test_steps), eval_every=max(1, test_steps // 20))
            if m == "amaml":
                ctx.deviate("A-MAML's meta-gradient: ctmeta's default rule, the adjoint solved backward by an adaptive "
                            "Dopri5 over the forward's dense output (`Adjoint()`), instead of the paper's Heun sweep "
                            "over states stored every h = 0.01 (on Alpine that sweep is unstable at h = 0.01: the "
                            "largest Hessian eigenvalue grows from 29 to 239 along the flow, and Heun needs "
                            "h * lambda_max < 2)")
                kwargs.update(T=T)
            elif m == "maml":
                kwargs.update(steps=maml_steps)
            elif m == "maml-1":
                kwargs.update(steps=1)
            else:
                kwargs.update(steps=steps)
            method = "maml" if m == "maml-1" else m
            r = run_method(ctx, f"{setting}/{m}", benchmark, method, **kwargs)
            r.label = f"{setting}/{_LABEL[m]}"
            rs.append(r)
        runs_by_setting[setting] = rs
    fig = ctx.out / f"fig2-{benchmark}.png"
    plot_curves(fig, [(f"{benchmark} {s}", rs) for s, rs in runs_by_setting.items()], "meta-test nRMSE")
    body = ["Meta-test nRMSE on 100 held-out tasks (mean ± 95% CI over tasks) after k steps of GD "
            "(lr 0.01) from each method's learned initialisation, for the paper's Fig. 2 "
            f"(panels {'b, c' if benchmark == 'cosmixture' else 'e, f'}).", ""]
    all_runs = []
    for setting, rs in runs_by_setting.items():
        test_steps = settings[setting][4]
        cols = [0, test_steps // 4, test_steps]
        body += [f"## {setting}", ""]
        rows = []
        for r in rs:
            if r.ok:
                rows.append([r.label.split("/")[1]] + [_pm(*r.value(s)) for s in cols])
            else:
                rows.append([r.label.split("/")[1]] + [r.status] * len(cols))
        ok = [r for r in rs if r.ok]
        if ok:
            rows.append(["random init"] + [_pm(*ok[0].value(s, "random")) for s in cols])
        body += [md_table(["method"] + [f"{s} steps" for s in cols], rows), ""]
        if ok:
            best = min(ok, key=lambda r: r.value(test_steps)[0])
            amaml = [r for r in ok if r.label.endswith("A-MAML")]
            verdict = f"Lowest nRMSE after {test_steps} steps: **{best.label.split('/')[1]}**."
            if amaml and best is not amaml[0]:
                gap = amaml[0].value(test_steps)[0] - best.value(test_steps)[0]
                verdict += f" A-MAML does not beat it here (worse by {gap:.4f})."
            body += [verdict, ""]
            if amaml:
                body += [f"A-MAML against each method after {test_steps} steps, paired over the same "
                         f"{len(amaml[0].per_task(test_steps))} test tasks (two-sided tests; the verdict "
                         "follows the Wilcoxon test, which assumes no normality):", ""]
                body += paired_table(amaml[0], ok, test_steps) + [""]
        all_runs += rs
    body += ["Paper (Fig. 2, a figure without numbers): A-MAML's initialisation gives the lowest error throughout "
             "adaptation in all four panels; iMAML second best early, MAML-1 worse than MAML; FOMAML and Reptile "
             "worse than MAML.", "", f"Figure: `{fig.name}`."]
    write_results(ctx, f"A-MAML Fig. 2: {benchmark}", f"A-MAML Fig. 2 ({benchmark}), Sec. 5.1", body, all_runs)


# --------------------------------------------------------------------------- #
# A-MAML Tables 1-2: collaborative filtering
# --------------------------------------------------------------------------- #


def _table12(ctx: Context) -> None:
    scale = ctx.scale
    datasets = ("movielens", "movielens-1m", "jester")
    shot_settings = {"10shot-15val": 10, "20shot-30val": 20}
    tables = {1: (0.5, 50, 5), 2: (1.0, 100, 10)}  # table: (A-MAML T, steps, MAML steps)
    methods = _T12_METHODS
    iters = {"paper": 5000, "quick": 150, "test": 2}[scale]
    if scale == "quick":
        shot_settings = {"10shot-15val": 10}
        ctx.deviate(f"meta-iterations: {iters} instead of the paper's 5,000; only the 10shot-15val setting "
                    "(20shot-30val at --scale paper)")
    if scale == "test":
        datasets, shot_settings, methods = ("movielens",), {"10shot-15val": 10}, ("amaml", "maml")
        tables = {1: (0.05, 5, 1)}
    ctx.deviate("the meta-test query set of a test user is all of the user's other ratings among the 100 most-rated "
                "items (the paper: 'the remaining were used for evaluation'); error bars are 95% CIs, the "
                "paper's are standard deviations")
    ctx.deviate("Jester-1: the data copy holds the first 4,000 users (jester-data-1-first4000users.xlsx), not "
                "all 24,983")
    results = {}
    all_runs = []
    for ds in datasets:
        for setting, shots in shot_settings.items():
            for table, (T, steps, maml_steps) in tables.items():
                for m in methods:
                    kw = dict(meta_iterations=iters, shots=shots, eval_steps=(0, steps), eval_every=max(1, steps // 10))
                    if m == "amaml":
                        kw.update(T=T)
                        ctx.deviate("A-MAML's meta-gradient: the adaptive backward adjoint (`Adjoint()`, ctmeta's "
                                    "default) instead of the paper's Heun sweep over stored states")
                    elif m == "maml":
                        kw.update(steps=maml_steps)
                    else:
                        kw.update(steps=steps)
                    label = f"{ds}/{setting}/{steps}steps/{m}"
                    r = run_method(ctx, label, ds, m, **kw)
                    results[(ds, setting, table, m)] = (r, steps)
                    all_runs.append(r)
                    if r.status == "skipped":
                        break  # the data set is absent: skip its other methods
                if any(results.get((ds, setting, table, m), (RunResult("", "ok"),))[0].status == "skipped"
                       for m in methods):
                    break
    body = ["Meta-test nRMSE (mean ± 95% CI over the 100 test users) after the table's number of GD steps "
            "(lr 0.01) from each method's learned initialisation; the paper's number (mean ± std) beside ours.", ""]
    for table, (T, steps, maml_steps) in tables.items():
        body += [f"## Table {table}: {steps} inner steps (A-MAML T = {T}; MAML {maml_steps} steps)", ""]
        header = ["method"]
        cols = []
        for ds in datasets:
            for setting in shot_settings:
                header += [f"{ds} {setting} (ours)", "paper"]
                cols.append((ds, setting))
        rows = []
        for m in methods:
            row = [_LABEL[m]]
            for ds, setting in cols:
                r, st = results.get((ds, setting, table, m), (None, steps))
                row.append(_pm(*r.value(st), 3) if r is not None and r.ok else (r.status if r else "not run"))
                p = PAPER_AMAML_TABLE12.get(table, {}).get(ds, {}).get(setting, {}).get(m)
                row.append(f"{p[0]:.3f} ± {p[1]:.3f}" if p else "-")
            rows.append(row)
        body += [md_table(header, rows), ""]
        for ds, setting in cols:
            ok = {m: results[(ds, setting, table, m)][0] for m in methods
                  if (ds, setting, table, m) in results and results[(ds, setting, table, m)][0].ok}
            if "amaml" in ok and len(ok) > 1:
                best = min(ok, key=lambda m: ok[m].value(steps)[0])
                if best != "amaml":
                    body.append(f"- {ds} {setting}: A-MAML is not the best here; {_LABEL[best]} is "
                                f"({ok[best].value(steps)[0]:.3f} vs {ok['amaml'].value(steps)[0]:.3f}).")
                else:
                    body.append(f"- {ds} {setting}: A-MAML is the best, as in the paper.")
        body.append("")
        body += _ratings_scales(ctx, results, table, steps, cols, methods)
    write_results(ctx, "A-MAML Tables 1-2: collaborative filtering", "A-MAML Tables 1 and 2 (Sec. 5.3)", body,
                  all_runs)


_RATING_RANGE = {"movielens": 4.0, "movielens-1m": 4.0, "jester": 20.0}  # 1..5 stars; -10..10


def _ratings_scales(ctx: Context, results: dict, table: int, steps: int, cols, methods) -> list[str]:
    """The other scales of Tables 1-2 (RMSE in rating units, RMSE / range, the
    relative squared error against the training users' mean rating), the
    predictors that learn no user beside the methods, and A-MAML's paired
    tests against each method on the same test users."""
    from .. import presets
    from ..tasks.metrics import RelativeSquaredError, nrmse, rmse

    header = ["method"] + [f"{ds} {setting}: nRMSE / RMSE / RMSE÷range / RSE" for ds, setting in cols]
    rows, trivial = [], {}
    for ds, setting in cols:
        try:
            shots = int(setting.split("shot")[0])
            config = presets.resolve_config(ds, "maml", shots=shots, data_dir=_data_dir_for(ctx, ds))
            fam = presets.build_family(config, progress=False, log=lambda *a: None)
        except (DataError, InputError):
            continue
        test = fam.test_batch()
        y, mask = np.asarray(test.query_y), np.asarray(test.query_mask)
        rse = RelativeSquaredError(fam.mean_rating())
        for name, pred in fam.trivial_predictions(test).items():
            scores = [float(np.mean(f(pred, y, mask))) for f in (nrmse, rmse, rse)]
            trivial.setdefault(name, {})[(ds, setting)] = scores
    for m in methods:
        row = [_LABEL[m]]
        for ds, setting in cols:
            r = results.get((ds, setting, table, m), (None,))[0]
            other = (r.results or {}).get("other_metrics") if r is not None and r.ok else None
            if not other:
                row.append(r.status if r is not None and not r.ok else "-")
                continue
            st = r.nearest_step(steps)
            i = other["rmse"]["learned"]["steps"].index(st) if st in other["rmse"]["learned"]["steps"] else -1
            n_rmse, rmse_v = r.value(steps)[0], other["rmse"]["learned"]["mean"][i]
            rse_v = other["relative_squared_error"]["learned"]["mean"][i]
            row.append(f"{n_rmse:.3f} / {rmse_v:.3f} / {rmse_v / _RATING_RANGE[ds]:.3f} / {rse_v:.3f}")
        rows.append(row)
    for name, by_col in trivial.items():
        row = [f"{name} (learns no user)"]
        for ds, setting in cols:
            v = by_col.get((ds, setting))
            row.append("-" if v is None else f"{v[0]:.3f} / {v[1]:.3f} / {v[1] / _RATING_RANGE[ds]:.3f} / {v[2]:.3f}")
        rows.append(row)
    out = [f"### Table {table}, other scales, after {steps} steps", "",
           "The paper's nRMSE is undefined; ours is ||e|| / ||y|| per user (first number). Beside it: RMSE in "
           "rating units, RMSE / the rating range (MovieLens 4, Jester 20), and RSE = ||e||^2 / ||y - m||^2 with "
           "m the meta-training users' mean rating (1 = predicting m). The predictors that learn no user are the "
           "floor meta-learning has to beat.", "", md_table(header, rows), ""]
    for ds, setting in cols:
        group = [results[(ds, setting, table, m)][0] for m in methods if (ds, setting, table, m) in results]
        amaml = [r for r in group if r.ok and r.label.endswith("/amaml")]
        if amaml and all("per_task" in r.results.get("learned", {}) for r in group if r.ok):
            out += [f"A-MAML against each method, {ds} {setting}, nRMSE after {steps} steps, paired over the "
                    "same test users:", ""] + paired_table(amaml[0], group, amaml[0].nearest_step(steps)) + [""]
    return out


# --------------------------------------------------------------------------- #
# Few-shot image classification
# --------------------------------------------------------------------------- #


_HEAD_ONLY = ("comln", "anil")  # adapt a linear head on a fixed embedding: cheap per meta-iteration

# Meta-iterations per method at --scale cpu: what fits a few hours of 2 CPU
# cores. Measured on Omniglot 5-way 1-shot, meta-batch 4, Conv-4 (float32):
# COMLN 0.64 s, ANIL 0.59 s, MAML 1.1 s, A-MAML (conv4-smooth, adaptive
# adjoint) 8 s a meta-iteration; 20-way 1-shot: A-MAML 14 s.
_CPU_ITERATIONS = {"comln": 2000, "anil": 2000, "maml": 1000, "amaml": 250}
# The papers' image budget: MAML's and iMAML's protocol (Finn et al. 2017:
# 60,000 meta-iterations), which A-MAML follows; COMLN follows Lee et al.
# (60 epochs of 1,000 batches).
_PAPER_IMAGE_ITERATIONS = 60000


def _image_budget(ctx: Context, method: str, whole_network_table: bool = True) -> dict:
    """Meta-iterations, meta-test tasks and meta-batch of one image run at the
    context's scale (meta-batch `None`: the presets'). At the cpu scale every
    run of a table that has whole-network methods is evaluated on the same 200
    test tasks (a whole-network evaluation of 100 GD steps costs ~4 s a task
    here; the paired tests need the same tasks), a head-only table on 600."""
    s = ctx.scale
    head = method in _HEAD_ONLY
    if s == "paper":
        return dict(meta_iterations=_PAPER_IMAGE_ITERATIONS, eval_tasks=600, meta_batch=None)
    if s == "cpu":
        return dict(meta_iterations=_CPU_ITERATIONS.get(method, 1000), eval_tasks=200 if whole_network_table else 600,
                    meta_batch=None)
    if s == "test":
        return dict(meta_iterations=1, eval_tasks=2, meta_batch=1)
    return dict(meta_iterations=40 if head else 12, eval_tasks=50 if head else 20, meta_batch=None)


def _image_budget_note(ctx: Context, methods) -> str:
    """The budgets of `methods` at the context's scale, for results.md."""
    parts = []
    for m in dict.fromkeys(methods):
        b = _image_budget(ctx, m)
        parts.append(f"{_LABEL.get(m, m)} {b['meta_iterations']} meta-iterations, {b['eval_tasks']} meta-test tasks")
    return "; ".join(parts)


def _acc_table(runs: list[tuple[str, RunResult, int]], paper: dict[str, tuple[float, float]] | None = None):
    rows = []
    for name, r, step in runs:
        ours = _acc(*r.value(step)) if r.ok else r.status
        T = f"{r.results['T']:.3g}" if r.ok else "-"
        p = (paper or {}).get(name)
        rows.append([name, ours, str(r.nearest_step(step) if r.ok else step), T, f"{p[0]:.2f} ± {p[1]:.2f}" if p else "-"])
    return md_table(["method", "accuracy % (ours)", "eval GD steps", "T (final)", "paper"], rows)


def _eval_step_for(r: RunResult, default: int) -> int:
    """The number of meta-test GD steps matching the method's training horizon (T / 0.01)."""
    if not r.ok:
        return default
    target = r.results["T"] / r.results["lr"]
    steps = r.results["curve_steps"]
    return min(steps, key=lambda s: abs(s - target)) if steps else default


_TABLE3_META_BATCH = 4  # the Omniglot preset's


def _table3(ctx: Context) -> None:
    scale = ctx.scale
    benches = ["omniglot", "miniimagenet"]
    methods = [("A-MAML (T=0.5)", "amaml", 0.5), ("MAML", "maml", None), ("COMLN", "comln", None)]
    if scale == "paper":
        methods.insert(1, ("A-MAML (T=1.0)", "amaml", 1.0))
    if scale == "cpu":
        methods = [m for m in methods if m[1] != "comln"]
    budgets = _image_budget_note(ctx, [m for _, m, _ in methods])
    if scale == "quick":
        benches = ["omniglot"]
        ctx.deviate(f"quick: Omniglot only; {budgets}, meta-batch {_TABLE3_META_BATCH}, instead of the protocol's "
                    "60,000 meta-iterations and 600 test tasks; A-MAML with T = 0.5 only (the paper also reports "
                    "T = 1.0)")
    if scale == "cpu":
        benches = ["omniglot"]
        ctx.deviate("cpu: no COMLN row (not in A-MAML's table): on 20-way 1-shot its augmented system holds "
                    "(M, M, M, ways) = 20^4 numbers with M^4 x ways work a step, ~1.6x the 5-way 5-shot case, which "
                    "measured 35 s a meta-iteration once its learned T had grown to 205 (see comln-table4); "
                    "COMLN's own experiments (comln-table2, comln-table4, comln-fig5) run it on 5-way 1-shot")
        ctx.deviate(f"cpu: Omniglot 20-way 1-shot only (whole-network miniImageNet does not fit 2 CPU cores); "
                    f"{budgets}, meta-batch {_TABLE3_META_BATCH}, instead of the protocol's 60,000 "
                    "meta-iterations (A-MAML's budget is what its cost allows: ~14 s a meta-iteration here); "
                    "A-MAML with T = 0.5 only")
    if scale == "paper":
        ctx.deviate(f"meta-batch {_TABLE3_META_BATCH} (the presets'; MAML's protocol uses 16 on Omniglot 20-way "
                    "and 4 on miniImageNet)")
    if scale == "test":
        benches = ["omniglot"]
        methods = [("COMLN", "comln", None)]
    if scale != "test":
        ctx.deviate("A-MAML adapts the smooth Conv-4 (`conv4-smooth`: softplus and average pooling, the presets' "
                    "A-MAML network on images) with the adaptive adjoint at float32 tolerances (rtol 1e-5, atol "
                    "1e-6); MAML and COMLN the benchmarks' ReLU/max-pool Conv-4. On the ReLU network the gradient "
                    "flow is discontinuous and A-MAML's meta-gradient changes by 20-35% with the discretisation "
                    "(docs/bench.md, 'Whole-network A-MAML on images')")
    ctx.deviate("Conv-4 in float32 on CPU; A-MAML's and MAML's meta-test adaptation is GD with lr 0.01 for the "
                "method's own horizon (T/0.01 steps); COMLN adapts its head by GD at lr 0.01 for its learned T/0.01 "
                "steps (nearest evaluated step)")
    if "miniimagenet" in benches:
        ctx.deviate("miniImageNet: the data copy has only the 64 training classes (protocol train64: 48 meta-train "
                    "/ 16 meta-test classes), so its numbers are not comparable with the published ones")
    comln_opt = _comln_optimizer(ctx)
    if scale in ("paper", "cpu") and any(m == "comln" for _, m, _ in methods):
        ctx.deviate("COMLN (not in A-MAML's table) is meta-trained with its own paper's protocol; "
                    + _LEE_SCHEDULE_NOTE + "; the A-MAML methods with Adam 1e-3 (A-MAML's)")
    body = ["Meta-test accuracy (%, mean ± 95% CI over test tasks).", ""]
    all_runs = []
    for b in benches:
        rows = {}
        # The cheap runs first, so that an interrupted quick run has them (A-MAML is the costliest on a CPU).
        for name, m, T in sorted(methods, key=lambda nm: nm[1] == "amaml"):
            budget = _image_budget(ctx, m)
            steps_eval = {"paper": (0, 5, 10, 50, 100), "cpu": (0, 5, 10, 50, 100), "test": (0, 10)}.get(
                scale, (0, 5, 10, 50))
            r = run_method(ctx, f"{b}/{m}" + (f"-T{T}" if T else ""), b, m, T=T, **budget,
                           eval_steps=steps_eval, eval_every=10 if scale != "test" else 5,
                           optimizer=comln_opt if m == "comln" else None)
            all_runs.append(r)
            default = {"amaml": int(round((T or 0.5) / 0.01)), "maml": 5}.get(m, 10)
            rows[name] = (name, r, _eval_step_for(r, default) if m == "comln" else min(default, max(steps_eval)))
        rows = [rows[name] for name, _, _ in methods]  # the table in the paper's order
        body += [f"## {b} ({'20-way 1-shot' if b == 'omniglot' else '5-way 1-shot'})", "",
                 _acc_table(rows, PAPER_AMAML_TABLE3[b]), ""]
        ok = [(n, r, s) for n, r, s in rows if r.ok]
        if ok:
            best = max(ok, key=lambda t: t[1].value(t[2])[0])
            added = (" (COMLN is not in A-MAML's Table 3; it is added as the brief asks.)"
                     if any(m == "comln" for _, m, _ in methods) else "")
            body += [f"Best here, each at its own meta-test horizon: **{best[0]}**.{added}", ""]
            horizon = {r.label: r.nearest_table_step(s) for _, r, s in ok}
            for n, ref, _ in ok if _same_test_tasks([r for _, r, _ in ok]) else ():
                if n.startswith("A-MAML"):
                    body += [f"{n} against the others on the same meta-test tasks (per-task accuracy, each at its "
                             "own horizon's table step: " + ", ".join(f"{m} {horizon[r.label]}" for m, r, _ in ok)
                             + "):", ""]
                    body += paired_table(ref, [r for _, r, _ in ok], lambda r: horizon[r.label],
                                         lower_is_better=False, name=n) + [""]
            # The horizons differ (MAML 5 steps, A-MAML 50): the same steps for every method as well.
            common = sorted(set.intersection(*(set(r.results["curve_steps"]) for _, r, _ in ok)) & set(steps_eval))
            if common:
                table = [[n] + [_acc(*r.value(k)) for k in common] for n, r, _ in ok]
                table.append([f"random init ({ok[0][0]}'s run)"] + [_acc(*ok[0][1].value(k, "random")) for k in common])
                body += ["Accuracy % after the same number of meta-test GD steps (lr 0.01):", "",
                         md_table(["method"] + [f"{k} steps" for k in common], table), ""]
            if plot_curves(ctx.out / f"table3-{b}.png", [(f"{b} (20-way 1-shot)" if b == "omniglot"
                                                           else f"{b} (5-way 1-shot)", [r for _, r, _ in ok])],
                           "meta-test accuracy (fraction)"):
                body += [f"Figure: `table3-{b}.png` (accuracy against meta-test GD steps).", ""]
    write_results(ctx, "A-MAML Table 3: few-shot image classification", "A-MAML Table 3 (Sec. 5.4)", body, all_runs)


def _comln_optimizer(ctx: Context) -> str | None:
    """The outer optimiser of a COMLN experiment's runs: at the paper and cpu
    scales the presets' (COMLN's SGD protocol for comln and anil); at the
    quick scale Adam 1e-3, since Lee et al.'s step schedule squeezed into a
    few dozen meta-iterations would leave the learning rate at 0.1 for a
    dozen of them."""
    if ctx.scale in ("paper", "cpu"):
        return None
    ctx.deviate(f"{ctx.scale}: outer optimiser Adam 1e-3 (A-MAML's) for every method instead of COMLN's SGD with "
                "Nesterov momentum 0.9, lr 0.1 and Lee et al.'s step schedule, which does not fit a few dozen "
                "meta-iterations (`ctmeta train --optimizer sgd` runs it)")
    return "adam"


#: Why `--scale cpu` runs COMLN's own experiments on 1-shot tasks (measured, comln-table4, 2026-12-03).
_CPU_ONE_SHOT_NOTE = ("cpu: 1-shot, not 5-shot: COMLN's augmented system holds z[i, j, m] for M = ways x shots "
                      "support examples ((M, M, M, ways) numbers, M^4 work a step), and on 5-way 5-shot the learned T grows ~0.8 a meta-iteration "
                      "(T = 205 at iteration 270), Dopri5's steps with it: 35 s a meta-iteration there, a projected "
                      "17 h for 2,000 on one core; 5-way 1-shot (M = 5) took 1,680 s for 2,000 (COMLN Table 2)")
_LEE_SCHEDULE_NOTE = ("outer optimiser: COMLN's SGD with Nesterov momentum 0.9, lr 0.1 and Lee et al.'s step schedule "
                      "(x0.06, x0.012, x0.0024 from 1/3, 2/3, 5/6 of the run), spread over the run's meta-iterations "
                      "instead of Lee et al.'s 60 epochs; no weight decay (Lee et al. use 5e-4; COMLN names none)")


def _comln_table2(ctx: Context) -> None:
    scale = ctx.scale
    benches = [("miniimagenet", 5), ("omniglot", 5)]
    shots = (1, 5)
    methods = ("comln", "anil", "maml")
    # ResNet-12 rows: miniImageNet at paper scale (the paper's; Omniglot 5-way is our addition).
    backbones = {"miniimagenet": ("conv4", "resnet12"), "omniglot": ("conv4",)} if scale == "paper" else {}
    budgets = _image_budget_note(ctx, methods)
    if scale == "quick":
        shots = (1,)
        ctx.deviate(f"quick: 1-shot only; {budgets}; Conv-4 only (the ResNet-12 rows run at --scale paper)")
    if scale == "cpu":
        benches, shots = [("omniglot", 5)], (1,)
        ctx.deviate(f"cpu: Omniglot 5-way 1-shot, Conv-4, only; {budgets}, instead of the protocol's 60,000 "
                    "meta-iterations (the miniImageNet and ResNet-12 rows run at --scale paper)")
    if scale == "test":
        benches, shots, methods = [("omniglot", 5)], (1,), ("comln",)
    if scale == "paper":
        ctx.deviate("ResNet-12 rows on miniImageNet only (Omniglot 5-way, our addition, is Conv-4 only); ResNet-12 "
                    "without DropBlock, as in COMLN, in float32; MAML on ResNet-12 adapts the whole network with a "
                    "bias-free linear head")
    if scale in ("paper", "cpu"):
        ctx.deviate(_LEE_SCHEDULE_NOTE + "; for MAML too, as COMLN does for every method of the table")
        opt = "sgd"
    else:
        opt = _comln_optimizer(ctx)
    if any(b == "miniimagenet" for b, _ in benches):
        ctx.deviate("miniImageNet: train64 protocol (48/16 of the 64 training classes): not comparable with "
                    "published numbers")
    ctx.deviate("Omniglot 5-way is an addition (COMLN reports tieredImageNet, which is not available)")
    body = ["Meta-test accuracy (%, mean ± 95% CI over test tasks), Conv-4 backbone"
            + (" and ResNet-12 on miniImageNet." if scale == "paper" else " (ResNet-12 rows at --scale paper)."), ""]
    all_runs = []
    for b, ways in benches:
        for backbone in backbones.get(b, ("conv4",)):
            suffix = "" if backbone == "conv4" else f"-{backbone}"
            for k in shots:
                rows = []
                for m in methods:
                    r = run_method(ctx, f"{b}-{ways}w{k}s{suffix}/{m}", b, m, ways=ways, shots=k,
                                   **_image_budget(ctx, m),
                                   eval_steps=(0, 5, 10, 50, 100) if scale in ("paper", "cpu") else (0, 10),
                                   eval_every=5, optimizer=opt, backbone=backbone)
                    all_runs.append(r)
                    rows.append((m, r, _eval_step_for(r, 10) if m == "comln" else 5 if m in ("maml", "anil") else 10))
                paper = {m: PAPER_COMLN_TABLE2[backbone][m][k] for m in methods} if b == "miniimagenet" else None
                name = {"conv4": "Conv-4", "resnet12": "ResNet-12"}[backbone]
                body += [f"## {b} {ways}-way {k}-shot, {name}", "", _acc_table(rows, paper), ""]
                ok = {m: r for m, r, _ in rows if r.ok}
                if "comln" in ok and len(ok) > 1 and _same_test_tasks(ok.values()):
                    horizon = {r.label: r.nearest_table_step(s) for _, r, s in rows if r.ok}
                    body += ["COMLN against the others on the same meta-test tasks (per-task accuracy, each at its "
                             "own horizon's table step: " + ", ".join(f"{_LABEL[m]} {horizon[r.label]}"
                                                                         for m, r in ok.items()) + "):", ""]
                    body += paired_table(ok["comln"], list(ok.values()), lambda r: horizon[r.label],
                                         lower_is_better=False, name="COMLN") + [""]
    title = "COMLN Table 2 (Conv-4 and ResNet-12)" if scale == "paper" else "COMLN Table 2 (Conv-4)"
    rows_note = "Conv-4 and ResNet-12 rows" if scale == "paper" else "Conv-4 rows"
    write_results(ctx, title, f"COMLN Table 2 (Sec. 5.1), {rows_note}", body, all_runs)


def _same_test_tasks(runs) -> bool:
    """Whether the runs were evaluated on the same meta-test tasks (the fixed
    test batch depends on the number of tasks): a paired test needs them."""
    return len({int(r.results["tasks"]) for r in runs}) == 1


def _comln_table4(ctx: Context) -> None:
    scale = ctx.scale
    budget = _image_budget(ctx, "comln", whole_network_table=False)
    b = "miniimagenet" if scale == "paper" else "omniglot"
    shots = {"paper": (1, 5), "cpu": (1,)}.get(scale, (5,))
    if scale != "paper":
        ctx.deviate(f"{scale}: Omniglot 5-way {shots[0]}-shot instead of miniImageNet, {budget['meta_iterations']} "
                    f"meta-iterations, {budget['eval_tasks']} test tasks")
    if scale == "cpu":
        ctx.deviate(_CPU_ONE_SHOT_NOTE)
    ctx.deviate("Euler: 20 fixed steps over the (learned) horizon; Dopri5: adaptive steps")
    opt = _comln_optimizer(ctx)
    if scale in ("paper", "cpu"):
        ctx.deviate(_LEE_SCHEDULE_NOTE)
    body = ["COMLN with an adaptive Dopri5 solver vs explicit Euler: meta-test accuracy and meta-training time.", ""]
    rows, all_runs = [], []
    for k in shots:
        for solver, steps in (("dopri5", None), ("euler", 20)):
            r = run_method(ctx, f"{b}-5w{k}s/comln-{solver}", b, "comln", ways=5, shots=k, steps=steps, **budget,
                           eval_steps=(0, 10, 50), eval_every=5, optimizer=opt)
            all_runs.append(r)
            p = PAPER_COMLN_TABLE4[solver].get(k)
            if r.ok:
                s = _eval_step_for(r, 10)
                sec = r.metrics[-1]["seconds"] / max(1, len(r.metrics)) if r.metrics else float("nan")
                rows.append([f"{solver} {k}-shot", _acc(*r.value(s)), f"{r.results['T']:.3g}", f"{sec:.3f}",
                             f"{p[0]:.2f} ± {p[1]:.2f}"])
            else:
                rows.append([f"{solver} {k}-shot", r.status, "-", "-", f"{p[0]:.2f} ± {p[1]:.2f}"])
    body += [md_table(["solver", "accuracy % (ours)", "learned T", "s / meta-iteration", "paper (miniImageNet)"],
                      rows), ""]
    write_results(ctx, "COMLN Table 4: Dopri5 vs Euler", "COMLN Table 4 (Appendix E.1)", body, all_runs)


def _comln_fig5(ctx: Context) -> None:
    scale = ctx.scale
    budget = _image_budget(ctx, "comln", whole_network_table=False)
    b, k = {"paper": ("miniimagenet", 5), "cpu": ("omniglot", 1)}.get(scale, ("omniglot", 5))
    fixed_T = 1.0
    if scale == "cpu":
        ctx.deviate(_CPU_ONE_SHOT_NOTE)
    if scale != "paper":
        ctx.deviate(f"{scale}: Omniglot 5-way {k}-shot instead of miniImageNet 5-way 5-shot; "
                    f"{budget['meta_iterations']} meta-iterations; {budget['eval_tasks']} test tasks; the left "
                    "panel's ResNet-12/tieredImageNet runs are not made (Conv-4 only)")
    ctx.deviate(f"fixed-T baseline: COMLN's head flow with T fixed at {fixed_T} (learn_T off); learned T starts at "
                "0.1 (presets)")
    if scale in ("paper", "cpu"):
        opt, schedule = None, None
        ctx.deviate(_LEE_SCHEDULE_NOTE + ("; the left panel's ResNet-12/tieredImageNet runs are not made"
                                          if scale == "paper" else ""))
    else:
        # What this figure is about is T moving; Adam 1e-3 moves log T by at most
        # 1e-3 an iteration (measured: 0.1 -> 0.104 in 40), SGD at 0.1 does not bind it.
        opt, schedule = "sgd", "none"
        ctx.deviate(f"{scale}: COMLN's SGD with Nesterov momentum 0.9 and lr 0.1, held constant (Lee et al.'s step "
                    "schedule does not fit a few dozen meta-iterations); with Adam 1e-3 T cannot move more than "
                    "a factor e^(0.001 x iterations)")
    runs = []
    eval_steps = (0, 10, 100) if scale == "paper" else (0, 10, 100, 1000)
    for label, learn, T in (("learned-T", True, None), (f"fixed-T{fixed_T}", False, fixed_T)):
        r = run_method(ctx, f"{b}-5w{k}s/{label}", b, "comln", ways=5, shots=k, T=T, learn_T=learn, **budget,
                       eval_steps=eval_steps, eval_every=10, optimizer=opt, lr_schedule=schedule)
        runs.append(r)
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        if r.ok and r.metrics:
            it = [m["iteration"] for m in r.metrics]
            total = max(it)
            a1.plot([i / total for i in it], [m["T"] for m in r.metrics], label=r.label.split("/")[1])
            import numpy as np

            loss = np.array([m["meta_loss"] for m in r.metrics])
            w = max(1, len(loss) // 10)
            a2.plot(it[w - 1:], np.convolve(loss, np.ones(w) / w, mode="valid"), label=r.label.split("/")[1])
    a1.set_xlabel("meta-training progress (normalised)")
    a1.set_ylabel("T")
    a1.set_title("horizon T during meta-training")
    a2.set_xlabel("meta-iteration")
    a2.set_ylabel("meta-loss (moving average)")
    a2.set_title("learned vs fixed T")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.tight_layout()
    _savefig(fig, ctx.out / "fig5.png")
    rows = []
    for r in runs:
        if r.ok:
            s = _eval_step_for(r, 10)
            per_it = r.metrics[-1]["seconds"] / len(r.metrics) if r.metrics else float("nan")
            T0 = r.metrics[0]["T"] if r.metrics else float("nan")
            rows.append([r.label.split("/")[1], f"{T0:.3g}", f"{r.results['T']:.3g}", _acc(*r.value(s)), str(s),
                         f"{per_it:.3f}"])
        else:
            rows.append([r.label.split("/")[1], "-", "-", r.status, "-", "-"])
    body = ["COMLN's horizon T during meta-training (learned from 0.1) and a fixed-T run.", "",
            md_table(["run", "T at iteration 1", "T at the end", "accuracy %", "eval GD steps", "s / meta-iteration"],
                     rows), "",
            "Paper (Fig. 5, a figure): T grows during meta-training, more for harder data sets and more shots; "
            "learned T reaches the fixed-T accuracy at lower cost early on.", "", "Figure: `fig5.png`."]
    write_results(ctx, "COMLN Fig. 5: learned horizon", "COMLN Fig. 5 (Appendix E.3)", body, runs)


# --------------------------------------------------------------------------- #
# Gradient accuracy, stability, memory/time
# --------------------------------------------------------------------------- #


def _amaml_table4(ctx: Context) -> None:
    import jax

    from . import gradient_accuracy as ga

    if ctx.scale == "test":
        states, horizons, inits, schemes = (10, 50), (0.1, 1.0), 3, ("heun",)
        ctx.deviate("test scale: 10 and 50 states, T in {0.1, 1.0}, 3 random initial states, Heun only")
    else:
        states, horizons, inits, schemes = ga.STATES, ga.HORIZONS, 20, ("heun", "rk4")
    with jax.enable_x64(True):
        res = ga.table4(schemes=schemes, states=states, horizons=horizons, num_inits=inits)
    ctx.deviate("float64; forward Dopri5 at rtol 1e-11 (the paper: torchdiffeq RK45 in PyTorch); the Autodiff "
                "columns of the paper are not reproduced (jax.grad through a discretised solve is not an A-MAML "
                "component)")
    body = ["Mean relative error of dL/dy0 against the closed form, for `dy/dt = -2t^3 - 2ty`, L = (y(T)-3)^6, "
            f"over {inits} random y0 in [-1, 1].", ""]
    idx = [ga.STATES.index(k) for k in states]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for T in horizons:
        body += [f"## T = {T}", "", md_table(
            ["states", "paper (Adjoint)"] + [f"ours ({s})" for s in schemes],
            [[str(k), f"{ga.PAPER_ADJOINT[T][j]:.2e}"] + [f"{res[s][T][i]:.2e}" for s in schemes]
             for i, (k, j) in enumerate(zip(states, idx))]), ""]
        line, = ax.loglog(states, res["heun"][T], marker="o", label=f"ours, T={T}")
        ax.loglog(states, [ga.PAPER_ADJOINT[T][j] for j in idx], ls="--", color=line.get_color(), label=f"paper, T={T}")
    if "adaptive" in res:
        tols = res["adaptive_tolerances"]
        body += ["## The adaptive backward (`Adjoint()`, ctmeta's default: no stored grid)", "",
                 "Relative error by the forward's tolerance (the backward's is 10x looser, the default).", "",
                 md_table(["T"] + [f"rtol {r:g}, atol {a:g}" for r, a in tols],
                          [[str(T)] + [f"{e:.2e}" for e in res["adaptive"][T]] for T in horizons]), ""]
    ax.set_xlabel("stored states")
    ax.set_ylabel("relative error")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _savefig(fig, ctx.out / "table4.png")
    body.append("Figure: `table4.png`.")
    (ctx.out / "table4.json").write_text(json.dumps(
        {s: ({str(T): v for T, v in d.items()} if isinstance(d, dict) else d) for s, d in res.items()}, indent=1))
    write_results(ctx, "A-MAML Table 4: gradient accuracy", "A-MAML Table 4 (Appendix A)", body)


def _amaml_table5(ctx: Context) -> None:
    from . import cosmixture_table5 as t5

    if ctx.scale == "test":
        states, ref, horizons, inits = (10, 50), 100, (0.1,), 2
        ctx.deviate("test scale: 10 and 50 states against a 100-state reference, T = 0.1, 2 initialisations")
    elif ctx.scale == "quick":
        states, ref, horizons, inits = t5.STATES, t5.REFERENCE, t5.HORIZONS, 5
        ctx.deviate("quick: 5 random initialisations instead of 20")
    else:
        states, ref, horizons, inits = t5.STATES, t5.REFERENCE, t5.HORIZONS, 20
    res = t5.table5(states=states, reference=ref, horizons=horizons, num_inits=inits, adaptive=True)
    ctx.deviate("float32 (as in training); the meta-gradient is that of one meta-batch of 5 CosMixture 50shot-50val "
                "tasks, w.r.t. all MLP parameters; forward Dopri5 at rtol 1e-6, atol 1e-8 (presets)")
    body = [f"Relative L2 error of the A-MAML meta-gradient with K stored states against the {ref}-state one "
            f"(mean ± std over {inits} random initialisations), beside the paper's Table 5.", ""]
    header = ["states"] + sum(([f"T={T} (ours)", "paper"] for T in horizons), [])
    rows = []
    for i, k in enumerate(states):
        row = [str(k)]
        for T in horizons:
            m, s = res[T][i]
            p = PAPER_AMAML_TABLE5.get(T, {}).get(k)
            row += [f"{m:.2e} ± {s:.2e}", f"{p[0]:.2e} ± {p[1]:.2e}" if p else "-"]
        rows.append(row)
    rows.append(["adaptive backward (`Adjoint()`, no grid)"]
                + sum(([f"{res[('adaptive', T)][0]:.2e} ± {res[('adaptive', T)][1]:.2e}", "-"] for T in horizons), []))
    body += [md_table(header, rows), "",
             "The last row is ctmeta's default rule (the backward reads u(t) from the forward's dense output, with "
             "its own step control); its error against the same reference is bounded below by the reference's "
             "own discretisation error.", ""]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for T in horizons:
        line, = ax.loglog(states, [res[T][i][0] for i in range(len(states))], marker="o", label=f"ours, T={T}")
        ps = [(k, PAPER_AMAML_TABLE5[T][k][0]) for k in states if k in PAPER_AMAML_TABLE5.get(T, {})]
        if ps:
            ax.loglog(*zip(*ps), ls="--", color=line.get_color(), label=f"paper, T={T}")
        ax.axhline(res[("adaptive", T)][0], ls=":", color=line.get_color(), label=f"adaptive backward, T={T}")
    ax.set_xlabel("stored states")
    ax.set_ylabel(f"relative error vs {ref} states")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _savefig(fig, ctx.out / "table5.png")
    body.append("Figure: `table5.png`.")
    write_results(ctx, "A-MAML Table 5: CosMixture meta-gradient vs stored states", "A-MAML Table 5 (Appendix A)",
                  body)


def _comln_fig2(ctx: Context) -> None:
    from . import stability

    kw = {}
    if ctx.scale == "test":
        kw = dict(horizons=(0.5, 2.0), trajectory_horizon=2.0)
    res = stability.stability_demo(ctx.out, **kw)
    methods = list(res["errors"])
    rows = [[f"{T:g}"] + [f"{res['errors'][m][i]:.2e}" for m in methods] + [f"{res['trajectory_gap'][i]:.2e}"]
            for i, T in enumerate(res["horizons"])]
    body = ["Relative error of dJ/dw0 on a quadratic (closed form) as the horizon grows, per method, and the "
            "gap between the forward trajectory and the one recomputed backward in time.", "",
            md_table(["T"] + methods + ["backward-recomputation gap"], rows), "",
            "Paper (COMLN Fig. 2, qualitative): recomputing W(t) backward diverges from the forward trajectory; "
            "forward sensitivity stays accurate.", "",
            "`adaptive_adjoint` is ctmeta's default rule (`Adjoint()` through `gradient_flow`: the backward reads "
            "w(t) from the forward's dense output, with its own step control), an implementation independent of "
            "the other three (diffrax directly). Like the stored sweep it never recomputes w backward, so it stays "
            "accurate where the backsolve's recomputation overflows. (The quadratic's adjoint does not read w, "
            "so the backsolve gradient itself is accurate until the overflow; see `ctmeta.experiments.stability`.)",
            "", "Figure: `stability.png`."]
    write_results(ctx, "COMLN Fig. 2: stability of the adjoint's backward recomputation", "COMLN Fig. 2 (Sec. 3.2)",
                  body)


def _bench(ctx: Context, cases: list[str]) -> None:
    from .. import bench

    quick = ctx.scale != "paper"
    steps = (5, 20) if ctx.scale == "test" else None
    if quick:
        ctx.deviate("ctmeta bench --quick: two step counts, 2 repeats, a 40 s budget per point")
    ctx.deviate("memory is XLA's compiled buffer assignment on CPU, not GPU memory; times are CPU times")
    bench.run(cases, steps, str(ctx.out), quick, meta_batch=1 if ctx.scale == "test" else None,
              progress=not ctx.quiet, data_dir=str(ctx.data_root) if ctx.data_root else None,
              vmap=ctx.scale != "test", diagnostics=ctx.scale != "test")
    md = ctx.out / "bench.md"
    body = ["Delegated to `ctmeta.bench.run` (see its module docstring for what is measured).", ""]
    if md.is_file():
        body += [md.read_text()]
    body += ["", "PNG figures: " + ", ".join(f"`{p.name}`" for p in sorted(ctx.out.glob("*.png")))]
    write_results(ctx, f"{ctx.name}: memory and time against inner steps",
                  "A-MAML Figs. 3-4" if ctx.name == "amaml-fig3-4" else "COMLN Fig. 3", body)


# --------------------------------------------------------------------------- #
# The registry
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    name: str
    reproduces: str
    quick_cost: str
    runner: Callable[[Context], None]
    #: Whether `--scale cpu` differs from `--scale paper` (the image experiments).
    cpu_differs: bool = False
    #: Whether it meta-trains runs (which `estimate` can time).
    meta_trains: bool = True


EXPERIMENTS: dict[str, ExperimentSpec] = {
    s.name: s
    for s in [
        ExperimentSpec("amaml-fig2-cosmixture", "A-MAML Fig. 2b,c: CosMixture, 6 methods, 50shot-50val and 100shot-100val",
                       "~10-15 min (12 runs of 150-300 meta-iterations)", lambda c: _fig2(c, "cosmixture")),
        ExperimentSpec("amaml-fig2-alpine", "A-MAML Fig. 2e,f: Alpine, 6 methods, 50shot-50val and 100shot-100val",
                       "~10-15 min (12 runs)", lambda c: _fig2(c, "alpine")),
        ExperimentSpec("amaml-fig2", "A-MAML Fig. 2: both of the above", "~20-30 min",
                       lambda c: (_fig2(_sub(c, "cosmixture"), "cosmixture"), _fig2(_sub(c, "alpine"), "alpine"))),
        ExperimentSpec("amaml-table1-2", "A-MAML Tables 1-2: MovieLens-100K/1M, Jester-1, 50 and 100 inner steps",
                       "~10 min (10shot-15val only; MovieLens-1M skipped without its data)", _table12),
        ExperimentSpec("amaml-table3", "A-MAML Table 3: Omniglot 20-way 1-shot, miniImageNet 5-way 1-shot",
                       "~15-25 min (Omniglot only, 12 meta-iterations of whole-network Conv-4)", _table3, cpu_differs=True),
        ExperimentSpec("amaml-table4", "A-MAML Table 4: adjoint gradient error vs closed form", "~1-2 min",
                       _amaml_table4, meta_trains=False),
        ExperimentSpec("amaml-table5", "A-MAML Table 5: CosMixture meta-gradient error vs 1000-state reference",
                       "~2-5 min (5 initialisations)", _amaml_table5, meta_trains=False),
        ExperimentSpec("amaml-fig3-4", "A-MAML Figs. 3-4: memory and time vs inner steps (CosMixture)",
                       "~2-5 min (ctmeta bench --quick)", lambda c: _bench(c, ["cosmixture"]), meta_trains=False),
        ExperimentSpec("comln-fig2", "COMLN Fig. 2: adjoint backward instability on a quadratic", "< 1 min",
                       _comln_fig2, meta_trains=False),
        ExperimentSpec("comln-fig3", "COMLN Figs. 3-4: memory and time vs inner steps (Conv-4 and ResNet-12, 5-way 5-shot)",
                       "~8-13 min (ctmeta bench --quick; ResNet-12 compiles ~5 min)", lambda c: _bench(c, ["miniimagenet"] + (["miniimagenet-resnet12"] if c.scale != "test" else [])), meta_trains=False),
        ExperimentSpec("comln-table2", "COMLN Table 2: COMLN vs ANIL vs MAML, Conv-4 (+ ResNet-12 at --scale paper) "
                       "(miniImageNet train64, Omniglot)",
                       "~15-25 min (1-shot only)", _comln_table2, cpu_differs=True),
        ExperimentSpec("comln-table4", "COMLN Table 4: Dopri5 vs Euler, accuracy and time", "~5 min", _comln_table4, cpu_differs=True),
        ExperimentSpec("comln-fig5", "COMLN Fig. 5: learned T during meta-training; learned vs fixed T",
                       "~5 min (Omniglot 5-way 5-shot; cpu: 1-shot)", _comln_fig5, cpu_differs=True),
    ]
}


def _sub(ctx: Context, suffix: str) -> Context:
    out = ctx.out / suffix
    out.mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(ctx, name=f"{ctx.name}-{suffix}", out=out, deviations=[], notes=[])


def list_text() -> str:
    w = max(len(n) for n in EXPERIMENTS)
    lines = ["experiments (ctmeta reproduce NAME [--scale quick|cpu|paper]; cpu = paper unless marked):", ""]
    for s in EXPERIMENTS.values():
        lines.append(f"  {s.name:<{w}}  {s.reproduces}")
        lines.append(f"  {'':<{w}}  quick scale: {s.quick_cost}"
                     + ("; cpu scale: Omniglot only, 1,000-2,000 meta-iterations" if s.cpu_differs else ""))
    return "\n".join(lines)


def run_experiment(name: str, *, scale: str = "quick", out: str = "reproduce-out", data_dir: str | None = None,
                   quiet: bool = False, argv: list[str] | None = None,
                   methods: tuple[str, ...] | None = None, estimate: int = 0) -> pathlib.Path | list[dict]:
    """Run one experiment; returns its output directory.

    `methods` (e.g. `("maml", "reptile")`) runs only the runs whose label ends
    in one of them; the others are listed as not run, unless already finished.

    `estimate > 0` runs nothing: it times `estimate` meta-iterations of every
    run (finished or not, after one that compiles), writes nothing, and
    returns one dict a run (`label`, `meta_iterations`, `compile_s`,
    `s_per_iteration`, `projected_s`)."""
    import tempfile

    if name not in EXPERIMENTS:
        raise InputError(f"unknown experiment {name!r}; see `ctmeta reproduce --list` ({', '.join(EXPERIMENTS)})")
    if scale not in SCALES:
        raise InputError(f"scale must be one of quick, cpu, paper; got {scale!r}")
    estimate = int(estimate)
    if estimate < 0:
        raise InputError(f"estimate must be a number of meta-iterations >= 0, got {estimate}")
    if estimate and not EXPERIMENTS[name].meta_trains:
        raise InputError(f"{name} does not meta-train: there is nothing to estimate (it runs in minutes)")
    if estimate:
        with tempfile.TemporaryDirectory(prefix="ctmeta-estimate-") as tmp:
            ctx = _run(name, scale, pathlib.Path(tmp), data_dir, quiet, argv, methods, estimate)
        return ctx.estimates
    return _run(name, scale, pathlib.Path(out).expanduser(), data_dir, quiet, argv, methods, 0).out


def _run(name, scale, out, data_dir, quiet, argv, methods, estimate) -> Context:
    from ..runs import Reporter

    root = None
    if data_dir is not None:
        root = pathlib.Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"--data-dir {root} does not exist")
        root = root.resolve()
    path = out / name
    path.mkdir(parents=True, exist_ok=True)
    ctx = Context(name=name, scale=scale, out=path, data_root=root, quiet=quiet,
                  argv=list(argv) if argv is not None else [name, "--scale", scale],
                  reporter=Reporter(quiet=quiet), methods=frozenset(methods) if methods else None,
                  estimate=estimate)
    if scale == "cpu" and not EXPERIMENTS[name].cpu_differs:
        ctx.log(f"{name}: its cpu scale is its paper scale (it fits this machine)")
        ctx.scale = "paper"
    t0 = time.perf_counter()
    EXPERIMENTS[name].runner(ctx)
    if estimate:
        ctx.log(f"\n{name} ({scale}): projected meta-training wall time on this machine\n\n"
                + estimate_table(ctx.estimates))
    else:
        ctx.log(f"{name} ({scale}) finished in {time.perf_counter() - t0:.0f} s; results in {path}")
    return ctx


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctmeta reproduce",
        description="Reproduce one of the papers' experiments (A-MAML, COMLN) into OUT/EXPERIMENT/: run "
        "directories per method, results.md with our table beside the paper's, and PNG figures.",
        epilog=list_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("experiment", nargs="?", metavar="EXPERIMENT", help="see --list")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--scale", choices=SCALES, default="quick", metavar="{quick,cpu,paper}",
                   help="quick: minutes on a CPU, with the cuts listed in results.md; paper: the papers' protocols; "
                   "cpu: paper, except the image experiments' budgets, cut to a few hours on 2 CPU cores")
    p.add_argument("--out", default="reproduce-out", metavar="DIR", help="output root (default: reproduce-out)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="root holding movielens/, jester/, omniglot/, miniimagenet/ (default: $CTMETA_DATA, "
                   "else ./data)")
    p.add_argument("--methods", default=None, metavar="M,M,...",
                   help="run only these methods (e.g. maml,maml-1,reptile); finished runs of the others are "
                   "still read back into the tables")
    p.add_argument("--estimate", type=int, nargs="?", const=3, default=0, metavar="N",
                   help="run nothing: time N (default 3) meta-iterations of each run after one that compiles, and "
                   "print each run's and the experiment's projected meta-training wall time")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="print tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    """`ctmeta reproduce ...`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.list:
        print(list_text())
        return 0
    if not args.experiment:
        print("ctmeta reproduce: error: name an EXPERIMENT (see ctmeta reproduce --list)", file=sys.stderr)
        return 2
    if args.experiment not in EXPERIMENTS:
        print(f"ctmeta reproduce: error: unknown experiment {args.experiment!r}; choose from "
              f"{', '.join(EXPERIMENTS)} (see --list)", file=sys.stderr)
        return 2
    if args.debug:
        os.environ["CTMETA_DEBUG"] = "1"
    try:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
        run_experiment(args.experiment, scale=args.scale, out=args.out, data_dir=args.data_dir, quiet=args.quiet,
                       argv=argv, methods=methods, estimate=args.estimate)
    except CtmetaError as err:
        if args.debug:
            traceback.print_exc()
        print(f"ctmeta reproduce: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctmeta reproduce: interrupted; run the same command again to resume (finished runs are reused)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
