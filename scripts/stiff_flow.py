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
is rtol/10; `:RTOL/BRTOL` sets the backward's rtol factor; `dopri5>rkc2:RTOL` solves the backward by
RKC2 after a Dopri5 forward, its spectral radius by power iteration on the adjoint's HVPs), `rk4:K`
(the stored sweep), `exprb:N:M` (a prototype exponential integrator, not a library rule: N equal
steps of exponential Rosenbrock exprb32 forward, Hochbruck, Ostermann & Schweitzer 2009, and the
exponential midpoint (Magnus) rule backward, a = exp(-h H(u_mid)) a over the same steps, each
phi-function or exponential by M Lanczos steps on HVPs with full reorthogonalisation).

`--spectrum P` also prints and saves, per task, the curvature range of the support loss
(`ctmeta.ode.curvature_range`, 40 Lanczos steps: smallest and largest Hessian eigenvalue) at P + 1
equally spaced times along the flow (diffrax Dopri5, rtol 1e-5 / 1e-7 in float32 / float64), and
the preset's forward steps between them with their mean h times lambda_max (Dopri5 is
stability-bound near 3.3) and times |lambda_min| (e-foldings of the fastest growing mode);
`--reference none` stops there. `--eval-cost` also times one gradient and one Hessian-vector product
(as the adjoint takes it) of each task's support loss at u0; each adaptive rule's forward and
backward are always timed apart (`forward_seconds`, `backward_seconds`): where the time goes.
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
    kind, _, backward_solver = kind.partition(">")
    solver, _, disp = kind.partition("-")
    return ctmeta.Adjoint(rtol=float(rtol), atol=float(rtol) / 10, solver=solver,
                          backward_solver=backward_solver or None,
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
    forward = jax.jit(lambda d: recorded_forward(field, d, T, data, opts, sens.dense_steps))
    backward = jax.jit(lambda dn, a: adjoint_backward(field, dn, T, data, a, sens, opts, (False, False)))
    y1, dense, status, fstats = jax.block_until_ready(forward(diff))  # compiles
    a_end = query_grad(y1)
    _, _, bstatus, bstats = jax.block_until_ready(backward(dense, a_end))
    # Where the time goes: each half timed alone, after its compilation.
    t0 = time.perf_counter()
    jax.block_until_ready(forward(diff))
    t1 = time.perf_counter()
    jax.block_until_ready(backward(dense, a_end))
    seconds = {"forward_seconds": t1 - t0, "backward_seconds": time.perf_counter() - t1}
    if method.solver == "rkc2":
        fwd = {"forward_gradients": int(fstats.evaluations), "forward_hvps": int(fstats.matvecs),
               "forward_steps": int(fstats.steps), "forward_accepted": int(fstats.accepted_steps),
               "max_stages": int(fstats.max_stages), "rho_max": float(fstats.max_rho)}
    else:
        fwd = {"forward_gradients": 6 * int(fstats["steps"]) + 1, "forward_hvps": 0,
               "forward_steps": int(fstats["steps"]), "forward_accepted": int(fstats["accepted_steps"])}
    return {**fwd, "backward_hvps": int(bstats["num_evaluations"]) + int(bstats.get("num_matvecs", 0)),
            "backward_steps": int(bstats["num_steps"]), "status": [int(status), int(bstatus)], **seconds}


def evaluation_cost(loss, u, data, repeats: int = 20) -> dict:
    """Seconds of one gradient of the support loss and of one Hessian-vector product as the
    adjoint takes it (`GradientField.vjp`: the jvp of the gradient, forward-over-reverse), each
    jitted and the median of `repeats` calls after compilation."""
    field = GradientField(loss)
    v = jax.tree.map(jnp.ones_like, u)
    fns = {"gradient": jax.jit(lambda u: field(0.0, u, data)),
           "hvp": jax.jit(lambda u: field.vjp(0.0, u, data, v)[0])}
    out = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn(u))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(u))
            times.append(time.perf_counter() - t0)
        out[f"{name}_seconds"] = float(np.median(times))
    return out


def _lanczos(matvec, v, m):
    """`m` Lanczos steps from `v` with full reorthogonalisation: `(Q, alpha, beta, |v|)`, `Q` (m, n)."""
    b0 = jnp.linalg.norm(v)
    Q = jnp.zeros((m, v.size), v.dtype).at[0].set(v / b0)

    def body(j, c):
        Q, al, be = c
        w = matvec(Q[j])
        a = jnp.vdot(Q[j], w)
        w = w - Q.T @ (Q @ w)
        w = w - Q.T @ (Q @ w)  # twice is enough (Kahan)
        b = jnp.linalg.norm(w)
        return Q.at[j + 1].set(w / b, mode="drop"), al.at[j].set(a), be.at[j].set(b)

    Q, al, be = jax.lax.fori_loop(0, m, body, (Q, jnp.zeros(m, v.dtype), jnp.zeros(m, v.dtype)))
    return Q, al, be, b0


def _krylov_apply(krylov, fn):
    """`fn(M) v` for the Lanczos process `krylov` of `(M, v)`: `Q^T fn(T_m) e_1 |v|`."""
    Q, al, be, b0 = krylov
    lam, S = jnp.linalg.eigh(jnp.diag(al) + jnp.diag(be[:-1], 1) + jnp.diag(be[:-1], -1))
    return Q.T @ (S @ (fn(lam) * S[0]) * b0)


def _phi1(z):
    zz = jnp.where(z == 0, 1.0, z)
    return jnp.where(z == 0, 1.0, jnp.expm1(zz) / zz)


def _phi3(z):
    zz = jnp.where(jnp.abs(z) < 1e-2, 1.0, z)
    return jnp.where(jnp.abs(z) < 1e-2, 1 / 6 + z / 24 + z * z / 120, (jnp.expm1(zz) - zz - zz * zz / 2) / zz ** 3)


def exprb_meta_gradient(loss, query_grad, u0, data, T, n_steps: int, m: int):
    """The `exprb:N:M` rule on flat parameters: `(dJ/du0, u(T))`.

    Forward, exprb32 with J = -H(u_n): U = u + h phi1(hJ) F(u), D = F(U) - F(u) - J (U - u),
    u_next = U + 2h phi3(hJ) D; the mid-step state u + (h/2) phi1(hJ/2) F(u) + (h/4) phi3(hJ/2) D
    (the variation-of-constants formula with the remainder quadratic in time, from the same bases).
    Backward: a_n = exp(h J(u_mid,n)) a_{n+1} (J symmetric). N (2 + (2M + 1)) gradients + HVPs
    forward, N M HVPs backward.
    """
    F = lambda u: -jax.grad(loss)(u, data)
    jv = lambda u: (lambda v: jax.jvp(F, (u,), (v,))[1])
    h = T / n_steps

    @jax.jit
    def forward_step(u):
        f = F(u)
        k1 = _lanczos(jv(u), f, m)
        U = u + _krylov_apply(k1, lambda l: h * _phi1(h * l))
        D = F(U) - f - jv(u)(U - u)
        k2 = _lanczos(jv(u), D, m)
        mid = (u + _krylov_apply(k1, lambda l: h / 2 * _phi1(h / 2 * l))
               + _krylov_apply(k2, lambda l: h / 4 * _phi3(h / 2 * l)))
        return U + _krylov_apply(k2, lambda l: 2 * h * _phi3(h * l)), mid

    @jax.jit
    def backward_step(a, mid):
        return _krylov_apply(_lanczos(jv(mid), a, m), lambda l: jnp.exp(h * l))

    u, mids = u0, []
    for _ in range(n_steps):
        u, mid = forward_step(u)
        mids.append(mid)
    a = query_grad(u)
    for mid in reversed(mids):
        a = backward_step(a, mid)
    return a, u


def spectrum(loss, u0, data, T, points: int, iterations: int = 40):
    """`[(t, lambda_min, lambda_max)]` of the support loss's Hessian at `points + 1` times along the flow."""
    import diffrax

    from ctmeta.flows import GradientField as Field

    f64 = jax.flatten_util.ravel_pytree(u0)[0].dtype == jnp.float64
    ts = jnp.linspace(0.0, T, points + 1)
    ys = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, a: jax.tree.map(jnp.negative, jax.grad(loss)(y, a))), diffrax.Dopri5(), 0.0, T,
        None, u0, args=data, saveat=diffrax.SaveAt(ts=ts), max_steps=100_000,
        stepsize_controller=diffrax.PIDController(rtol=1e-7 if f64 else 1e-5, atol=1e-9 if f64 else 1e-6)).ys
    rng = jax.jit(lambda y: ode.curvature_range(Field(loss), 0.0, y, data, iterations))
    return [(float(t), *map(float, rng(jax.tree.map(lambda x, k=k: x[k], ys)))) for k, t in enumerate(ts)]


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
    p.add_argument("--reference", default="rk4:100", help="the reference rule, or 'none' (with --spectrum: no gradients)")
    p.add_argument("--check-reference", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--spectrum", type=int, default=0, metavar="P",
                   help="also the curvature range at P + 1 times along each task's flow")
    p.add_argument("--eval-cost", action="store_true",
                   help="also time one gradient and one Hessian-vector product of each task's support loss at u0")
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

    if args.spectrum:
        out["spectrum"] = []
        for i in range(args.tasks):
            data = (batch[0][i], batch[1][i])
            rows = spectrum(loss, diff, data, T, args.spectrum)
            # The preset's forward steps between consecutive times, and their mean size times lambda_max
            # (Dopri5 is stability-bound near 3.3) and |lambda_min| (the e-foldings of the fastest growing mode).
            if preset.steps is None:
                opts = ode.SolveOptions(steps=1, rtol=preset.rtol, atol=preset.atol, max_steps=preset.max_steps,
                                        solver=preset.solver, error_scale=preset.error_scale)
                dense = jax.jit(lambda d: recorded_forward(GradientField(loss), d, T, data, opts, 1024)[1])(diff)
                ts = np.asarray(dense.ts[: int(dense.n) + 1])
            for k, (t, lo, hi) in enumerate(rows):
                line = f"task {i} t = {t:.4f}: Hessian eigenvalues from {lo:9.3f} to {hi:9.3f}"
                if preset.steps is None and k + 1 < len(rows):
                    t_next = rows[k + 1][0]
                    n = int(np.sum((ts[1:] > t) & (ts[1:] <= t_next + 1e-12)))
                    h = (t_next - t) / max(n, 1)
                    line += (f"; preset forward: {n} steps to t = {t_next:.4f}, mean h = {h:.4f}, "
                             f"h lambda_max = {h * hi:.2f}, h |lambda_min| = {h * abs(min(lo, 0)):.2f}")
                    rows[k] = (t, lo, hi, n)
                print(line, flush=True)
            out["spectrum"].append(rows)

    if args.eval_cost:
        out["evaluation_cost"] = []
        for i in range(args.tasks):
            cost = evaluation_cost(loss, diff, (batch[0][i], batch[1][i]))
            out["evaluation_cost"].append(cost)
            print(f"task {i}: one gradient {1e3 * cost['gradient_seconds']:.1f} ms, one Hessian-vector product "
                  f"{1e3 * cost['hvp_seconds']:.1f} ms ({cost['hvp_seconds'] / cost['gradient_seconds']:.2f}x)",
                  flush=True)

    if args.reference == "none":  # the spectrum only
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
        return
    names = [args.reference] + ([args.check_reference] if args.check_reference else []) + args.rules
    grads = {}
    flat0, unravel = jax.flatten_util.ravel_pytree(diff)
    for name in names:
        rows = []
        if name.startswith("exprb:"):
            n_steps, m = map(int, name.split(":")[1:])
            for i in range(args.tasks):
                sx, sy, qx, qy = tuple(x[i] for x in batch)[:4]
                flat_loss = lambda v, data: loss(unravel(v), data)
                query_grad = jax.jit(jax.grad(
                    lambda v: apply_loss(learner.loss, learner.apply(eqx.combine(unravel(v), static), qx), qy)))
                run_rule = lambda: jax.block_until_ready(
                    exprb_meta_gradient(flat_loss, query_grad, flat0, (sx, sy), T, n_steps, m)[0])
                flat = np.asarray(run_rule(), np.float64)  # untimed: a prototype's counts, not its seconds
                row = {"forward_gradients": 2 * n_steps,
                       "forward_hvps": n_steps * (2 * m + 1), "backward_hvps": n_steps * m}
                ref = grads[args.reference][i]
                row["relative_error"] = float(np.linalg.norm(flat - ref) / np.linalg.norm(ref))
                rows.append(row)
                print(f"{name:18s} task {i}: err {row['relative_error']:.3e}  fwd {row['forward_gradients']} grads "
                      f"+ {row['forward_hvps']} hvps, bwd {row['backward_hvps']} hvps", flush=True)
            out["rules"][name] = rows
            if args.out:
                pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
            continue
        method = parse_rule(name, preset)
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
                  f"(forward {row.get('forward_seconds', float('nan')):.1f} s, "
                  f"backward {row.get('backward_seconds', float('nan')):.1f} s) "
                  f"{ {k: v for k, v in row.items() if k in ('forward_steps', 'max_stages', 'rho_max', 'backward_steps')} }",
                  flush=True)
        out["rules"][name] = rows
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
