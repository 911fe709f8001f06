"""Benchmark presets: which task family, model, loss, metric and method
defaults each benchmark of the papers uses, and how a run's configuration
(a JSON-able dict) becomes a task family and a [`MetaLearner`][ctmeta.meta.MetaLearner].

Resolution is pure Python (no JAX work), so the command line can check every
flag before anything is compiled: [`resolve_config`][] fills in the
defaults and validates; [`build`][] makes the objects.

Horizon and steps (the papers' convention $T = K h$, $K$ = `steps`, $h = 0.01$):

- `amaml`: `T` is the horizon of the gradient flow (`T = 2` of A-MAML Sec. 5.1
  for the regressions, 0.5 for the ratings and images). Without `steps` the
  adjoint is solved backward adaptively over the forward's dense output
  (`Adjoint()`), on every benchmark (on images, over the smooth Conv-4);
  `steps = K` selects the paper's sweep over `K` stored states (`h = T / K`),
  and `solver="rk4"` without `steps` takes `K = T / 0.01` fixed RK4 steps.
- `maml`, `fomaml`, `reptile`, `imaml`, `anil`: `steps` gradient steps with
  learning rate `h = T / steps`; without `T`, `T = steps * h` with the
  benchmark's inner learning rate `h` (0.01).
- `comln`: `T` is the *initial* horizon, learned as `exp(log_T)`; the head
  flow uses Dopri5, or Euler with `steps` fixed steps.

Outer optimiser (the configuration's `optimizer` entry, see
[`optimizer_config`][]): each paper's own. A-MAML (Sec. 5) meta-trains every
method with Adam at learning rate 1e-3; COMLN (Appendix E.5) meta-trains every
method of its Table 2 with SGD, Nesterov momentum 0.9, learning rate 0.1
decreased by Lee et al. (2019)'s step schedule. So `comln` and `anil` (the
methods only COMLN runs) default to COMLN's SGD and the others to Adam;
`optimizer` picks either protocol for any method.

Backbone (images only): Conv-4 by default, or ResNet-12 (MetaOptNet's,
without global pooling: 16,000 features on 84x84 inputs, COMLN's setting).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from ._errors import DataError, InputError, check_positive, check_positive_int
from ._paths import dataset_dir
from .optimizers import LR_SCHEDULES, OPTIMIZERS, build_optimizer, learning_rate_schedule, optimizer_spec

__all__ = ["BACKBONES", "BENCHMARKS", "METHODS", "BenchmarkPreset", "Experiment", "build", "build_learner",
           "check_config", "optimizer_config", "resolve_config"]
# The optimiser's names live in ctmeta.optimizers; imported above for the callers of presets.


@dataclasses.dataclass(frozen=True)
class BenchmarkPreset:
    """The defaults of one benchmark."""

    name: str
    kind: str  # "regression" | "ratings" | "images"
    description: str
    shots: int
    queries: int
    ways: int | None
    T: float  # A-MAML's horizon
    steps: int  # A-MAML's stored states; FOMAML/Reptile/iMAML's GD steps
    maml_steps: int  # MAML's and ANIL's unrolled steps
    meta_iterations: int
    meta_batch: int
    eval_steps: tuple[int, ...]  # the final table's columns
    eval_every: int  # spacing of the error-vs-steps curve
    eval_tasks: int = 100
    inner_lr: float = 0.01
    outer_lr: float = 1e-3
    data_subdir: str | None = None
    comln_T: float = 0.1
    # A-MAML's adaptive rule: the most accepted forward steps its dense output holds
    # (3 states each). Measured at initialisation (float32, rtol 1e-5): CosMixture
    # 15 (T=2) / 32 (T=5), Alpine 49 (T=2) / 185 (T=5), MovieLens 12 and Jester 22
    # (T=0.5); meta-training sharpens Alpine's flow, hence its margin.
    dense_steps: int = 128


BENCHMARKS: dict[str, BenchmarkPreset] = {
    "cosmixture": BenchmarkPreset(
        "cosmixture", "regression", "CosMixture 2-D regression (A-MAML Sec. 5.1)",
        shots=50, queries=50, ways=None, T=2.0, steps=200, maml_steps=20,
        meta_iterations=1000, meta_batch=5, eval_steps=(0, 50, 200), eval_every=10,
    ),
    "alpine": BenchmarkPreset(
        "alpine", "regression", "Alpine 2-D regression (A-MAML Sec. 5.1)",
        shots=50, queries=50, ways=None, T=2.0, steps=200, maml_steps=20,
        meta_iterations=1000, meta_batch=5, eval_steps=(0, 50, 200), eval_every=10, dense_steps=1024,
    ),
    "movielens": BenchmarkPreset(
        "movielens", "ratings", "MovieLens-100K rating prediction (A-MAML Sec. 5.3)",
        shots=10, queries=15, ways=None, T=0.5, steps=50, maml_steps=5,
        meta_iterations=1000, meta_batch=5, eval_steps=(0, 50, 100), eval_every=10,
        data_subdir="movielens",
    ),
    "movielens-1m": BenchmarkPreset(
        "movielens-1m", "ratings", "MovieLens-1M rating prediction (A-MAML Sec. 5.3)",
        shots=10, queries=15, ways=None, T=0.5, steps=50, maml_steps=5,
        meta_iterations=1000, meta_batch=5, eval_steps=(0, 50, 100), eval_every=10,
        data_subdir="movielens",
    ),
    "jester": BenchmarkPreset(
        "jester", "ratings", "Jester-1 joke rating prediction (A-MAML Sec. 5.3)",
        shots=10, queries=15, ways=None, T=0.5, steps=50, maml_steps=5,
        meta_iterations=1000, meta_batch=5, eval_steps=(0, 50, 100), eval_every=10,
        data_subdir="jester",
    ),
    "omniglot": BenchmarkPreset(
        "omniglot", "images", "Omniglot 20-way 1-shot classification (A-MAML Table 3)",
        shots=1, queries=5, ways=20, T=0.5, steps=50, maml_steps=5,
        meta_iterations=1000, meta_batch=4, eval_steps=(0, 10, 50, 100), eval_every=10,
        data_subdir="omniglot", dense_steps=256,
    ),
    "miniimagenet": BenchmarkPreset(
        "miniimagenet", "images", "miniImageNet 5-way 1-shot classification (A-MAML Table 3, COMLN)",
        shots=1, queries=15, ways=5, T=0.5, steps=50, maml_steps=5,
        meta_iterations=1000, meta_batch=4, eval_steps=(0, 10, 50, 100), eval_every=10,
        data_subdir="miniimagenet", dense_steps=256,
    ),
}

METHODS: dict[str, str] = {
    "amaml": "A-MAML: gradient flow, adjoint meta-gradient (adaptive backward; --steps K: K stored states)",
    "maml": "MAML: backprop through --steps unrolled GD steps",
    "fomaml": "first-order MAML",
    "reptile": "Reptile (theta - u_K as the outer direction)",
    "imaml": "iMAML: proximal inner loss (lam=1), 5 CG steps",
    "anil": "ANIL: unrolled GD on a linear head over a Conv-4 (or ResNet-12) embedding",
    "comln": "COMLN: gradient flow of a linear head, learned horizon T",
}

HEAD_METHODS = ("anil", "comln")
DISCRETE_METHODS = ("maml", "fomaml", "reptile", "imaml", "anil")

#: Embedding networks of the image benchmarks.
BACKBONES: dict[str, str] = {
    "conv4": "Conv-4: 4 x [conv3x3, batch norm, ReLU, max-pool]",
    "conv4-smooth": "Conv-4 with softplus and average pooling: a smooth gradient flow (A-MAML's default on images)",
    "resnet12": "ResNet-12: 64-160-320-640 channels, no global pooling (16,000 features on 84x84)",
}
def default_data_dir(preset: BenchmarkPreset) -> pathlib.Path:
    """`$CTMETA_DATA/<subdir>` if set, else `./data/<subdir>` (see `ctmeta._paths`)."""
    return dataset_dir(preset.data_subdir or preset.name)


def resolve_config(
    benchmark: str | None = None,
    method: str | None = None,
    *,
    T: float | None = None,
    steps: int | None = None,
    meta_iterations: int | None = None,
    meta_batch: int | None = None,
    ways: int | None = None,
    shots: int | None = None,
    data_dir: str | None = None,
    seed: int | None = None,
    checkpoint_every: int | None = None,
    optimizer: str | None = None,
    meta_lr: float | None = None,
    lr_schedule: str | None = None,
    backbone: str | None = None,
    solver: str | None = None,
    flow: str | None = None,
) -> dict[str, Any]:
    """Validate the user's choices and fill in the benchmark's and method's
    defaults. Returns the run configuration (JSON-able). Pure Python.

    `optimizer` (`"adam"` or `"sgd"`), `meta_lr` and `lr_schedule` (`"none"`,
    `"step"`, `"cosine"`) choose the outer optimiser (see
    [`optimizer_config`][]); `backbone` (`"conv4"`, `"conv4-smooth"` or `"resnet12"`) the
    embedding network of the image benchmarks; `solver` (`"dopri5"`,
    `"rkc2"` or `"rk4"`, A-MAML only) the forward solver of the inner flow; `flow`
    (`"gradient"`, `"preconditioned"` or `"heavy-ball"`, see `ctmeta.flows`)
    the inner flow, whose meta-parameters are learned (so only with the
    methods that differentiate them: amaml, maml, anil)."""
    benchmark, method = _check_names(benchmark, method)
    p = BENCHMARKS[benchmark]
    T, steps, meta_iterations, meta_batch, seed, checkpoint_every = _check_numbers(
        T, steps, meta_iterations, meta_batch, seed, checkpoint_every, p)
    ways, shots, backbone = _check_architecture(p, method, ways, shots, backbone, solver)
    if solver == "rkc2" and steps is not None:
        raise InputError("`solver` rkc2 is adaptive (the adjoint is solved over its dense output): drop `steps`")
    if solver == "rkc2" and flow == "heavy-ball":
        raise InputError("`solver` rkc2 needs a flow with a symmetric Jacobian (gradient or preconditioned); "
                         "heavy-ball's is not: use dopri5")
    opt = optimizer_config(method, optimizer, meta_lr, lr_schedule, meta_iterations, adam_lr=p.outer_lr)
    flow_spec = flow_config(method, flow)
    n_shots, n_queries, n_ways = _task_sizes(p, ways, shots, meta_batch)
    horizon, n_steps, learn_T, method_solver = _horizon_and_steps(p, method, T, steps, solver)
    resolved_data = _resolved_data_dir(p, data_dir)

    from . import __version__

    return {
        "ctmeta_version": __version__,
        "benchmark": benchmark,
        "method": method,
        "T": horizon,
        "learn_T": learn_T,
        "steps": n_steps,
        "inner_lr": p.inner_lr,
        "meta_iterations": meta_iterations,
        "meta_batch": meta_batch,
        "ways": n_ways,
        "shots": n_shots,
        "queries": n_queries,
        "data_dir": resolved_data,
        "seed": seed,
        "checkpoint_every": checkpoint_every,
        "optimizer": opt,
        "backbone": backbone,
        "model": _model_config(p, method, backbone),
        "method_options": _method_options(p, method, n_steps, method_solver),
        "flow": flow_spec,
        "eval": _eval_config(p),
    }


def _check_names(benchmark: str | None, method: str | None) -> tuple[str, str]:
    """The benchmark and the method, by default cosmixture and amaml."""
    benchmark = benchmark or "cosmixture"
    method = method or "amaml"
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return benchmark, method


def _check_numbers(T, steps, meta_iterations, meta_batch, seed, checkpoint_every, p: BenchmarkPreset) -> tuple:
    """`T` and `steps` checked (`None` stays `None`: the method decides), and the
    run's length, meta-batch, seed and checkpoint spacing checked or defaulted."""
    if T is not None:
        T = check_positive("`T`", T)
    if steps is not None:
        steps = check_positive_int("`steps`", steps)
    meta_iterations = check_positive_int("`meta_iterations`", p.meta_iterations if meta_iterations is None else meta_iterations)
    meta_batch = check_positive_int("`meta_batch`", p.meta_batch if meta_batch is None else meta_batch)
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"`seed` must be a non-negative integer, got {seed!r}")
    if checkpoint_every is None:
        checkpoint_every = max(1, meta_iterations // 5)
    checkpoint_every = check_positive_int("`checkpoint_every`", checkpoint_every)
    return T, steps, meta_iterations, meta_batch, seed, checkpoint_every


def _check_architecture(p: BenchmarkPreset, method: str, ways, shots, backbone, solver) -> tuple:
    """What fits the benchmark's kind: a head method and `ways` on images only,
    the backbone (defaulted on images), A-MAML's forward solver. Returns
    `(ways, shots, backbone)`."""
    benchmark = p.name
    if method in HEAD_METHODS and p.kind != "images":
        raise InputError(
            f"`method` {method} adapts a linear softmax head on an image embedding (Conv-4, ResNet-12): "
            "use it with `benchmark` omniglot or miniimagenet"
        )
    if ways is not None:
        ways = check_positive_int("`ways`", ways)
        if p.kind != "images":
            raise InputError(f"`ways` applies to classification benchmarks (omniglot, miniimagenet), not {benchmark}")
        if ways < 2:
            raise InputError(f"`ways` must be at least 2, got {ways}")
    if shots is not None:
        shots = check_positive_int("`shots`", shots)
    if backbone is not None:
        if backbone not in BACKBONES:
            raise InputError(f"unknown `backbone` {backbone!r}; choose from {', '.join(BACKBONES)}")
        if p.kind != "images":
            raise InputError(
                f"`backbone` applies to the image benchmarks (omniglot, miniimagenet), not {benchmark}"
            )
    elif p.kind == "images":
        backbone = "conv4-smooth" if method == "amaml" else "conv4"
    if solver is not None:
        if method != "amaml":
            raise InputError(f"`solver` applies to `method` amaml (the gradient flow's forward solver), not {method}")
        if solver not in ("dopri5", "rkc2", "rk4"):
            raise InputError(f"unknown `solver` {solver!r}; choose from dopri5, rkc2, rk4")
    return ways, shots, backbone


def _task_sizes(p: BenchmarkPreset, ways, shots, meta_batch: int) -> tuple:
    """`(shots, queries, ways)` of a task: the regressions take as many queries as
    shots (50shot-50val), the ratings 1.5 times as many (10shot-15val)."""
    n_shots = p.shots if shots is None else shots
    if p.kind == "regression":
        n_queries = p.queries if shots is None else shots  # 50shot-50val, 100shot-100val
        if meta_batch > 100:
            raise InputError(f"`meta_batch` {meta_batch} exceeds the 100 meta-training tasks of {p.name}")
    elif p.kind == "ratings":
        n_queries = p.queries if shots is None else max(1, (3 * shots) // 2)  # 10shot-15val, 20shot-30val
    else:
        n_queries = p.queries
    n_ways = (p.ways if ways is None else ways) if p.kind == "images" else None
    return n_shots, n_queries, n_ways


def _horizon_and_steps(p: BenchmarkPreset, method: str, T, steps, solver) -> tuple:
    """`(T, steps, learn_T, solver)` of the method (see the module docstring);
    `solver` is A-MAML's forward solver or COMLN's head solver, else `None`."""
    if method == "amaml":
        # None: the adaptive backward; K: the stored sweep over K states (after K fixed
        # RK4 steps with solver "rk4", h = T/K; by default the preset's h = 0.01). On
        # images the adaptive rule runs on the smooth Conv-4 (see _model_config): a
        # fixed step is stable only below 2.785 / lambda_max, and lambda_max grows
        # past 80 within one meta-step on Omniglot (docs/bench.md).
        solver = solver or "dopri5"
        if steps is None and solver == "rk4":
            steps = p.steps
        return (p.T if T is None else T), steps, False, solver
    if method == "comln":  # steps None: Dopri5; K: Euler with K steps
        return (p.comln_T if T is None else T), steps, True, ("dopri5" if steps is None else "euler")
    default_steps = p.maml_steps if method in ("maml", "anil") else p.steps
    n_steps = default_steps if steps is None else steps
    return (n_steps * p.inner_lr if T is None else T), n_steps, False, None


def _resolved_data_dir(p: BenchmarkPreset, data_dir) -> str | None:
    """The absolute folder of the benchmark's data set (`None` for a synthetic one)."""
    benchmark = p.name
    if p.data_subdir is None:
        if data_dir is not None:
            raise InputError(f"`data_dir` is not used by {benchmark} (its tasks are synthetic)")
        return None
    path = dataset_dir(p.data_subdir, data_dir) if data_dir else default_data_dir(p)
    if not path.exists():
        if data_dir:  # what was given, and what was looked for in it
            raise DataError(f"`data_dir` {data_dir} does not exist (for {benchmark} it is the data root holding "
                            f"{p.data_subdir}/, or that {p.data_subdir} folder itself)")
        raise DataError(f"{benchmark} data directory {path} does not exist (the default; pass `data_dir` DIR, "
                        f"the data root holding {p.data_subdir}/, or set $CTMETA_DATA)")
    return str(path.resolve())


def _method_options(p: BenchmarkPreset, method: str, n_steps, solver) -> dict[str, Any]:
    """The configuration's `method_options`: the rule's tolerances and solvers."""
    if method == "imaml":
        return {"lam": 1.0, "cg_steps": 5}
    if method == "amaml":
        # Images: float32 Conv-4 weights of size ~0.1 resolve ~1e-8, so atol 1e-8 asks
        # for rounding (and rtol 1e-5 is float32's floor, see ode.effective_rtol).
        tol = {"rtol": 1e-5, "atol": 1e-6} if p.kind == "images" else {"rtol": 1e-6, "atol": 1e-8}
        if n_steps is None:
            options = {**tol, "dense_steps": p.dense_steps}
            if solver != "dopri5":  # dopri5 is implied (configs written before rkc2 have no key)
                options["solver"] = solver
            return options
        # The stored sweep: Heun (the paper's) after Dopri5, RK4 after RK4.
        return {**tol, "solver": solver, "scheme": "rk4" if solver == "rk4" else "heun"}
    if method == "comln":
        return {"lam": 0.0, "solver": solver}
    return {}


def _eval_config(p: BenchmarkPreset) -> dict[str, Any]:
    """The configuration's `eval`: the final table's steps, the error-vs-steps curve,
    the learning rate of the adaptation, the number of meta-test tasks and the metric."""
    eval_steps = list(p.eval_steps)
    curve = sorted(set(range(0, max(eval_steps) + 1, p.eval_every)) | set(eval_steps))
    return {
        "steps": eval_steps,
        "curve": curve,
        "lr": p.inner_lr,
        "tasks": p.eval_tasks,
        "metric": "nrmse" if p.kind != "images" else "accuracy",
    }


def optimizer_config(
    method: str,
    name: str | None = None,
    learning_rate: float | None = None,
    schedule: str | None = None,
    meta_iterations: int = 1000,
    *,
    adam_lr: float = 1e-3,
) -> dict[str, Any]:
    """The configuration's `optimizer` entry: the outer optimiser of `method`.

    `name=None` takes the protocol of the paper that runs the method: COMLN's
    SGD for `comln` and `anil`, A-MAML's Adam for the others. Each name
    brings its paper's defaults, which `learning_rate` and `schedule`
    override:

    - `"adam"`: `{"name": "adam", "learning_rate": 1e-3, "schedule": None}`.
    - `"sgd"`: `{"name": "sgd", "learning_rate": 0.1, "momentum": 0.9,
      "nesterov": True, "schedule": "step"}`.

    With a schedule (`"step"`: Lee et al.'s; `"cosine"`), `decay_steps` is
    its length, the run's `meta_iterations`, fixed when the run is created
    (so a resumed run follows the same schedule). Pure Python.
    """
    if name is None:
        name = "sgd" if method in HEAD_METHODS else "adam"
    return optimizer_spec(name, learning_rate, schedule, meta_iterations, adam_lr=adam_lr)


def _model_config(p: BenchmarkPreset, method: str, backbone: str | None = None) -> dict[str, Any]:
    if p.name == "alpine":
        # Inputs in [-10, 10]^2 are divided by 10: unscaled, the Hessian of the
        # task loss reaches eigenvalues ~300 > 2/h along the flow, where GD at
        # h = 0.01 oscillates and the adjoint's Heun sweep (and MAML's
        # unrolled product) blows up.
        return {"name": "mlp", "width": 32, "depth": 2, "activation": "tanh", "input_scale": 0.1}
    if p.kind == "regression":
        return {"name": "mlp", "width": 32, "depth": 2, "activation": "tanh"}
    if p.kind == "ratings":
        return {"name": "mlp", "width": 40, "depth": 2, "activation": "tanh"}
    if backbone == "resnet12":
        # COMLN's (App. E.5, after Lee et al.): no global pooling; leaky ReLU 0.1.
        resnet = {"channels": [64, 160, 320, 640], "global_pool": False}
        if method in HEAD_METHODS:
            return {"name": "resnet12-embedding+linear-head", **resnet, "head_init": "zeros"}
        # Whole-network adaptation (MAML & co): a bias-free linear head on top.
        return {"name": "resnet12+linear-head", **resnet, "head_init": "uniform"}
    hidden = 64 if p.name == "omniglot" else 32
    smooth = {"activation": "softplus", "pool": "avg"} if backbone == "conv4-smooth" else {}
    if method in HEAD_METHODS:
        return {"name": "conv4-embedding+linear-head", "hidden": hidden, **smooth, "head_init": "zeros"}
    return {"name": "conv4", "hidden": hidden, **smooth}


# --------------------------------------------------------------------------- #
# Checking a saved configuration (a run's config.json)
# --------------------------------------------------------------------------- #

_ACTIVATIONS = ("tanh", "relu", "softplus", "gelu")
_MODEL_NAMES = ("mlp", "conv4", "conv4-embedding+linear-head", "resnet12-embedding+linear-head", "resnet12+linear-head")
_MISSING = object()


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    import math

    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _quoted(names) -> str:
    return ", ".join(f'"{n}"' for n in names)


def _one_of(names):
    return (lambda x: isinstance(x, str) and x in names), "one of " + _quoted(names)


_POSITIVE_INT = (lambda x: _is_int(x) and x >= 1), "a positive integer"
_NON_NEGATIVE_INT = (lambda x: _is_int(x) and x >= 0), "an integer >= 0"
_POSITIVE = (lambda x: _is_number(x) and x > 0), "a positive, finite number"
_NON_NEGATIVE = (lambda x: _is_number(x) and x >= 0), "a finite number >= 0"
_BOOL = (lambda x: isinstance(x, bool)), "true or false"
_STRING = (lambda x: isinstance(x, str) and x != ""), "a non-empty string"
_STEP_LIST = (lambda x: isinstance(x, list) and bool(x) and all(_is_int(i) and i >= 0 for i in x),
              "a non-empty list of integers >= 0")


def _nullable(check):
    test, words = check
    return (lambda x: x is None or test(x)), f"null or {words}"


def check_config(config, where: str = "the configuration", error: type[Exception] = InputError) -> dict:
    """Refuse a configuration (a run's `config.json`, say) that
    [`build`][ctmeta.presets.build] and the commands cannot use: a missing
    entry, or one of the wrong type or out of range, named with what was
    expected, e.g. `config.json: "shots" is missing; expected a positive
    integer`. Returns `config`. Pure Python.

    Checks what [`resolve_config`][] writes, not that the values agree with
    one another (a configuration may differ from the presets on purpose:
    `ctmeta reproduce` changes its evaluation, for one)."""

    def fail(key, value, expected):
        got = "is missing" if value is _MISSING else f"is {json_repr(value)}"
        raise error(f"{where}: \"{key}\" {got}; expected {expected}")

    def need(mapping, key, check, prefix=""):
        value = mapping.get(key, _MISSING)
        test, words = check
        if value is _MISSING or not test(value):
            fail(prefix + key, value, words)
        return value

    def optional(mapping, key, check, prefix=""):
        if key in mapping:
            need(mapping, key, check, prefix)

    if not isinstance(config, dict):
        raise error(f"{where} is not a JSON object of a run's configuration")
    benchmark = need(config, "benchmark", _one_of(tuple(BENCHMARKS)))
    method = need(config, "method", _one_of(tuple(METHODS)))
    preset = BENCHMARKS[benchmark]
    need(config, "T", _POSITIVE)
    need(config, "learn_T", (lambda x: isinstance(x, bool) or x == "per-task", "true, false or \"per-task\""))
    need(config, "steps", _POSITIVE_INT if method in DISCRETE_METHODS else _nullable(_POSITIVE_INT))
    for key in ("meta_iterations", "meta_batch", "shots", "queries", "checkpoint_every"):
        need(config, key, _POSITIVE_INT)
    if preset.kind == "images":
        need(config, "ways", ((lambda x: _is_int(x) and x >= 2), "an integer >= 2 (classes per task)"))
    else:
        need(config, "ways", ((lambda x: x is None), f"null ({benchmark} is not a classification benchmark)"))
    if preset.data_subdir is not None:
        need(config, "data_dir", (_STRING[0], f"the directory of {benchmark}'s data (a string)"))
    need(config, "seed", ((lambda x: _is_int(x) and 0 <= x <= 2**32 - 1), "an integer in 0..4294967295"))
    optional(config, "inner_lr", _POSITIVE)
    optional(config, "on_nonfinite", _one_of(("error", "skip-task")))
    optional(config, "keep_checkpoints", ((lambda x: isinstance(x, list) and all(_is_int(i) and i >= 1 for i in x)),
                                          "a list of positive meta-iterations"))
    optional(config, "backbone", _nullable(_one_of(tuple(BACKBONES))))
    optional(config, "dtype", _one_of(("float32", "float64")))
    opt = need(config, "optimizer", ((lambda x: isinstance(x, dict)), f"an object with a \"name\" ({', '.join(OPTIMIZERS)})"))
    need(opt, "name", _one_of(tuple(OPTIMIZERS)), "optimizer.")
    need(opt, "learning_rate", _POSITIVE, "optimizer.")
    schedule = need(opt, "schedule", _nullable(_one_of(tuple(k for k in LR_SCHEDULES if k != "none"))), "optimizer.")
    if schedule is not None:
        need(opt, "decay_steps", _POSITIVE_INT, "optimizer.")
    optional(opt, "momentum", ((lambda x: _is_number(x) and 0 <= x < 1), "a number in [0, 1)"), "optimizer.")
    optional(opt, "nesterov", _BOOL, "optimizer.")

    model = need(config, "model", ((lambda x: isinstance(x, dict)), "an object with a \"name\""))
    name = need(model, "name", _one_of(_MODEL_NAMES), "model.")
    if name == "mlp":
        for key in ("width", "depth"):
            need(model, key, _POSITIVE_INT, "model.")
        need(model, "activation", _one_of(_ACTIVATIONS), "model.")
        optional(model, "input_scale", _POSITIVE, "model.")
    elif name.startswith("conv4"):
        need(model, "hidden", _POSITIVE_INT, "model.")
        optional(model, "activation", _one_of(_ACTIVATIONS), "model.")
        optional(model, "pool", _one_of(("max", "avg")), "model.")
    else:
        need(model, "channels", ((lambda x: isinstance(x, list) and len(x) == 4 and all(_is_int(c) and c >= 1 for c in x)),
                                 "a list of 4 positive integers"), "model.")
        need(model, "global_pool", _BOOL, "model.")
    if preset.kind != "images" and name != "mlp":
        fail("model.name", name, f"\"mlp\" for {benchmark}")
    if preset.kind == "images" and name == "mlp":
        fail("model.name", name, f"an image network ({_quoted(_MODEL_NAMES[1:])}) for {benchmark}")

    options = config.get("method_options", {})
    if not isinstance(options, dict):
        fail("method_options", options, "an object")
    for key in ("rtol", "atol", "adjoint_rtol", "adjoint_atol"):
        optional(options, key, _POSITIVE, "method_options.")
    for key in ("dense_steps", "cg_steps"):
        optional(options, key, _POSITIVE_INT, "method_options.")
    optional(options, "lam", _NON_NEGATIVE, "method_options.")
    optional(options, "solver", _one_of(("dopri5", "rkc2", "rk4") if method == "amaml" else ("dopri5", "euler")),
             "method_options.")
    optional(options, "scheme", _one_of(("heun", "rk4")), "method_options.")
    optional(options, "error_scale", _one_of(("state", "displacement")), "method_options.")
    if method == "amaml" and options.get("solver") == "rkc2" and config["steps"] is not None:
        fail("steps", config["steps"], "null (the rkc2 solver is adaptive)")
    if method == "comln" and options.get("solver") == "euler" and config["steps"] is None:
        fail("steps", None, "a positive integer (COMLN's Euler steps)")

    flow = config.get("flow", {"name": "gradient"})
    if not isinstance(flow, dict):
        fail("flow", flow, f"an object with a \"name\" ({', '.join(FLOW_NAMES)})")
    optional(flow, "name", _one_of(FLOW_NAMES), "flow.")
    optional(flow, "scale", _POSITIVE, "flow.")
    optional(flow, "gamma", _POSITIVE, "flow.")
    optional(flow, "per", _one_of(("parameter", "layer")), "flow.")

    ev = need(config, "eval", ((lambda x: isinstance(x, dict)), "an object (steps, curve, lr, tasks, metric)"))
    need(ev, "steps", _STEP_LIST, "eval.")
    need(ev, "curve", _STEP_LIST, "eval.")
    need(ev, "lr", _POSITIVE, "eval.")
    need(ev, "tasks", _POSITIVE_INT, "eval.")
    optional(ev, "metric", _one_of(("nrmse", "accuracy")), "eval.")
    return config


def json_repr(value) -> str:
    """`value` as config.json spells it (`"two"`, `null`, `true`), cut to 60 characters."""
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- #
# Building the objects (JAX from here on)
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Experiment:
    """What a run needs: the task family, the learner, the evaluation tasks."""

    config: dict
    family: Any
    learner: Any
    model_key: Any
    run_key: Any
    lower_is_better: bool
    metric_name: str
    eval_chunk: int | None
    _eval_batch: Any = None

    def eval_batch(self):
        """The fixed meta-test tasks (the same for every method and seed)."""
        if self._eval_batch is None:
            import jax

            fam = self.family
            if hasattr(fam, "test_batch"):
                self._eval_batch = fam.test_batch()
            else:
                key = jax.random.PRNGKey(2**31 - 1)
                self._eval_batch = fam.sample(key, int(self.config["eval"]["tasks"]), "test")
        return self._eval_batch

    def limit_eval_tasks(self, n: int) -> None:
        """Keep the first `n` of the fixed meta-test tasks (all of them if there are fewer)."""
        import jax

        batch = self.eval_batch()
        if n < jax.tree.leaves(batch)[0].shape[0]:
            self._eval_batch = type(batch)(*jax.tree.map(lambda a: a[:n], tuple(batch)))


def _activation(name: str):
    import jax
    import jax.numpy as jnp

    return {"tanh": jnp.tanh, "relu": jax.nn.relu, "softplus": jax.nn.softplus, "gelu": jax.nn.gelu}[name]


def build_family(config: dict, *, progress: bool = True, log=print):
    """The task family of a configuration (may update `config["data_options"]`)."""
    b = config["benchmark"]
    if b in ("cosmixture", "alpine"):
        from .tasks.regression import Alpine, CosMixture

        cls = CosMixture if b == "cosmixture" else Alpine
        return cls(shots=config["shots"], queries=config["queries"], seed=0)
    if b in ("movielens", "movielens-1m"):
        from .tasks.ratings import MovieLens

        return MovieLens(
            config["data_dir"], "100k" if b == "movielens" else "1m",
            shots=config["shots"], queries=config["queries"], seed=0,
        )
    if b == "jester":
        from .tasks.ratings import Jester

        return Jester(config["data_dir"], shots=config["shots"], queries=config["queries"], seed=0)
    if b == "omniglot":
        from .tasks.omniglot import Omniglot

        return Omniglot(
            config["data_dir"], ways=config["ways"], shots=config["shots"], queries=config["queries"],
            progress=progress,
        )
    if b == "miniimagenet":
        from .tasks.miniimagenet import MiniImageNet

        opts = config.setdefault("data_options", {})
        protocol = opts.get("protocol")
        kwargs = dict(ways=config["ways"], shots=config["shots"], queries=config["queries"], progress=progress)
        if protocol is not None:
            return MiniImageNet(config["data_dir"], protocol=protocol, **kwargs)
        try:
            fam = MiniImageNet(config["data_dir"], protocol="ravi", **kwargs)
            opts["protocol"] = "ravi"
        except DataError as err:
            # Copies with only the 64 training classes: split them 48/16.
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            log(
                f"warning: miniImageNet's standard (Ravi & Larochelle) split is not available ({first[:200]}); "
                "using protocol='train64' (48/16 of the 64 training classes): results are not "
                "comparable with published miniImageNet numbers."
            )
            fam = MiniImageNet(config["data_dir"], protocol="train64", **kwargs)
            opts["protocol"] = "train64"
        return fam
    raise InputError(f"unknown benchmark {b!r}")


#: The inner flows by name, and the methods that learn them (Adjoint, Unrolled).
FLOW_NAMES = ("gradient", "preconditioned", "heavy-ball")
FLOW_METHODS = ("amaml", "maml", "anil")


def flow_config(method: str, flow: str | None) -> dict[str, Any]:
    """The `flow` entry of a configuration: its name and initial meta-parameters."""
    flow = flow or "gradient"
    if flow not in FLOW_NAMES:
        raise InputError(f"unknown `flow` {flow!r}; choose from {', '.join(FLOW_NAMES)}")
    if flow != "gradient" and method not in FLOW_METHODS:
        raise InputError(f"`flow` {flow} is meta-learned, which needs a `method` that differentiates it "
                         f"({', '.join(FLOW_METHODS)}); {method} does not")
    if flow == "preconditioned":  # P = I at first: the run starts as plain A-MAML/MAML
        return {"name": flow, "per": "parameter", "scale": 1.0}
    if flow == "heavy-ball":
        return {"name": flow, "gamma": 1.0}
    return {"name": flow}


def build_flow(config: dict, model):
    """The inner flow of a configuration (`ctmeta.flows`), for `model` (a head method: its head).
    Configurations written before flows have none: the gradient flow."""
    from .flows import Gradient, HeavyBall, Preconditioned

    spec = config.get("flow") or {"name": "gradient"}
    name = spec.get("name", "gradient")
    if name == "gradient":
        return Gradient()
    if name == "preconditioned":
        target = model.head if config["method"] in HEAD_METHODS else model
        return Preconditioned.like(target, per=spec.get("per", "parameter"), scale=float(spec.get("scale", 1.0)))
    if name == "heavy-ball":
        return HeavyBall.with_gamma(float(spec.get("gamma", 1.0)))
    raise InputError(f"unknown flow {name!r} in the configuration; choose from {', '.join(FLOW_NAMES)}")


def build_method(config: dict):
    from . import methods
    from .methods import LinearFlow

    m, K, opts = config["method"], config["steps"], config.get("method_options", {})
    if m == "amaml":
        if K is None:  # the adaptive backward over the forward's dense output
            return methods.Adjoint(rtol=opts.get("rtol", 1e-6), atol=opts.get("atol", 1e-8),
                                   dense_steps=opts.get("dense_steps", 256), solver=opts.get("solver", "dopri5"),
                                   error_scale=opts.get("error_scale", "state"),
                                   adjoint_rtol=opts.get("adjoint_rtol", 10.0), adjoint_atol=opts.get("adjoint_atol", 10.0))
        return methods.Adjoint(steps=K, rtol=opts.get("rtol", 1e-6), atol=opts.get("atol", 1e-8),
                               scheme=opts.get("scheme", "heun"), solver=opts.get("solver", "dopri5"))
    if m in ("maml", "anil"):
        return methods.Unrolled(steps=K)
    if m == "fomaml":
        return methods.FirstOrder(steps=K)
    if m == "reptile":
        return methods.Reptile(steps=K)
    if m == "imaml":
        return methods.Implicit(steps=K, lam=opts.get("lam", 1.0), cg_steps=opts.get("cg_steps", 5))
    if m == "comln":
        solver = opts.get("solver", "dopri5")
        return LinearFlow(lam=opts.get("lam", 0.0), solver=solver, steps=K if solver == "euler" else None)
    raise InputError(f"unknown method {m!r}")


def build_model(config: dict, family, key):
    import jax
    import jax.numpy as jnp

    from .models import MLP, Conv4, EmbeddingHead, InputScale, ResNet12, feature_size

    spec = config["model"]
    if spec["name"] == "mlp":
        (in_size,) = family.input_shape
        mlp = MLP(in_size, family.output_size, spec["width"], spec["depth"], _activation(spec["activation"]), key=key)
        scale = spec.get("input_scale")
        return mlp if scale is None else InputScale(mlp, float(scale))
    c, h, w = family.input_shape
    if spec["name"] == "conv4":
        return Conv4(c, family.output_size, hidden=spec["hidden"], image_size=(h, w),
                     activation=_activation(spec.get("activation", "relu")), pool=spec.get("pool", "max"),
                     conv_impl=spec.get("conv_impl", "auto"), key=key)
    if spec["name"] == "conv4-embedding+linear-head":
        # An embedding runs outside the inner loop, where XLA's own convolutions are fastest.
        emb = Conv4(c, hidden=spec["hidden"], activation=_activation(spec.get("activation", "relu")),
                    pool=spec.get("pool", "max"), conv_impl="xla", key=key)
        d = feature_size(emb, (c, h, w))
        dtype = jax.tree.leaves(emb)[0].dtype
        return EmbeddingHead(embedding=emb, head=jnp.zeros((family.output_size, d), dtype))
    if spec["name"] in ("resnet12-embedding+linear-head", "resnet12+linear-head"):
        emb_key, head_key = jax.random.split(key)
        emb = ResNet12(c, channels=tuple(spec["channels"]), global_pool=bool(spec["global_pool"]),
                       conv_impl="xla", key=emb_key)
        d = feature_size(emb, (c, h, w))
        dtype = jax.tree.leaves(emb)[0].dtype
        shape = (family.output_size, d)
        if spec.get("head_init", "zeros") == "zeros":
            head = jnp.zeros(shape, dtype)
        else:  # the default of a linear layer: U(-1/sqrt(d), 1/sqrt(d))
            bound = 1.0 / d**0.5
            head = jax.random.uniform(head_key, shape, dtype, -bound, bound)
        return EmbeddingHead(embedding=emb, head=head)
    raise InputError(f"unknown model {spec['name']!r} in the configuration")


_WHOLE_IMAGE_NETWORKS = ("conv4", "resnet12+linear-head")


def build_learner(config: dict, family, model_key):
    """The [`MetaLearner`][ctmeta.meta.MetaLearner] of a resolved
    configuration on `family` (anything with `input_shape`, `output_size`
    and `kind`), its model initialised from `model_key`."""
    from .losses import accuracy, cross_entropy, mse, nrmse_metric
    from .meta import MetaLearner

    optimizer = build_optimizer(config["optimizer"])  # checks the entry first
    model = build_model(config, family, model_key)
    method = build_method(config)
    classification = getattr(family, "kind", "regression") == "classification"
    return MetaLearner(
        model,
        method,
        optimizer,
        cross_entropy if classification else mse,
        T=config["T"],
        learn_T=config["learn_T"],
        metric=accuracy if classification else nrmse_metric,
        adapt="head" if config["method"] in HEAD_METHODS else "all",
        # A whole Conv-4 per task fills a CPU core: batching tasks buys nothing there,
        # and an adaptive solve under vmap runs every task for the slowest one's steps.
        task_map="map" if config["model"]["name"] in _WHOLE_IMAGE_NETWORKS else "vmap",
        flow=build_flow(config, model),
    )


def build(config: dict, *, progress: bool = True, log=print) -> Experiment:
    """Task family, model and learner of a resolved configuration (checked
    first by [`check_config`][ctmeta.presets.check_config])."""
    import jax

    check_config(config)

    family = build_family(config, progress=progress, log=log)
    root = jax.random.PRNGKey(config["seed"])
    model_key, run_key = jax.random.split(root)
    learner = build_learner(config, family, model_key)
    classification = getattr(family, "kind", "regression") == "classification"
    return Experiment(
        config=config,
        family=family,
        learner=learner,
        model_key=model_key,
        run_key=run_key,
        lower_is_better=not classification,
        metric_name="accuracy" if classification else "nRMSE",
        eval_chunk=10 if classification else None,
    )
