"""The meta-batch split over devices and hosts: a device mesh with a task axis.

The tasks of a meta-batch are independent until their meta-gradients are
averaged, so the natural way to use several devices is to give each device a
slice of the tasks and to keep the meta-parameters and the optimiser's state
*replicated* (a copy on every device). A [`task_mesh`][] is a
`jax.sharding.Mesh` with one axis, `"tasks"`; given one,
`MetaLearner(..., mesh=mesh)` runs the per-task work (adaptation, query loss,
meta-gradient) under `jax.shard_map`, each device on its own tasks, and the
average over tasks becomes an all-reduce. The same code runs on one CPU,
several GPUs of one machine, or several machines:

- **one process**: `task_mesh()` spans `jax.devices()`, the local devices.
- **several processes** (one per host, typically): each calls
  [`initialize`][] (`jax.distributed.initialize`) before any other JAX
  work; `jax.devices()` then lists the devices of every process and
  `task_mesh()` spans them all. Every process samples the *same* full
  meta-batch (the sampler is a deterministic function of the iteration's
  key) and [`place_tasks`][] builds global arrays from it with
  `jax.make_array_from_callback`, each process supplying only the shards of
  its own devices. Nothing but the collectives of the meta-step crosses
  hosts.

Everything a host reads back (metrics, new parameters, checkpoints) is
replicated, hence readable on every process. On CPU, the collectives between
processes use gloo (JAX's default `jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._errors import InputError

PyTree = Any

__all__ = [
    "TASK_AXIS",
    "check_cluster",
    "check_mesh",
    "constrain_replicated",
    "initialize",
    "is_main_process",
    "map_over_tasks",
    "place_replicated",
    "place_tasks",
    "task_mesh",
    "tasks_per_device",
]

#: The name of the mesh axis the tasks of a meta-batch are split over.
TASK_AXIS = "tasks"

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def initialize(coordinator_address: str, num_processes: int, process_id: int, *, timeout: int = 300) -> None:
    """Join a multi-process JAX job (`jax.distributed.initialize`).

    Call it in every process, before any other JAX computation, with the same
    `coordinator_address` (`"host:port"` of process 0, which listens there)
    and `num_processes`, and this process's `process_id` in
    `0..num_processes-1`. With `num_processes == 1` it does nothing. Raises
    `InputError` on a malformed address or an out-of-range id, and when the
    coordinator cannot be reached within `timeout` seconds.
    """
    check_cluster(coordinator_address, num_processes, process_id)
    if num_processes == 1:
        return
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=int(timeout),
        )
    except (RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "must be called before" in str(err) or "only be called once" in str(err):
            raise InputError(
                f"cannot join the multi-process job: {first} (initialize must come before any JAX computation, "
                "once per process)"
            ) from None
        raise InputError(
            f"cannot join the multi-process job at {coordinator_address} as process {process_id} of "
            f"{num_processes}: {first}. Start every process with the same `coordinator_address` (process 0's "
            "host and a free port) and `num_processes`, and distinct `process_id`."
        ) from None


def check_cluster(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """The checks of [`initialize`][] without joining anything: `InputError`
    on a malformed `HOST:PORT`, a non-positive `num_processes` or a
    `process_id` outside `0..num_processes-1`."""
    if not isinstance(coordinator_address, str) or not _ADDRESS.match(coordinator_address):
        raise InputError(
            f"`coordinator_address` must be HOST:PORT (the address process 0 listens on), "
            f"got {coordinator_address!r}"
        )
    port = int(coordinator_address.rsplit(":", 1)[1])
    if not 0 < port < 65536:
        raise InputError(f"`coordinator_address` {coordinator_address}: port {port} is not in 1..65535")
    for name, value in (("`num_processes`", num_processes), ("`process_id`", process_id)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{name} must be an integer, got {value!r}")
    if num_processes < 1:
        raise InputError(f"`num_processes` must be a positive integer, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise InputError(
            f"`process_id` {process_id} is out of range: with `num_processes` {num_processes} it must be "
            f"in 0..{num_processes - 1}"
        )


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes files."""
    return jax.process_index() == 0


def task_mesh(devices: Sequence[jax.Device] | None = None, *, per_process: int | None = None) -> Mesh:
    """A one-axis mesh, `"tasks"`, over `devices` (default: `jax.devices()`,
    every device of every process).

    `per_process`: use only the first `per_process` devices of each process
    (the same number on every process). The devices are ordered by process,
    so that each process's tasks are a contiguous slice of the meta-batch.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise InputError("task_mesh: no devices given")
    if len({(d.process_index, d.id) for d in devices}) != len(devices):
        raise InputError("task_mesh: a device is listed twice")
    devices.sort(key=lambda d: (d.process_index, d.id))
    if per_process is not None:
        if isinstance(per_process, bool) or not isinstance(per_process, int) or per_process < 1:
            raise InputError(f"`per_process` must be a positive integer, got {per_process!r}")
        local = sum(d.process_index == jax.process_index() for d in devices)
        if per_process > local:
            raise InputError(
                f"`per_process` {per_process}: this process has only {local} device{'s' if local > 1 else ''} "
                f"({devices[0].platform})"
            )
        taken: dict[int, int] = {}
        kept = []
        for d in devices:
            if taken.get(d.process_index, 0) < per_process:
                taken[d.process_index] = taken.get(d.process_index, 0) + 1
                kept.append(d)
        devices = kept
    return Mesh(np.asarray(devices, dtype=object), (TASK_AXIS,))


def check_mesh(mesh: Mesh) -> Mesh:
    """`mesh`, or `InputError` unless it is a `Mesh` with a `"tasks"` axis."""
    if not isinstance(mesh, Mesh) or TASK_AXIS not in mesh.axis_names:
        raise InputError(f"mesh must be a jax.sharding.Mesh with a {TASK_AXIS!r} axis (see task_mesh()); got {mesh!r}")
    return mesh


def tasks_per_device(meta_batch: int, mesh: Mesh) -> int:
    """How many tasks each device gets; `InputError` unless `meta_batch` is a
    multiple of the number of devices along the task axis."""
    devices = check_mesh(mesh).shape[TASK_AXIS]
    if meta_batch % devices:
        below, above = (meta_batch // devices) * devices, (meta_batch // devices + 1) * devices
        suggest = " or ".join(str(m) for m in (below, above) if m > 0)
        raise InputError(
            f"`meta_batch` {meta_batch} cannot be split evenly over {devices} devices: use a multiple of "
            f"{devices} (e.g. {suggest}), or fewer devices (`per_process`, CUDA_VISIBLE_DEVICES)"
        )
    return meta_batch // devices


def _place(x, sharding: NamedSharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable:  # one process: a plain transfer
        return jax.device_put(x, sharding)
    # Several processes: every process holds the same full value and supplies
    # the shards of its own devices.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_tasks(batch: PyTree, mesh: Mesh) -> PyTree:
    """`batch` (every array with a leading task axis, the same full value on
    every process) as global arrays split over the mesh's task axis."""
    leaves = [x for x in jax.tree.leaves(batch) if eqx.is_array_like(x) and np.ndim(x) > 0]
    if not leaves:
        raise InputError("place_tasks: the batch has no arrays with a task axis")
    n = int(np.shape(leaves[0])[0])
    if any(int(np.shape(x)[0]) != n for x in leaves):
        raise InputError("place_tasks: the batch's arrays disagree on the number of tasks (leading axis)")
    tasks_per_device(n, mesh)
    split = NamedSharding(mesh, PartitionSpec(TASK_AXIS))
    return jax.tree.map(lambda x: _place(x, split) if eqx.is_array(x) else x, batch)


def place_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
    """`tree`'s arrays (the same value on every process) copied to every
    device of the mesh; other leaves unchanged."""
    everywhere = NamedSharding(check_mesh(mesh), PartitionSpec())
    return jax.tree.map(lambda x: _place(x, everywhere) if eqx.is_array(x) else x, tree)


def constrain_replicated(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """Inside `jit`: ask for `tree`'s arrays replicated over the mesh, so that
    every process can read them (an all-gather where they were split)."""
    if mesh is None:
        return tree
    everywhere = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, everywhere) if eqx.is_array(x) else x, tree
    )


def map_over_tasks(fn: Callable, mesh: Mesh | None) -> Callable:
    """`fn(shared, tasks) -> per-task outputs`, run per device on its own slice
    of `tasks` (split along their leading axis over the mesh's task axis) with
    `shared` replicated; the outputs are split the same way. Without a mesh,
    `fn` itself.

    Inside, `fn` sees the device's slice only, so it must treat tasks
    independently (a `vmap` over tasks does). Gradients taken inside are
    per device: no implicit sum over devices (`check_vma=False`).
    """
    if mesh is None:
        return fn
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(TASK_AXIS)),
        out_specs=PartitionSpec(TASK_AXIS),
        check_vma=False,
    )
