"""Evaluating a run: the table (results.md, results.json) and the figures."""

from __future__ import annotations

import io
import json
import os
import pathlib
import time
import warnings

from .._errors import CheckpointError, InputError, NumericalError
from .._io import atomic_write_bytes, atomic_write_text
from .console import Reporter
from .rundir import RunDir

__all__ = ["EvaluationDiverged", "check_finite", "eval_curve", "evaluate_run", "flow_summary", "resolve_evaluation",
           "results_markdown", "results_text", "save_figure", "write_figures"]


def eval_curve(table_steps, every: int | None = None) -> list[int]:
    """The steps of the error-vs-steps curve for the table's `table_steps`:
    every `every` steps from 0 to the largest (default: about 20 points),
    plus the table's own."""
    table_steps = sorted({int(x) for x in table_steps})
    top = table_steps[-1]
    if every is None:
        every = max(1, top // 20)
    return sorted(set(range(0, top + 1, max(1, int(every)))) | set(table_steps) | {0})


class EvaluationDiverged(NumericalError):
    """The adaptation of an evaluation gave a non-finite meta-test error on
    some tasks (a learning rate too large): nothing was written."""


def resolve_evaluation(exp, state, *, steps=None, tasks: int | None = None, lr: float | None = None,
                       inner_loss_tasks: int | None = None, available: int | None = None) -> dict:
    """What an evaluation of `state` computes, the run's configuration filling
    what is not given: `iteration`, `table_steps`, `curve_steps`, `tasks`
    (how many meta-test tasks), `lr` and `inner_loss_tasks` (0: none).

    Two evaluations with the same values give the same numbers: this is what
    names an evaluation and tells whether it is the run's own
    (`ctmeta.runs.evaluations`). `available`: the number of meta-test tasks
    (default: counted from `exp.eval_batch()`)."""
    import jax

    from ..presets import BENCHMARKS

    cfg = exp.config
    ev = cfg["eval"]
    if steps is None:
        table_steps = [int(x) for x in ev["steps"]]
        curve = [int(x) for x in ev["curve"]]
    else:
        table_steps = sorted({int(x) for x in steps})
        old = [int(x) for x in ev.get("curve") or []]
        every = old[1] - old[0] if len(old) > 1 else None
        curve = eval_curve(table_steps, every)
    if available is None:
        available = int(jax.tree.leaves(exp.eval_batch())[0].shape[0])
    if tasks is not None and tasks > available:
        raise InputError(f"`tasks` {tasks} exceeds the {available} meta-test tasks of {cfg['benchmark']}; "
                         f"the maximum is {available}")
    n_tasks = available if tasks is None else int(tasks)
    if inner_loss_tasks is None:
        inner_loss_tasks = 0 if getattr(BENCHMARKS.get(cfg["benchmark"]), "kind", None) == "images" else 4
    inner = 0 if exp.learner.method.head_only else min(int(inner_loss_tasks), n_tasks)
    return {"iteration": int(state.iteration), "table_steps": table_steps, "curve_steps": curve, "tasks": n_tasks,
            "lr": float(ev["lr"]) if lr is None else float(lr), "inner_loss_tasks": inner}


def check_finite(evaluations: dict, lr: float, steps: int) -> None:
    """Raise [`EvaluationDiverged`][] if any task's error is not finite at some step."""
    import numpy as np

    bad = {name: int(np.sum(~np.all(np.isfinite(np.asarray(e.per_task)), axis=1))) for name, e in evaluations.items()}
    if not any(bad.values()):
        return
    n = next(iter(evaluations.values())).per_task.shape[0]
    worst = max(bad, key=bad.get)
    others = "; ".join(f"{k} of {n} from the {name} initialisation" for name, k in bad.items())
    raise EvaluationDiverged(
        f"adaptation diverged at lr {lr:g} on {bad[worst]} of {n} tasks (a non-finite meta-test error within "
        f"{steps} steps; {others}); nothing was written: choose a smaller `lr`")


def evaluate_run(exp, run: RunDir, state, *, reporter: Reporter | None = None, steps=None, tasks: int | None = None,
                 lr: float | None = None, log_y: bool = False, inner_loss_tasks: int | None = None,
                 dest: str | os.PathLike | None = None, record: dict | None = None) -> dict:
    """Evaluate the learned and a random initialisation on the meta-test
    tasks; print the table, then write results.md, results.json and the
    figures (process 0 of a multi-process run only; all of them evaluate).

    `steps` (the table's adaptation steps), `tasks` (the first `tasks`
    meta-test tasks) and `lr` (the GD learning rate) override the run's
    configuration; `log_y` draws the error-vs-steps figure on a log scale.
    `inner_loss_tasks`: on how many test tasks to look inside the inner loop
    (`MetaLearner.loss_along_flow`: the support and query loss along the
    continuous-time inner flow, learned against random initialisation, in
    results.json and figures/inner_loss.png); default 4, and 0 (none) for
    images, whose whole-network flows are costly or, with ReLU, not smooth
    enough for an adaptive solve.

    `dest`: the folder the table and figures go to (default: the run
    directory, the run's own results; an evaluation of other options goes
    to `RUN/evaluations/<name>/`, see `ctmeta.runs.evaluations`, and draws
    no meta-loss curve). `record` (its name, checkpoint) is kept in
    results.json under `evaluation`.

    **Raises:** [`EvaluationDiverged`][] (a `NumericalError`), before
    anything is printed or written, when the adaptation gives a non-finite
    error on some task (a learning rate too large)."""
    from ..sharding import is_main_process

    reporter = reporter or Reporter()
    started = time.perf_counter()
    cfg = exp.config
    learner = exp.learner
    batch = exp.eval_batch()
    import jax

    options = resolve_evaluation(exp, state, steps=steps, tasks=tasks, lr=lr, inner_loss_tasks=inner_loss_tasks,
                                 available=int(jax.tree.leaves(batch)[0].shape[0]))
    table_steps, curve, lr, n_tasks = (options[k] for k in ("table_steps", "curve_steps", "lr", "tasks"))
    batch = type(batch)(*(a[:n_tasks] for a in batch))
    from ..presets import BENCHMARKS

    evaluations = {}
    inits = {"learned": state, "random": learner.init(exp.run_key)}
    for name, st in inits.items():
        with reporter.progress(f"evaluating {name} init", n_tasks) as bar, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy on NaN errors: `check_finite` says it once
            evaluations[name] = learner.evaluate(
                st, batch, curve, lr=lr, chunk_size=exp.eval_chunk, progress=bar.update
            )
    check_finite(evaluations, lr, curve[-1])
    own_flow = None
    if learner.method.head_only:  # COMLN: its own adaptation too, the head's flow to the learned T
        with reporter.progress("adapting by the rule's own flow", len(inits)) as bar:
            own_flow = _own_flow(learner, inits, batch, exp.eval_chunk, bar.update)
    T_learned = float(learner.horizon(state))
    learned_flow = flow_summary(learner.inner_flow(state))
    inner_loss = None
    if options["inner_loss_tasks"] > 0:
        with reporter.progress("loss along the inner flow", len(inits)) as bar:
            inner_loss = _inner_loss(learner, inits, batch, options["inner_loss_tasks"], curve[-1] * lr, bar.update)
    # Ratings: the other scales a reader of "nRMSE" may assume, at the table's steps.
    other = {}
    preset = BENCHMARKS.get(cfg["benchmark"])
    if preset is not None and preset.kind == "ratings" and hasattr(exp.family, "mean_rating"):
        from ..tasks.metrics import RelativeSquaredError, rmse

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
        "flow": (cfg.get("flow") or {}).get("name", "gradient"),
        "table_steps": table_steps,
        "curve_steps": curve,
        **{
            name: {"mean": e.mean.tolist(), "ci95": e.ci95.tolist(),
                   # each task's error at the table's steps, for paired tests between methods
                   "per_task": {str(st): e.per_task[:, curve.index(st)].tolist() for st in table_steps}}
            for name, e in evaluations.items()
        },
    }
    if learned_flow:
        results["learned_flow"] = learned_flow
    if other:
        results["other_metrics"] = other  # {metric: {init: {steps, mean, ci95, per_task}}}
    if inner_loss is not None:
        results["inner_loss"] = inner_loss
    if own_flow is not None:
        results["own_flow"] = own_flow  # {init: {T, mean, ci95, per_task, failed}}
    results["inner_loss_tasks"] = options["inner_loss_tasks"]
    results["evaluation"] = {**(record or {}), "options": {k: v for k, v in options.items() if k != "curve_steps"}}
    results["eval_seconds"] = round(time.perf_counter() - started, 1)  # this evaluation's wall time
    # The table first: whatever happens to the files, the numbers are on screen.
    reporter.log("")
    reporter.log(results_text(results))
    dest = run.path if dest is None else pathlib.Path(dest)
    own = dest.resolve() == run.path.resolve()
    if is_main_process():
        dest.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dest / "results.json", json.dumps(results, indent=2) + "\n")
        atomic_write_text(dest / "results.md", results_markdown(results))
        try:
            write_figures(run, results, log_y=log_y, figure_dir=None if own else dest / "figures")
        except Exception as err:  # figures are a convenience; never lose a run over them
            reporter.warn(f"could not draw the figures: {type(err).__name__}: {err}")
    reporter.log(f"\nrun directory: {run.path}" if own else f"\nwritten to {dest} (the run's own results.md untouched)")
    return results


def flow_summary(flow) -> dict:
    """The meta-parameters of an inner flow in a few numbers: the heavy ball's
    friction `gamma`, the preconditioner's smallest, median and largest
    entry; `{}` for the gradient flow."""
    import jax
    import numpy as np

    if getattr(flow, "is_gradient", True):
        return {}
    if hasattr(flow, "gamma"):
        return {"gamma": float(flow.gamma)}
    if hasattr(flow, "preconditioner"):
        P = np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(flow.preconditioner)])
        return {"P_min": float(P.min()), "P_median": float(np.median(P)), "P_max": float(P.max()),
                "P_entries": int(P.size)}
    return {}


def _own_flow(learner, inits: dict, batch, chunk: int | None, progress) -> dict:
    """Each initialisation's meta-test metric after the rule's own adaptation
    (`MetaLearner.evaluate_own_flow`: COMLN's head flow) to its horizon `T`."""
    import numpy as np

    from ..losses import summarize

    out = {}
    for i, (name, st) in enumerate(inits.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_task, status = learner.evaluate_own_flow(st, batch, chunk_size=chunk)
            mean, ci = summarize(per_task)
        out[name] = {"T": float(learner.horizon(st)), "mean": mean, "ci95": ci, "per_task": per_task.tolist(),
                     "failed": int(np.sum(np.asarray(status) != 0))}
        progress(i + 1)
    return out


def _inner_loss(learner, inits: dict, batch, n: int, horizon: float, progress) -> dict:
    """The support and query losses of the first `n` test tasks at 41 times
    of [0, `horizon`] along the inner flow from each initialisation."""
    import numpy as np

    ts = np.linspace(0.0, float(horizon), 41)
    part = type(batch)(*(a[:n] for a in batch))
    out = {"ts": ts.tolist(), "tasks": int(n)}
    for i, (name, st) in enumerate(inits.items()):
        support, query = learner.loss_along_flow(st, part, ts)
        out[name] = {"support": support.tolist(), "query": query.tolist()}
        progress(i + 1)
    return out


def _flow_text(results: dict) -> str:
    f = results.get("learned_flow") or {}
    if "gamma" in f:
        return f"Learned friction of the heavy-ball flow: gamma = {f['gamma']:.4g} (initially 1)."
    if "P_median" in f:
        return (f"Learned preconditioner P = exp(rho), {f['P_entries']} entries: min {f['P_min']:.3g}, "
                f"median {f['P_median']:.3g}, max {f['P_max']:.3g} (initially 1).")
    return ""


def _cell(results: dict, name: str, step: int) -> str:
    i = results["curve_steps"].index(step)
    mean, ci = results[name]["mean"][i], results[name]["ci95"][i]
    if results["metric"] == "accuracy":
        return f"{100 * mean:.2f} ± {100 * ci:.2f}%"
    return f"{mean:.4f} ± {ci:.4f}"


def _own_cell(results: dict, name: str) -> str:
    own = results["own_flow"][name]
    if results["metric"] == "accuracy":
        text = f"{100 * own['mean']:.2f} ± {100 * own['ci95']:.2f}%"
    else:
        text = f"{own['mean']:.4f} ± {own['ci95']:.4f}"
    return f"{text} (T = {own['T']:.3g})"


def _table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    steps = results["table_steps"]
    own = "own_flow" in results
    header = ["initialisation"] + [f"{s} steps" for s in steps] + (["own flow to T"] if own else [])
    rows = [
        [f"learned ({results['method']})"] + [_cell(results, "learned", s) for s in steps],
        ["random"] + [_cell(results, "random", s) for s in steps],
    ]
    if own:
        rows[0].append(_own_cell(results, "learned"))
        rows[1].append(_own_cell(results, "random"))
    return header, rows


def _own_flow_text(results: dict) -> str:
    """What the "own flow to T" column is, for the caption of the table."""
    if "own_flow" not in results:
        return ""
    failed = sum(results["own_flow"][n].get("failed", 0) for n in ("learned", "random"))
    return (f"Own flow to T: the head adapted by {results['method']}'s own flow (linear_flow, Dopri5) up to the "
            "learned horizon T (the random initialisation: up to its initial T), what the rule is meta-trained "
            "for; the step columns adapt by gradient descent."
            + (f" {failed} solves failed (NaN)." if failed else ""))


def _adaptation(results: dict) -> str:
    """How the test tasks adapt: gradient descent, or the learned inner flow's Euler steps."""
    flow = results.get("flow", "gradient")
    if flow == "gradient":
        return f"gradient descent with learning rate {results['lr']:g}"
    return (f"Euler steps of h = {results['lr']:g} of the {flow} inner flow (learned; the random "
            "initialisation with the flow's initial meta-parameters)")


def _caption(results: dict) -> str:
    better = "lower" if results["lower_is_better"] else "higher"
    return (
        f"Meta-test {results['metric']} ({better} is better) on {results['tasks']} test tasks of "
        f"{results['benchmark']} after {results['iteration']} meta-iterations of {results['method']} "
        f"(T = {results['T']:.4g}); {_adaptation(results)} on each "
        "task's support set; mean ± 95% CI over tasks."
    )


def results_markdown(results: dict) -> str:
    header, rows = _table_rows(results)
    lines = [f"# {results['benchmark']} / {results['method']}", "", _caption(results), ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * len(header)) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if _own_flow_text(results):
        lines += ["", _own_flow_text(results)]
    if _flow_text(results):
        lines += ["", _flow_text(results)]
    if "inner_loss" in results:
        lines += ["", f"figures/inner_loss.png: the support and query losses of {results['inner_loss']['tasks']} "
                  "test tasks along the continuous-time inner flow (`MetaLearner.loss_along_flow`)."]
    return "\n".join(lines) + "\n"


def results_text(results: dict) -> str:
    header, rows = _table_rows(results)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    sep = "  ".join("-" * w for w in widths)
    extra = [t for t in (_own_flow_text(results), _flow_text(results)) if t]
    return "\n".join([_caption(results), "", fmt(header), sep] + [fmt(r) for r in rows] + extra)


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


def write_figures(run: RunDir, results: dict | None, *, log_y: bool = False,
                  figure_dir: str | os.PathLike | None = None) -> None:
    """figures/meta_loss.png (from metrics.csv) and, given `results`,
    figures/error_vs_steps.png (mean and 95% CI band over the test tasks;
    `log_y`: a logarithmic error axis) and figures/inner_loss.png.

    `figure_dir`: where to draw the figures of `results` instead of the
    run's figures/ (an evaluation of its own, `RUN/evaluations/<name>/figures`);
    the meta-loss curve, the run's, is then not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    own = figure_dir is None
    figure_dir = run.figure_dir if own else pathlib.Path(figure_dir)
    figure_dir.mkdir(parents=True, exist_ok=True)
    rows = run.read_metrics() if own else []
    title = _run_title(run, results)
    if rows:
        rows = sorted({int(r["iteration"]): r for r in rows}.values(), key=lambda r: r["iteration"])
        it = np.array([r["iteration"] for r in rows])
        loss = np.array([r["meta_loss"] for r in rows])
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*_broken_at_gaps(it, loss), lw=0.6, alpha=0.4, label="per iteration")
        if len(loss) >= 10:
            w = max(5, len(loss) // 50)
            smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
            ax.plot(*_broken_at_gaps(it[w - 1 :], smooth), lw=1.5, label=f"moving average ({w})")
        _shade_gaps(ax, it)
        if np.all(loss > 0):
            ax.set_yscale("log")
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel("meta-loss (query loss after adaptation)")
        ax.set_title(f"meta-training: {title}")
        ax.legend()
        ax.grid(alpha=0.3)
        save_figure(fig, figure_dir / "meta_loss.png")
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
        _mark_horizon(ax, results, steps)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(f"adaptation steps (GD, lr {results['lr']:g})")
        ax.set_ylabel(f"meta-test {results['metric']}")
        ax.set_title(f"{title}: {results['tasks']} test tasks, iteration {results['iteration']}")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3, which="both" if log_y else "major")
        save_figure(fig, figure_dir / "error_vs_steps.png")
        plt.close(fig)
    if results is not None and "inner_loss" in results:
        _inner_loss_figure(figure_dir / "inner_loss.png", results, title)
    elif results is not None:  # an evaluation without it: no figure of an earlier one beside this table
        (figure_dir / "inner_loss.png").unlink(missing_ok=True)


def _broken_at_gaps(it, values):
    """`(it, values)` with a NaN after each iteration whose next row is missing: the line breaks there."""
    import numpy as np

    cut = np.flatnonzero(np.diff(it) > 1) + 1
    return (np.insert(it.astype(float), cut, np.nan), np.insert(np.asarray(values, float), cut, np.nan))


def _shade_gaps(ax, it) -> None:
    """Shade the iterations metrics.csv has no row for (a cut or torn file), labelled once."""
    missing = [(int(a) + 1, int(b) - 1) for a, b in zip(it[:-1], it[1:]) if b - a > 1]
    if it[0] > 1:
        missing.insert(0, (1, int(it[0]) - 1))
    text = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in missing)
    for i, (a, b) in enumerate(missing):
        ax.axvspan(a - 0.5, b + 0.5, color="red", alpha=0.12, lw=0,
                   label=f"no rows in metrics.csv: {text}" if i == 0 else None)


#: Methods whose horizon T is continuous time, meta-trained (and, learn_T, learned): marked on the figures.
_HORIZON_METHODS = ("amaml", "comln")


def _mark_horizon(ax, results: dict, steps) -> None:
    """On the error-vs-steps axes: the horizon T of a continuous-time method
    as the GD step it equals (k = T / lr), and COMLN's own-flow error at it."""
    T, lr = results.get("T"), results["lr"]
    if results.get("method") not in _HORIZON_METHODS or not isinstance(T, (int, float)) or not T > 0:
        return
    k = T / lr
    what = f"{results['method']}'s"
    inside = 0 <= k <= max(steps)
    where = f"k = T/lr = {k:.3g}" + ("" if inside else ", beyond the curve")
    if inside:
        ax.axvline(k, color="k", lw=0.8, ls=":", label=f"{what} horizon T = {T:.3g} ({where})")
    own = results.get("own_flow")
    if own:
        for name, color in (("learned", "C0"), ("random", "C1")):
            o = own[name]
            label = (f"learned ({results['method']}): own flow to T = {o['T']:.3g}"
                     + ("" if inside else f" ({where})") if name == "learned"
                     else f"random init: own flow to T = {o['T']:.3g}")
            ax.axhline(o["mean"], color=color, lw=1.2, ls="-.", label=label)
            if inside and name == "learned":
                ax.plot([k], [o["mean"]], marker="*", ms=10, color=color, ls="none")
    elif not inside:  # the horizon, named though off the axis
        ax.plot([], [], color="k", lw=0.8, ls=":", label=f"{what} horizon T = {T:.3g} ({where})")


def _inner_loss_figure(path: pathlib.Path, results: dict, title: str) -> None:
    """Support and query loss against adaptation time: one thin line per test
    task, the tasks' median thick; learned against random initialisation."""
    import matplotlib.pyplot as plt
    import numpy as np

    inner = results["inner_loss"]
    ts = np.array(inner["ts"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, which in zip(axes, ("support", "query")):
        for name, color, ls in (("learned", "C0", "-"), ("random", "gray", "--")):
            losses = np.array(inner[name][which], dtype=float)
            label = f"learned ({results['method']})" if name == "learned" else "random init"
            for i, row in enumerate(losses):  # one legend entry for the thin lines: the first
                ax.plot(ts, row, color=color, ls=ls, lw=0.6, alpha=0.4,
                        label=f"{label}: each of the {len(losses)} tasks" if i == 0 else None)
            ax.plot(ts, np.nanmedian(losses, axis=0), color=color, ls=ls, lw=2, label=f"{label}: median")
        both = np.array([inner[n][which] for n in ("learned", "random")], dtype=float)
        if np.all(np.isfinite(both)) and np.min(both) > 0:
            ax.set_yscale("log")
        T = results.get("T")
        if isinstance(T, (int, float)) and 0 < T <= ts[-1] and results.get("method") == "amaml":
            ax.axvline(T, color="k", lw=0.8, ls=":", label=f"meta-training horizon T = {T:.3g}")
        ax.set_xlabel(f"adaptation time t (GD step k is t = {results['lr']:g} k)")
        ax.set_ylabel(f"{which} loss")
        ax.set_title(f"{which} loss along the {results.get('flow', 'gradient')} flow")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    fig.suptitle(f"{title}: {inner['tasks']} test tasks, iteration {results['iteration']}")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a matplotlib figure as a PNG (120 dpi, tight), atomically: an
    interrupted write leaves the previous file, never a torn one."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(pathlib.Path(path), buf.getvalue())
