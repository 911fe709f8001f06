"""Gradient accuracy, stability, memory and time: A-MAML Tables 4-5 and Figs. 3-4, COMLN Figs. 2-3."""

from __future__ import annotations

import json


from .context import Context
from .paper import PAPER_AMAML_TABLE5
from .report import pyplot, savefig, md_table, write_results


def amaml_table4(ctx: Context) -> None:
    import jax

    from .. import gradient_accuracy as ga

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
    plt = pyplot()
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
    savefig(fig, ctx.out / "table4.png")
    body.append("Figure: `table4.png`.")
    (ctx.out / "table4.json").write_text(json.dumps(
        {s: ({str(T): v for T, v in d.items()} if isinstance(d, dict) else d) for s, d in res.items()}, indent=1))
    write_results(ctx, "A-MAML Table 4: gradient accuracy", "A-MAML Table 4 (Appendix A)", body)


def amaml_table5(ctx: Context) -> None:
    from .. import cosmixture_table5 as t5

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
    plt = pyplot()
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
    savefig(fig, ctx.out / "table5.png")
    body.append("Figure: `table5.png`.")
    write_results(ctx, "A-MAML Table 5: CosMixture meta-gradient vs stored states", "A-MAML Table 5 (Appendix A)",
                  body)


def comln_fig2(ctx: Context) -> None:
    from .. import stability

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


def bench_experiment(ctx: Context, cases: list[str]) -> None:
    from ... import bench

    quick = ctx.scale != "paper"
    steps = (5, 20) if ctx.scale == "test" else None
    if quick:
        ctx.deviate("ctmeta bench --quick: two step counts, 2 repeats, a 40 s budget per point")
    ctx.deviate("memory is XLA's compiled buffer assignment on CPU, not GPU memory; times are CPU times")
    bench.run(cases, steps, str(ctx.out), quick, meta_batch=1 if ctx.scale == "test" else None,
              progress=not ctx.quiet, data_dir=str(ctx.data_root) if ctx.data_root else None,
              vmap=ctx.scale != "test", diagnostics=ctx.scale != "test", resume=True)
    md = ctx.out / "bench.md"
    body = ["Delegated to `ctmeta.bench.run` (see its module docstring for what is measured).", ""]
    if md.is_file():
        body += [md.read_text()]
    body += ["", "PNG figures: " + ", ".join(f"`{p.name}`" for p in sorted(ctx.out.glob("*.png")))]
    write_results(ctx, f"{ctx.name}: memory and time against inner steps",
                  "A-MAML Figs. 3-4" if ctx.name == "amaml-fig3-4" else "COMLN Fig. 3", body)


def comln_fig3(ctx: Context) -> None:
    """COMLN Figs. 3-4: the Conv-4 rules of Fig. 3 (iMAML aside), and ResNet-12's head-only rules.

    Whole-network A-MAML is in neither figure, and on the ReLU Conv-4 its stored
    sweep is refused at h = 0.01 anyway (docs/bench.md, "Whole-network A-MAML on
    images"), after ~4 min a point on a CPU.
    """
    cases = ["miniimagenet/comln+comln-euler+anil+maml"]
    bench_experiment(ctx, cases + (["miniimagenet-resnet12"] if ctx.scale != "test" else []))
