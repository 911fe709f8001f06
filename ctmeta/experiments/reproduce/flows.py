"""Inner flows beyond the gradient flow: does a meta-learned preconditioner or
heavy ball help A-MAML? (ctmeta's own experiment; neither paper has it.)

On A-MAML Fig. 2's 100shot-100val setting (CosMixture, Alpine), A-MAML with
the plain gradient flow against A-MAML with a learned diagonal preconditioner
(`du/dt = -P grad L`, Meta-SGD in continuous time) and with a learned heavy
ball (`du/dt = v, dv/dt = -gamma v - grad L`), beside MAML and MAML with a
learned preconditioner (Meta-SGD itself). Each is meta-tested by its own
flow's Euler steps of h = 0.01 from its learned initialisation.
"""

from __future__ import annotations

from . import runner
from .context import Context
from .report import format_pm, md_table, paired_table, paired_test, plot_curves, run_seconds, write_results

#: method key: (ctmeta method, flow, label)
_FLOW_METHODS = {
    "amaml": ("amaml", "gradient", "A-MAML"),
    "amaml-preconditioned": ("amaml", "preconditioned", "A-MAML, learned P"),
    "amaml-heavy-ball": ("amaml", "heavy-ball", "A-MAML, heavy ball"),
    "maml": ("maml", "gradient", "MAML"),
    "maml-preconditioned": ("maml", "preconditioned", "MAML, learned P (Meta-SGD)"),
}
_BENCHMARKS = ("cosmixture", "alpine")
# A-MAML Fig. 2's 100shot-100val: T = 5 (500 states of h = 0.01), MAML 50 steps, meta-test 500 steps.
_SHOTS, _T, _MAML_STEPS, _TEST_STEPS = 100, 5.0, 50, 500


def inner_flows(ctx: Context) -> None:
    scale = ctx.scale
    iters = {"paper": 5000, "quick": 300, "test": 2}[scale]
    benchmarks, methods, (shots, T, maml_steps, test_steps) = _BENCHMARKS, tuple(_FLOW_METHODS), \
        (_SHOTS, _T, _MAML_STEPS, _TEST_STEPS)
    eval_tasks = 4 if scale == "test" else 100
    if scale == "test":
        benchmarks, methods = ("cosmixture",), ("amaml", "amaml-heavy-ball", "maml-preconditioned")
        shots, T, maml_steps, test_steps = 20, 0.1, 2, 10
        ctx.deviate("test scale: CosMixture only, 20 shots, A-MAML T=0.1, MAML 2 steps, 2 meta-iterations, "
                    "4 test tasks")
    else:
        ctx.deviate(f"{iters} meta-iterations (A-MAML Fig. 2: 5,000)" if iters != 5000 else
                    "5,000 meta-iterations, as A-MAML Fig. 2")
    ctx.deviate("every run starts its flow at the plain gradient flow's: P = I, gamma = 1 (heavy ball); the "
                "flow's meta-parameters are learned with the initialisation by the same Adam (lr 0.001)")
    panels, body, all_runs = [], [], []
    cols = [0, test_steps // 4, test_steps]
    for benchmark in benchmarks:
        rs = []
        for m in methods:
            method, flow, label = _FLOW_METHODS[m]
            kw = dict(meta_iterations=iters, shots=shots, eval_tasks=eval_tasks, flow=flow,
                      eval_steps=tuple(cols), eval_every=max(1, test_steps // 20))
            kw.update(T=T) if method == "amaml" else kw.update(steps=maml_steps)
            r = runner.run_method(ctx, f"{benchmark}/{m}", benchmark, method, **kw)
            r.label = f"{benchmark}/{label}"
            rs.append(r)
        panels.append((f"{benchmark} {shots}shot", rs))
        all_runs += rs
        body += [f"## {benchmark}, {shots}shot-{shots}val", "", _table(rs, cols), ""]
        body += _verdicts(rs, test_steps)
    fig = ctx.out / "inner-flows.png"
    plot_curves(fig, panels, "meta-test nRMSE", xlabel="meta-test adaptation steps (each flow's Euler steps, h 0.01)")
    head = ["Meta-test nRMSE on 100 held-out tasks (mean ± 95% CI over tasks) after k Euler steps of h = 0.01 "
            "of each run's own inner flow (for the gradient flow: GD with lr 0.01) from its learned "
            "initialisation. Each run's `figures/inner_loss.png` shows the support and query losses along its "
            "continuous-time flow.", ""]
    write_results(ctx, "Inner flows: learned preconditioner and heavy ball",
                  "ctmeta's own experiment (issue 16), on A-MAML Fig. 2's 100shot-100val setting",
                  head + body + [f"Figure: `{fig.name}`."], all_runs)


def _table(rs, cols) -> str:
    rows = []
    for r in rs:
        name = r.label.split("/")[-1]
        if not r.ok:
            rows.append([name] + [r.status] * len(cols) + ["", ""])
            continue
        rows.append([name] + [format_pm(*r.value(s)) for s in cols] + [_flow_cell(r), run_seconds(r, 0)])
    ok = [r for r in rs if r.ok]
    if ok:
        rows.append(["random init"] + [format_pm(*ok[0].value(s, "random")) for s in cols] + ["", ""])
    return md_table(["method"] + [f"{s} steps" for s in cols] + ["learned flow", "seconds: train + eval"], rows)


def _flow_cell(r) -> str:
    f = (r.results or {}).get("learned_flow") or {}
    if "gamma" in f:
        return f"gamma {f['gamma']:.3g}"
    if "P_median" in f:
        return f"P {f['P_min']:.2g} .. {f['P_median']:.2g} .. {f['P_max']:.2g}"
    return "-"


def _verdicts(rs, step) -> list[str]:
    ok = [r for r in rs if r.ok]
    if not ok:
        return []
    best = min(ok, key=lambda r: r.value(step)[0])
    out = [f"Lowest nRMSE after {step} steps: **{best.label.split('/')[-1]}**.", ""]
    for ref_name, other_names in (("A-MAML", ("A-MAML, learned P", "A-MAML, heavy ball")),
                                  ("MAML", ("MAML, learned P (Meta-SGD)",))):
        ref = [r for r in ok if r.label.split("/")[-1] == ref_name]
        for name in other_names:
            other = [r for r in ok if r.label.split("/")[-1] == name]
            if ref and other:
                t = paired_test(other[0].per_task(step), ref[0].per_task(step))
                sign = "lower" if t["mean_diff"] < 0 else "higher"
                sig = "significant" if t["wilcoxon_p"] < 0.05 else "not significant"
                out.append(f"- {name} against {ref_name}: nRMSE {sign} by {abs(t['mean_diff']):.4f} ± {t['ci95']:.4f} "
                           f"(paired over {t['n']} tasks; Wilcoxon p = {t['wilcoxon_p']:.2g}: {sig}).")
    out.append("")
    amaml = [r for r in ok if r.label.split("/")[-1] == "A-MAML"]
    if amaml:
        out += ["Plain A-MAML against each run, paired over the same test tasks:", ""]
        out += paired_table(amaml[0], ok, step) + [""]
    return out
