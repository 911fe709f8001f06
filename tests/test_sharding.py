"""The meta-batch split over devices and processes (`ctmeta.sharding`).

JAX fixes its devices at start-up, so the multi-device checks run in
subprocesses: one with four CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=4`), and a two-process
job on localhost (gloo collectives) driven through `ctmeta train`. All in
float64, where a sharded result must equal one device's up to the order of
the final sum over tasks.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

import ctmeta.presets as presets
from ctmeta import FirstOrder, InputError, Unrolled
from ctmeta.cli import main
from ctmeta.meta import MetaLearner
from ctmeta.checkpoint import load_state
from ctmeta.losses import mse
from ctmeta.models import MLP
from ctmeta.sharding import check_cluster, place_tasks, task_mesh, tasks_per_device

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    env["JAX_ENABLE_X64"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


# ------------------------------------------------------------ four devices

FOUR_DEVICES = textwrap.dedent(
    """
    import json, equinox as eqx, jax, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    from ctmeta import Adjoint, InputError, Unrolled
    from ctmeta.cli import main
    from ctmeta.meta import MetaLearner
    from ctmeta.losses import mse
    from ctmeta.models import MLP
    from ctmeta.sharding import place_tasks, task_mesh
    from test_meta import sine_batch

    def gap(a, b):
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    def learner(method, mesh=None):
        model = MLP(1, 1, 8, 1, key=jax.random.PRNGKey(0))
        return MetaLearner(model, method, optax.sgd(0.1), mse, T=0.2, mesh=mesh)

    out = {"devices": jax.device_count()}
    mesh = task_mesh()
    batch = sine_batch(jax.random.PRNGKey(2), meta_batch=8, shots=5, queries=5)
    placed = place_tasks(batch, mesh)
    out["shards"] = sorted((s.device.id, s.data.shape[0]) for s in placed[0].addressable_shards)
    out["spec"] = str(placed[0].sharding.spec)
    for name, method in {"adjoint": Adjoint(steps=4), "unrolled": Unrolled(steps=3)}.items():
        one, many = learner(method), learner(method, mesh)
        state = one.init(jax.random.PRNGKey(1))
        loss1, grad1 = one.meta_gradient(state, batch)
        loss4, grad4 = many.meta_gradient(state, batch)
        # One device's meta-step, from its meta-gradient (saves compiling it).
        updates, _ = one.optimizer.update(grad1, state.opt_state, state.params)
        params1 = eqx.apply_updates(state.params, updates)
        s4, m4 = many.meta_step(state, batch)
        params4 = s4.params
        s4, _ = many.meta_step(s4, sine_batch(many.iteration_key(s4), meta_batch=8, shots=5, queries=5))
        out[name] = {
            "loss": abs(float(loss1) - float(loss4)),
            "grad": gap(grad1, grad4),
            "grad_scale": max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grad1)),
            "params": gap(params1, params4),
            "step_loss": abs(float(loss1) - float(m4["meta_loss"])),
            "iteration": int(s4.iteration),
            "traces": many.num_traces,
            "params_spec": str(jax.tree.leaves(s4.params)[0].sharding.spec),
        }
    # RKC2 (per-task adaptive steps and spectral estimates): the meta-gradient alone (its meta-step is the
    # same optimiser update as above; compiling it again would double this check's time).
    rkc1, rkc4 = learner(Adjoint(solver="rkc2")), learner(Adjoint(solver="rkc2"), mesh)
    loss1, grad1 = rkc1.meta_gradient(state, batch)
    loss4, grad4 = rkc4.meta_gradient(state, batch)
    out["rkc2"] = {"loss": abs(float(loss1) - float(loss4)), "grad": gap(grad1, grad4),
                   "grad_scale": max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grad1))}
    ev1 = one.evaluate(state, batch, (0, 3), chunk_size=3)
    ev4 = many.evaluate(state, batch, (0, 3), chunk_size=3)  # chunks of 4 on 4 devices
    out["evaluate"] = float(np.max(np.abs(ev1.per_task - ev4.per_task)))
    try:
        many.meta_gradient(state, sine_batch(jax.random.PRNGKey(3), meta_batch=6, shots=5, queries=5))
        out["indivisible"] = None
    except InputError as err:
        out["indivisible"] = str(err)
    out["cli_indivisible"] = main(["train", "--method", "fomaml", "--steps", "2", "--meta-batch", "3",
                                   "--meta-iterations", "1", "--quiet", "--out", "never-written"])
    print("RESULT " + json.dumps(out))
    """
)


def test_sharded_meta_gradients_and_steps_equal_one_device(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", FOUR_DEVICES], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["devices"] == 4
    # The batch is really split: two tasks on each of the four devices.
    assert out["shards"] == [[0, 2], [1, 2], [2, 2], [3, 2]] and "tasks" in out["spec"]
    r = out["rkc2"]
    assert r["grad_scale"] > 1e-3 and r["loss"] < 1e-12 and r["grad"] < 1e-12, r
    for name in ("adjoint", "unrolled"):
        r = out[name]
        assert r["grad_scale"] > 1e-3  # a meta-gradient worth comparing
        assert r["loss"] < 1e-12 and r["grad"] < 1e-12, (name, r)
        assert r["params"] < 1e-12 and r["step_loss"] < 1e-12, (name, r)  # SGD: the step is the gradient's
        assert r["iteration"] == 2 and r["traces"] == 1, (name, r)  # one compilation for the steps
        assert r["params_spec"] in ("P()", "PartitionSpec()")  # replicated: readable everywhere
    assert out["evaluate"] < 1e-12
    assert out["indivisible"] and "`meta_batch` 6" in out["indivisible"] and "4 devices" in out["indivisible"]
    assert out["cli_indivisible"] == 2
    assert "--meta-batch 3" in proc.stderr and "4 devices" in proc.stderr
    assert not (tmp_path / "never-written").exists()


# ------------------------------------------------------------ one device


def test_a_one_device_mesh_changes_nothing():
    model = MLP(1, 1, 8, 1, key=jax.random.PRNGKey(0))
    one = MetaLearner(model, FirstOrder(steps=1), optax.sgd(0.1), mse, T=0.2)
    meshed = MetaLearner(model, FirstOrder(steps=1), optax.sgd(0.1), mse, T=0.2, mesh=task_mesh())
    from test_meta import sine_batch

    batch = sine_batch(jax.random.PRNGKey(2), meta_batch=3, shots=4, queries=4)
    state = one.init(jax.random.PRNGKey(1))
    a, _ = one.meta_step(state, batch)
    b, _ = meshed.meta_step(state, batch)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert one.mesh is None and meshed.mesh is not None


def test_bad_meshes_and_flags_raise_input_error():
    with pytest.raises(InputError, match="tasks"):
        MetaLearner(MLP(1, 1, 4, 1, key=jax.random.PRNGKey(0)), Unrolled(steps=1), optax.sgd(0.1), mse,
                    mesh=jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",)))
    with pytest.raises(InputError, match=r"`meta_batch` 5 .* 2 devices.*4 or 6"):
        tasks_per_device(5, jax.sharding.Mesh(np.asarray(jax.devices() * 2).reshape(2), ("tasks",)))
    with pytest.raises(InputError, match="HOST:PORT"):
        check_cluster("localhost", 2, 0)
    with pytest.raises(InputError, match="out of range"):
        check_cluster("127.0.0.1:1234", 2, 2)
    with pytest.raises(InputError, match="`per_process` 2"):
        task_mesh(per_process=2)
    with pytest.raises(InputError, match="disagree"):
        place_tasks((np.zeros((2, 1)), np.zeros((3, 1))), task_mesh())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-processes", "2"], "--coordinator-address"),
        (["--coordinator-address", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "out of range"),
        (["--coordinator-address", "127.0.0.1", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
        (["--coordinator-address", "127.0.0.1:1", "--num-processes", "0", "--process-id", "0"], "--num-processes"),
        (["--coordinator-address", "127.0.0.1:1", "--num-processes", "2", "--process-id", "1"], "--out"),
        (["--devices", "0"], "--devices"),
        (["--devices", "64"], "--devices 64"),
    ],
)
def test_distributed_flags_are_checked_before_any_work(flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = [] if "--out" in message else ["--out", "run"]
    assert main(["train", "--method", "fomaml", "--steps", "2", "--meta-batch", "2", "--quiet", *out, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------ two processes

TRAIN = textwrap.dedent(
    """
    # `ctmeta train` with a short evaluation (as tests/test_cli.py does).
    import dataclasses, sys
    import ctmeta.presets as presets
    from ctmeta.cli import main
    p = presets.BENCHMARKS["cosmixture"]
    presets.BENCHMARKS["cosmixture"] = dataclasses.replace(p, eval_steps=(0, 5), eval_every=5, eval_tasks=6)
    sys.exit(main(sys.argv[1:]))
    """
)
TINY = ["--method", "fomaml", "--steps", "3", "--meta-batch", "4", "--checkpoint-every", "1", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp_path, args: list[str]) -> None:
    """`ctmeta train ARGS` as processes 0 and 1 of a job on localhost."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    cluster = ["--coordinator-address", f"127.0.0.1:{_free_port()}", "--num-processes", "2"]
    procs = [
        subprocess.Popen([sys.executable, str(script), *args, *cluster, "--process-id", str(i)], cwd=tmp_path,
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (stdout, stderr)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i}:\n{stdout[-2000:]}\n{stderr[-3000:]}"
    assert "meta-training" in outputs[0][0] and "meta-training" not in outputs[1][0]  # process 0 prints


def _rows(run: pathlib.Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _params(run: pathlib.Path, iteration: int):
    config = json.loads((run / "config.json").read_text())
    exp = presets.build(config, progress=False, log=lambda m: None)
    state, _ = load_state(run / "checkpoints" / f"ckpt-{iteration}.eqx", exp.learner.init(exp.run_key))
    return state


def test_two_processes_on_localhost_train_and_resume_as_one(tmp_path, monkeypatch):
    # One process, in this one: 3 meta-iterations (the reference).
    p = presets.BENCHMARKS["cosmixture"]
    monkeypatch.setitem(presets.BENCHMARKS, "cosmixture",
                        dataclasses.replace(p, eval_steps=(0, 5), eval_every=5, eval_tasks=6))
    assert jax.config.jax_enable_x64  # tests/conftest.py; the subprocesses get JAX_ENABLE_X64=1
    assert main(["train", *TINY, "--meta-iterations", "3", "--out", str(tmp_path / "one")]) == 0
    # Two processes: iterations 1-2 in a new run, then 3 resumed from its checkpoint.
    _two_processes(tmp_path, ["train", *TINY, "--meta-iterations", "2", "--out", "two"])
    two = tmp_path / "two"
    config = json.loads((two / "config.json").read_text())
    assert config["processes"] == 2 and config["devices"] == 2
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [
        "ckpt-1.eqx", "ckpt-1.json", "ckpt-2.eqx", "ckpt-2.json"]
    _two_processes(tmp_path, ["train", "--resume", "two", "--meta-iterations", "3", "--quiet"])
    config = json.loads((two / "config.json").read_text())
    assert config["resumes"][-1]["from_iteration"] == 2 and config["resumes"][-1]["processes"] == 2

    one_rows, two_rows = _rows(tmp_path / "one"), _rows(two)
    assert [r["iteration"] for r in two_rows] == ["1", "2", "3"]
    for a, b in zip(one_rows, two_rows):
        for column in ("meta_loss", "grad_norm", "T", "skipped"):
            assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-12, abs=1e-14), (column, a, b)
    one_state, two_state = _params(tmp_path / "one", 3), _params(two, 3)
    for x, y in zip(jax.tree.leaves(one_state), jax.tree.leaves(two_state)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-14)
    results = [json.loads((run / "results.json").read_text()) for run in (tmp_path / "one", two)]
    np.testing.assert_allclose(results[0]["learned"]["mean"], results[1]["learned"]["mean"], rtol=1e-12)
