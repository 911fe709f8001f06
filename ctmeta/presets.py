"""Benchmark presets: which task family, model, loss, metric and method
defaults each benchmark of the papers uses, and how a run's configuration
(a JSON-able dict) becomes a task family and a [`MetaLearner`][ctmeta.meta.MetaLearner].

Resolution is pure Python (no JAX work), so the command line can check every
flag before anything is compiled: [`resolve_config`][] fills in the
defaults and validates; [`build`][] makes the objects.

Horizon and steps (the papers' convention `T = steps * h`, `h = 0.01`):

- `amaml`: `T` is the horizon of the gradient flow and `steps` the number of
  stored states of the adjoint (the default `T = 2`, `steps = 200` of A-MAML
  Sec. 5.1 for the 50-shot regressions).
- `maml`, `fomaml`, `reptile`, `imaml`, `anil`: `steps` gradient steps with
  learning rate `h = T / steps`; without `--T`, `T = steps * h` with the
  benchmark's inner learning rate `h` (0.01).
- `comln`: `T` is the *initial* horizon, learned as `exp(log_T)`; the head
  flow uses Dopri5, or Euler with `--steps` fixed steps.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

from ._errors import DataError, InputError, check_positive

__all__ = ["BENCHMARKS", "METHODS", "BenchmarkPreset", "Experiment", "build", "resolve_config"]


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


BENCHMARKS: dict[str, BenchmarkPreset] = {
    "cosmixture": BenchmarkPreset(
        "cosmixture", "regression", "CosMixture 2-D regression (A-MAML Sec. 5.1)",
        shots=50, queries=50, ways=None, T=2.0, steps=200, maml_steps=20,
        meta_iterations=1000, meta_batch=5, eval_steps=(0, 50, 200), eval_every=10,
    ),
    "alpine": BenchmarkPreset(
        "alpine", "regression", "Alpine 2-D regression (A-MAML Sec. 5.1)",
        shots=50, queries=50, ways=None, T=2.0, steps=200, maml_steps=20,
        meta_iterations=1000, meta_batch=5, eval_steps=(0, 50, 200), eval_every=10,
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
        data_subdir="omniglot",
    ),
    "miniimagenet": BenchmarkPreset(
        "miniimagenet", "images", "miniImageNet 5-way 1-shot classification (A-MAML Table 3, COMLN)",
        shots=1, queries=15, ways=5, T=0.5, steps=50, maml_steps=5,
        meta_iterations=1000, meta_batch=4, eval_steps=(0, 10, 50, 100), eval_every=10,
        data_subdir="miniimagenet",
    ),
}

METHODS: dict[str, str] = {
    "amaml": "A-MAML: gradient flow, adjoint meta-gradient over stored states",
    "maml": "MAML: backprop through --steps unrolled GD steps",
    "fomaml": "first-order MAML",
    "reptile": "Reptile (theta - u_K as the outer direction)",
    "imaml": "iMAML: proximal inner loss (lam=1), 5 CG steps",
    "anil": "ANIL: unrolled GD on a linear head over a Conv-4 embedding",
    "comln": "COMLN: gradient flow of a linear head, learned horizon T",
}

HEAD_METHODS = ("anil", "comln")
DISCRETE_METHODS = ("maml", "fomaml", "reptile", "imaml", "anil")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value



def default_data_dir(preset: BenchmarkPreset) -> pathlib.Path:
    """`$CTMETA_DATA/<subdir>` if set, else `./data/<subdir>`."""
    root = os.environ.get("CTMETA_DATA")
    base = pathlib.Path(root).expanduser() if root else pathlib.Path("data")
    return base / (preset.data_subdir or preset.name)


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
) -> dict[str, Any]:
    """Validate the user's choices and fill in the benchmark's and method's
    defaults. Returns the run configuration (JSON-able). Pure Python."""
    benchmark = benchmark or "cosmixture"
    method = method or "amaml"
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    p = BENCHMARKS[benchmark]
    if T is not None:
        T = check_positive("--T", T)
    if steps is not None:
        steps = _positive_int("--steps", steps)
    meta_iterations = _positive_int("--meta-iterations", p.meta_iterations if meta_iterations is None else meta_iterations)
    meta_batch = _positive_int("--meta-batch", p.meta_batch if meta_batch is None else meta_batch)
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {seed!r}")
    if checkpoint_every is None:
        checkpoint_every = max(1, meta_iterations // 5)
    checkpoint_every = _positive_int("--checkpoint-every", checkpoint_every)

    if method in HEAD_METHODS and p.kind != "images":
        raise InputError(
            f"--method {method} adapts a linear softmax head on a Conv-4 embedding: "
            "use it with --benchmark omniglot or miniimagenet"
        )
    if ways is not None:
        ways = _positive_int("--ways", ways)
        if p.kind != "images":
            raise InputError(f"--ways applies to classification benchmarks (omniglot, miniimagenet), not {benchmark}")
        if ways < 2:
            raise InputError(f"--ways must be at least 2, got {ways}")
    if shots is not None:
        shots = _positive_int("--shots", shots)

    # Task sizes.
    if p.kind == "regression":
        n_shots = p.shots if shots is None else shots
        n_queries = p.queries if shots is None else shots  # 50shot-50val, 100shot-100val
        if meta_batch > 100:
            raise InputError(f"--meta-batch {meta_batch} exceeds the 100 meta-training tasks of {benchmark}")
    elif p.kind == "ratings":
        n_shots = p.shots if shots is None else shots
        n_queries = p.queries if shots is None else max(1, (3 * shots) // 2)  # 10shot-15val, 20shot-30val
    else:
        n_shots = p.shots if shots is None else shots
        n_queries = p.queries
    n_ways = (p.ways if ways is None else ways) if p.kind == "images" else None

    # Horizon and steps.
    h = p.inner_lr
    learn_T = False
    solver = None
    if method == "amaml":
        n_steps = p.steps if steps is None else steps
        horizon = p.T if T is None else T
    elif method == "comln":
        n_steps = steps  # None: Dopri5; K: Euler with K steps
        horizon = p.comln_T if T is None else T
        learn_T = True
        solver = "dopri5" if steps is None else "euler"
    else:
        default_steps = p.maml_steps if method in ("maml", "anil") else p.steps
        n_steps = default_steps if steps is None else steps
        horizon = n_steps * h if T is None else T

    # Data.
    resolved_data = None
    if p.data_subdir is not None:
        path = pathlib.Path(data_dir).expanduser() if data_dir else default_data_dir(p)
        if not path.exists():
            hint = "" if data_dir else " (the default; pass --data-dir DIR or set $CTMETA_DATA)"
            raise DataError(f"{benchmark} data directory {path} does not exist{hint}")
        resolved_data = str(path.resolve())
    elif data_dir is not None:
        raise InputError(f"--data-dir is not used by {benchmark} (its tasks are synthetic)")

    eval_steps = list(p.eval_steps)
    curve = sorted(set(range(0, max(eval_steps) + 1, p.eval_every)) | set(eval_steps))
    model = _model_config(p, method)
    method_options: dict[str, Any] = {}
    if method == "imaml":
        method_options = {"lam": 1.0, "cg_steps": 5}
    elif method == "amaml":
        method_options = {"rtol": 1e-6, "atol": 1e-8, "scheme": "heun"}
    elif method == "comln":
        method_options = {"lam": 0.0, "solver": solver}

    from . import __version__

    return {
        "ctmeta_version": __version__,
        "benchmark": benchmark,
        "method": method,
        "T": horizon,
        "learn_T": learn_T,
        "steps": n_steps,
        "inner_lr": h,
        "meta_iterations": meta_iterations,
        "meta_batch": meta_batch,
        "ways": n_ways,
        "shots": n_shots,
        "queries": n_queries,
        "data_dir": resolved_data,
        "seed": seed,
        "checkpoint_every": checkpoint_every,
        "optimizer": {"name": "adam", "learning_rate": p.outer_lr},
        "model": model,
        "method_options": method_options,
        "eval": {
            "steps": eval_steps,
            "curve": curve,
            "lr": h,
            "tasks": p.eval_tasks,
            "metric": "nrmse" if p.kind != "images" else "accuracy",
        },
    }


def _model_config(p: BenchmarkPreset, method: str) -> dict[str, Any]:
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
    hidden = 64 if p.name == "omniglot" else 32
    if method in HEAD_METHODS:
        return {"name": "conv4-embedding+linear-head", "hidden": hidden, "head_init": "zeros"}
    return {"name": "conv4", "hidden": hidden}


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


def _activation(name: str):
    import jax
    import jax.numpy as jnp

    return {"tanh": jnp.tanh, "relu": jax.nn.relu}[name]


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


def build_method(config: dict):
    from . import methods
    from .meta import LinearFlow

    m, K, opts = config["method"], config["steps"], config.get("method_options", {})
    if m == "amaml":
        return methods.Adjoint(steps=K, rtol=opts.get("rtol", 1e-6), atol=opts.get("atol", 1e-8),
                               scheme=opts.get("scheme", "heun"))
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

    from .meta import EmbeddingHead, InputScale
    from .models import MLP, Conv4, feature_size

    spec = config["model"]
    if spec["name"] == "mlp":
        (in_size,) = family.input_shape
        mlp = MLP(in_size, family.output_size, spec["width"], spec["depth"], _activation(spec["activation"]), key=key)
        scale = spec.get("input_scale")
        return mlp if scale is None else InputScale(mlp, float(scale))
    c, h, w = family.input_shape
    if spec["name"] == "conv4":
        return Conv4(c, family.output_size, hidden=spec["hidden"], image_size=(h, w), key=key)
    if spec["name"] == "conv4-embedding+linear-head":
        emb = Conv4(c, hidden=spec["hidden"], key=key)
        d = feature_size(emb, (c, h, w))
        dtype = jax.tree.leaves(emb)[0].dtype
        return EmbeddingHead(embedding=emb, head=jnp.zeros((family.output_size, d), dtype))
    raise InputError(f"unknown model {spec['name']!r} in the configuration")


def build(config: dict, *, progress: bool = True, log=print) -> Experiment:
    """Task family, model and learner of a resolved configuration."""
    import jax
    import optax

    from .meta import MetaLearner, accuracy, cross_entropy, mse, nrmse_metric

    family = build_family(config, progress=progress, log=log)
    root = jax.random.PRNGKey(config["seed"])
    model_key, run_key = jax.random.split(root)
    model = build_model(config, family, model_key)
    method = build_method(config)
    opt = config["optimizer"]
    if opt["name"] != "adam":
        raise InputError(f"unknown optimizer {opt['name']!r} in the configuration")
    classification = getattr(family, "kind", "regression") == "classification"
    learner = MetaLearner(
        model,
        method,
        optax.adam(opt["learning_rate"]),
        cross_entropy if classification else mse,
        T=config["T"],
        learn_T=config["learn_T"],
        metric=accuracy if classification else nrmse_metric,
        adapt="head" if config["method"] in HEAD_METHODS else "all",
    )
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
