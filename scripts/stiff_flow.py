"""A-MAML's meta-gradient on a stiff inner flow: each rule's cost (counted) and error against a reference.

    python scripts/stiff_flow.py RUN_DIR [--checkpoint N] [--tasks 2] [--rules NAME ...] [--reference rk4:100]
        [--check-reference rk4:200] [--out FILE.json]

Loads a run (`ctmeta train` / `ctmeta reproduce`) at a checkpoint, draws `--tasks` meta-*training*
tasks (fixed keys), and for each task and rule computes the per-task meta-gradient (the gradient of
the query loss after the inner flow for the run's T, with respect to the initialisation), counting:

- forward: vector-field evaluations (gradients of the support loss) and, for RKC2, the
  Hessian-vector products of its spectral estimate;
- backward: adjoint evaluations (one Hessian-vector product each);
- the seconds of one jitted call (after its compilation), on whatever else the machine runs.

The error is `|g - g_ref| / |g_ref|` per task against the reference rule (default: the stored RK4
sweep after K fixed RK4 steps, `Adjoint(steps=K, solver="rk4", scheme="rk4")`), validated by
`--check-reference` (the same at 2K: their disagreement bounds the reference's own error).

Rule names: `preset` (the run's own method), `dopri5:RTOL`, `dopri5-disp:RTOL`, `rkc2:RTOL`,
`rkc2-disp:RTOL` (the adaptive adjoint with that forward solver, error scale and forward rtol; atol
is rtol/10; `:RTOL/BRTOL` sets the backward's rtol factor), `rk4:K` (the stored sweep).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

import ctmeta
from ctmeta import ode
from ctmeta.flows import GradientField
from ctmeta.losses import apply_loss
from ctmeta.ode._adaptive import adjoint_backward, recorded_forward
from ctmeta.presets import build
from ctmeta.runs import RunDir


def parse_rule(name: str, preset):
    if name == "preset":
        return preset
    kind, _, arg = name.partition(":")
    if kind == "rk4":
        return ctmeta.Adjoint(steps=int(arg), solver="rk4", scheme="rk4", stability_check=False)
    rtol, _, back = arg.partition("/")
    solver, _, disp = kind.partition("-")
    return ctmeta.Adjoint(rtol=float(rtol), atol=float(rtol) / 10, solver=solver,
                          error_scale="displacement" if disp else "state", dense_steps=1024,
                          adjoint_rtol=float(back) if back else preset.adjoint_rtol,
                          adjoint_atol=float(back) if back else preset.adjoint_atol)


def counts(method, loss, diff, T, data, query_grad):
    """Forward and backward evaluation counts of an adaptive rule on one task."""
    if method.steps is not None:  # stored RK4 sweep: K steps of 4 gradients, K intervals of 4 HVPs
        return {"forward_gradients": 4 * method.steps, "forward_hvps": 0, "backward_hvps": 4 * method.steps}
    field = GradientField(loss)
    opts = ode.SolveOptions(steps=1, rtol=method.rtol, atol=method.atol, max_steps=method.max_steps,
                            solver=method.solver, error_scale=method.error_scale)
    sens = method.sensitivity
    y1, dense, status, fstats = jax.jit(
        lambda d: recorded_forward(field, d, T, data, opts, sens.dense_steps))(diff)
    a_end = query_grad(y1)
    _, _, bstatus, bstats = jax.jit(
        lambda dn, a: adjoint_backward(field, dn, T, data, a, sens, opts, (False, False)))(dense, a_end)
    if method.solver == "rkc2":
        fwd = {"forward_gradients": int(fstats.evaluations), "forward_hvps": int(fstats.matvecs),
               "forward_steps": int(fstats.steps), "forward_accepted": int(fstats.accepted_steps),
               "max_stages": int(fstats.max_stages), "rho_max": float(fstats.max_rho)}
    else:
        fwd = {"forward_gradients": 6 * int(fstats["steps"]) + 1, "forward_hvps": 0,
               "forward_steps": int(fstats["steps"]), "forward_accepted": int(fstats["accepted_steps"])}
    return {**fwd, "backward_hvps": int(bstats["num_evaluations"]) + int(bstats.get("num_matvecs", 0)),
            "backward_steps": int(bstats["num_steps"]), "status": [int(status), int(bstatus)]}


def quadratic(out_path=None):
    """The stiff quadratic (Hessian eigenvalues logspaced 1 .. 1e4, T = 1, float64): meta-gradient in u0 against
    its closed form, and the evaluations of each solver, at several tolerances."""
    jax.config.update("jax_enable_x64", True)
    n = 20
    lam, b = jnp.logspace(0, 4, n), jnp.linspace(-1.0, 1.0, n)
    c, u0, T = jnp.cos(jnp.arange(n, dtype=float)), jnp.sin(jnp.arange(n, dtype=float) + 1), jnp.asarray(1.0)
    loss = lambda u, d: 0.5 * jnp.sum(d[0] * u * u) - jnp.sum(d[1] * u)
    outer = lambda u: 0.5 * jnp.sum((u - c) ** 2)
    closed = lambda u0: b / lam + jnp.exp(-lam * T) * (u0 - b / lam)
    want = jax.grad(lambda u: outer(closed(u)))(u0)
    rows = []
    for solver in ("dopri5", "rkc2"):
        for rtol in (1e-5, 1e-6, 1e-7, 1e-8):
            method = ctmeta.Adjoint(rtol=rtol, atol=rtol / 100, solver=solver, dense_steps=16384, max_steps=100000)
            g = jax.jit(jax.grad(lambda u: outer(ctmeta.gradient_flow(loss, u, (lam, b), T, method=method))))(u0)
            err = float(jnp.max(jnp.abs(g - want)))
            row = {"solver": solver, "rtol": rtol, "max_abs_error": err,
                   **counts(method, loss, u0, T, (lam, b), jax.grad(outer))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if out_path:
        pathlib.Path(out_path).write_text(json.dumps(rows, indent=1))


def figure(path: str, files: list[str]) -> None:
    """Error against evaluations (forward gradients + HVPs + backward HVPs), one panel per JSON, one point per
    rule (mean over its tasks), RKC2 and Dopri5 apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(files), figsize=(4.2 * len(files), 3.6), squeeze=False)
    for ax, f in zip(axes[0], files):
        data = json.loads(pathlib.Path(f).read_text())
        rows = data if isinstance(data, list) else [
            {"rule": name, "max_abs_error": None, **{k: float(np.mean([r[k] for r in rs])) for k in
                                                     ("relative_error", "forward_gradients", "forward_hvps",
                                                      "backward_hvps")}}
            for name, rs in data["rules"].items() if name != data["reference"]]
        for row in rows:
            name = row.get("rule") or f"{row['solver']}:{row['rtol']:g}"
            cost = row["forward_gradients"] + row["forward_hvps"] + row["backward_hvps"]
            err = row["relative_error"] if row.get("max_abs_error") is None else row["max_abs_error"]
            ax.loglog(cost, err, "o" if "rkc2" in name else "s", color="C1" if "rkc2" in name else "C0")
            ax.annotate(name, (cost, err), fontsize=7, xytext=(3, 3), textcoords="offset points")
        title = pathlib.Path(f).stem.replace("stiff-", "")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("evaluations (gradients + HVPs)")
        ax.set_ylabel("max abs error" if isinstance(data, list) else "relative error of the meta-gradient")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("RKC2 (circles) against Dopri5 (squares): error against cost", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default="", help="a run directory, or 'quadratic' for the closed-form stiff quadratic")
    p.add_argument("--checkpoint", type=int, default=None, help="its iteration (0: the initialisation; default: last)")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--rules", nargs="+", default=["preset", "rkc2:1e-5", "rkc2-disp:1e-3"])
    p.add_argument("--reference", default="rk4:100")
    p.add_argument("--check-reference", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--figure", nargs="+", default=None, metavar=("PNG", "JSON"),
                   help="draw PNG from measured JSON files instead of measuring")
    args = p.parse_args()
    if args.figure:
        return figure(args.figure[0], args.figure[1:])
    if args.run == "quadratic":
        return quadratic(args.out)

    run = RunDir.open(args.run)
    config = run.read_config()
    exp = build(config, progress=False, log=lambda *_: None)
    learner = exp.learner
    template = learner.init(exp.run_key)
    if args.checkpoint == 0:  # the run's initialisation, before meta-training
        state, path = template, pathlib.Path("init")
    elif args.checkpoint is None:
        state, _, path = run.load_latest(template, config=config)
    else:
        path = run.path / "checkpoints" / f"ckpt-{args.checkpoint}.eqx"
        state, _ = learner.load(path)
    preset = learner.method
    T = learner.horizon(state)
    model = learner.model(state)
    diff, static = eqx.partition(model, eqx.is_inexact_array)
    inner = learner._inner_loss()
    loss = lambda u, data: inner(eqx.combine(u, static), data)
    batch = exp.family.sample(jax.random.PRNGKey(20_000), args.tasks, "train")
    out = {"run": str(run.path), "checkpoint": path.name, "T": float(T), "tasks": args.tasks,
           "reference": args.reference, "rules": {}}
    print(f"{run.path} {path.name}: T = {float(T)}, {args.tasks} training tasks", flush=True)

    names = [args.reference] + ([args.check_reference] if args.check_reference else []) + args.rules
    grads = {}
    for name in names:
        method = parse_rule(name, preset)
        rows = []
        for i in range(args.tasks):
            task = tuple(x[i] for x in batch)
            sx, sy, qx, qy = task[:4]

            def objective(d):
                adapted = ctmeta.gradient_flow(inner, eqx.combine(d, static), (sx, sy), T, method=method)
                return apply_loss(learner.loss, learner.apply(adapted, qx), qy)

            g_fn = jax.jit(jax.grad(objective))
            t0 = time.perf_counter()
            g = jax.block_until_ready(g_fn(diff))
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            g = jax.block_until_ready(g_fn(diff))
            seconds = time.perf_counter() - t0
            flat = np.asarray(jax.flatten_util.ravel_pytree(g)[0], np.float64)
            grads.setdefault(name, []).append(flat)
            query_grad = jax.jit(jax.grad(
                lambda u: apply_loss(learner.loss, learner.apply(eqx.combine(u, static), qx), qy)))
            row = {"seconds": seconds, "compile_seconds": compile_s,
                   **counts(method, loss, diff, T, (sx, sy), query_grad)}
            ref = grads[args.reference][i]
            row["relative_error"] = float(np.linalg.norm(flat - ref) / np.linalg.norm(ref))
            rows.append(row)
            print(f"{name:18s} task {i}: err {row['relative_error']:.3e}  fwd {row['forward_gradients']} grads "
                  f"+ {row['forward_hvps']} hvps, bwd {row['backward_hvps']} hvps  {seconds:.1f} s "
                  f"{ {k: v for k, v in row.items() if k in ('forward_steps', 'max_stages', 'rho_max', 'backward_steps')} }",
                  flush=True)
        out["rules"][name] = rows
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
