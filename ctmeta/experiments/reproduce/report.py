"""The experiments' results.md: markdown tables, paired tests between methods, figures."""

from __future__ import annotations

import math
import pathlib

import numpy as np

from .context import Context, RunResult


METHOD_LABELS = {"amaml": "A-MAML", "maml": "MAML", "maml-1": "MAML-1", "fomaml": "FOMAML", "reptile": "Reptile",
          "imaml": "iMAML", "comln": "COMLN", "anil": "ANIL"}


def paired_test(a, b) -> dict:
    """Paired comparison of two methods' errors on the same tasks, `a - b`.

    `mean_diff` (with its normal 95% half-width), the two-sided p-values of
    the paired t-test and of the Wilcoxon signed-rank test (the latter makes
    no normality assumption; per-task errors are skewed), and the number of
    tasks on which `a` is lower."""
    from scipy import stats

    from ...losses import summarize

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
        rows.append([METHOD_LABELS.get(label, label), f"{t['mean_diff']:+.4f} ± {t['ci95']:.4f}", _p(t["t_p"]),
                     _p(t["wilcoxon_p"]), f"{wins}/{t['n']}", verdict])
    header = [f"{name} vs", f"mean difference ({name} - it)", "p (paired t)", "p (Wilcoxon)",
              f"tasks where {name} is {'lower' if lower_is_better else 'higher'}", "at p < 0.05"]
    return [md_table(header, rows)] if rows else []


def _p(p: float) -> str:
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


format_p = _p  # a p-value as the paired tables write it


def format_long_duration(seconds: float) -> str:
    """`seconds` in the unit a reader takes in: "45 s", "12.5 min", "7.0 h", "2.3 d"."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    for unit, size, above in (("d", 86400.0, 2 * 86400.0), ("h", 3600.0, 2 * 3600.0), ("min", 60.0, 120.0)):
        if seconds >= above:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def iteration_seconds(metrics: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """`(iterations, seconds)`: each meta-iteration's wall time from a run's
    metrics rows (`iteration`, `seconds`: cumulative since the run started).
    The differences of the cumulative seconds, the first row's against 0 (it
    includes the compilation), divided by the iterations they span where rows
    are missing; a clock that goes back (restarted at a resume) starts a new
    segment: that negative difference is dropped, the next ones count again."""
    its = np.asarray([float(r["iteration"]) for r in metrics], float)
    secs = np.asarray([float(r["seconds"]) for r in metrics], float)
    prev_it = np.concatenate([[0.0], its[:-1]])
    prev_s = np.concatenate([[0.0], secs[:-1]])
    d, gap = secs - prev_s, its - prev_it
    keep = (d >= 0) & (gap > 0) & np.isfinite(d)
    return its[keep].astype(int), d[keep] / gap[keep]


def solver_changes(config: dict) -> list[tuple[int, str, str]]:
    """The forward-solver changes of a run, from its config.json: `(iteration, before, after)` for each
    resume that changed A-MAML's adaptive solver (`ctmeta train --resume --solver`, recorded as
    `resumes[i].changed.solver`: the solver before); the new solver ran from `iteration + 1` on."""
    resumes = [r for r in config.get("resumes") or () if "solver" in (r.get("changed") or {})]
    now = (config.get("method_options") or {}).get("solver") or "dopri5"
    after = [r["changed"]["solver"] for r in resumes[1:]] + [now]
    return [(int(r["from_iteration"]), r["changed"]["solver"], a) for r, a in zip(resumes, after)]


def cost_summary(metrics: list[dict], window: int = 10) -> dict:
    """A run's meta-training cost from its metrics rows ([`iteration_seconds`][]):
    `wall` (their sum), `start` (median over meta-iterations 1..`window`),
    `middle` (over the `window` around the middle row; `middle_span` their
    first and last iteration), `end` (over the last `window`), `last` (the
    last iteration) and `iterations` (how many timed). Medians, since one
    meta-iteration of a paused or suspended process holds the whole pause."""
    its, per = iteration_seconds(metrics)
    nan = float("nan")
    if not its.size:
        return {"wall": 0.0, "start": nan, "middle": nan, "middle_span": (0, 0), "end": nan, "last": 0,
                "iterations": 0}
    first = per[its <= window]
    lo = max(0, min(its.size // 2 - window // 2, its.size - window))
    mid = slice(lo, lo + window)
    return {"wall": float(per.sum()), "start": float(np.median(first)) if first.size else nan,
            "middle": float(np.median(per[mid])), "middle_span": (int(its[mid][0]), int(its[mid][-1])),
            "end": float(np.median(per[-window:])), "last": int(max(float(r["iteration"]) for r in metrics)),
            "iterations": int(its.size)}


def _f(x: float, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "nan"
    return f"{x:.{digits}f}"


def format_pm(mean: float, ci: float, digits: int = 4) -> str:
    return f"{_f(mean, digits)} ± {_f(ci, digits)}"


def format_accuracy(mean: float, ci: float) -> str:
    return f"{100 * mean:.2f} ± {100 * ci:.2f}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_results(ctx: Context, title: str, reproduces: str, body: list[str], runs: list[RunResult] = ()) -> pathlib.Path:
    if ctx.estimate:  # an estimate writes nothing
        return ctx.out / "results.md"
    from ..._io import atomic_write_bytes

    lines = [f"# {title}", "", f"Reproduces: {reproduces}.", "",
             f"Command: `ctmeta {' '.join(['reproduce', *ctx.argv])}` (scale `{ctx.scale}`).", ""]
    lines += body
    if ctx.deviations:
        lines += ["", "## Differences from the paper's protocol", ""] + [f"- {d}" for d in ctx.deviations]
    if ctx.notes:
        lines += ["", "## Notes (skipped or failed runs)", ""] + [f"- {n}" for n in ctx.notes]
    if runs:
        lines += ["", "## Runs", "", md_table(
            ["run", "status", "meta-iterations", "seconds: train + eval", "directory"],
            [[r.label, r.status if r.ok else f"{r.status}: {r.message[:120]}",
              str(r.results["iteration"]) if r.ok else "-", run_seconds(r) if r.ok else "-",
              f"`{pathlib.Path(r.run_dir).name}/`" if r.run_dir else "-"] for r in runs])]
    path = ctx.out / "results.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    ctx.log(f"\nwrote {path}")
    return path


def run_seconds(r, digits: int = 1) -> str:
    """`train + eval` seconds of a run (`?` for an evaluation whose time was not recorded)."""
    return f"{_f(r.train_seconds, digits)} + {'?' if r.eval_seconds is None else _f(r.eval_seconds, digits)}"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def savefig(fig, path: pathlib.Path) -> None:
    from ...runs import save_figure

    save_figure(fig, path)
    pyplot().close(fig)


def plot_curves(path: pathlib.Path, panels: list[tuple[str, list[RunResult]]], ylabel: str, *, random_from=None,
                xlabel: str = "meta-test adaptation steps (GD, lr 0.01)", logy: bool = False) -> bool:
    """One panel per setting; one line per method (learned init), mean ± 95% CI."""
    panels = [(t, [r for r in rs if r.ok]) for t, rs in panels]
    panels = [(t, rs) for t, rs in panels if rs]
    if not panels:
        return False
    plt = pyplot()
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
    savefig(fig, path)
    return True


def plot_against_iterations(path: pathlib.Path, series, title: str,
                            ylabel: str = "meta-test accuracy % (95% CI)") -> bool:
    """One line per method: `series` of `(name, iterations, [(mean, ci95), ...])`
    (fractions, drawn as %), against meta-iterations, with error bars."""
    series = [(n, x, v) for n, x, v in series if len(x)]
    if not series:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, x, values in series:
        ax.errorbar(x, [100 * m for m, _ in values], yerr=[100 * c for _, c in values], marker="o", ms=4,
                    capsize=3, label=name)
    ax.set_xlabel("meta-iterations")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, path)
    return True


def plot_cost(path: pathlib.Path, runs, title: str, marks=()) -> bool:
    """Seconds a meta-iteration ([`iteration_seconds`][]) against meta-iteration,
    one line per `(name, metrics rows)`, log scale; `marks`: `(iteration, text)`
    drawn as dotted vertical lines (e.g. where a run changed its solver)."""
    curves = [(name, *iteration_seconds(metrics)) for name, metrics in runs]
    curves = [(n, x[y > 0], y[y > 0]) for n, x, y in curves]
    curves = [c for c in curves if c[1].size]
    if not curves:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, x, y in curves:
        ax.plot(x, y, lw=1, marker="." if x.size < 50 else None, label=name)
    for iteration, text in marks:
        ax.axvline(iteration + 0.5, color="0.4", ls=":", lw=1)
        ax.annotate(text, (iteration + 0.5, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                    textcoords="offset points", va="top", fontsize=7, color="0.3")
    ax.set_yscale("log")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("seconds a meta-iteration")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, path)
    return True
