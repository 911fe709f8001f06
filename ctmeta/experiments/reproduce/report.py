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
