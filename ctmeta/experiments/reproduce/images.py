"""Few-shot image classification: A-MAML Table 3, COMLN Tables 2 and 4, COMLN Fig. 5."""

from __future__ import annotations

import json

import numpy as np

from . import runner
from .context import Context, RunResult
from .paper import PAPER_AMAML_TABLE3, PAPER_COMLN_TABLE2, PAPER_COMLN_TABLE4
from .report import (METHOD_LABELS, cost_summary, format_accuracy, format_long_duration, format_p, md_table,
                     paired_table, paired_test, plot_against_iterations, plot_cost, plot_curves, pyplot, savefig,
                     solver_changes, write_results)


_HEAD_ONLY = ("comln", "anil")  # adapt a linear head on a fixed embedding: cheap per meta-iteration

# Meta-iterations per method at --scale cpu: what fits a few hours of 2 CPU
# cores, but for A-MAML. Measured on Omniglot 5-way 1-shot, meta-batch 4,
# Conv-4 (float32): COMLN 0.64 s, ANIL 0.59 s, MAML 1.1 s, A-MAML
# (conv4-smooth, adaptive adjoint) 8 s a meta-iteration; 20-way 1-shot:
# A-MAML 14 s at first, but its cost grows as meta-training sharpens the loss
# and the adaptive solver takes more steps (35 s at iteration 6, 90 s at 21,
# ~200 s at 50, 160-250 s from there to 150; one core): its first 150
# meta-iterations took 7 h. A-MAML is only used by amaml-table3, which
# compares it with MAML at equal meta-iterations (150, 500, 1,000: kept
# checkpoints), so it gets MAML's 1,000: days of meta-training at that
# cost, many sessions, the run continued from its checkpoints each time
# (`runner.run_method`). The outer rate is constant, so a shorter run is the
# first iterations of a longer one.
_CPU_ITERATIONS = {"comln": 2000, "anil": 2000, "maml": 1000, "amaml": 1000}
#: How often an A-MAML run saves a checkpoint at --scale cpu (~30 min of its meta-training).
_CPU_AMAML_CHECKPOINT_EVERY = 10
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
        parts.append(f"{METHOD_LABELS.get(m, m)} {b['meta_iterations']} meta-iterations, {b['eval_tasks']} meta-test tasks")
    return "; ".join(parts)


def _acc_table(runs: list[tuple[str, RunResult, int]], paper: dict[str, tuple[float, float]] | None = None):
    rows = []
    for name, r, step in runs:
        ours = format_accuracy(*r.value(step)) if r.ok else r.status
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
# The meta-iterations at which --scale cpu evaluates A-MAML and MAML side by side
# (from one run each: reruns are not bitwise reproducible on this CPU).
_TABLE3_EVALUATED = (150, 500, 1000)


def amaml_table3(ctx: Context) -> None:
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
                    "meta-iterations; A-MAML with T = 0.5 only. A-MAML's cost grows from ~30 s to 160-250 s a "
                    "meta-iteration here (on one core) as meta-training sharpens the loss and its adaptive solver "
                    "takes more steps, so its 1,000 meta-iterations take days, over many sessions (each call "
                    "continues the run from its last checkpoint; `--methods maml` rebuilds this page meanwhile "
                    "from the runs as they are: the Runs table gives each run's meta-iterations); both methods "
                    f"keep their checkpoints at {', '.join(str(k) for k in _TABLE3_EVALUATED)} meta-iterations, "
                    "compared in 'At equal meta-iterations' once evaluated (`ctmeta evaluate RUN --checkpoint N "
                    "--tasks 200 --steps 0,H`, H the method's horizon in GD steps: MAML 5, A-MAML 50; the full "
                    "table's 100 steps are not needed for the pairing)")
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
            r = runner.run_method(ctx, f"{b}/{m}" + (f"-T{T}" if T else ""), b, m, T=T, **budget,
                           eval_steps=steps_eval, eval_every=10 if scale != "test" else 5,
                           optimizer=comln_opt if m == "comln" else None,
                           keep_checkpoints=_TABLE3_EVALUATED if scale == "cpu" else (),
                           checkpoint_every=_CPU_AMAML_CHECKPOINT_EVERY if scale == "cpu" and m == "amaml" else None)
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
                table = [[n] + [format_accuracy(*r.value(k)) for k in common] for n, r, _ in ok]
                table.append([f"random init ({ok[0][0]}'s run)"] + [format_accuracy(*ok[0][1].value(k, "random")) for k in common])
                body += ["Accuracy % after the same number of meta-test GD steps (lr 0.01):", "",
                         md_table(["method"] + [f"{k} steps" for k in common], table), ""]
            if plot_curves(ctx.out / f"table3-{b}.png", [(f"{b} (20-way 1-shot)" if b == "omniglot"
                                                           else f"{b} (5-way 1-shot)", [r for _, r, _ in ok])],
                           "meta-test accuracy (fraction)"):
                body += [f"Figure: `table3-{b}.png` (accuracy against meta-test GD steps).", ""]
        body += _equal_iterations(ctx, b, rows) + _training_cost(ctx, b, rows)
    write_results(ctx, "A-MAML Table 3: few-shot image classification", "A-MAML Table 3 (Sec. 5.4)", body, all_runs)


def _equal_iterations(ctx: Context, b: str, rows: list[tuple[str, RunResult, int]]) -> list[str]:
    """Section "At equal meta-iterations" of one benchmark: each A-MAML run
    against MAML's after the same number of meta-iterations, on the same test
    tasks, each at its own horizon (`rows`' step), from every evaluation the
    two run directories hold at that horizon (`runner.evaluations_of`: a run's
    own results, `ctmeta evaluate RUN --checkpoint N [--steps 0,H]` in
    RUN/evaluations/); and the figure
    of accuracy against meta-iterations. At the cpu scale one row per
    `_TABLE3_EVALUATED` (an iteration missing for a method reads "not evaluated
    yet") and per other iteration both have; elsewhere the iterations either
    has, and only when some run holds evaluations of other checkpoints."""
    evals = {name: runner.evaluations_of(r.label, ctx.out / r.label, step=s) for name, r, s in rows}
    step = {name: s for name, _, s in rows}
    amamls = [n for n, _, _ in rows if n.startswith("A-MAML")]
    if "MAML" not in evals or not amamls:
        return []
    others = any(e.run_dir != str(ctx.out / r.label) for n, r, _ in rows for e in evals[n].values())
    if ctx.scale != "cpu" and not others:
        return []
    out = []
    for a in amamls:
        ea, em = evals[a], evals["MAML"]
        both = set(ea) & set(em)
        keys = sorted(set(_TABLE3_EVALUATED) | both) if ctx.scale == "cpu" else sorted(set(ea) | set(em))
        if not keys:
            continue
        ha = {k: e.nearest_table_step(step[a]) for k, e in ea.items()}
        hm = {k: e.nearest_table_step(step["MAML"]) for k, e in em.items()}
        table = []
        for k in keys:
            acc = [format_accuracy(*e[k].value(h[k])) if k in e else "not evaluated yet"
                   for e, h in ((ea, ha), (em, hm))]
            if k in both and int(ea[k].results["tasks"]) == int(em[k].results["tasks"]):
                t = paired_test(ea[k].per_task(ha[k]), em[k].per_task(hm[k]))
                higher = int(np.sum(ea[k].per_task(ha[k]) > em[k].per_task(hm[k])))
                table.append([str(k), *acc, f"{100 * t['mean_diff']:+.2f} ± {100 * t['ci95']:.2f}",
                              format_p(t["wilcoxon_p"]), format_p(t["t_p"]), f"{higher}/{t['n']}"])
            else:
                why = "-" if k not in both else "other test tasks"
                table.append([str(k), *acc, why, "-", "-", "-"])
        sa = sorted(set(ha.values())) or [step[a]]
        sm = sorted(set(hm.values())) or [step["MAML"]]
        steps_of = lambda s: "/".join(str(x) for x in s) + " steps"
        tasks = sorted({int(e.results["tasks"]) for e in (*ea.values(), *em.values())})
        out += [f"## At equal meta-iterations ({b})", "",
                f"{a} and MAML after the same number of meta-iterations, each evaluated from that checkpoint (a "
                "run's own results where it ended there, else `ctmeta evaluate RUN --checkpoint N` in "
                f"RUN/evaluations/) on the same {'/'.join(str(t) for t in tasks) or '-'} meta-test tasks, each at "
                f"its own horizon ({a} {steps_of(sa)}, MAML {steps_of(sm)}); accuracy %, mean ± 95% CI; the "
                "difference in points with its 95% CI, and two-sided paired tests on the per-task accuracies.", "",
                md_table(["meta-iterations", f"{a}, {steps_of(sa)}", f"MAML, {steps_of(sm)}",
                          f"difference ({a} - MAML)", "p (Wilcoxon)", "p (paired t)",
                          f"tasks where {a} is higher"], table), ""]
    series = [(f"{n}, {step[n]} steps", sorted(evals[n]),
               [evals[n][k].value(evals[n][k].nearest_table_step(step[n])) for k in sorted(evals[n])])
              for n in [*amamls, "MAML"] if evals[n]]
    if series and plot_against_iterations(ctx.out / f"table3-{b}-iterations.png", series,
                                          f"{b}: meta-test accuracy at each method's horizon"):
        out += [f"Figure: `table3-{b}-iterations.png` (meta-test accuracy, at each method's horizon, against "
                "meta-iterations; bars: 95% CI).", ""]
    return out


def _training_cost(ctx: Context, b: str, rows: list[tuple[str, RunResult, int]]) -> list[str]:
    """Section "Meta-training cost" of one benchmark: each run's wall time and
    seconds a meta-iteration (start, middle, end) from its metrics.csv, what
    the paper's 60,000 meta-iterations would take at its end rate, and the
    figure of seconds a meta-iteration against meta-iteration."""
    from ...runs import RunDir

    runs, changes = [], []
    for name, r, _ in rows:
        run = RunDir(ctx.out / r.label)
        metrics = r.metrics if r.metrics else run.read_metrics()
        if metrics:
            runs.append((name, metrics, cost_summary(metrics)))
            try:  # only the resume records are read: a config.json that is not a run's has none
                changes += [(name, *c) for c in solver_changes(json.loads(run.config_path.read_text()))]
            except (OSError, ValueError, TypeError, KeyError):
                pass
    runs = [(n, m, c) for n, m, c in runs if c["iterations"]]
    if not runs:
        return []
    table = [[n, str(c["last"]), format_long_duration(c["wall"]), _sec(c["start"]),
              f"{_sec(c['middle'])} ({c['middle_span'][0]}-{c['middle_span'][1]})", _sec(c["end"])]
             for n, _, c in runs]
    out = [f"## Meta-training cost ({b})", "",
           "From each run's metrics.csv: its cumulative `seconds` differenced into seconds a meta-iteration (a "
           "clock that restarts at a resume starts a new segment, whose first difference is dropped); wall time: "
           "their sum; start: the median over meta-iterations 1-10 (the first compiles); middle: over the 10 "
           "around the run's middle; end: over its last 10 (medians: a paused process's one long meta-iteration "
           "does not count). Wall-clock on this machine, contended by whatever "
           "else ran.", "",
           md_table(["run", "meta-iterations", "wall time", "s / meta-iteration: start", "middle (iterations)",
                     "end"], table), ""]
    if ctx.scale != "paper":
        out += [f"At its end rate, the paper's {_PAPER_IMAGE_ITERATIONS:,} meta-iterations (`--scale paper`) would "
                "take " + "; ".join(f"{n} {format_long_duration(c['end'] * _PAPER_IMAGE_ITERATIONS)}"
                                    for n, _, c in runs) + " (one run, this machine).", ""]
    for name, it, before, after in changes:
        out += [f"{name} changed its forward solver from {before} to {after} after meta-iteration {it} "
                f"(`ctmeta train --resume RUN --solver {after}`: the same flow and tolerances; recorded in its "
                "config.json), marked on the figure.", ""]
    marks = [(it, f"{n}: {before} -> {after}") for n, it, before, after in changes]
    if plot_cost(ctx.out / f"table3-{b}-cost.png", [(n, m) for n, m, _ in runs], f"{b}: meta-training cost", marks):
        out += [f"Figure: `table3-{b}-cost.png` (seconds a meta-iteration against meta-iteration, log scale).", ""]
    return out


def _sec(x: float) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.3g}"


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


def comln_table2(ctx: Context) -> None:
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
                    r = runner.run_method(ctx, f"{b}-{ways}w{k}s{suffix}/{m}", b, m, ways=ways, shots=k,
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
                             "own horizon's table step: " + ", ".join(f"{METHOD_LABELS[m]} {horizon[r.label]}"
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


def comln_table4(ctx: Context) -> None:
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
            r = runner.run_method(ctx, f"{b}-5w{k}s/comln-{solver}", b, "comln", ways=5, shots=k, steps=steps, **budget,
                           eval_steps=(0, 10, 50), eval_every=5, optimizer=opt)
            all_runs.append(r)
            p = PAPER_COMLN_TABLE4[solver].get(k)
            if r.ok:
                s = _eval_step_for(r, 10)
                sec = r.metrics[-1]["seconds"] / max(1, len(r.metrics)) if r.metrics else float("nan")
                rows.append([f"{solver} {k}-shot", format_accuracy(*r.value(s)), f"{r.results['T']:.3g}", f"{sec:.3f}",
                             f"{p[0]:.2f} ± {p[1]:.2f}"])
            else:
                rows.append([f"{solver} {k}-shot", r.status, "-", "-", f"{p[0]:.2f} ± {p[1]:.2f}"])
    body += [md_table(["solver", "accuracy % (ours)", "learned T", "s / meta-iteration", "paper (miniImageNet)"],
                      rows), ""]
    write_results(ctx, "COMLN Table 4: Dopri5 vs Euler", "COMLN Table 4 (Appendix E.1)", body, all_runs)


def comln_fig5(ctx: Context) -> None:
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
        r = runner.run_method(ctx, f"{b}-5w{k}s/{label}", b, "comln", ways=5, shots=k, T=T, learn_T=learn, **budget,
                       eval_steps=eval_steps, eval_every=10, optimizer=opt, lr_schedule=schedule)
        runs.append(r)
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        if r.ok and r.metrics:
            it = [m["iteration"] for m in r.metrics]
            total = max(it)
            a1.plot([i / total for i in it], [m["T"] for m in r.metrics], label=r.label.split("/")[1])
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
    savefig(fig, ctx.out / "fig5.png")
    rows = []
    for r in runs:
        if r.ok:
            s = _eval_step_for(r, 10)
            per_it = r.metrics[-1]["seconds"] / len(r.metrics) if r.metrics else float("nan")
            T0 = r.metrics[0]["T"] if r.metrics else float("nan")
            rows.append([r.label.split("/")[1], f"{T0:.3g}", f"{r.results['T']:.3g}", format_accuracy(*r.value(s)), str(s),
                         f"{per_it:.3f}"])
        else:
            rows.append([r.label.split("/")[1], "-", "-", r.status, "-", "-"])
    body = ["COMLN's horizon T during meta-training (learned from 0.1) and a fixed-T run.", "",
            md_table(["run", "T at iteration 1", "T at the end", "accuracy %", "eval GD steps", "s / meta-iteration"],
                     rows), "",
            "Paper (Fig. 5, a figure): T grows during meta-training, more for harder data sets and more shots; "
            "learned T reaches the fixed-T accuracy at lower cost early on.", "", "Figure: `fig5.png`."]
    write_results(ctx, "COMLN Fig. 5: learned horizon", "COMLN Fig. 5 (Appendix E.3)", body, runs)
