"""Why Reptile beats A-MAML on Alpine at paper scale: is it A-MAML's objective, or
its outer optimisation?

    python scripts/alpine_reptile_vs_amaml.py [RESULTS_DIR] [--setting 100shot-100val]
        [--iterations 300] [--tasks 200] [--path 11] [--seed 0] [--out FILE.json]
    python scripts/alpine_reptile_vs_amaml.py --figure PNG JSON...   # draw committed measurements

Reads the committed paper-scale runs (`RESULTS_DIR/amaml-fig2-alpine/SETTING/{amaml,reptile}`)
and measures, with A-MAML's own learner (same network, horizon T, adaptive adjoint):

1. A-MAML's meta-objective (the query loss after the gradient flow for T on the support
   set) at A-MAML's final initialisation and at Reptile's, averaged over `--tasks`
   meta-*training* tasks (fixed keys, the same tasks for both), and the meta-gradient's
   norm at each;
2. A-MAML's meta-training warm-started from Reptile's initialisation (fresh Adam 1e-3, the
   run's meta-batch and sampler rule), `--iterations` meta-iterations: does A-MAML's own
   meta-gradient keep Reptile's point, improve it, or leave it? The objective of (1) is
   re-measured every 50 iterations, and the meta-test nRMSE after T/lr GD steps on the
   100 fixed test tasks at the start and the end;
3. (`--path N`) the objective of (1) along the segment from A-MAML's initialisation to
   Reptile's, at N evenly spaced points: a rise above both ends is a barrier between them that
   local descent on the objective does not cross.

If Reptile's initialisation is lower on A-MAML's own objective, the objective is not what
makes A-MAML lose: its outer optimisation does not reach that point from where it starts.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import numpy as np
import optax
from scipy import stats

from ctmeta.presets import build
from ctmeta.runs import RunDir


def _load(run_dir: pathlib.Path):
    run = RunDir.open(run_dir)
    config = run.read_config()
    exp = build(config, progress=False, log=lambda *_: None)
    state, _, _ = run.load_latest(exp.learner.init(exp.run_key), config=config)
    return exp, state


def figure(path: str, files: list[str]) -> None:
    """Left: A-MAML's objective along the segment from its initialisation to Reptile's; right:
    A-MAML's meta-training from Reptile's initialisation, against the two initialisations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for f, color in zip(files, ("C0", "C1", "C2")):
        r = json.loads(pathlib.Path(f).read_text())
        if "path" in r:
            a = [q["alpha"] for q in r["path"]]
            m = np.array([q["objective"] for q in r["path"]])
            ci = 1.96 * np.array([q["objective_se"] for q in r["path"]])
            ax1.errorbar(a, m, ci, color=color, marker="o", ms=3, capsize=2, label=r["setting"])
        if "warm_start" in r:
            its = [0] + [q["iteration"] for q in r["warm_start"]["trace"]]
            obj = [r["reptile"]["objective"]] + [q["objective"] for q in r["warm_start"]["trace"]]
            ax2.plot(its, obj, color=color, marker="o", ms=3, label=f"{r['setting']}: from Reptile's init")
            ax2.axhline(r["amaml"]["objective"], color=color, ls="--", lw=1,
                        label=f"{r['setting']}: A-MAML's own init (5,000 its)")
    ax1.set(xlabel="alpha: (1 - alpha) A-MAML init + alpha Reptile init", ylabel="A-MAML objective (query MSE after T)",
            title="A-MAML's objective between the two initialisations")
    ax2.set(xlabel="A-MAML meta-iterations", ylabel="A-MAML objective (query MSE after T)",
            title="A-MAML meta-trained from Reptile's initialisation")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--figure", nargs="+", default=None, metavar="PNG JSON",
                   help="draw the figure PNG from the JSON files this script wrote, and exit")
    p.add_argument("results", nargs="?", default="docs/results")
    p.add_argument("--setting", default="100shot-100val")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--path", type=int, default=0, help="points on the segment (0: none)")
    p.add_argument("--skip-ends", action="store_true", help="skip (1), the two initialisations alone")
    p.add_argument("--seed", type=int, default=0,
                   help="the warm start's task sequence (0: the run's own key; another seed: another sequence)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.figure:
        figure(args.figure[0], args.figure[1:])
        return
    root = pathlib.Path(args.results) / "amaml-fig2-alpine" / args.setting
    exp, amaml_state = _load(root / "amaml")
    _, reptile_state = _load(root / "reptile")
    learner, family, cfg = exp.learner, exp.family, exp.config
    meta_batch = int(cfg["meta_batch"])
    T = float(cfg["T"])
    steps = int(round(T / float(cfg["inner_lr"])))

    # Fixed meta-training tasks for the objective, in meta-batches of the run's size.
    probe = [family.sample(jax.random.PRNGKey(10_000 + i), meta_batch, "train")
             for i in range(max(1, args.tasks // meta_batch))]

    def objective(state):
        losses, norms = [], []
        for batch in probe:
            loss, grads = learner.meta_gradient(state, batch)
            losses.append(float(loss))
            norms.append(float(optax.tree.norm(grads.model)))
        return float(np.mean(losses)), float(np.std(losses) / np.sqrt(len(losses))), float(np.mean(norms))

    test = exp.eval_batch()

    def test_error(state):
        ev = learner.evaluate(state, test, (0, steps), lr=float(cfg["inner_lr"]))
        per_task = np.asarray(ev.per_task)[:, -1]
        return float(per_task.mean()), per_task

    out = {"setting": args.setting, "T": T, "test_steps": steps, "probe_tasks": len(probe) * meta_batch,
           "seed": args.seed}
    t0 = time.time()
    per_task = {}
    for name, state in () if args.skip_ends else (("amaml", amaml_state), ("reptile", reptile_state)):
        obj, se, gnorm = objective(state)
        err, per_task[name] = test_error(state)
        out[name] = {"objective": obj, "objective_se": se, "meta_grad_norm": gnorm, "test_nrmse": err}
        print(f"{name:8s} A-MAML objective on {out['probe_tasks']} training tasks {obj:.5f} ± {1.96 * se:.5f}, "
              f"meta-gradient norm {gnorm:.4f}, test nRMSE after {steps} steps {err:.4f}", flush=True)

    if args.path:
        import equinox as eqx

        a_model, r_model = (eqx.filter(learner.model(s), eqx.is_inexact_array) for s in (amaml_state, reptile_state))
        out["path"] = []
        for alpha in np.linspace(0.0, 1.0, args.path):
            mixed = jax.tree.map(lambda a, r: (1 - alpha) * a + alpha * r, a_model, r_model)
            state = learner.init(jax.random.PRNGKey(0), model=eqx.combine(mixed, learner.model(amaml_state)))
            obj, se, gnorm = objective(state)
            out["path"].append({"alpha": float(alpha), "objective": obj, "objective_se": se, "meta_grad_norm": gnorm})
            print(f"segment alpha {alpha:.2f} (0: A-MAML, 1: Reptile): objective {obj:.5f} ± {1.96 * se:.5f}, "
                  f"meta-gradient norm {gnorm:.4f} ({time.time() - t0:.0f} s)", flush=True)

    if args.iterations > 0:
        out["warm_start"] = warm_start(learner, family, cfg, reptile_state, args.iterations, objective, t0, args.seed)
        err, warm = test_error(out["warm_start"].pop("state"))
        out["warm_start"]["test_nrmse"] = err
        line = f"warm start after {args.iterations}: test nRMSE after {steps} steps {err:.4f}"
        if "reptile" in per_task:  # paired over the same test tasks
            p = float(stats.wilcoxon(warm, per_task["reptile"]).pvalue)
            out["warm_start"]["wilcoxon_p_vs_reptile"] = p
            out["warm_start"]["tasks_lower_than_reptile"] = int(np.sum(warm < per_task["reptile"]))
            line += (f" (Reptile's {out['reptile']['test_nrmse']:.4f}: lower on "
                     f"{out['warm_start']['tasks_lower_than_reptile']}/{len(warm)} tasks, Wilcoxon p {p:.2g})")
        print(line, flush=True)
    out["seconds"] = time.time() - t0
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


def warm_start(learner, family, cfg, reptile_state, iterations, objective, t0, seed: int = 0) -> dict:
    """A-MAML's meta-training from Reptile's initialisation (fresh optimiser state, the runs'
    sampler rule), the objective every 50 iterations; the final state under "state".
    `seed` > 0 draws another sequence of meta-training tasks."""
    meta_batch = int(cfg["meta_batch"])
    key = jax.random.PRNGKey(int(cfg["seed"]))
    state = learner.init(jax.random.fold_in(key, seed) if seed else key, model=learner.model(reptile_state))
    trace = []
    for i in range(1, iterations + 1):
        batch = family.sample(jax.random.fold_in(state.key, i), meta_batch, "train")
        state, _ = learner.meta_step(state, batch)
        if i % 50 == 0 or i == iterations:
            obj, se, gnorm = objective(state)
            trace.append({"iteration": i, "objective": obj, "objective_se": se, "meta_grad_norm": gnorm})
            print(f"warm start, iteration {i}: objective {obj:.5f} ± {1.96 * se:.5f}, "
                  f"meta-gradient norm {gnorm:.4f} ({time.time() - t0:.0f} s)", flush=True)
    return {"trace": trace, "iterations": iterations, "state": state}


if __name__ == "__main__":
    main()
