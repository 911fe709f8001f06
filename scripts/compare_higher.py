r"""One meta-iteration of ctmeta's A-MAML against a PyTorch MAML built on `higher`.

Both sides run the same problem, in one run of this script on one machine:

- CosMixture 100shot-100val (`ctmeta.presets`: benchmark `cosmixture`, method
  `amaml`, `shots=100`; the fixed task family `CosMixture(shots=100,
  queries=100, seed=0)`), one fixed meta-batch of 5 tasks (the first
  meta-batch of the preset's run, `family.sample(learner.iteration_key(state),
  5)`), float32;
- the preset's MLP 2 -> 32 -> 32 -> 1 with tanh, and the *same* initial
  weights on both sides (the preset's model, copied into `torch.nn.Linear`s);
- inner loop: 500 steps of plain gradient descent at learning rate
  `h = 0.01` on the support MSE (MAML), or the gradient flow of the support
  MSE over `T = 500 h = 5` (A-MAML); outer loss: query MSE averaged over the
  tasks; outer optimiser: Adam, lr 1e-3 (torch's and optax's defaults agree:
  betas 0.9/0.999, eps 1e-8). `--steps K` keeps `h = 0.01` and sets
  `T = K h` (the convention of `ctmeta bench`).

**The rows.**

- `torch+higher MAML`: `higher.innerloop_ctx(net, SGD(lr=h),
  copy_initial_weights=False)` per task, K `diffopt.step`s (each a
  `torch.autograd.grad(create_graph=True)`), the query loss over the meta-batch
  backpropagated through the whole unrolled loop (one `backward` per task, so
  each task's graph is freed before the next is built; `higher`'s own MAML
  example), then `Adam.step()`. `torch.set_num_threads(1)`. If `higher`
  cannot be imported or fails on the installed torch, the same unrolled loop
  is written with `torch.autograd.grad(create_graph=True)` (that is MAML as
  `higher` computes it) and the row says `torch autograd MAML`
  (`--torch-impl autograd` asks for it).
- `ctmeta Adjoint()`: a `ctmeta.meta.MetaLearner` with the rule
  `ctmeta.Adjoint()` as it is defined in the checked-out ctmeta (its repr and
  all its fields are printed and written to the CSV), `meta_step` = the
  A-MAML meta-gradient over the 5 tasks (vmapped) + the Adam update.
- `ctmeta Adjoint(steps=K)`: the same with the stored-state sweep over K states.
- `ctmeta Unrolled(steps=K)` (skip with `--no-unrolled`): ctmeta's own MAML,
  the same algorithm as the torch row. Its meta-gradient at the initial
  weights is compared with torch's (relative error), which checks that the
  torch row computes MAML on the same problem.

**What is timed**: one meta-iteration, wall clock (`time.perf_counter`), on
the fixed meta-batch, the state carried from one iteration to the next.
`--warmup` iterations first (for ctmeta the first one compiles `meta_step`;
its time is reported as `first_call_seconds`), then `--repeats` timed ones;
the median is reported. Beside the wall time, the CPU time of the process
(`time.process_time`, all its threads) of the same iterations: on a shared
core, where another process takes turns with this one, wall times grow and
scatter with that process's load while CPU times do not, so the CPU ratio is
the steadier one (`median_cpu_seconds`, `torch_over_this_cpu`). ctmeta: `learner.meta_step(state, batch)` (with its
default finiteness check) then `jax.block_until_ready(state)`. torch: CPU
tensors, synchronous. `torch_over_this` is the torch row's median divided by
the row's median.

**Sanity checks** (printed; no row's meta-gradient has to match another's,
A-MAML and MAML are different methods): the torch meta-loss must decrease
over the iterations run (`torch_loss_decreases`), every ctmeta meta-loss must
be finite; the first iteration's meta-loss (the query loss after adaptation
at the shared initial weights) is printed for every row, so that the MAML
rows' agree and the A-MAML rows' differ from them by the O(h) gap between 500
GD steps and the flow.

**Install** (the torch side runs in a subprocess of a separate interpreter,
so nothing is added to ctmeta's virtualenv or to pyproject.toml)::

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch higher numpy

(PyPI's Linux torch wheel pulls the CUDA packages, ~5.5 GB in all; a CPU
wheel does as well.) The torch interpreter is `--torch-python`, else
`$CTMETA_TORCH_PYTHON`, else this interpreter if it can import torch, else
`/tmp/torchvenv/bin/python`.

**Run** (one core, as the brief of `docs/bench.md`)::

    . .venv/bin/activate
    taskset -c 1 python scripts/compare_higher.py --out docs/figures
    taskset -c 1 python scripts/compare_higher.py --quick --out /tmp/cmp   # smoke test

Outputs in `--out`: `compare_higher.csv` (one row per rule) and
`compare_higher.png` (seconds per meta-iteration, log scale, one labelled bar
per row).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

H = 0.01  # inner learning rate; T = steps * H
OUTER_LR = 1e-3
DEFAULT_TORCH_PYTHON = "/tmp/torchvenv/bin/python"

COLUMNS = (
    "row",
    "framework",
    "rule",
    "rule_fields",
    "steps",
    "T",
    "meta_batch",
    "median_seconds",
    "min_seconds",
    "max_seconds",
    "repeats",
    "warmup",
    "first_call_seconds",
    "torch_over_this",
    "median_cpu_seconds",
    "torch_over_this_cpu",
    "first_meta_loss",
    "last_meta_loss",
    "first_grad_norm",
    "all_finite",
    "status",
    "versions",
)


# --------------------------------------------------------------------------- #
# The torch side (runs in the torch interpreter; imports neither jax nor ctmeta)
# --------------------------------------------------------------------------- #


def torch_worker(in_path: str, out_path: str) -> None:
    """Read the problem from `in_path` (npz), time torch MAML, write `out_path` (npz) and print JSON."""
    import importlib.metadata

    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (parallel work started): harmless here
        pass
    torch.set_default_dtype(torch.float32)

    data = np.load(in_path)
    cfg = json.loads(str(data["config"]))
    steps, h, lr, B = int(cfg["steps"]), float(cfg["h"]), float(cfg["outer_lr"]), int(cfg["meta_batch"])
    warmup, repeats, impl = int(cfg["warmup"]), int(cfg["repeats"]), cfg["torch_impl"]

    net = torch.nn.Sequential(
        torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    )
    with torch.no_grad():
        for i, layer in enumerate([net[0], net[2], net[4]]):
            layer.weight.copy_(torch.from_numpy(data[f"W{i}"]))
            layer.bias.copy_(torch.from_numpy(data[f"b{i}"]))
    sx, sy, qx, qy = (torch.from_numpy(data[k]) for k in ("sx", "sy", "qx", "qy"))
    mse = torch.nn.functional.mse_loss
    meta_opt = torch.optim.Adam(net.parameters(), lr=lr)
    inner_opt = torch.optim.SGD(net.parameters(), lr=h)

    note = ""
    higher_version = None
    if impl == "higher":
        try:
            import higher

            higher_version = importlib.metadata.version("higher")
        except Exception as err:  # noqa: BLE001 - any failure means: fall back
            impl, note = "autograd", f"higher unavailable ({type(err).__name__}: {err}); autograd fallback"

    def task_loss_higher(t):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(steps):
                diffopt.step(mse(fnet(sx[t]), sy[t]))
            q = mse(fnet(qx[t]), qy[t])
            (q / B).backward()
        return q.item()

    def task_loss_autograd(t):
        # MAML as higher computes it: u_{k+1} = u_k - h grad L(u_k), graph kept.
        params = list(net.parameters())

        def forward(ps, x):
            z = torch.tanh(x @ ps[0].T + ps[1])
            z = torch.tanh(z @ ps[2].T + ps[3])
            return z @ ps[4].T + ps[5]

        u = params
        for _ in range(steps):
            g = torch.autograd.grad(mse(forward(u, sx[t]), sy[t]), u, create_graph=True)
            u = [ui - h * gi for ui, gi in zip(u, g)]
        q = mse(forward(u, qx[t]), qy[t])
        (q / B).backward()
        return q.item()

    def meta_step():
        meta_opt.zero_grad(set_to_none=False)
        fn = task_loss_higher if impl == "higher" else task_loss_autograd
        loss = sum(fn(t) for t in range(B)) / B
        grads = [p.grad.detach().clone().numpy() for p in net.parameters()]
        meta_opt.step()
        return loss, grads

    losses, times, cpu_times, first_grads = [], [], [], None
    for it in range(warmup + repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            loss, grads = meta_step()
        except Exception as err:  # noqa: BLE001 - higher broken on this torch: fall back once
            if impl != "higher" or it > 0:
                raise
            impl, note = "autograd", f"higher failed ({type(err).__name__}: {err}); autograd fallback"
            t0, c0 = time.perf_counter(), time.process_time()
            loss, grads = meta_step()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if first_grads is None:
            first_grads = grads
        losses.append(loss)
        if it >= warmup:
            times.append(dt)
            cpu_times.append(dc)
        print(f"  torch {impl} iteration {it + 1}/{warmup + repeats}: {dt:.3f} s (cpu {dc:.3f} s), "
              f"meta-loss {loss:.6f}", file=sys.stderr, flush=True)
    np.savez(out_path, times=np.asarray(times), cpu_times=np.asarray(cpu_times), losses=np.asarray(losses),
             **{f"g{i}": g for i, g in enumerate(first_grads)})
    print(json.dumps({
        "impl": impl,
        "note": note,
        "torch_version": torch.__version__,
        "higher_version": higher_version,
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "python": sys.executable,
    }))


# --------------------------------------------------------------------------- #
# The ctmeta side
# --------------------------------------------------------------------------- #


def rule_fields(rule) -> str:
    """Every field of a rule, defaults included (the repr of an equinox module shows only the others)."""
    if dataclasses.is_dataclass(rule):
        return ", ".join(f"{f.name}={getattr(rule, f.name)!r}" for f in dataclasses.fields(rule))
    return repr(rule)


def find_torch_python(explicit: str | None) -> str:
    candidates = [explicit, os.environ.get("CTMETA_TORCH_PYTHON")]
    for c in candidates:
        if c:
            return c
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    if probe.returncode == 0:
        return sys.executable
    return DEFAULT_TORCH_PYTHON


def time_ctmeta(learner, state, batch, warmup: int, repeats: int):
    """Wall and CPU times of `meta_step`; returns (times, cpu_times, first_call, losses, grad_norms, status)."""
    import jax

    from ctmeta import NumericalError

    times, cpu, losses, norms, first = [], [], [], [], None
    for it in range(warmup + repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            state, metrics = learner.meta_step(state, batch)
            jax.block_until_ready(state)
        except NumericalError as err:
            return times, cpu, first, losses, norms, f"failed at iteration {it + 1}: {err}"
        except Exception as err:  # noqa: BLE001 - report the row as failed, keep the others
            line = next((x for x in str(err).splitlines() if x.strip()), "")
            print(f"  error at iteration {it + 1}: {type(err).__name__}: {line}", flush=True)
            return times, cpu, first, losses, norms, f"error at iteration {it + 1}: {type(err).__name__}: {line}"
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        losses.append(float(metrics["meta_loss"]))
        norms.append(float(metrics["grad_norm"]))
        if it == 0:
            first = dt
        if it >= warmup:
            times.append(dt)
            cpu.append(dc)
        print(f"  iteration {it + 1}/{warmup + repeats}: {dt:.3f} s (cpu {dc:.3f} s), meta-loss {losses[-1]:.6f}",
              flush=True)
    return times, cpu, first, losses, norms, "ok"


def plot(rows, path: pathlib.Path, title: str) -> None:
    """Seconds per meta-iteration, log scale: per row a wall-time bar and a CPU-time bar, both labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["median_seconds"] != ""]
    labels = [r["row"].replace(" ", "\n", 1) for r in timed]
    wall = [float(r["median_seconds"]) for r in timed]
    cpu = [float(r["median_cpu_seconds"]) for r in timed]
    fig, ax = plt.subplots(figsize=(2.3 * len(timed) + 2.5, 5.0))
    x = np.arange(len(timed))
    width = 0.38
    for k, (vals, what, ratio_key) in enumerate(((wall, "wall", "torch_over_this"), (cpu, "cpu", "torch_over_this_cpu"))):
        colors = [("tab:orange" if r["framework"] == "torch" else "tab:blue") for r in timed]
        bars = ax.bar(x + (k - 0.5) * width, vals, width, color=colors, alpha=1.0 if k == 0 else 0.45,
                      hatch=None if k == 0 else "//", edgecolor="black", linewidth=0.4,
                      label="wall time (median)" if k == 0 else "CPU time of the process (median)")
        for bar, r, v in zip(bars, timed, vals):
            text = f"{what} {v:.3g} s"
            if r["framework"] != "torch":
                text += f"\ntorch/this {float(r[ratio_key]):.3g}x"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, v), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("seconds per meta-iteration (log scale)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(min(wall + cpu) / 3, max(wall + cpu) * 5)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/figures", help="output folder (default docs/figures)")
    p.add_argument("--repeats", type=int, default=None, help="timed meta-iterations per row (default 10; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed meta-iterations first (default 2; 1 with --quick)")
    p.add_argument("--steps", type=int, default=500, help="inner steps K; h = 0.01, T = K h (default 500)")
    p.add_argument("--meta-batch", type=int, default=5, help="tasks per meta-batch (default 5)")
    p.add_argument("--quick", action="store_true", help="smoke test: few repeats")
    p.add_argument("--no-unrolled", action="store_true", help="skip the ctmeta Unrolled(steps=K) (MAML in JAX) row")
    p.add_argument("--torch-python", default=None, help="interpreter with torch and higher (see the docstring)")
    p.add_argument("--torch-impl", choices=("higher", "autograd"), default="higher")
    p.add_argument("--torch-worker", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.torch_worker:
        torch_worker(*args.torch_worker)
        return 0

    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if repeats < 1 or warmup < 1 or args.steps < 1 or args.meta_batch < 1:
        p.error("--repeats, --warmup, --steps and --meta-batch must be positive")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps, B = args.steps, args.meta_batch
    T = steps * H

    import jax

    import ctmeta
    from ctmeta import presets
    from ctmeta.meta import MetaLearner, mse
    from ctmeta.models import MLP

    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    print(f"cores this process may use: {affinity}  (run under `taskset -c 1` for the one-core comparison)")
    if len(affinity) != 1:
        print("warning: not pinned to one core; torch uses 1 thread, XLA whatever cores it sees")

    # The problem: the preset (CosMixture 100shot-100val, MLP 2x32 tanh, Adam 1e-3).
    cfg = presets.resolve_config("cosmixture", "amaml", T=T, steps=steps, shots=100, meta_batch=B)
    exp = presets.build(cfg, progress=False)
    model = exp.learner.model(exp.learner.init(exp.run_key))
    assert isinstance(model, MLP) and len(model.layers) == 3, model
    assert cfg["optimizer"] == {"name": "adam", "learning_rate": OUTER_LR, "schedule": None}, cfg["optimizer"]
    first_state = exp.learner.init(exp.run_key)
    batch = exp.family.sample(exp.learner.iteration_key(first_state), B)
    sx, sy, qx, qy = (np.asarray(a, np.float32) for a in batch)
    print(f"problem: {exp.family!r}, meta-batch {B} (support {sx.shape[1:]}, query {qx.shape[1:]}), "
          f"MLP 2-32-32-1 tanh, K={steps}, h={H}, T={T:g}, outer Adam lr {OUTER_LR}, float32")

    # ---- torch, in its own interpreter ----
    torch_python = find_torch_python(args.torch_python)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        in_path, out_path = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        weights = {}
        for i, layer in enumerate(model.layers):
            weights[f"W{i}"] = np.asarray(layer.weight, np.float32)
            weights[f"b{i}"] = np.asarray(layer.bias, np.float32)
        config = dict(steps=steps, h=H, outer_lr=OUTER_LR, meta_batch=B, warmup=warmup, repeats=repeats,
                      torch_impl=args.torch_impl)
        np.savez(in_path, sx=sx, sy=sy, qx=qx, qy=qy, config=json.dumps(config), **weights)
        print(f"\n[torch] {torch_python} (subprocess, 1 thread)", flush=True)
        proc = subprocess.run([torch_python, os.path.abspath(__file__), "--torch-worker", in_path, out_path],
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            print(f"error: the torch worker failed (exit {proc.returncode}); install torch and higher, "
                  f"see the top of {__file__}", file=sys.stderr)
            return 1
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        res = np.load(out_path)
        torch_times, torch_losses = res["times"].tolist(), res["losses"].tolist()
        torch_cpu = res["cpu_times"].tolist()
        torch_grads = [res[f"g{i}"] for i in range(6)]
    torch_median = statistics.median(torch_times)
    torch_cpu_median = statistics.median(torch_cpu)
    torch_name = "torch+higher MAML" if info["impl"] == "higher" else "torch autograd MAML"
    torch_decreases = torch_losses[-1] < torch_losses[0]
    torch_gnorm = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in torch_grads)))
    versions = f"torch {info['torch_version']}, higher {info['higher_version']}"
    rows.append(dict(
        row=torch_name, framework="torch",
        rule=f"{'higher.innerloop_ctx + SGD' if info['impl'] == 'higher' else 'autograd.grad(create_graph=True)'}"
             f"(lr={H}) x {steps} steps", rule_fields=info["note"],
        steps=steps, T=T, meta_batch=B, median_seconds=torch_median, min_seconds=min(torch_times),
        max_seconds=max(torch_times), repeats=len(torch_times), warmup=warmup, first_call_seconds="",
        torch_over_this=1.0, median_cpu_seconds=torch_cpu_median, torch_over_this_cpu=1.0,
        first_meta_loss=torch_losses[0], last_meta_loss=torch_losses[-1],
        first_grad_norm=torch_gnorm, all_finite=bool(np.all(np.isfinite(torch_losses))),
        status="ok" if torch_decreases else "meta-loss did not decrease", versions=versions,
    ))

    # ---- ctmeta ----
    rules = [("ctmeta Adjoint()", ctmeta.Adjoint()), (f"ctmeta Adjoint(steps={steps})", ctmeta.Adjoint(steps=steps))]
    if not args.no_unrolled:
        rules.append((f"ctmeta Unrolled(steps={steps})", ctmeta.Unrolled(steps=steps)))
    optimizer = presets.build_optimizer(cfg["optimizer"])
    jax_versions = f"jax {jax.__version__}, ctmeta {ctmeta.__version__}"
    grad_check = None
    for name, rule in rules:
        print(f"\n[{name}] repr {rule!r}; fields: {rule_fields(rule)}", flush=True)
        learner = MetaLearner(model, rule, optimizer, mse, T=T)
        state = learner.init(exp.run_key)
        if isinstance(rule, ctmeta.Unrolled):  # same algorithm as torch: compare the meta-gradients
            try:
                _, g = learner.meta_gradient(state, batch)
                mine = np.concatenate([np.ravel(np.asarray(x)) for l in g.model.layers for x in (l.weight, l.bias)])
                theirs = np.concatenate([np.ravel(x) for x in torch_grads])
                grad_check = float(np.linalg.norm(theirs - mine) / np.linalg.norm(mine))
            except Exception as err:  # noqa: BLE001 - the check is a bonus; the timing below says more
                print(f"  meta-gradient check failed: {type(err).__name__}: {err}", flush=True)
        times, cpu, first, losses, norms, status = time_ctmeta(learner, state, batch, warmup, repeats)
        med = statistics.median(times) if times else ""
        cmed = statistics.median(cpu) if cpu else ""
        rows.append(dict(
            row=name, framework="ctmeta", rule=repr(rule), rule_fields=rule_fields(rule),
            steps=steps, T=T, meta_batch=B, median_seconds=med,
            min_seconds=min(times) if times else "", max_seconds=max(times) if times else "",
            repeats=len(times), warmup=warmup, first_call_seconds=first if first is not None else "",
            torch_over_this=torch_median / med if times else "",
            median_cpu_seconds=cmed, torch_over_this_cpu=torch_cpu_median / cmed if cpu else "",
            first_meta_loss=losses[0] if losses else "", last_meta_loss=losses[-1] if losses else "",
            first_grad_norm=norms[0] if norms else "",
            all_finite=bool(losses) and bool(np.all(np.isfinite(losses))), status=status, versions=jax_versions,
        ))

    # ---- report ----
    print(f"\nOne meta-iteration, CosMixture 100shot-100val, meta-batch {B}, K={steps}, h={H}, T={T:g}, "
          f"float32, Adam {OUTER_LR}; median of {repeats} after {warmup} warm-up; "
          f"{platform.processor() or platform.machine()}, cores {affinity}")
    print(f"{versions} ({info['impl']}; threads {info['num_threads']}/{info['num_interop_threads']}); {jax_versions}")
    header = f"{'row':28s} {'median s':>9s} {'min s':>8s} {'max s':>8s} {'torch/this':>10s} " \
             f"{'cpu s':>8s} {'torch/this cpu':>14s} " \
             f"{'loss it1':>9s} {'loss last':>9s} {'|g| it1':>8s}  status"
    print(header)
    print("-" * len(header))
    fmt = lambda v, f: format(v, f) if v != "" else "-"
    for r in rows:
        print(f"{r['row']:28s} {fmt(r['median_seconds'], '9.4f')} {fmt(r['min_seconds'], '8.4f')} "
              f"{fmt(r['max_seconds'], '8.4f')} {fmt(r['torch_over_this'], '10.2f')} "
              f"{fmt(r['median_cpu_seconds'], '8.4f')} {fmt(r['torch_over_this_cpu'], '14.2f')} "
              f"{fmt(r['first_meta_loss'], '9.6f')} {fmt(r['last_meta_loss'], '9.6f')} "
              f"{fmt(r['first_grad_norm'], '8.5f')}  {r['status']}")
    if info["note"]:
        print(f"note: {info['note']}")
    print(f"\nsanity: torch meta-loss {torch_losses[0]:.6f} -> {torch_losses[-1]:.6f} over "
          f"{len(torch_losses)} iterations: {'decreases' if torch_decreases else 'DOES NOT DECREASE'}")
    ok_ct = all(r["all_finite"] and r["status"] == "ok" for r in rows if r["framework"] == "ctmeta")
    print(f"sanity: every ctmeta meta-loss finite: {ok_ct}")
    if grad_check is not None:
        print(f"sanity: MAML meta-gradient at the initial weights, torch vs ctmeta Unrolled(steps={steps}): "
              f"relative error {grad_check:.2e}")
    for r in rows:
        if r["framework"] == "ctmeta" and r["first_call_seconds"] != "":
            print(f"{r['row']}: first call (compiles meta_step) {r['first_call_seconds']:.1f} s, not timed")

    csv_path, png_path = out / "compare_higher.csv", out / "compare_higher.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    plot(rows, png_path, f"One meta-iteration: CosMixture 100shot-100val, {B} tasks, MLP 2x32 tanh, "
                         f"K={steps} (h={H}, T={T:g}), float32, 1 CPU core\n{versions}; {jax_versions}")
    print(f"\nwrote {csv_path} and {png_path}")
    return 0 if (torch_decreases and ok_ct) else 1


if __name__ == "__main__":
    sys.exit(main())
