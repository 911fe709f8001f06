r"""Compiling and timing one meta-gradient: XLA's memory of the compiled program, median wall times.

The meta-gradient of a meta-batch of $B$ tasks is the task average
$\frac1B \sum_b \nabla_\theta L^q_b(u_b(T))$, each task's term by
`jax.value_and_grad` under one `jax.vmap` (for Reptile, the direction
$\theta - u_K$ instead, no derivative).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from .._internal import all_finite
from ..methods import reptile_direction
from .problems import H, Problem, make_problem

__all__ = ["meta_gradient_fn", "task_mean", "compile_fn", "time_call", "median_time", "alternate_medians",
           "device_description", "measure_vmap"]


def task_mean(tree):
    """The mean over the leading (task) axis of every leaf."""
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), tree)


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
            return jnp.mean(losses), task_mean(grads)

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


def _times(fn, args, n: int) -> list[float]:
    """Wall times of `n` calls of `fn(*args)`, each ended by `block_until_ready`."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def time_call(compiled, args, repeats: int, budget: float) -> tuple[float, int, list[float]]:
    """Median seconds of `compiled(*args)` after one warm-up call; `(median, timed calls, times)`.

    The number of timed calls is `repeats`, cut so that warm-up plus the calls
    stay within `budget` seconds; if the warm-up alone exhausts it, its own
    time is returned with 0 timed calls.
    """
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    warm = time.perf_counter() - t0
    if not bool(all_finite(out)):
        raise FloatingPointError("non-finite meta-gradient or loss")
    n = min(repeats, int(max(0.0, budget - warm) // max(warm, 1e-9)))
    if n <= 0:
        return warm, 0, [warm]
    times = _times(compiled, args, n)
    return statistics.median(times), n, times


def median_time(fn, args, repeats: int) -> float:
    """Median seconds of `repeats` calls of `fn(*args)` after one untimed call."""
    jax.block_until_ready(fn(*args))
    return statistics.median(_times(fn, args, repeats))


def alternate_medians(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each of `calls` (no arguments), timed in turn `repeats` times
    after one untimed call each: load from other processes hits them all alike."""
    for call in calls.values():
        jax.block_until_ready(call())
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, call in calls.items():
            times[k] += _times(call, (), 1)
    return {k: statistics.median(v) for k, v in times.items()}


def device_description() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    if d.platform == "cpu":
        return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return f"{d.platform} ({kind})"


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
    med = alternate_medians({"vmap": lambda: batched(problem.params, problem.batch),
                             "loop": lambda: [single(problem.params, t) for t in tasks]}, repeats)
    mv, ml = med["vmap"], med["loop"]
    common = dict(benchmark="cosmixture", steps=steps, T=steps * H, meta_batch=meta_batch, repeats=repeats,
                  device=device or device_description(), dtype="float32")
    return [
        dict(method="amaml-vmap", seconds=mv, **common, speedup=ml / mv),
        dict(method="amaml-loop", seconds=ml, **common, speedup=1.0),
    ]
