r"""Whole-network A-MAML on Omniglot Conv-4: forward solver, smoothness, cost and accuracy.

A-MAML adapts every weight of the Conv-4 by the gradient flow
$\dot u = -\nabla L(u)$ of the support loss. With the benchmarks' ReLU and
max-pool, $\nabla L$ itself jumps wherever a unit's sign or a pool's argmax
changes, so the vector field is discontinuous: an adaptive solver shrinks its
step at every switch (Dopri5 took 1,067 steps over $T = 0.5$ at atol 1e-8),
every fixed-step solver is first order at best, and the derivative of the flow
map (which has jump terms at each switch) is not what a discretised adjoint
converges to. With softplus and average pooling (`--backbone conv4-smooth`)
the field is smooth and classical RK4 converges at fourth order.

For each network and each rule this measures, on one fixed meta-training task
(float32, the preset's $T$), the time of one meta-gradient (after
compilation) and its relative error $\|g - g_\text{ref}\| / \|g_\text{ref}\|$
against the network's reference: RK4 with the most steps of the list,
backward by the RK4 sweep. Its convergence is shown by the rows beside it
(the error of $K$ against the largest $K$ falls as $K^{-4}$ when the field is
smooth). `backprop` rows differentiate the same RK4 steps exactly (the
discrete map's gradient), the reference the A-MAML authors' own code would
give.

Run: `python -m ctmeta.experiments.image_amaml --ways 5 --out bench-images`.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import time

import jax
import numpy as np

from .. import methods, ode, presets
from ..meta import MetaLearner
from ..losses import accuracy, cross_entropy

NETWORKS = {"conv4": "ReLU, max-pool (the benchmarks' Conv-4)", "conv4-smooth": "softplus, average pool"}
#: (label, steps, method options); steps None is the adaptive rule.
RULES = (
    ("adaptive rtol 1e-4", None, {"rtol": 1e-4, "atol": 1e-5}),
    ("adaptive rtol 1e-5 (the preset)", None, {"rtol": 1e-5, "atol": 1e-6}),
    ("adaptive rtol 1e-5, backward rtol 1e-5", None, {"rtol": 1e-5, "atol": 1e-6, "adjoint_rtol": 1.0,
                                                      "adjoint_atol": 1.0}),
    ("rk4 K=15, rk4 sweep", 15, {"solver": "rk4", "scheme": "rk4"}),
    ("rk4 K=25, heun sweep", 25, {"solver": "rk4", "scheme": "heun"}),
    ("rk4 K=25, rk4 sweep", 25, {"solver": "rk4", "scheme": "rk4"}),
    ("rk4 K=50, rk4 sweep", 50, {"solver": "rk4", "scheme": "rk4"}),
    ("rk4 K=15, backprop", 15, {"solver": "rk4", "backprop": True}),
    ("rk4 K=100, rk4 sweep (reference)", 100, {"solver": "rk4", "scheme": "rk4"}),
)


class _BackpropRK4(methods.AbstractMethod):
    """Backprop through `steps` RK4 steps: the exact gradient of the discrete map."""

    steps: int

    def adapt(self, loss_fn, params, data, T):
        return ode.solve(methods.GradientField(loss_fn), params, T, data, steps=self.steps,
                         sensitivity=ode.Backprop(), solver="rk4")


def _learner(config, family, steps, options):
    config = json.loads(json.dumps(config))
    config["steps"] = steps
    options = dict(options)
    backprop = options.pop("backprop", False)
    if steps is None:
        options.setdefault("dense_steps", 1024)
    config["method_options"] = options
    if not backprop:
        return presets.build_learner(config, family, jax.random.PRNGKey(0))
    model = presets.build_model(config, family, jax.random.PRNGKey(0))
    return MetaLearner(model, _BackpropRK4(steps), presets.build_optimizer(config["optimizer"]), cross_entropy,
                       T=config["T"], metric=accuracy)


def measure(ways: int, data_dir: str, networks=tuple(NETWORKS), rules=RULES, log=print):
    """Rows of `{network, rule, compile_s, time_s, rel_error, loss}`."""
    rows = []
    for net in networks:
        config = presets.resolve_config("omniglot", "amaml", ways=ways, shots=1, meta_batch=1,
                                        data_dir=data_dir, backbone=net, steps=15)
        family = presets.build_family(config, progress=False, log=lambda *a: None)
        batch = family.sample(jax.random.PRNGKey(0), 1, "train")
        grads = {}
        for label, steps, options in rules:
            learner = _learner(config, family, steps, options)
            state = learner.init(jax.random.PRNGKey(0))
            try:
                t0 = time.perf_counter()
                jax.block_until_ready(learner.meta_gradient(state, batch))
                compile_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                loss, g = learner.meta_gradient(state, batch)
                jax.block_until_ready(g)
                run_s = time.perf_counter() - t0
            except Exception as err:  # an unstable sweep or an overflowing dense output is a result
                log(f"{net:13s} {label:34s} failed: {str(err).splitlines()[0][:160]}")
                rows.append({"network": net, "rule": label, "compile_s": None, "time_s": None,
                             "rel_error": None, "loss": None, "note": str(err).splitlines()[0][:200]})
                continue
            grads[label] = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(g)])
            rows.append({"network": net, "rule": label, "compile_s": compile_s, "time_s": run_s,
                         "rel_error": None, "loss": float(loss), "note": ""})
            log(f"{net:13s} {label:34s} {run_s:7.2f} s (compile {compile_s:5.1f} s)  loss {float(loss):.5f}")
        ref = grads.get(rules[-1][0])
        for row in rows:
            if row["network"] == net and ref is not None and row["rule"] in grads:
                row["rel_error"] = float(np.linalg.norm(grads[row["rule"]] - ref) / np.linalg.norm(ref))
    return rows


def markdown(rows, ways: int) -> str:
    lines = [f"Omniglot {ways}-way 1-shot, one task, float32, T = 0.5 (meta-gradient after compilation)", "",
             "| network | rule | time (s) | rel. error vs reference |", "| --- | --- | ---: | ---: |"]
    for r in rows:
        t = "failed" if r["time_s"] is None else f"{r['time_s']:.2f}"
        e = "" if r["rel_error"] is None else ("0 (reference)" if r["rel_error"] == 0 else f"{r['rel_error']:.1e}")
        lines.append(f"| {r['network']} | {r['rule']} | {t} | {e or r['note']} |")
    return "\n".join(lines) + "\n"


def plot(rows, path, ways: int) -> None:
    """Error against time, one point per rule, one colour per network (the reference rows left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runs import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for net, colour in zip(NETWORKS, ("tab:red", "tab:blue")):
        pts = [r for r in rows if r["network"] == net and r["time_s"] is not None and r["rel_error"]]
        if not pts:
            continue
        ax.scatter([r["time_s"] for r in pts], [r["rel_error"] for r in pts], color=colour,
                   label=f"{net}: {NETWORKS[net]}")
        for r in pts:
            ax.annotate(r["rule"].replace(" (the preset)", "*"), (r["time_s"], r["rel_error"]), fontsize=7,
                        xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("meta-gradient of one task (s)")
    ax.set_ylabel("relative error vs the network's reference")
    ax.set_title(f"Whole-network A-MAML, Omniglot {ways}-way 1-shot Conv-4 (* the preset)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def read_csv(path) -> list[dict]:
    """Rows written by `main`, numbers parsed."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k in ("compile_s", "time_s", "rel_error", "loss"):
                r[k] = float(r[k]) if r[k] not in ("", "None") else None
            rows.append(r)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--data-dir", default=None, help="the omniglot folder (default $CTMETA_DATA/omniglot)")
    parser.add_argument("--out", default="bench-images")
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS))
    args = parser.parse_args(argv)
    data_dir = args.data_dir or str(presets.default_data_dir(presets.BENCHMARKS["omniglot"]))
    rows = measure(args.ways, data_dir, networks=tuple(args.networks))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"image_amaml_{args.ways}way.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, args.ways)
    (out / f"image_amaml_{args.ways}way.md").write_text(text)
    plot(rows, out / f"image_amaml_{args.ways}way.png", args.ways)
    print(text)


if __name__ == "__main__":
    main()
