r"""Diagnostics: where the time of a meta-gradient goes, and what limits it, measured.

A-MAML's meta-gradient is a forward Dopri5 solve of $\dot u = -\nabla L(u)$
plus a backward sweep of the adjoint $\dot a = H(u)\,a$ ($2K$
Hessian-vector products by Heun over $K$ stored states); COMLN's is a solve
of the augmented system $(S, B, z)$ of [`linear_flow`][ctmeta.linear_flow.linear_flow]. Each part is
timed or counted alone here; the rows go to `diagnostics.csv` and the notes
under the targets.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from .. import ode
from .._internal import augmented_field, linear_flow_problem, zeros_augmented
from ..adaptation import gradient_flow
from ..linear_flow import linear_flow
from ..losses import cross_entropy
from ..methods import GradientField
from .measurement import alternate_medians, compile_fn, median_time, task_mean
from .problems import H, Problem, head_loss, make_problem, rule

__all__ = ["amaml_breakdown", "dopri5_step_count", "comln_solver_steps", "amaml_solver_steps",
           "comln_head_timing", "head_memory", "run_diagnostics"]


def _dopri5(field, params, task, T, saveat, rtol=1e-6, atol=1e-8):
    """diffrax's Dopri5 on the gradient flow of a task's support loss, from 0 to `T`."""
    import diffrax

    return diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, a: field(t, y, a)), diffrax.Dopri5(), 0.0, T, None, params,
        args=(task[0], task[1]), saveat=saveat,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=16384,
    )


def amaml_breakdown(problem: Problem, steps: int, repeats: int = 3, rtol=1e-6, atol=1e-8) -> dict:
    """Split A-MAML's meta-gradient time into its parts, each timed alone (vmapped over the meta-batch).

    - `dopri5_steps`, `rejected_steps`: the adaptive forward solve's step count
      (largest over tasks; a vmapped solve runs them all that long);
    - `fwd_t1_seconds`: the forward solve saving only `u(T)` (the adaptation);
    - `fwd_stored_seconds`: the forward solve saving the `steps + 1` states;
    - `sweep_seconds`: the backward Heun sweep over the stored states
      (`2 * steps` Hessian-vector products);
    - `grad_eval_seconds`, `hvp_seconds`: one loss gradient and one HVP of the
      meta-batch, each measured as the mean over `steps` calls inside a `scan`
      (as the solvers call them).
    """
    import diffrax

    T = steps * H
    field = GradientField(problem.whole_loss)
    ts = jnp.linspace(0.0, T, steps + 1, dtype=jnp.float32)

    def solve(params, task, saveat):
        return _dopri5(field, params, task, T, saveat, rtol, atol)

    def stored(params, batch):
        sol = jax.vmap(lambda t: solve(params, t, diffrax.SaveAt(ts=ts)), in_axes=0)(batch)
        return sol.ys, sol.stats["num_steps"], sol.stats["num_rejected_steps"]

    def final(params, batch):
        return jax.vmap(lambda t: solve(params, t, diffrax.SaveAt(t1=True)).ys, in_axes=0)(batch)

    def sweep(ys, batch):
        def one(ys_, task):
            y1 = jax.tree.map(lambda x: x[-1], ys_)
            a_end = jax.grad(problem.whole_outer)(y1, task)
            return ode.adjoint_sweep(field, ys_, 0.0, T / steps, (task[0], task[1]), a_end, "heun")

        return jax.vmap(one)(ys, batch)

    def grads_in_scan(params, batch):
        def body(u, _):
            g = jax.vmap(lambda t: jax.grad(problem.whole_loss)(u, (t[0], t[1])))(batch)
            return jax.tree.map(lambda a, b: a - 1e-6 * jnp.mean(b, 0), u, g), None

        return jax.lax.scan(body, params, None, length=steps)[0]

    def hvps_in_scan(params, batch):
        def body(v, _):
            hv = jax.vmap(lambda t: field.vjp(0.0, params, (t[0], t[1]), v)[0])(batch)
            return jax.tree.map(lambda a, b: a + 1e-6 * jnp.mean(b, 0), v, hv), None

        return jax.lax.scan(body, params, None, length=steps)[0]

    def hvps_u_only_in_scan(params, batch):
        # The same product without the data cotangent that `GradientField.vjp` also forms.
        def hvp(t, v):
            return jax.jvp(lambda u: jax.grad(problem.whole_loss)(u, (t[0], t[1])), (params,), (v,))[1]

        def body(v, _):
            hv = jax.vmap(lambda t: hvp(t, v))(batch)
            return jax.tree.map(lambda a, b: a + 1e-6 * jnp.mean(b, 0), v, hv), None

        return jax.lax.scan(body, params, None, length=steps)[0]

    p, b = problem.params, problem.batch
    ys, nsteps, nrej = jax.jit(stored)(p, b)
    out = dict(benchmark=problem.name, method="amaml", steps=steps, T=T, meta_batch=problem.meta_batch,
               dopri5_steps=int(np.max(nsteps)), rejected_steps=int(np.max(nrej)))
    out["fwd_t1_seconds"] = median_time(jax.jit(final), (p, b), repeats)
    out["fwd_stored_seconds"] = median_time(jax.jit(stored), (p, b), repeats)
    out["sweep_seconds"] = median_time(jax.jit(sweep), (ys, b), repeats)
    out["grad_eval_seconds"] = median_time(jax.jit(grads_in_scan), (p, b), repeats) / steps
    out["hvp_seconds"] = median_time(jax.jit(hvps_in_scan), (p, b), repeats) / steps
    out["hvp_u_only_seconds"] = median_time(jax.jit(hvps_u_only_in_scan), (p, b), repeats) / steps
    out["hvp_per_grad"] = out["hvp_seconds"] / out["grad_eval_seconds"]
    # The model of the meta-gradient's cost: forward solve + 2K HVPs (Heun).
    out["predicted_ratio"] = (out["fwd_stored_seconds"] + 2 * steps * out["hvp_seconds"]) / out["fwd_t1_seconds"]
    return out


def dopri5_step_count(loss_fn, params, data, T: float, *, rtol=1e-6, atol=1e-8, cap: int = 200) -> dict:
    """Steps Dopri5 with `Adjoint`'s step control takes on the gradient flow of `loss_fn` up to `T`.

    Stepped from Python, one jitted step at a time: on CPU a convolution
    inside an XLA loop is an order of magnitude slower than outside one, so
    this counts the steps of a Conv-4 flow much faster than the solve itself.
    Stops after `cap` steps; `steps_to_T` then extrapolates at the rate so far.
    """
    import diffrax

    field = GradientField(loss_fn)
    term = diffrax.ODETerm(lambda t, y, a: field(t, y, a))
    # The tolerance `ode.solve` would use (raised to 1e-5 for float32 states).
    solver, ctrl = diffrax.Dopri5(), diffrax.PIDController(rtol=ode.effective_rtol(rtol, params), atol=atol)
    dtype = jnp.result_type(*jax.tree.leaves(params))
    t0, t1 = jnp.asarray(0.0, dtype), jnp.asarray(T, dtype)
    tn, cstate = ctrl.init(term, t0, t1, params, None, data, solver.func, solver.error_order(term))
    tn = jnp.minimum(tn, t1)
    sstate = solver.init(term, t0, tn, params, data)

    @jax.jit
    def step(tp, tn, y, sstate, cstate):
        y1, yerr, _, sstate1, _ = solver.step(term, tp, tn, y, data, sstate, False)
        keep, ntp, ntn, _, cstate1, _ = ctrl.adapt_step_size(tp, tn, y, y1, data, yerr, solver.error_order(term), cstate)
        pick = lambda a, b: jax.tree.map(lambda u, v: jnp.where(keep, u, v), a, b)
        return keep, ntp, jnp.minimum(ntn, t1), pick(y1, y), pick(sstate1, sstate), cstate1

    tp, y, accepted, rejected = t0, params, 0, 0
    start = time.perf_counter()
    while float(tp) < T * (1 - 1e-6) and accepted + rejected < cap:
        keep, tp, tn, y, sstate, cstate = step(tp, tn, y, sstate, cstate)
        accepted, rejected = accepted + int(bool(keep)), rejected + int(not bool(keep))
    reached = float(tp)
    total = accepted + rejected
    return dict(T=T, accepted=accepted, rejected=rejected, reached_t=reached, last_dt=float(tn - tp),
                steps_to_T=total if reached >= T * (1 - 1e-6) else round(total * T / max(reached, 1e-12)),
                count_seconds=time.perf_counter() - start)


def comln_solver_steps(problem: Problem, steps: int) -> dict:
    """Steps Dopri5 takes on COMLN's augmented system `(s, B, z)` up to `T = steps * h`,
    with `linear_flow`'s default tolerances, against Euler's `steps`."""
    import diffrax

    T = steps * H
    emb, W0 = problem.head["split"](problem.params)
    task = tuple(x[0] for x in problem.batch)
    fs = problem.head["features"](emb, task[0])
    onehot = jax.nn.one_hot(task[1], problem.head["ways"], dtype=fs.dtype)

    @jax.jit
    def count(W0, fs, onehot):
        prob = linear_flow_problem(W0, fs, onehot, jnp.asarray(0.0, fs.dtype))
        M, N = onehot.shape
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(augmented_field), diffrax.Dopri5(), 0.0, T, None,
            zeros_augmented(M, N, fs.dtype), args=prob, saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8), max_steps=16384,
        )
        return sol.stats["num_steps"], sol.stats["num_rejected_steps"]

    n, r = count(W0, fs, onehot)
    return dict(benchmark=problem.name, method="comln", steps=steps, T=T, dopri5_steps=int(n),
                rejected_steps=int(r), euler_steps=steps, dopri5_evals=6 * int(n) + 1)


def amaml_solver_steps(problem: Problem, steps: int, rtol=1e-6, atol=1e-8, lanczos: int = 20) -> dict:
    r"""The `stiff` diagnostic: what A-MAML's forward solve to `T = steps * h` faces and what it costs.

    Largest over the meta-batch: Dopri5's steps (`dopri5_steps`, `rejected_steps`) and RKC2's at the
    same tolerances (`rkc2_steps`, `rkc2_max_stages`, `rkc2_evals` gradients + `rkc2_hvps` of its
    spectral estimate); the curvature range of the support loss (`ctmeta.ode.curvature_range`,
    `lanczos` HVPs each) at $u_0$, $u(T/2)$ and $u(T)$: `lambda_max` (the largest, what makes the
    flow stiff) and `lambda_min` (the smallest: below 0 the flow is unstable there, modes grow
    like $e^{|\lambda_{\min}| t}$ and every solver must resolve them, whatever its stability);
    and `dopri5_h_lambda`, $\lambda_{\max}$ times Dopri5's mean step (stability-bound near 3.3).
    """
    import diffrax

    from ..ode._adaptive import rkc_forward

    T = steps * H
    field = GradientField(problem.whole_loss)
    options = ode.SolveOptions(steps=1, rtol=rtol, atol=atol, max_steps=16384, solver="rkc2")

    @jax.jit
    def count(params, batch):
        def one(task):
            sol = _dopri5(field, params, task, T, diffrax.SaveAt(ts=jnp.asarray([0.0, T / 2, T])), rtol, atol)
            ranges = [ode.curvature_range(field, 0.0, jax.tree.map(lambda x, k=k: x[k], sol.ys), (task[0], task[1]),
                                          lanczos) for k in range(3)]
            _, _, _, rkc = rkc_forward(field, params, jnp.asarray(T), (task[0], task[1]), options, None)
            return (sol.stats["num_steps"], sol.stats["num_rejected_steps"], jnp.stack([r[0] for r in ranges]),
                    jnp.stack([r[1] for r in ranges]), rkc)

        return jax.vmap(one)(batch)

    n, r, lo, hi, rkc = count(problem.params, problem.batch)
    n = int(np.max(n))
    lam_max, lam_min = np.max(np.asarray(hi), axis=0), np.min(np.asarray(lo), axis=0)
    return dict(benchmark=problem.name, method="amaml", diagnostic="stiff", steps=steps, T=T,
                meta_batch=problem.meta_batch, dopri5_steps=n, rejected_steps=int(np.max(r)), dopri5_evals=6 * n + 1,
                grad_evals_per_h=(6 * n + 1) / steps, rkc2_steps=int(np.max(rkc.steps)),
                rkc2_max_stages=int(np.max(rkc.max_stages)), rkc2_evals=int(np.max(rkc.evaluations)),
                rkc2_hvps=int(np.max(rkc.matvecs)),
                **{f"lambda_{end}_{at}": float(v[i]) for end, v in (("max", lam_max), ("min", lam_min))
                   for i, at in enumerate(("u0", "mid", "uT"))},
                dopri5_h_lambda=float(np.max(lam_max)) * T / max(n, 1))


def _head_inputs(problem: Problem):
    """`(W0, fs, onehot, fq, sy, qy)`: the initial head, and per task the support
    features, one-hot support labels, query features, support and query labels."""
    emb, W0 = problem.head["split"](problem.params)
    features = jax.vmap(lambda x: problem.head["features"](emb, x))
    fs, fq = features(problem.batch[0]), features(problem.batch[2])
    onehot = jax.nn.one_hot(problem.batch[1], problem.head["ways"], dtype=fs.dtype)
    return W0, fs, onehot, fq, problem.batch[1], problem.batch[3]


def _head_meta_gradient(loss):
    """`(W0, *per_task) ->` the task mean of the derivative of `loss(W0, fs, onehot, fq, ...)`
    w.r.t. `W0`, `fs` and `fq` (what the embedding's backward would need), `W0` shared by the tasks."""

    def grad(W0, *per_task):
        in_axes = (None,) + (0,) * len(per_task)
        return task_mean(jax.vmap(jax.grad(loss, argnums=(0, 1, 3)), in_axes=in_axes)(W0, *per_task))

    return grad


def comln_head_timing(problem: Problem, steps: int, repeats: int = 7) -> dict:
    """COMLN's meta-gradient through `linear_flow` alone (features fixed, no Conv-4),
    Dopri5 vs Euler with `steps` steps, the two timed alternately."""
    T = steps * H
    W0, fs, onehot, fq, _, qy = _head_inputs(problem)
    args = (W0, fs, onehot, fq, qy)

    def make(kw):
        def loss(W0, fs, onehot, fq, qy):
            return cross_entropy(fq @ linear_flow(W0, fs, onehot, T, **kw).T, qy)

        return compile_fn(_head_meta_gradient(loss), *args)[0]

    fns = {"dopri5": make(dict(max_steps=16384)), "euler": make(dict(solver="euler", steps=steps))}
    med = alternate_medians({k: (lambda f=f: f(*args)) for k, f in fns.items()}, repeats)
    d, e = med["dopri5"], med["euler"]
    return dict(benchmark=problem.name, method="comln-head-only", steps=steps, T=T, meta_batch=problem.meta_batch,
                dopri5_head_seconds=d, euler_head_seconds=e, dopri5_over_euler=d / e, repeats=repeats)


def head_memory(problem: Problem, steps: int) -> dict:
    """Compiled memory of the head's meta-gradient alone, features fixed (no embedding):
    COMLN (`linear_flow`, Dopri5) against ANIL (`Unrolled(steps)` through the head), the
    derivative taken w.r.t. `W0` and both feature sets, as the embedding's backward would need.

    On ResNet-12 the embedding's own backward (~6 GB on a 5-way 5-shot task) hides the
    head's graph in `peak_bytes`; this isolates the part that grows with the steps."""
    T = steps * H
    args = _head_inputs(problem)

    def comln(W0, fs, onehot, fq, sy, qy):
        return cross_entropy(fq @ linear_flow(W0, fs, onehot, T, max_steps=16384).T, qy)

    def anil(W0, fs, onehot, fq, sy, qy):
        W = gradient_flow(head_loss, W0, (fs, sy), T, method=rule("anil", steps))
        return cross_entropy(fq @ W.T, qy)

    out = dict(benchmark=problem.name, method="head-only", steps=steps, T=T, meta_batch=problem.meta_batch)
    for name, loss in (("comln", comln), ("anil", anil)):
        out[f"{name}_head_bytes"] = compile_fn(_head_meta_gradient(loss), *args)[1]["peak_bytes"]
    out["comln_over_anil"] = out["comln_head_bytes"] / out["anil_head_bytes"]
    return out


def run_diagnostics(rows, problems, *, repeats=3, quick=False, data_dir=None, budget=120.0) -> list[dict]:
    """Where the time goes, measured: A-MAML's time breakdown on CosMixture
    (at 500 steps, or the closest measured; meta-batch 5 and 1) and its Dopri5
    step counts at every step count; on Conv-4, A-MAML's Dopri5 steps at
    T = 0.1 for a zero and a random head, COMLN's Dopri5 step counts and its
    head-only Dopri5-vs-Euler times."""
    out = []

    def guard(fn, **where):
        try:
            out.append(fn())
        except Exception as err:  # noqa: BLE001 - recorded, the run goes on
            out.append(dict(where, error=f"{type(err).__name__}: {err}"[:200]))

    measured = sorted({r["steps"] for r in rows if r["benchmark"] == "cosmixture" and r["method"] == "amaml"
                       and r.get("seconds") is not None})
    if measured:
        k = min(measured, key=lambda s: (abs(math.log(s / 500)), -s))
        problem = problems.get("cosmixture") or make_problem("cosmixture", 5)
        guard(lambda: amaml_breakdown(problem, k, repeats), benchmark="cosmixture", method="amaml", steps=k)
        if problem.meta_batch > 1:
            single = make_problem("cosmixture", 1)
            guard(lambda: amaml_breakdown(single, k, repeats), benchmark="cosmixture", method="amaml", steps=k)
        for s in measured:
            guard(lambda: amaml_solver_steps(problem, s), benchmark="cosmixture", method="amaml", steps=s)
    for bench in ("omniglot", "miniimagenet"):
        if quick or bench not in problems or not any(r["benchmark"] == bench and r["method"] == "amaml" for r in rows):
            continue
        # A-MAML on the whole Conv-4: Dopri5's steps at T = 0.1 (K = 10), zero
        # head (the benchmark's) and a random head U(+-1/sqrt(d)).
        for init in ("zeros", "random"):
            try:
                prob = problems[bench] if init == "zeros" else make_problem(bench, 1, data_dir=data_dir, head_init="random")
                task = tuple(x[0] for x in prob.batch)
                info = dopri5_step_count(prob.whole_loss, prob.params, (task[0], task[1]), 10 * H, cap=40)
                out.append(dict(benchmark=bench, method="amaml", steps=10, T=10 * H, head_init=init,
                                dopri5_steps=info["steps_to_T"], rejected_steps=info["rejected"],
                                reached_t=info["reached_t"], last_dt=info["last_dt"]))
            except Exception as err:  # noqa: BLE001
                out.append(dict(benchmark=bench, method="amaml", steps=10, head_init=init, error=f"{type(err).__name__}: {err}"[:200]))
    rn = "miniimagenet-resnet12"
    if rn in problems:
        for k in sorted({r["steps"] for r in rows if r["benchmark"] == rn and r["method"] == "anil"}):
            guard(lambda: head_memory(problems[rn], k), benchmark=rn, method="head-only", steps=k)
    for bench in ("omniglot", "miniimagenet"):
        if bench not in problems:
            continue
        ks = sorted({r["steps"] for r in rows if r["benchmark"] == bench and r["method"] == "comln"})
        for k in ks:
            guard(lambda: comln_solver_steps(problems[bench], k), benchmark=bench, method="comln", steps=k)
        timed = sorted({r["steps"] for r in rows if r["benchmark"] == bench and r["method"] == "comln-euler"
                        and r.get("seconds") is not None and r["steps"] * H >= 1})
        for k in timed[:2] if quick else timed:
            guard(lambda: comln_head_timing(problems[bench], k, max(repeats, 5)), benchmark=bench, method="comln", steps=k)
    return out
