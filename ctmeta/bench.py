r"""`ctmeta bench`: memory and time of the meta-gradient against the number of inner steps.

The benchmark of A-MAML Sec. 5.2 (Figs. 3-4, CosMixture) and COMLN Sec. 5.2
(Fig. 3, Conv-4 on 5-way 5-shot tasks), on the same footing for every rule.

**What is measured, per (benchmark, method, steps):**

- `peak_bytes`: the memory of the compiled meta-gradient of one meta-batch,
  from XLA's buffer assignment: `memory_analysis()` of
  `jax.jit(meta_gradient).lower(params, batch).compile()`, taken as
  `temp_size_in_bytes + argument_size_in_bytes + output_size_in_bytes`. It is
  deterministic (no allocator noise, no other process), available without
  running the function (so cases too large to run still get a number), and it
  is what the program needs at its peak: XLA allocates every temporary of the
  program in one buffer of `temp_size_in_bytes` whose slices are reused by
  liveness, so the temporaries' peak is at most that, and arguments and
  outputs live for the whole call. The parts are kept as their own columns
  (`temp_bytes`, `argument_bytes`, `output_bytes`). Not counted: the
  executable's code and the Python process.
- `seconds`: median wall time of one call of the jitted meta-gradient of a
  meta-batch (`jax.vmap` over tasks of `jax.value_and_grad` of the query loss
  after adaptation, averaged over tasks), after one warm-up call, each call
  ended by `block_until_ready`. Compilation is ahead of time and never timed.
- `forward_seconds`: the same for the adaptation alone, no meta-gradient:
  `vmap` over tasks of adapt-then-query-loss (for COMLN, the meta-test path
  `linear_flow_adapt`, which integrates the state without the sensitivities).
- For Reptile the "meta-gradient" is its update direction `theta - u_K`
  (`reptile_direction`), with no derivative.

**Budgets.** A case whose compiled memory exceeds `max_bytes` (default 8 GB)
is not run (its `peak_bytes` is still reported, `status` says why), and a
case whose time, extrapolated linearly in the steps from the method's last
timed step count, would exceed `time_budget` seconds (warm-up plus one call)
is not timed either. The number of timed calls is cut so that one point stays
within `time_budget`; `repeats` says how many were made (0: the warm-up call
is the only one, for points that alone exceed the budget).

**Outputs** in `out_dir`: `bench.csv`, `vmap.csv`, `diagnostics.csv`,
`bench-<benchmark>.png` (memory and time against steps, log scales, one line
per method), `targets.md` and `bench.md` (the tables as markdown).

Run it as `ctmeta bench [--quick] --out DIR`, or `python -m ctmeta.bench`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import ode
from ._errors import InputError
from .adaptation import gradient_flow
from .linear_flow import linear_flow, linear_flow_adapt
from .methods import Adjoint, FirstOrder, GradientField, Implicit, Reptile, Unrolled, reptile_direction

__all__ = [
    "BENCHMARKS",
    "COLUMNS",
    "DEFAULT_STEPS",
    "QUICK_STEPS",
    "main",
    "run",
    "checkpoints_for",
    "evaluate_targets",
]

#: The inner learning rate `h`: `T = steps * h` (A-MAML and COMLN both use 0.01).
H = 0.01
DEFAULT_STEPS = (10, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
QUICK_STEPS = (10, 100)

#: benchmark -> its methods, in plotting order.
BENCHMARKS: dict[str, tuple[str, ...]] = {
    "cosmixture": ("maml", "fomaml", "reptile", "imaml", "amaml", "amaml-ckpt", "amaml-adaptive"),
    "omniglot": ("comln", "comln-euler", "anil", "maml", "amaml", "amaml-ckpt", "amaml-adaptive"),
    "miniimagenet": ("comln", "comln-euler", "anil", "maml", "amaml", "amaml-ckpt", "amaml-adaptive"),
    # COMLN's own embedding (Fig. 4, Appendix E.2): ResNet-12 without global
    # pooling, d = 640 * 5 * 5 = 16,000 features on 84x84 images, where the
    # head's unrolled graph (ANIL) is no longer small beside the embedding's.
    "miniimagenet-resnet12": ("comln", "comln-euler", "anil"),
}
#: Benchmarks whose every call takes tens of seconds on a CPU: memory only under `quick`.
_SLOW_BENCHMARKS = ("miniimagenet-resnet12",)
DEFAULT_CASES = ("cosmixture", "omniglot")

#: Columns of `bench.csv`, in order.
COLUMNS = (
    "benchmark",
    "method",
    "steps",
    "T",
    "peak_bytes",
    "temp_bytes",
    "argument_bytes",
    "output_bytes",
    "seconds",
    "forward_seconds",
    "repeats",
    "forward_repeats",
    "meta_batch",
    "checkpoints",
    "device",
    "dtype",
    "compile_seconds",
    "status",
    "forward_steps",
    "backward_steps",
)

PyTree = Any


# --------------------------------------------------------------------------- #
# Losses
# --------------------------------------------------------------------------- #


def _mse(pred, y):
    return jnp.mean(jnp.square(pred - y))


def _cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


# --------------------------------------------------------------------------- #
# Problems: parameters, a meta-batch, and the per-task objective of each method
# --------------------------------------------------------------------------- #


def checkpoints_for(steps: int) -> int:
    """The number of checkpoints of `amaml-ckpt`: the divisor of `steps` nearest `sqrt(steps)`.

    Ties go to the smaller divisor (fewer kept states). `Adjoint` needs a
    divisor; for a prime `steps` this is 1 (one segment re-integrated whole).
    """
    root = math.sqrt(steps)
    divisors = [d for d in range(1, steps + 1) if steps % d == 0]
    return min(divisors, key=lambda d: (abs(d - root), d))


def _rule(method: str, steps: int, dense_steps: int | None = None):
    """The `ctmeta.methods` rule of a whole-model method name at `steps` inner steps.

    `amaml` is the stored sweep over `steps` states; `amaml-adaptive` the
    adaptive backward (`Adjoint()`) at the same horizon, its dense output
    holding `dense_steps` accepted steps."""
    if method == "amaml-adaptive":
        return Adjoint(dense_steps=dense_steps or 256)
    if method == "maml":
        return Unrolled(steps)
    if method == "fomaml":
        return FirstOrder(steps)
    if method == "reptile":
        return Reptile(steps)
    if method == "imaml":
        return Implicit(steps, lam=1.0, cg_steps=5)
    if method == "amaml":
        return Adjoint(steps)
    if method == "amaml-ckpt":
        return Adjoint(steps, checkpoints=checkpoints_for(steps))
    raise InputError(f"unknown whole-model method {method!r}")


@dataclasses.dataclass
class Problem:
    """One benchmark's data and model.

    `params` are the meta-parameters (array leaves, `None` elsewhere) and
    `batch` a tuple `(support_x, support_y, query_x, query_y)` with a leading
    task axis. `task_objective(method, steps)` returns `(loss, forward,
    adapt)`: the per-task query loss after adaptation (differentiated for the
    meta-gradient), the per-task function timed as the forward pass, and (for
    whole-model methods, else `None`) the adaptation `adapt(params, task)`.
    """

    name: str
    params: PyTree
    batch: tuple
    meta_batch: int
    dtype: str
    data: str
    whole_loss: Callable  # (params, (x, y)) -> inner loss of the whole model
    whole_outer: Callable  # (adapted params, task) -> query loss
    head: dict | None = None  # for Conv-4: features, W0 handling

    def task_objective(self, method: str, steps: int):
        T = steps * H
        if method in ("comln", "comln-euler", "anil"):
            return self._head_objective(method, steps, T)
        rule = _rule(method, steps, self.dense_steps(T) if method == "amaml-adaptive" else None)

        def adapt(params, task):
            return gradient_flow(self.whole_loss, params, (task[0], task[1]), T, method=rule)

        def loss(params, task):
            return self.whole_outer(adapt(params, task), task)

        return loss, loss, adapt

    def forward_steps(self, T) -> int:
        """The most accepted steps the adaptive forward (Dopri5, `Adjoint()`'s
        tolerances) takes over the meta-batch up to `T`."""
        field, rule = GradientField(self.whole_loss), Adjoint()
        opts = ode._Options(steps=1, rtol=rule.rtol, atol=rule.atol, max_steps=rule.max_steps, solver="dopri5")

        def one(task):
            return ode._dense_forward(field, self.params, jnp.asarray(T, jnp.float32), (task[0], task[1]), opts,
                                      None)[3]["accepted_steps"]

        return int(np.max(jax.jit(jax.vmap(one))(self.batch)))

    def adaptive_steps(self, T) -> tuple[int, int]:
        """`(forward, backward)` accepted steps of `amaml-adaptive` at `T`, the most over the meta-batch."""
        field, rule = GradientField(self.whole_loss), Adjoint()
        sens = ode.AdaptiveAdjoint(self.dense_steps(T), rule.adjoint_rtol, rule.adjoint_atol)
        opts = ode._Options(steps=1, rtol=rule.rtol, atol=rule.atol, max_steps=rule.max_steps, solver="dopri5")

        def one(task):
            data = (task[0], task[1])
            Tj = jnp.asarray(T, jnp.float32)
            y1, dense, _, fstats = ode._dense_forward(field, self.params, Tj, data, opts, sens.dense_steps, True)
            a_end = jax.grad(self.whole_outer)(y1, task)
            _, _, _, bstats = ode.adjoint_backward(field, dense, Tj, data, a_end, sens, opts, (False, False))
            return fstats["accepted_steps"], bstats["num_accepted_steps"]

        f, b = jax.jit(jax.vmap(one))(self.batch)
        return int(np.max(f)), int(np.max(b))

    def dense_steps(self, T) -> int:
        """A dense-output size for `amaml-adaptive`: the forward's steps plus a quarter, rounded up to 16."""
        return 16 * math.ceil(1.25 * self.forward_steps(T) / 16)

    def _head_objective(self, method, steps, T):
        features, split = self.head["features"], self.head["split"]
        ways = self.head["ways"]

        def head_parts(params, task):
            emb, W0 = split(params)
            fs, fq = features(emb, task[0]), features(emb, task[2])
            return W0, fs, fq

        def adapted_head(params, task, forward):
            W0, fs, fq = head_parts(params, task)
            sy = task[1]
            if method == "anil":
                W = gradient_flow(
                    lambda W, d: _cross_entropy(d[0] @ W.T, d[1]), W0, (fs, sy), T, method=Unrolled(steps)
                )
            else:
                onehot = jax.nn.one_hot(sy, ways, dtype=fs.dtype)
                kw = dict(solver="euler", steps=steps) if method == "comln-euler" else dict(max_steps=16384)
                flow = linear_flow_adapt if forward else linear_flow
                W = flow(W0, fs, onehot, T, **kw)
            return fq @ W.T

        def loss(params, task):
            return _cross_entropy(adapted_head(params, task, False), task[3])

        def forward(params, task):
            return _cross_entropy(adapted_head(params, task, True), task[3])

        return loss, forward, None


def _default_data_dir() -> pathlib.Path:
    if os.environ.get("CTMETA_DATA"):
        return pathlib.Path(os.environ["CTMETA_DATA"]).expanduser()
    # The repository's sibling `shared/data` (see DESIGN.md and tests/conftest.py).
    return pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def _f32(batch) -> tuple:
    return tuple(jnp.asarray(x, jnp.float32) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else jnp.asarray(x)
                 for x in batch)


def make_problem(name: str, meta_batch: int, *, data_dir=None, seed: int = 0, head_init: str = "zeros") -> Problem:
    """Build a benchmark's model, meta-batch and losses (float32 whatever `jax_enable_x64`)."""
    key = jax.random.PRNGKey(seed)
    if name == "cosmixture":
        from .models import MLP, apply_to_set
        from .tasks.regression import CosMixture

        family = CosMixture(shots=100, queries=100, num_train_tasks=max(100, meta_batch), seed=seed)
        batch = _f32(family.sample(key, meta_batch))
        model = MLP(2, 1, 32, 2, activation=jnp.tanh, dtype=jnp.float32, key=jax.random.fold_in(key, 1))
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def whole_loss(p, data):
            return _mse(apply_to_set(eqx.combine(p, static), data[0]), data[1])

        def whole_outer(u, task):
            return _mse(apply_to_set(eqx.combine(u, static), task[2]), task[3])

        return Problem(name, params, batch, meta_batch, "float32", "CosMixture 100shot-100val, MLP 2x32 tanh",
                       whole_loss, whole_outer)
    if name in ("omniglot", "miniimagenet"):
        return _image_problem(name, meta_batch, data_dir=data_dir, seed=seed, head_init=head_init)
    if name == "miniimagenet-resnet12":
        return _image_problem(name, meta_batch, data_dir=data_dir, seed=seed, head_init=head_init,
                              backbone="resnet12")
    raise InputError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")


def _image_problem(name, meta_batch, *, data_dir, seed, head_init="zeros", backbone="conv4"):
    """An image benchmark: Conv-4 (64 channels) or, with `backbone="resnet12"`, COMLN's ResNet-12
    without global pooling (head-only methods; the whole network never adapts there)."""
    from .models import Conv4, ResNet12, apply_to_set

    ways, shots, queries = 5, 5, 15
    channels, size = (1, 28) if name == "omniglot" else (3, 84)
    net = "ResNet-12 without global pooling (d = 16,000)" if backbone == "resnet12" else "Conv-4 (64 ch)"
    key = jax.random.PRNGKey(seed)
    data_dir = pathlib.Path(data_dir) if data_dir is not None else _default_data_dir()
    try:
        if name == "omniglot":
            from .tasks.omniglot import Omniglot

            family = Omniglot(data_dir / "omniglot", ways=ways, shots=shots, queries=queries, progress=False)
        else:
            from .tasks.miniimagenet import MiniImageNet

            family = MiniImageNet(data_dir / "miniimagenet", ways=ways, shots=shots, queries=queries,
                                  protocol="train64", progress=False)
        batch = _f32(family.sample(key, meta_batch, "train"))
        data = f"{name} {ways}-way {shots}-shot ({queries} queries/class), {net}, head init {head_init}"
    except Exception as err:  # data absent: same shapes, random pixels (memory and time do not depend on values)
        k1, k2 = jax.random.split(key)
        labels = lambda n: jnp.tile(jnp.repeat(jnp.arange(ways, dtype=jnp.int32), n), (meta_batch, 1))
        batch = (
            jax.random.uniform(k1, (meta_batch, ways * shots, channels, size, size), jnp.float32),
            labels(shots),
            jax.random.uniform(k2, (meta_batch, ways * queries, channels, size, size), jnp.float32),
            labels(queries),
        )
        data = f"synthetic {name}-shaped images ({type(err).__name__}: real data not loaded)"
    # The same parameters under two convolutions (as the presets build them):
    # XLA's for the head-only methods, whose embedding runs outside any loop,
    # and the default (matrix products on a CPU) for whole-network adaptation,
    # whose convolutions run inside the inner loops (`ctmeta.models.conv2d`).
    if backbone == "resnet12":
        make = lambda **kw: ResNet12(channels, global_pool=False, dtype=jnp.float32, key=jax.random.fold_in(key, 1), **kw)
    else:
        make = lambda **kw: Conv4(channels, hidden=64, dtype=jnp.float32, key=jax.random.fold_in(key, 1), **kw)
    embedding = make(conv_impl="xla")
    emb_params, emb_static = eqx.partition(embedding, eqx.is_inexact_array)
    whole_params, whole_static = eqx.partition(make(), eqx.is_inexact_array)
    whole_def = jax.tree.structure(whole_params)  # the convolution is static: the same leaves, another treedef
    d = 640 * 5 * 5 if backbone == "resnet12" else 64 * (size // 16) ** 2
    if head_init == "zeros":
        # A zero head: every method starts from the same uniform prediction.
        # With a random head the whole-network gradient flow forces Dopri5
        # (rtol 1e-6, float32) to steps of ~4e-4, some 20 per h = 0.01: see
        # `dopri5_step_count` and docs/bench.md.
        W0 = jnp.zeros((ways, d), jnp.float32)
    else:
        bound = 1.0 / math.sqrt(d)
        W0 = jax.random.uniform(jax.random.fold_in(key, 2), (ways, d), jnp.float32, -bound, bound)
    params = (emb_params, W0)

    def features(emb, x):
        f = apply_to_set(eqx.combine(emb, emb_static), x)
        return f.reshape(f.shape[0], -1)

    def whole_features(emb, x):
        f = apply_to_set(eqx.combine(jax.tree.unflatten(whole_def, jax.tree.leaves(emb)), whole_static), x)
        return f.reshape(f.shape[0], -1)

    def whole_loss(p, data):
        emb, W = p
        return _cross_entropy(whole_features(emb, data[0]) @ W.T, data[1])

    def whole_outer(u, task):
        emb, W = u
        return _cross_entropy(whole_features(emb, task[2]) @ W.T, task[3])

    head = dict(features=features, split=lambda p: p, ways=ways)
    return Problem(name, params, batch, meta_batch, "float32", data, whole_loss, whole_outer, head)


# --------------------------------------------------------------------------- #
# Compiling, measuring
# --------------------------------------------------------------------------- #


def meta_gradient_fn(problem: Problem, method: str, steps: int) -> tuple[Callable, Callable]:
    """`(meta_gradient, forward)`, both `(params, batch) ->` arrays, to be jitted.

    `meta_gradient` is the task-averaged query loss and meta-gradient of one
    meta-batch (`vmap` over tasks); `forward` the per-task query losses after
    adaptation, with no derivative.
    """
    loss, forward, adapt = problem.task_objective(method, steps)

    if method == "reptile":

        def meta_gradient(params, batch):
            adapted = jax.vmap(adapt, in_axes=(None, 0))(params, batch)
            losses = jax.vmap(problem.whole_outer)(adapted, batch)
            return jnp.mean(losses), reptile_direction(params, adapted)

    else:

        def meta_gradient(params, batch):
            losses, grads = jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0))(params, batch)
            return jnp.mean(losses), jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)

    def forward_fn(params, batch):
        return jax.vmap(forward, in_axes=(None, 0))(params, batch)

    return meta_gradient, forward_fn


def compile_fn(fn, *args):
    """AOT-compile `jax.jit(fn)` for `args`; returns `(compiled, memory dict, seconds)`."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    mem = dict(
        temp_bytes=int(ma.temp_size_in_bytes),
        argument_bytes=int(ma.argument_size_in_bytes),
        output_bytes=int(ma.output_size_in_bytes),
    )
    mem["peak_bytes"] = mem["temp_bytes"] + mem["argument_bytes"] + mem["output_bytes"]
    return compiled, mem, seconds


def _all_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def time_call(compiled, args, repeats: int, budget: float) -> tuple[float, int, list[float]]:
    """Median seconds of `compiled(*args)` after one warm-up call; `(median, timed calls, times)`.

    The number of timed calls is `repeats`, cut so that warm-up plus the calls
    stay within `budget` seconds; if the warm-up alone exhausts it, its own
    time is returned with 0 timed calls.
    """
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    warm = time.perf_counter() - t0
    if not _all_finite(out):
        raise FloatingPointError("non-finite meta-gradient or loss")
    n = min(repeats, int(max(0.0, budget - warm) // max(warm, 1e-9)))
    if n <= 0:
        return warm, 0, [warm]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), n, times


def device_description() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    if d.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return f"{d.platform} ({kind})"


# --------------------------------------------------------------------------- #
# The run
# --------------------------------------------------------------------------- #


_WHOLE_CONV4_SLOW = ("maml", "amaml", "amaml-ckpt", "amaml-adaptive")


@dataclasses.dataclass
class Settings:
    quick: bool
    time_budget: float
    max_bytes: float
    meta_batch: dict
    vmap: bool = True
    diagnostics: bool = True
    data_dir: Any = None
    progress: bool = True


def _parse_cases(cases) -> list[tuple[str, str]]:
    """`["cosmixture", "omniglot/comln", ...]` -> `[(benchmark, method), ...]`."""
    out = []
    for item in cases or DEFAULT_CASES:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            bench, _, method = part.partition("/")
            if bench not in BENCHMARKS:
                raise InputError(f"unknown benchmark {bench!r} in --cases; choose from {sorted(BENCHMARKS)}")
            methods = BENCHMARKS[bench] if not method else tuple(m for m in method.split("+"))
            for m in methods:
                if m not in BENCHMARKS[bench]:
                    raise InputError(f"unknown method {m!r} for {bench}; choose from {BENCHMARKS[bench]}")
                if (bench, m) not in out:
                    out.append((bench, m))
    return out


def _fmt_bytes(b) -> str:
    if b is None or (isinstance(b, float) and not math.isfinite(b)):
        return "-"
    return f"{b / 1e6:,.1f} MB" if b < 1e9 else f"{b / 1e9:,.2f} GB"


def _fmt_s(s) -> str:
    if s is None or (isinstance(s, float) and not math.isfinite(s)):
        return "-"
    return f"{s * 1e3:,.1f} ms" if s < 1 else f"{s:,.2f} s"


def _measure_case(problem, method, steps, settings, history, repeats, device):
    """One row of bench.csv."""
    row = dict(
        benchmark=problem.name, method=method, steps=steps, T=round(steps * H, 10),
        meta_batch=problem.meta_batch, device=device, dtype=problem.dtype,
        checkpoints=checkpoints_for(steps) if method == "amaml-ckpt" else "",
        repeats=0, forward_repeats=0, seconds=None, forward_seconds=None,
    )
    args = (problem.params, problem.batch)
    grad_fn, fwd_fn = meta_gradient_fn(problem, method, steps)
    try:
        compiled, mem, csec = compile_fn(grad_fn, *args)
    except Exception as err:  # noqa: BLE001 - recorded, the run goes on
        row.update(status=f"error compiling: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        return row
    row.update(mem, compile_seconds=round(csec, 2))
    if settings.quick and problem.head is not None and method in _WHOLE_CONV4_SLOW:
        row["status"] = ("memory only (--quick): whole-network Conv-4 timings take 10-100 s per call "
                         "on a CPU, see docs/bench.md")
        return row
    if settings.quick and problem.name in _SLOW_BENCHMARKS:
        row["status"] = "memory only (--quick): ResNet-12 meta-gradients take tens of seconds per call on a CPU"
        return row
    if mem["peak_bytes"] > settings.max_bytes:
        row["status"] = f"memory only: needs {_fmt_bytes(mem['peak_bytes'])} > limit {_fmt_bytes(settings.max_bytes)}"
        return row
    last = history.get((problem.name, method))
    if last is not None:
        est = last[1] * steps / last[0]
        if 2 * est > settings.time_budget:
            row["status"] = (f"memory only: time skipped, est. {_fmt_s(est)} per call "
                             f"(x2 with warm-up) > budget {settings.time_budget:g} s")
            return row
    try:
        row["seconds"], row["repeats"], _ = time_call(compiled, args, repeats, settings.time_budget)
        del compiled
        cf, _, csec_f = compile_fn(fwd_fn, *args)
        row["compile_seconds"] = round(csec + csec_f, 2)
        row["forward_seconds"], row["forward_repeats"], _ = time_call(cf, args, repeats, settings.time_budget)
    except Exception as err:  # noqa: BLE001
        msg = str(err).strip().splitlines()
        msg = next((m for m in msg if "ctmeta" in m or "max_steps" in m), msg[0] if msg else "")
        row["status"] = f"error running: {type(err).__name__}: {msg[:200]}"
        return row
    if method == "amaml-adaptive":
        row["forward_steps"], row["backward_steps"] = problem.adaptive_steps(steps * H)
    history[(problem.name, method)] = (steps, row["seconds"], row["forward_seconds"])
    row["status"] = "ok" if row["repeats"] > 0 else "ok (warm-up call only: over the time budget)"
    return row


def run(
    cases: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    out_dir: str | os.PathLike = "bench-out",
    quick: bool = False,
    repeats: int | None = None,
    *,
    meta_batch: int | None = None,
    time_budget: float | None = None,
    max_bytes: float = 8e9,
    vmap: bool = True,
    diagnostics: bool = True,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    console=None,
) -> list[dict]:
    """Run the benchmark; write `bench.csv`, figures, `vmap.csv`, `targets.md` in `out_dir`.

    **Arguments:**

    - `cases`: benchmarks (`"cosmixture"`, `"omniglot"`, `"miniimagenet"`,
      `"miniimagenet-resnet12"`)
      or `"benchmark/method"` items (`"cosmixture/maml+amaml"`); default
      cosmixture and omniglot with all their methods.
    - `steps`: inner step counts (default `DEFAULT_STEPS`, quick `QUICK_STEPS`).
    - `quick`: two step counts, 2 repeats, a 40 s budget per point.
    - `repeats`: timed calls per point (default 5, quick 2).
    - `meta_batch`: tasks per meta-batch (default 5 for cosmixture, 1 for the
      Conv-4 benchmarks, as in COMLN Fig. 3).
    - `time_budget`: seconds one point may take (default 120, quick 40).
    - `max_bytes`: compiled memory above which a case is not run (8 GB).
    - `vmap`, `diagnostics`: also measure vmap-vs-loop and the A-MAML and COMLN
      time breakdowns.

    **Returns:** the rows of `bench.csv` as dicts.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    pairs = _parse_cases(cases)
    steps = sorted({int(s) for s in (steps or (QUICK_STEPS if quick else DEFAULT_STEPS))})
    if not steps or steps[0] < 1:
        raise InputError("steps must be positive integers")
    repeats = int(repeats if repeats is not None else (2 if quick else 5))
    if repeats < 1:
        raise InputError("repeats must be >= 1")
    budget = float(time_budget if time_budget is not None else (40.0 if quick else 120.0))
    mb = {}
    for bench in {b for b, _ in pairs}:
        mb[bench] = int(meta_batch) if meta_batch else (5 if bench == "cosmixture" else 1)
    settings = Settings(quick, budget, float(max_bytes), mb, vmap, diagnostics, data_dir, progress)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = device_description()
    started = time.perf_counter()

    problems: dict[str, Problem] = {}
    rows: list[dict] = []
    history: dict = {}
    items = [(b, m, k) for b, m in pairs for k in steps]
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("bench", total=len(items) + int(vmap) + int(diagnostics))
        for bench, method, k in items:
            bar.update(task, description=f"{bench} {method} K={k}")
            if bench not in problems:
                problems[bench] = make_problem(bench, mb[bench], data_dir=data_dir)
                console.print(f"[bold]{bench}[/]: {problems[bench].data}, meta-batch {mb[bench]}", soft_wrap=True)
            row = _measure_case(problems[bench], method, k, settings, history, repeats, device)
            rows.append(row)
            console.print(
                f"  {bench:<12} {method:<12} K={k:<6} mem {_fmt_bytes(row.get('peak_bytes')):>11}  "
                f"grad {_fmt_s(row['seconds']):>10}  fwd {_fmt_s(row['forward_seconds']):>10}  {row['status']}",
                soft_wrap=True,
            )
            write_csv(out / "bench.csv", rows, COLUMNS)
            bar.advance(task)
        vmap_rows, diag_rows = [], []
        if vmap:
            bar.update(task, description="vmap vs loop")
            vmap_rows = measure_vmap(steps=100, repeats=max(repeats, 3), device=device)
            write_csv(out / "vmap.csv", vmap_rows, list(vmap_rows[0]))
            bar.advance(task)
        if diagnostics:
            bar.update(task, description="diagnostics")
            diag_rows = run_diagnostics(rows, problems, repeats=max(repeats, 3), quick=quick,
                                        data_dir=data_dir, budget=budget)
            if diag_rows:
                write_csv(out / "diagnostics.csv", diag_rows, _union_keys(diag_rows))
            bar.advance(task)

    figures = plot(rows, out, max_bytes)
    targets = evaluate_targets(rows, vmap_rows, diag_rows)
    elapsed = time.perf_counter() - started
    header = (
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
        f"- device: {device}; jax {jax.__version__}; dtype float32\n"
        f"- settings: quick={quick}, steps={steps}, repeats={repeats}, time budget {budget:g} s/point, "
        f"max bytes {max_bytes:g}, meta-batch {mb}\n"
        f"- data: " + "; ".join(f"{p.name}: {p.data}" for p in problems.values()) + "\n"
        f"- wall time of the run: {elapsed / 60:.1f} min\n"
    )
    (out / "targets.md").write_text("# ctmeta bench: targets\n\n" + header + "\n" + targets_markdown(targets, diag_rows))
    (out / "bench.md").write_text(
        "# ctmeta bench\n\n" + header + "\n## bench.csv\n\n" + rows_markdown(rows)
        + ("\n## vmap.csv\n\n" + table_markdown(vmap_rows) if vmap_rows else "")
        + ("\n## diagnostics.csv\n\n" + table_markdown(diag_rows) if diag_rows else "")
        + "\n## targets\n\n" + targets_markdown(targets, diag_rows)
        + "\n" + "".join(f"![{f.name}]({f.name})\n" for f in figures)
    )
    print_summary(targets, console)
    console.print(f"wrote {out}/bench.csv, {', '.join(f.name for f in figures)}, targets.md ({elapsed / 60:.1f} min)")
    return rows


def _union_keys(rows):
    keys = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    return keys


def write_csv(path, rows, columns):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def read_csv(path) -> list[dict]:
    """Rows of a bench.csv with numbers parsed (empty cells become None)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out = {}
            for k, v in r.items():
                if v == "":
                    out[k] = None
                    continue
                try:
                    out[k] = int(v)
                except ValueError:
                    try:
                        out[k] = float(v)
                    except ValueError:
                        out[k] = v
            rows.append(out)
    return rows


# --------------------------------------------------------------------------- #
# vmap over tasks vs a Python loop
# --------------------------------------------------------------------------- #


def measure_vmap(steps: int = 100, repeats: int = 5, meta_batch: int = 5, device: str | None = None) -> list[dict]:
    """A-MAML on CosMixture: one vmapped meta-gradient of `meta_batch` tasks vs a
    Python loop calling a jitted per-task meta-gradient `meta_batch` times.

    The two are timed alternately (so that load from other processes hits both
    alike); medians and their ratio are returned as two rows.
    """
    problem = make_problem("cosmixture", meta_batch)
    loss, _, _ = problem.task_objective("amaml", steps)
    grad_vmap, _ = meta_gradient_fn(problem, "amaml", steps)
    batched, _, _ = compile_fn(grad_vmap, problem.params, problem.batch)
    tasks = [tuple(x[i] for x in problem.batch) for i in range(meta_batch)]
    single, _, _ = compile_fn(jax.value_and_grad(loss), problem.params, tasks[0])

    def call_vmap():
        jax.block_until_ready(batched(problem.params, problem.batch))

    def call_loop():
        jax.block_until_ready([single(problem.params, t) for t in tasks])

    call_vmap()
    call_loop()
    tv, tl = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call_vmap()
        tv.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        call_loop()
        tl.append(time.perf_counter() - t0)
    mv, ml = statistics.median(tv), statistics.median(tl)
    common = dict(benchmark="cosmixture", steps=steps, T=steps * H, meta_batch=meta_batch, repeats=repeats,
                  device=device or device_description(), dtype="float32")
    return [
        dict(method="amaml-vmap", seconds=mv, **common, speedup=ml / mv),
        dict(method="amaml-loop", seconds=ml, **common, speedup=1.0),
    ]


# --------------------------------------------------------------------------- #
# Diagnostics: where the time goes
# --------------------------------------------------------------------------- #


def _median_time(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


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
        return diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, a: field(t, y, a)), diffrax.Dopri5(), 0.0, T, None, params,
            args=(task[0], task[1]), saveat=saveat,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=16384,
        )

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
    out["fwd_t1_seconds"] = _median_time(jax.jit(final), (p, b), repeats)
    out["fwd_stored_seconds"] = _median_time(jax.jit(stored), (p, b), repeats)
    out["sweep_seconds"] = _median_time(jax.jit(sweep), (ys, b), repeats)
    out["grad_eval_seconds"] = _median_time(jax.jit(grads_in_scan), (p, b), repeats) / steps
    out["hvp_seconds"] = _median_time(jax.jit(hvps_in_scan), (p, b), repeats) / steps
    out["hvp_u_only_seconds"] = _median_time(jax.jit(hvps_u_only_in_scan), (p, b), repeats) / steps
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

    import importlib

    lf = importlib.import_module("ctmeta.linear_flow")  # the module (the package exports the function)

    T = steps * H
    emb, W0 = problem.head["split"](problem.params)
    task = tuple(x[0] for x in problem.batch)
    fs = problem.head["features"](emb, task[0])
    onehot = jax.nn.one_hot(task[1], problem.head["ways"], dtype=fs.dtype)

    @jax.jit
    def count(W0, fs, onehot):
        prob = lf._problem(W0, fs, onehot, jnp.asarray(0.0, fs.dtype))
        M, N = onehot.shape
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lf._augmented_field), diffrax.Dopri5(), 0.0, T, None,
            lf._zeros_augmented(M, N, fs.dtype), args=prob, saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8), max_steps=16384,
        )
        return sol.stats["num_steps"], sol.stats["num_rejected_steps"]

    n, r = count(W0, fs, onehot)
    return dict(benchmark=problem.name, method="comln", steps=steps, T=T, dopri5_steps=int(n),
                rejected_steps=int(r), euler_steps=steps, dopri5_evals=6 * int(n) + 1)


def amaml_solver_steps(problem: Problem, steps: int, rtol=1e-6, atol=1e-8) -> dict:
    """Dopri5's step count in A-MAML's forward solve to `T = steps * h` (largest over the meta-batch)."""
    import diffrax

    T = steps * H
    field = GradientField(problem.whole_loss)

    @jax.jit
    def count(params, batch):
        def one(task):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, a: field(t, y, a)), diffrax.Dopri5(), 0.0, T, None, params,
                args=(task[0], task[1]), saveat=diffrax.SaveAt(t1=True),
                stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=16384,
            )
            return sol.stats["num_steps"], sol.stats["num_rejected_steps"]

        return jax.vmap(one)(batch)

    n, r = count(problem.params, problem.batch)
    n = int(np.max(n))
    return dict(benchmark=problem.name, method="amaml", steps=steps, T=T, meta_batch=problem.meta_batch,
                dopri5_steps=n, rejected_steps=int(np.max(r)), dopri5_evals=6 * n + 1, grad_evals_per_h=(6 * n + 1) / steps)


def comln_head_timing(problem: Problem, steps: int, repeats: int = 7) -> dict:
    """COMLN's meta-gradient through `linear_flow` alone (features fixed, no Conv-4),
    Dopri5 vs Euler with `steps` steps, the two timed alternately."""
    T = steps * H
    emb, W0 = problem.head["split"](problem.params)
    ways = problem.head["ways"]
    fs = jax.vmap(lambda x: problem.head["features"](emb, x))(problem.batch[0])
    fq = jax.vmap(lambda x: problem.head["features"](emb, x))(problem.batch[2])
    onehot = jax.nn.one_hot(problem.batch[1], ways, dtype=fs.dtype)

    def make(kw):
        def loss(W0, fs, onehot, fq, qy):
            return _cross_entropy(fq @ linear_flow(W0, fs, onehot, T, **kw).T, qy)

        def grad(W0, fs, onehot, fq, qy):
            g = jax.vmap(jax.grad(loss, argnums=(0, 1, 3)), in_axes=(None, 0, 0, 0, 0))(W0, fs, onehot, fq, qy)
            return jax.tree.map(lambda x: jnp.mean(x, 0), g)

        return jax.jit(grad).lower(W0, fs, onehot, fq, problem.batch[3]).compile()

    args = (W0, fs, onehot, fq, problem.batch[3])
    fns = {"dopri5": make(dict(max_steps=16384)), "euler": make(dict(solver="euler", steps=steps))}
    times = {k: [] for k in fns}
    for f in fns.values():
        jax.block_until_ready(f(*args))
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[k].append(time.perf_counter() - t0)
    d, e = statistics.median(times["dopri5"]), statistics.median(times["euler"])
    return dict(benchmark=problem.name, method="comln-head-only", steps=steps, T=T, meta_batch=problem.meta_batch,
                dopri5_head_seconds=d, euler_head_seconds=e, dopri5_over_euler=d / e, repeats=repeats)


def head_memory(problem: Problem, steps: int) -> dict:
    """Compiled memory of the head's meta-gradient alone, features fixed (no embedding):
    COMLN (`linear_flow`, Dopri5) against ANIL (`Unrolled(steps)` through the head), the
    derivative taken w.r.t. `W0` and both feature sets, as the embedding's backward would need.

    On ResNet-12 the embedding's own backward (~6 GB on a 5-way 5-shot task) hides the
    head's graph in `peak_bytes`; this isolates the part that grows with the steps."""
    T = steps * H
    emb, W0 = problem.head["split"](problem.params)
    ways = problem.head["ways"]
    fs = jax.vmap(lambda x: problem.head["features"](emb, x))(problem.batch[0])
    fq = jax.vmap(lambda x: problem.head["features"](emb, x))(problem.batch[2])
    onehot = jax.nn.one_hot(problem.batch[1], ways, dtype=fs.dtype)
    sy, qy = problem.batch[1], problem.batch[3]

    def comln(W0, fs, onehot, fq, sy, qy):
        return _cross_entropy(fq @ linear_flow(W0, fs, onehot, T, max_steps=16384).T, qy)

    def anil(W0, fs, onehot, fq, sy, qy):
        W = gradient_flow(lambda W, d: _cross_entropy(d[0] @ W.T, d[1]), W0, (fs, sy), T, method=Unrolled(steps))
        return _cross_entropy(fq @ W.T, qy)

    out = dict(benchmark=problem.name, method="head-only", steps=steps, T=T, meta_batch=problem.meta_batch)
    for name, loss in (("comln", comln), ("anil", anil)):
        def grad(*args, loss=loss):
            g = jax.vmap(jax.grad(loss, argnums=(0, 1, 3)), in_axes=(None, 0, 0, 0, 0, 0))(*args)
            return jax.tree.map(lambda x: jnp.mean(x, 0), g)

        out[f"{name}_head_bytes"] = compile_fn(grad, W0, fs, onehot, fq, sy, qy)[1]["peak_bytes"]
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


# --------------------------------------------------------------------------- #
# Targets
# --------------------------------------------------------------------------- #


def _get(rows, bench, method, steps, key):
    for r in rows:
        if r["benchmark"] == bench and r["method"] == method and r["steps"] == steps:
            v = r.get(key)
            return None if v is None or v == "" else float(v)
    return None


def _closest(candidates, want):
    candidates = sorted(candidates)
    if not candidates:
        return None
    return min(candidates, key=lambda s: (abs(math.log(s / want)), -s))


def _steps_with(rows, bench, methods, key):
    sets = []
    for m in methods:
        sets.append({r["steps"] for r in rows if r["benchmark"] == bench and r["method"] == m
                     and r.get(key) not in (None, "")})
    return sorted(set.intersection(*sets)) if sets else []


def evaluate_targets(rows, vmap_rows=(), diag_rows=()) -> list[dict]:
    """The six targets of the issue as ratios within this run.

    Each entry: `name`, `value` (text), `goal`, `met` (True/False/None when
    not measured), `at` (where it was measured).
    """
    t = []
    conv = next((b for b in ("omniglot", "miniimagenet") if any(r["benchmark"] == b for r in rows)), None)

    # (1) A-MAML meta-gradient / forward at 500 steps.
    ks = _steps_with(rows, "cosmixture", ["amaml"], "forward_seconds")
    k = _closest(ks, 500)
    if k:
        g, f = _get(rows, "cosmixture", "amaml", k, "seconds"), _get(rows, "cosmixture", "amaml", k, "forward_seconds")
        all_r = ", ".join(f"K={s}: {_get(rows, 'cosmixture', 'amaml', s, 'seconds') / _get(rows, 'cosmixture', 'amaml', s, 'forward_seconds'):.1f}"
                          for s in ks)
        t.append(dict(name="1. A-MAML meta-gradient / its forward (CosMixture)", value=f"{g / f:.2f}",
                      goal="<= 3", met=g / f <= 3, at=f"K={k}", detail=all_r))
    else:
        t.append(dict(name="1. A-MAML meta-gradient / its forward (CosMixture)", value="-", goal="<= 3", met=None, at="not measured"))

    # (2) A-MAML / MAML seconds at equal steps.
    ks = _steps_with(rows, "cosmixture", ["amaml", "maml"], "seconds")
    k = _closest(ks, 500)
    if k:
        ratios = {s: _get(rows, "cosmixture", "amaml", s, "seconds") / _get(rows, "cosmixture", "maml", s, "seconds") for s in ks}
        t.append(dict(name="2. A-MAML seconds / MAML seconds, equal steps (CosMixture)", value=f"{ratios[k]:.2f}",
                      goal="<= 1.5", met=ratios[k] <= 1.5, at=f"K={k}",
                      detail=", ".join(f"K={s}: {v:.2f}" for s, v in ratios.items())))
        if conv:
            kc = _steps_with(rows, conv, ["amaml", "maml"], "seconds")
            if kc:
                t[-1]["detail"] += "; Conv-4 " + ", ".join(
                    f"K={s}: {_get(rows, conv, 'amaml', s, 'seconds') / _get(rows, conv, 'maml', s, 'seconds'):.2f}" for s in kc)
    else:
        t.append(dict(name="2. A-MAML seconds / MAML seconds, equal steps (CosMixture)", value="-", goal="<= 1.5", met=None, at="not measured"))

    # (3) A-MAML / MAML memory at 1000 steps on Conv-4.
    name3 = f"3. A-MAML peak_bytes / MAML peak_bytes ({conv or 'Conv-4'})"
    ks = _steps_with(rows, conv, ["amaml", "maml"], "peak_bytes") if conv else []
    k = _closest(ks, 1000)
    if k:
        a, m = _get(rows, conv, "amaml", k, "peak_bytes"), _get(rows, conv, "maml", k, "peak_bytes")
        t.append(dict(name=name3, value=f"{a / m:.3f} ({_fmt_bytes(a)} / {_fmt_bytes(m)})", goal="<= 0.25",
                      met=a / m <= 0.25, at=f"K={k}",
                      detail=", ".join(f"K={s}: {_get(rows, conv, 'amaml', s, 'peak_bytes') / _get(rows, conv, 'maml', s, 'peak_bytes'):.3f}" for s in ks)))
    else:
        t.append(dict(name=name3, value="-", goal="<= 0.25", met=None, at="not measured"))

    # (4) COMLN memory flat, COMLN/ANIL memory, Dopri5 vs Euler.
    ks = sorted({r["steps"] for r in rows if r["benchmark"] == conv and r["method"] == "comln" and r.get("peak_bytes")}) if conv else []
    if len(ks) >= 2:
        mem = [_get(rows, conv, "comln", s, "peak_bytes") for s in ks]
        spread = (max(mem) - min(mem)) / min(mem)
        t.append(dict(name="4a. COMLN memory flat in T/h", value=f"{100 * spread:.2f}% spread ({_fmt_bytes(min(mem))} - {_fmt_bytes(max(mem))})",
                      goal="<= 5%", met=spread <= 0.05, at=f"K={ks[0]}..{ks[-1]}"))
    else:
        t.append(dict(name="4a. COMLN memory flat in T/h", value="-", goal="<= 5%", met=None, at="not measured"))
    ks = _steps_with(rows, conv, ["comln", "anil"], "peak_bytes") if conv else []
    k = _closest(ks, 1000)
    if k:
        c, a = _get(rows, conv, "comln", k, "peak_bytes"), _get(rows, conv, "anil", k, "peak_bytes")
        t.append(dict(name="4b. COMLN peak_bytes / ANIL peak_bytes", value=f"{c / a:.3f} ({_fmt_bytes(c)} / {_fmt_bytes(a)})",
                      goal="<= 0.1", met=c / a <= 0.1, at=f"K={k}",
                      detail=", ".join(f"K={s}: {_get(rows, conv, 'comln', s, 'peak_bytes') / _get(rows, conv, 'anil', s, 'peak_bytes'):.3f}" for s in ks)))
    else:
        t.append(dict(name="4b. COMLN peak_bytes / ANIL peak_bytes", value="-", goal="<= 0.1", met=None, at="not measured"))
    rn = "miniimagenet-resnet12"
    ks = _steps_with(rows, rn, ["comln", "anil"], "peak_bytes")
    k = _closest(ks, 1000)
    name4d = "4d. COMLN peak_bytes / ANIL peak_bytes, ResNet-12 (d = 16,000)"
    if k:
        c, a = _get(rows, rn, "comln", k, "peak_bytes"), _get(rows, rn, "anil", k, "peak_bytes")
        t.append(dict(name=name4d, value=f"{c / a:.3f} ({_fmt_bytes(c)} / {_fmt_bytes(a)})", goal="<= 0.1",
                      met=c / a <= 0.1, at=f"K={k}",
                      detail=", ".join(f"K={s}: {_get(rows, rn, 'comln', s, 'peak_bytes') / _get(rows, rn, 'anil', s, 'peak_bytes'):.3f}" for s in ks)))
        head = sorted((d for d in diag_rows if d.get("benchmark") == rn and d.get("method") == "head-only"
                       and d.get("comln_over_anil") is not None), key=lambda d: d["steps"])
        if head:
            t[-1]["detail"] += "; head alone (features fixed): " + ", ".join(
                f"K={d['steps']}: {_fmt_bytes(d['comln_head_bytes'])} / {_fmt_bytes(d['anil_head_bytes'])} "
                f"= {d['comln_over_anil']:.3f}" for d in head)
    elif any(r["benchmark"] == rn for r in rows):
        t.append(dict(name=name4d, value="-", goal="<= 0.1", met=None, at="not measured"))
    ks = [s for s in (_steps_with(rows, conv, ["comln", "comln-euler"], "seconds") if conv else []) if s * H >= 1]
    if ks:
        ratios = {s: _get(rows, conv, "comln", s, "seconds") / _get(rows, conv, "comln-euler", s, "seconds") for s in ks}
        t.append(dict(name="4c. COMLN Dopri5 seconds / Euler seconds, T >= 1", value=", ".join(f"K={s}: {v:.2f}" for s, v in ratios.items()),
                      goal="< 1 for every T >= 1", met=all(v < 1 for v in ratios.values()), at=f"K={ks[0]}..{ks[-1]}"))
    else:
        t.append(dict(name="4c. COMLN Dopri5 seconds / Euler seconds, T >= 1", value="-", goal="< 1", met=None, at="not measured"))

    # (5) vmap speed-up.
    v = next((r for r in vmap_rows if r["method"] == "amaml-vmap"), None)
    if v:
        t.append(dict(name="5. vmap speed-up over a Python loop (A-MAML, 5 CosMixture tasks)",
                      value=f"{v['speedup']:.2f}x", goal=">= 3", met=v["speedup"] >= 3, at=f"K={v['steps']}"))
    else:
        t.append(dict(name="5. vmap speed-up over a Python loop", value="-", goal=">= 3", met=None, at="not measured"))

    # (6) checkpointed A-MAML.
    for bench in [b for b in ("cosmixture", conv) if b]:
        ks = _steps_with(rows, bench, ["amaml", "amaml-ckpt"], "peak_bytes")
        if not ks:
            continue
        k = ks[-1]
        mr = _get(rows, bench, "amaml-ckpt", k, "peak_bytes") / _get(rows, bench, "amaml", k, "peak_bytes")
        kt = _steps_with(rows, bench, ["amaml", "amaml-ckpt"], "seconds")
        tr = ""
        if kt:
            tr = ", time ratio " + ", ".join(
                f"K={s}: {_get(rows, bench, 'amaml-ckpt', s, 'seconds') / _get(rows, bench, 'amaml', s, 'seconds'):.2f}" for s in kt)
        t.append(dict(name=f"6. amaml-ckpt / amaml peak_bytes ({bench})", value=f"{mr:.3f}", goal="< 1 (time: reported)",
                      met=mr < 1, at=f"K={k}, C={checkpoints_for(k)}",
                      detail="memory " + ", ".join(
                          f"K={s}: {_get(rows, bench, 'amaml-ckpt', s, 'peak_bytes') / _get(rows, bench, 'amaml', s, 'peak_bytes'):.3f}" for s in ks) + tr))

    # (7) the adaptive backward (`Adjoint()`) against its own forward, and its memory against
    # the stored sweep at the paper's h = 0.01, on CosMixture 100-shot at T = 5 (K = 500).
    ks = _steps_with(rows, "cosmixture", ["amaml-adaptive"], "seconds")
    if ks:
        k = _closest(ks, 500)
        sec = _get(rows, "cosmixture", "amaml-adaptive", k, "seconds")
        fwd = _get(rows, "cosmixture", "amaml-adaptive", k, "forward_seconds")
        ratio = sec / fwd if sec and fwd else float("nan")
        t.append(dict(name="7. amaml-adaptive meta-gradient / its forward (cosmixture)", value=f"{ratio:.2f}",
                      goal="<= 3", met=bool(ratio <= 3), at=f"T={k * H:g}",
                      detail=", ".join(
                          f"T={s * H:g}: {_get(rows, 'cosmixture', 'amaml-adaptive', s, 'seconds') / _get(rows, 'cosmixture', 'amaml-adaptive', s, 'forward_seconds'):.2f}"
                          for s in ks)))
    km = _steps_with(rows, "cosmixture", ["amaml", "amaml-adaptive"], "peak_bytes")
    if km:
        k = _closest(km, 500)
        mr = _get(rows, "cosmixture", "amaml-adaptive", k, "peak_bytes") / _get(rows, "cosmixture", "amaml", k, "peak_bytes")
        t.append(dict(name="8. amaml-adaptive / amaml (stored, h = 0.01) peak_bytes (cosmixture)", value=f"{mr:.3f}",
                      goal="<= 1", met=bool(mr <= 1), at=f"T={k * H:g}",
                      detail=", ".join(
                          f"T={s * H:g}: {_get(rows, 'cosmixture', 'amaml-adaptive', s, 'peak_bytes') / _get(rows, 'cosmixture', 'amaml', s, 'peak_bytes'):.3f}"
                          for s in km)))
    return t


def _met(m):
    return "met" if m is True else ("not met" if m is False else "not measured")


def targets_markdown(targets, diag_rows=()) -> str:
    lines = ["| target | value | goal | where | result |", "| --- | --- | --- | --- | --- |"]
    for t in targets:
        lines.append(f"| {t['name']} | {t['value']} | {t['goal']} | {t['at']} | **{_met(t['met'])}** |")
    details = [f"- {t['name']}: {t['detail']}" for t in targets if t.get("detail")]
    text = "\n".join(lines) + "\n"
    if details:
        text += "\nAll step counts:\n\n" + "\n".join(details) + "\n"
    notes = limit_notes(diag_rows)
    if notes:
        text += "\nWhat limits them (measured, diagnostics.csv):\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return text


def limit_notes(diag_rows) -> list[str]:
    """One line per diagnostic: the measured quantities behind the targets."""
    notes = []
    for d in diag_rows or ():
        if d.get("error"):
            notes.append(f"{d.get('benchmark')} {d.get('method')} K={d.get('steps')}: diagnostic failed: {d['error']}")
        elif d.get("sweep_seconds") is not None:
            k = d["steps"]
            notes.append(
                f"A-MAML, CosMixture K={k}, meta-batch {d['meta_batch']}: Dopri5 took {d['dopri5_steps']} steps "
                f"({d['rejected_steps']} rejected), ~{6 * d['dopri5_steps'] + 1} gradient evaluations; forward to u(T) "
                f"{_fmt_s(d['fwd_t1_seconds'])}, forward storing {k + 1} states {_fmt_s(d['fwd_stored_seconds'])}, "
                f"backward Heun sweep ({2 * k} HVPs) {_fmt_s(d['sweep_seconds'])}; one gradient "
                f"{d['grad_eval_seconds'] * 1e6:.0f} us, one HVP {d['hvp_seconds'] * 1e6:.0f} us "
                f"({d['hvp_per_grad']:.2f} gradients; {d['hvp_u_only_seconds'] * 1e6:.0f} us without the data cotangent); "
                f"(stored forward + sweep) / forward = "
                f"{(d['fwd_stored_seconds'] + d['sweep_seconds']) / d['fwd_t1_seconds']:.1f}.")
        elif d.get("method") == "amaml" and d.get("grad_evals_per_h") is not None:
            notes.append(f"A-MAML, {d['benchmark']} K={d['steps']} (T={d['T']:g}): Dopri5 {d['dopri5_steps']} steps "
                         f"= {d['grad_evals_per_h']:.2f} gradient evaluations per h = 0.01 (backward: 2 HVPs per h).")
        elif d.get("head_init"):
            notes.append(f"A-MAML, whole Conv-4 ({d['benchmark']}), {d['head_init']} head: Dopri5 needs "
                         f"~{d['dopri5_steps']} steps to T = {d.get('T', 0.1):g} (last step {d['last_dt']:.2g}; "
                         f"reached t = {d['reached_t']:.3g} in the counted steps).")
        elif d.get("method") == "comln" and d.get("euler_steps") is not None:
            notes.append(f"COMLN, {d['benchmark']} K={d['steps']} (T={d['T']:g}): Dopri5 {d['dopri5_steps']} steps "
                         f"({d['dopri5_evals']} evaluations of the augmented field) vs Euler {d['euler_steps']}.")
        elif d.get("method") == "comln-head-only":
            notes.append(f"COMLN head only (features fixed), K={d['steps']}: Dopri5 {_fmt_s(d['dopri5_head_seconds'])} "
                         f"vs Euler {_fmt_s(d['euler_head_seconds'])} (ratio {d['dopri5_over_euler']:.2f}, "
                         f"timed alternately).")
    return notes


def print_summary(targets, console=None):
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="ctmeta bench: targets (ratios within this run)")
    for col in ("target", "value", "goal", "where", "result"):
        table.add_column(col)
    for t in targets:
        style = "green" if t["met"] is True else ("red" if t["met"] is False else "yellow")
        table.add_row(t["name"], t["value"], t["goal"], t["at"], f"[{style}]{_met(t['met'])}[/]")
    console.print(table)


def table_markdown(rows, columns=None) -> str:
    if not rows:
        return ""
    columns = columns or _union_keys(rows)

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "/")

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def rows_markdown(rows) -> str:
    """bench.csv as a readable markdown table (MB and ms)."""
    cols = ["benchmark", "method", "steps", "T", "peak MB", "temp MB", "seconds", "forward s", "repeats",
            "meta_batch", "checkpoints", "status"]
    out = []
    for r in rows:
        pb, tb = r.get("peak_bytes"), r.get("temp_bytes")
        out.append({
            "benchmark": r["benchmark"], "method": r["method"], "steps": r["steps"], "T": r["T"],
            "peak MB": None if pb is None else round(pb / 1e6, 2), "temp MB": None if tb is None else round(tb / 1e6, 2),
            "seconds": r.get("seconds"), "forward s": r.get("forward_seconds"),
            "repeats": f"{r.get('repeats')}/{r.get('forward_repeats')}", "meta_batch": r["meta_batch"],
            "checkpoints": r.get("checkpoints"), "status": r.get("status"),
        })
    return table_markdown(out, cols)


# --------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------- #


def plot(rows, out_dir, limit_bytes: float = 8e9) -> list[pathlib.Path]:
    """One PNG per benchmark: memory (left) and time (right) against steps, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = pathlib.Path(out_dir)
    paths = []
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
        for i, method in enumerate(dict.fromkeys(r["method"] for r in rows if r["benchmark"] == bench)):
            rs = sorted((r for r in rows if r["benchmark"] == bench and r["method"] == method), key=lambda r: r["steps"])
            color = f"C{i}"
            # MB (1e6 bytes), the unit of the log lines and of bench.md.
            mem = [(r["steps"], r["peak_bytes"] / 1e6, r.get("seconds") is not None) for r in rs if r.get("peak_bytes")]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], "-", color=color, label=method)
                ax_m.plot([m[0] for m in mem if m[2]], [m[1] for m in mem if m[2]], "o", color=color)
                ax_m.plot([m[0] for m in mem if not m[2]], [m[1] for m in mem if not m[2]], "o", color=color,
                          markerfacecolor="none")
            tim = [(r["steps"], r["seconds"]) for r in rs if r.get("seconds") is not None]
            if tim:
                ax_t.plot([x[0] for x in tim], [x[1] for x in tim], "o-", color=color, label=method)
        top = max((r["peak_bytes"] for r in rows if r["benchmark"] == bench and r.get("peak_bytes")), default=0)
        if top > limit_bytes / 10:
            ax_m.axhline(limit_bytes / 1e6, color="grey", ls="--", lw=1)
            ax_m.text(ax_m.get_xlim()[0], limit_bytes / 1e6, f" run limit {_fmt_bytes(limit_bytes)}",
                      va="bottom", fontsize=8, color="grey")
        for ax, ylabel in ((ax_m, "peak memory of the meta-gradient (MB)"), (ax_t, "seconds per meta-gradient")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("inner steps K = T / h  (h = 0.01)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        mb = next(r["meta_batch"] for r in rows if r["benchmark"] == bench)
        untimed = any(r.get("peak_bytes") and r.get("seconds") is None for r in rows if r["benchmark"] == bench)
        ax_m.set_title(f"{bench}: memory (XLA, compiled" + ("; hollow: memory only, not timed)" if untimed else ")"),
                       fontsize=10)
        ax_t.set_title(f"{bench}: time, meta-batch {mb} (median)", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"bench-{bench}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="ctmeta bench",
        description="Memory and time of each meta-gradient rule against the number of inner steps "
                    "(A-MAML Figs. 3-4, COMLN Fig. 3). Writes bench.csv, figures and targets.md.",
    )
    p.add_argument("--quick", action="store_true", help="two step counts (10, 100), 2 repeats, 40 s per point")
    p.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    p.add_argument("--cases", nargs="+", default=None,
                   help="benchmarks or benchmark/method items, e.g. cosmixture omniglot/comln+anil "
                        f"(default: {' '.join(DEFAULT_CASES)}; also miniimagenet, miniimagenet-resnet12)")
    p.add_argument("--steps", nargs="+", type=int, default=None,
                   help=f"inner step counts (default {' '.join(map(str, DEFAULT_STEPS))}; quick {' '.join(map(str, QUICK_STEPS))})")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per point (default 5, quick 2)")
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-batch (default 5 cosmixture, 1 Conv-4)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds one point may take (default 120, quick 40)")
    p.add_argument("--max-bytes", type=float, default=8e9, help="compiled memory above which a case is not run (8e9)")
    p.add_argument("--data-dir", default=None, help="folder with omniglot/ and miniimagenet/ (default ../shared/data)")
    p.add_argument("--no-vmap", action="store_true", help="skip the vmap-vs-loop measurement")
    p.add_argument("--no-diagnostics", action="store_true", help="skip the time breakdowns")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--diagnostics-only", action="store_true",
                   help="read OUT/bench.csv (and vmap.csv) of an earlier run, measure the diagnostics again, "
                        "rewrite diagnostics.csv, targets.md and the figures")
    return p


def rerun_diagnostics(out_dir, *, repeats: int = 3, data_dir=None, console=None) -> list[dict]:
    """`--diagnostics-only`: the diagnostics of an earlier run's `bench.csv`, and its targets again."""
    from rich.console import Console

    console = console or Console(stderr=True)
    out = pathlib.Path(out_dir)
    rows = read_csv(out / "bench.csv")
    for r in rows:
        r["checkpoints"] = "" if r.get("checkpoints") is None else r["checkpoints"]
    vmap_rows = read_csv(out / "vmap.csv") if (out / "vmap.csv").is_file() else []
    problems = {}
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        mb = next(r["meta_batch"] for r in rows if r["benchmark"] == bench)
        problems[bench] = make_problem(bench, mb, data_dir=data_dir)
    quick = len({r["steps"] for r in rows}) <= 2
    diag = run_diagnostics(rows, problems, repeats=repeats, quick=quick, data_dir=data_dir)
    write_csv(out / "diagnostics.csv", diag, _union_keys(diag))
    plot(rows, out)
    targets = evaluate_targets(rows, vmap_rows, diag)
    text = (out / "targets.md").read_text() if (out / "targets.md").is_file() else "# ctmeta bench: targets\n\n"
    head = text.split("| target |")[0]
    (out / "targets.md").write_text(head + targets_markdown(targets, diag))
    print_summary(targets, console)
    return diag


def main(argv: list[str] | None = None) -> int:
    """`ctmeta bench [--quick] --out DIR ...`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.diagnostics_only:
            rerun_diagnostics(args.out, repeats=args.repeats or 3, data_dir=args.data_dir)
            return 0
        run(
            args.cases, args.steps, args.out, args.quick, args.repeats,
            meta_batch=args.meta_batch, time_budget=args.time_budget, max_bytes=args.max_bytes,
            vmap=not args.no_vmap, diagnostics=not args.no_diagnostics, data_dir=args.data_dir,
            progress=not args.no_progress,
        )
    except InputError as err:
        print(f"ctmeta bench: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
