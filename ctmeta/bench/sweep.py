r"""The sweep: every (benchmark, method, inner steps) case compiled, measured within budgets, and written.

For each case the meta-gradient of one meta-batch is compiled ahead of time
(its memory from XLA's buffer assignment), then timed, unless its memory
exceeds `max_bytes` or its time, extrapolated in $K$ from the method's
timed step counts (`_time_skipped`), would exceed `time_budget`.

`bench.csv` is rewritten after every case, and `sweep.json` records the
settings the rows were measured under, so an interrupted sweep resumes
(`resume=True`): rows measured under the same settings on the same device
are kept, and only the missing cases are measured.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import time
from typing import Any, Sequence

import jax

from .._errors import InputError
from .._io import atomic_write_text
from .diagnostics import run_diagnostics
from .measurement import compile_fn, device_description, measure_vmap, meta_gradient_fn, time_call
from .plots import plot
from .problems import ADAPTIVE_SOLVER, BENCHMARKS, OPTIONAL_METHODS, H, Problem, checkpoints_for, make_problem
from .report import fmt_bytes, fmt_seconds, read_csv, rows_markdown, table_markdown, union_keys, write_csv
from .targets import evaluate_targets, print_summary, targets_markdown

__all__ = ["COLUMNS", "DEFAULT_CASES", "DEFAULT_STEPS", "QUICK_STEPS", "Settings", "run", "rerun_diagnostics"]

DEFAULT_STEPS = (10, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
QUICK_STEPS = (10, 100)
DEFAULT_CASES = ("cosmixture", "omniglot")
#: Benchmarks whose every call takes tens of seconds on a CPU: memory only under
#: `quick`, and by default one step count a decade (a point is ~2.5 min on one core).
_SLOW_BENCHMARKS = ("miniimagenet-resnet12",)
SLOW_STEPS = (10, 100, 1000, 10000)

#: Columns of `bench.csv`, in order.
COLUMNS = (
    "benchmark",
    "method",
    "steps",
    "T",
    "peak_bytes",
    "temp_bytes",
    "argument_bytes",
    "output_bytes",
    "seconds",
    "forward_seconds",
    "repeats",
    "forward_repeats",
    "meta_batch",
    "checkpoints",
    "device",
    "dtype",
    "compile_seconds",
    "status",
    "forward_steps",
    "backward_steps",
)



_WHOLE_CONV4_SLOW = ("maml", "amaml", "amaml-ckpt", "amaml-adaptive")


@dataclasses.dataclass
class Settings:
    quick: bool
    time_budget: float
    max_bytes: float
    meta_batch: dict
    vmap: bool = True
    diagnostics: bool = True
    data_dir: Any = None
    progress: bool = True


def _parse_cases(cases) -> list[tuple[str, str]]:
    """`["cosmixture", "omniglot/comln", ...]` -> `[(benchmark, method), ...]`."""
    out = []
    for item in cases or DEFAULT_CASES:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            bench, _, method = part.partition("/")
            if bench not in BENCHMARKS:
                raise InputError(f"unknown benchmark {bench!r} in --cases; choose from {sorted(BENCHMARKS)}")
            methods = BENCHMARKS[bench] if not method else tuple(m for m in method.split("+"))
            known = BENCHMARKS[bench] + OPTIONAL_METHODS.get(bench, ())
            for m in methods:
                if m not in known:
                    raise InputError(f"unknown method {m!r} for {bench}; choose from {known}")
                if (bench, m) not in out:
                    out.append((bench, m))
    return out


def _sweep_settings(settings: "Settings", repeats: int, device: str) -> dict:
    """What a measured row depends on besides its case: `sweep.json`."""
    return dict(quick=settings.quick, repeats=repeats, time_budget=settings.time_budget,
                max_bytes=settings.max_bytes, device=device)


def _resumed_rows(out: pathlib.Path, recorded: dict) -> tuple[dict, dict]:
    """`(benchmark, method, steps) -> row` of an earlier sweep in `out` under the same settings,
    and its `sweep.json` (with the `seconds` and `date` of its sessions so far).

    Rows that failed with an error are measured again. An earlier sweep under
    other settings is an error rather than silently mixed or overwritten.
    """
    csv_path, json_path = out / "bench.csv", out / "sweep.json"
    if not csv_path.is_file():
        return {}, {}
    if not json_path.is_file():
        raise InputError(f"{csv_path} has no sweep.json beside it, so the settings it was measured under are "
                         "unknown: use another --out, or remove it to start again")
    earlier = json.loads(json_path.read_text())
    differ = sorted(k for k in recorded if earlier.get(k) != recorded[k])
    if differ:
        what = ", ".join(f"{k} {earlier.get(k)!r} (now {recorded[k]!r})" for k in differ)
        raise InputError(f"{out} holds a sweep measured under other settings: {what}; "
                         "use another --out, or remove it to start again")
    kept = {(r["benchmark"], r["method"], int(r["steps"])): r for r in _read_rows(csv_path)
            if not str(r.get("status") or "").startswith("error")}
    return kept, earlier


def _read_rows(path: pathlib.Path) -> list[dict]:
    """The rows of a written `bench.csv`, as `_measure_case` makes them (no checkpoints: `""`)."""
    rows = read_csv(path)
    for r in rows:
        r["checkpoints"] = "" if r.get("checkpoints") is None else r["checkpoints"]
    return rows


def _write_record(out: pathlib.Path, record: dict) -> None:
    atomic_write_text(out / "sweep.json", json.dumps(record, indent=1) + "\n")


def _remember_timing(history: dict, row: dict) -> None:
    """The method's timed points `(steps, seconds, repeats)`, from which later cases' times are extrapolated."""
    if row.get("seconds") is not None and str(row.get("status", "")).startswith("ok"):
        history.setdefault((row["benchmark"], row["method"]), []).append(
            (row["steps"], row["seconds"], row["repeats"]))


def _time_skipped(points: list, steps: int, budget: float) -> str | None:
    r"""Why the case at `steps` is not timed, from the method's timed `points`; `None` to time it.

    From two points the time per call is extrapolated affinely through the last
    two, $t_2 + \max(0, (t_2 - t_1)/(K_2 - K_1))(K - K_2)$: a head-only rule
    is a fixed embedding cost plus a head cost linear in $K$, and through the
    origin would overestimate it by orders of magnitude (ResNet-12: ~50 s a
    call at any K). From one point it is $t_1 K / K_1$, an upper bound; the
    second point is timed anyway unless the first was over the budget alone
    or that bound exceeds ten budgets, so the affine model gets its points.
    The case is skipped when one call would exceed `budget` (a case timed
    near it may come out as its warm-up call alone, `repeats` 0).
    """
    if not points:
        return None
    k2, t2, repeats = points[-1]
    if len(points) == 1:
        est = t2 * steps / k2
        if repeats > 0 and est <= 10 * budget:
            return None
    else:
        k1, t1, _ = points[-2]
        est = t2 + max(0.0, (t2 - t1) / (k2 - k1)) * (steps - k2)
    if est <= budget:
        return None
    return f"memory only: time skipped, est. {fmt_seconds(est)} per call > budget {budget:g} s"


def _steps_text(pairs, steps_of) -> str:
    """`[10, 100]` if every benchmark has the same step counts, else one list a benchmark."""
    per = {b: steps_of(b) for b, _ in pairs}
    if len({tuple(v) for v in per.values()}) == 1:
        return str(next(iter(per.values())))
    return "; ".join(f"{b} {v}" for b, v in per.items())


def _measure_case(problem, method, steps, settings, history, repeats, device):
    """One row of bench.csv."""
    row = dict(
        benchmark=problem.name, method=method, steps=steps, T=round(steps * H, 10),
        meta_batch=problem.meta_batch, device=device, dtype=problem.dtype,
        checkpoints=checkpoints_for(steps) if method == "amaml-ckpt" else "",
        repeats=0, forward_repeats=0, seconds=None, forward_seconds=None,
    )
    args = (problem.meta_params(method), problem.batch)
    grad_fn, fwd_fn = meta_gradient_fn(problem, method, steps)
    try:
        compiled, mem, csec = compile_fn(grad_fn, *args)
    except Exception as err:  # noqa: BLE001 - recorded, the run goes on
        row.update(status=f"error compiling: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        return row
    row.update(mem, compile_seconds=round(csec, 2))
    if settings.quick and problem.head is not None and method in _WHOLE_CONV4_SLOW:
        row["status"] = ("memory only (--quick): whole-network Conv-4 timings take 10-100 s per call "
                         "on a CPU, see docs/bench.md")
        return row
    if settings.quick and problem.name in _SLOW_BENCHMARKS:
        row["status"] = "memory only (--quick): ResNet-12 meta-gradients take tens of seconds per call on a CPU"
        return row
    if mem["peak_bytes"] > settings.max_bytes:
        row["status"] = f"memory only: needs {fmt_bytes(mem['peak_bytes'])} > limit {fmt_bytes(settings.max_bytes)}"
        return row
    skipped = _time_skipped(history.get((problem.name, method), []), steps, settings.time_budget)
    if skipped:
        row["status"] = skipped
        return row
    try:
        row["seconds"], row["repeats"], _ = time_call(compiled, args, repeats, settings.time_budget)
        del compiled
        cf, _, csec_f = compile_fn(fwd_fn, *args)
        row["compile_seconds"] = round(csec + csec_f, 2)
        row["forward_seconds"], row["forward_repeats"], _ = time_call(cf, args, repeats, settings.time_budget)
    except Exception as err:  # noqa: BLE001
        msg = str(err).strip().splitlines()
        msg = next((m for m in msg if "ctmeta" in m or "max_steps" in m), msg[0] if msg else "")
        row["status"] = f"error running: {type(err).__name__}: {msg[:200]}"
        return row
    base, flow = problem.rule_and_flow(method)
    if base in ADAPTIVE_SOLVER:
        row.update(problem.adaptive_steps(steps * H, flow, ADAPTIVE_SOLVER[base]))
    row["status"] = "ok" if row["repeats"] > 0 else "ok (warm-up call only: over the time budget)"
    _remember_timing(history, row)
    return row


def run(
    cases: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    out_dir: str | os.PathLike = "bench-out",
    quick: bool = False,
    repeats: int | None = None,
    *,
    meta_batch: int | None = None,
    time_budget: float | None = None,
    max_bytes: float = 8e9,
    vmap: bool = True,
    diagnostics: bool = True,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    resume: bool = False,
    console=None,
) -> list[dict]:
    """Run the benchmark; write `bench.csv`, figures, `vmap.csv`, `targets.md` in `out_dir`.

    **Arguments:**

    - `cases`: benchmarks (`"cosmixture"`, `"omniglot"`, `"miniimagenet"`,
      `"miniimagenet-resnet12"`)
      or `"benchmark/method"` items (`"cosmixture/maml+amaml"`); default
      cosmixture and omniglot with all their methods.
    - `steps`: inner step counts (default `DEFAULT_STEPS`, for ResNet-12
      `SLOW_STEPS`; quick `QUICK_STEPS`).
    - `quick`: two step counts, 2 repeats, a 40 s budget per point.
    - `repeats`: timed calls per point (default 5, quick 2).
    - `meta_batch`: tasks per meta-batch (default 5 for cosmixture, 1 for the
      Conv-4 benchmarks, as in COMLN Fig. 3).
    - `time_budget`: seconds one point may take (default 120, quick 40).
    - `max_bytes`: compiled memory above which a case is not run (8 GB).
    - `vmap`, `diagnostics`: also measure vmap-vs-loop and the A-MAML and COMLN
      time breakdowns.
    - `resume`: keep the rows of an earlier, interrupted sweep in `out_dir`
      (same settings and device, else `InputError`) and measure only the
      missing cases; its `vmap.csv` and `diagnostics.csv` too when it wrote
      them and no case is measured anew.

    **Returns:** the rows of `bench.csv` as dicts.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    pairs = _parse_cases(cases)
    given = sorted({int(s) for s in steps}) if steps else None
    if given is not None and given[0] < 1:
        raise InputError("steps must be positive integers")

    def steps_of(bench: str) -> list[int]:
        if given is not None:
            return given
        return list(QUICK_STEPS if quick else SLOW_STEPS if bench in _SLOW_BENCHMARKS else DEFAULT_STEPS)

    repeats = int(repeats if repeats is not None else (2 if quick else 5))
    if repeats < 1:
        raise InputError("repeats must be >= 1")
    budget = float(time_budget if time_budget is not None else (40.0 if quick else 120.0))
    mb = {}
    for bench in dict.fromkeys(b for b, _ in pairs):
        mb[bench] = int(meta_batch) if meta_batch else (5 if bench == "cosmixture" else 1)
    settings = Settings(quick, budget, float(max_bytes), mb, vmap, diagnostics, data_dir, progress)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device_description()
    recorded = _sweep_settings(settings, repeats, device)
    earlier, record = _resumed_rows(out, recorded) if resume else ({}, {})
    # The time spent measuring, over all the sweep's sessions, kept in sweep.json after every
    # case (a resumed sweep that measures nothing adds nothing).
    record = dict(recorded, date=record.get("date") or datetime.datetime.now().isoformat(timespec="seconds"),
                  seconds=float(record.get("seconds") or 0.0))
    _write_record(out, record)
    started = time.perf_counter()

    def measured(fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record["seconds"] = round(record["seconds"] + time.perf_counter() - t0, 1)
            _write_record(out, record)

    problems: dict[str, Problem] = {}
    rows: list[dict] = []
    history: dict = {}
    items = [(b, m, k) for b, m in pairs for k in steps_of(b)]
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("bench", total=len(items) + int(vmap) + int(diagnostics))
        measured_anew, kept_count = False, 0
        for bench, method, k in items:
            bar.update(task, description=f"{bench} {method} K={k}")
            if bench not in problems:
                problems[bench] = make_problem(bench, mb[bench], data_dir=data_dir)
                console.print(f"[bold]{bench}[/]: {problems[bench].data}, meta-batch {mb[bench]}", soft_wrap=True)
            row = earlier.get((bench, method, k))
            if row is not None and row.get("meta_batch") == mb[bench]:
                _remember_timing(history, row)
                kept, kept_count = " (kept from the earlier sweep)", kept_count + 1
            else:
                row = measured(_measure_case, problems[bench], method, k, settings, history, repeats, device)
                measured_anew, kept = True, ""
            rows.append(row)
            console.print(
                f"  {bench:<12} {method:<12} K={k:<6} mem {fmt_bytes(row.get('peak_bytes')):>11}  "
                f"grad {fmt_seconds(row['seconds']):>10}  fwd {fmt_seconds(row['forward_seconds']):>10}  "
                f"{row['status']}{kept}",
                soft_wrap=True,
            )
            write_csv(out / "bench.csv", rows, COLUMNS)
            bar.advance(task)
        reuse = resume and not measured_anew
        vmap_rows, diag_rows = [], []
        if vmap:
            bar.update(task, description="vmap vs loop")
            if reuse and (out / "vmap.csv").is_file():
                vmap_rows = read_csv(out / "vmap.csv")
            else:
                vmap_rows = measured(measure_vmap, steps=100, repeats=max(repeats, 3), device=device)
                write_csv(out / "vmap.csv", vmap_rows, list(vmap_rows[0]))
            bar.advance(task)
        if diagnostics:
            bar.update(task, description="diagnostics")
            if reuse and (out / "diagnostics.csv").is_file():
                diag_rows = read_csv(out / "diagnostics.csv")
            else:
                diag_rows = measured(run_diagnostics, rows, problems, repeats=max(repeats, 3), quick=quick,
                                     data_dir=data_dir, budget=budget)
                if diag_rows:
                    write_csv(out / "diagnostics.csv", diag_rows, union_keys(diag_rows))
            bar.advance(task)

    figures = plot(rows, out, max_bytes)
    targets = evaluate_targets(rows, vmap_rows, diag_rows)
    elapsed = time.perf_counter() - started
    header = (
        f"- date: {record['date']}" + (f" (resumed {datetime.datetime.now().isoformat(timespec='seconds')})"
                                       if kept_count else "") + "\n"
        f"- device: {device}; jax {jax.__version__}; dtype float32\n"
        f"- settings: quick={quick}, steps {_steps_text(pairs, steps_of)}, repeats={repeats}, time budget {budget:g} s/point, "
        f"max bytes {max_bytes:g}, meta-batch {mb}\n"
        f"- data: " + "; ".join(f"{p.name}: {p.data}" for p in problems.values()) + "\n"
        f"- wall time of the run: {record['seconds'] / 60:.1f} min measuring"
        + (f", over its sessions ({kept_count} of {len(items)} cases kept from the earlier ones)" if kept_count else "")
        + "\n"
    )
    (out / "targets.md").write_text("# ctmeta bench: targets\n\n" + header + "\n" + targets_markdown(targets, diag_rows))
    (out / "bench.md").write_text(
        "# ctmeta bench\n\n" + header + "\n## bench.csv\n\n" + rows_markdown(rows)
        + ("\n## vmap.csv\n\n" + table_markdown(vmap_rows) if vmap_rows else "")
        + ("\n## diagnostics.csv\n\n" + table_markdown(diag_rows) if diag_rows else "")
        + "\n## targets\n\n" + targets_markdown(targets, diag_rows)
        + "\n" + "".join(f"![{f.name}]({f.name})\n" for f in figures)
    )
    print_summary(targets, console)
    console.print(f"wrote {out}/bench.csv, {', '.join(f.name for f in figures)}, targets.md ({elapsed / 60:.1f} min)")
    return rows


def rerun_diagnostics(out_dir, *, repeats: int = 3, data_dir=None, console=None) -> list[dict]:
    """`--diagnostics-only`: the diagnostics of an earlier run's `bench.csv`, and its targets again."""
    from rich.console import Console

    console = console or Console(stderr=True)
    out = pathlib.Path(out_dir)
    rows = _read_rows(out / "bench.csv")
    vmap_rows = read_csv(out / "vmap.csv") if (out / "vmap.csv").is_file() else []
    problems = {}
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        mb = next(r["meta_batch"] for r in rows if r["benchmark"] == bench)
        problems[bench] = make_problem(bench, mb, data_dir=data_dir)
    sweep = out / "sweep.json"
    quick = json.loads(sweep.read_text())["quick"] if sweep.is_file() else len({r["steps"] for r in rows}) <= 2
    diag = run_diagnostics(rows, problems, repeats=repeats, quick=quick, data_dir=data_dir)
    write_csv(out / "diagnostics.csv", diag, union_keys(diag))
    plot(rows, out)
    targets = evaluate_targets(rows, vmap_rows, diag)
    text = (out / "targets.md").read_text() if (out / "targets.md").is_file() else "# ctmeta bench: targets\n\n"
    head = text.split("| target |")[0]
    (out / "targets.md").write_text(head + targets_markdown(targets, diag))
    print_summary(targets, console)
    return diag
