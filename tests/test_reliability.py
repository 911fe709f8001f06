"""Reliability of `ctmeta train`: kill -9 / SIGTERM and resume, corrupted
checkpoints, non-finite tasks.

The runs are tiny (CosMixture, MAML with 5 steps, meta-batch 2) so that the
file runs in about a minute on 2 CPU cores; the subprocess runs are long
enough (a few hundred meta-iterations) to be stopped in the middle.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ctmeta import presets
from ctmeta._errors import CheckpointError, NumericalError
from ctmeta.cli import main
from ctmeta.models import EmbeddingHead
from ctmeta.methods import LinearFlow
from ctmeta.meta import MetaLearner
from ctmeta.losses import cross_entropy, mse
from ctmeta.checkpoint import load_state
from ctmeta.methods import Adjoint
from ctmeta.models import MLP
from ctmeta.ode import SolveStatus
from ctmeta.tasks.base import Batch
from ctmeta.tasks.regression import CosMixture
from ctmeta.runs import RunDir

# One xdist group (pyproject: --dist loadgroup): its tests train the same tiny
# runs, so on one worker the module's fixtures and that worker's compilation
# cache (conftest.py) serve them all; spread over two, both would compile them.
pytestmark = pytest.mark.xdist_group("test_reliability")

SMALL = ["--benchmark", "cosmixture", "--method", "maml", "--steps", "5", "--meta-batch", "2", "--quiet"]
EVERY, TOTAL = 20, 240
LONG = [*SMALL, "--meta-iterations", str(TOTAL), "--checkpoint-every", str(EVERY)]


def _ctmeta() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "ctmeta")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "ctmeta.cli"]


# The tests run in float64 (conftest.py); the subprocesses must too, to compare bits.
# They share a persistent compilation cache (the same programs compile once).
ENV = {**os.environ, "JAX_ENABLE_X64": "1" if jax.config.jax_enable_x64 else "0",
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module", autouse=True)
def _quick(tmp_path_factory):
    """A short meta-test curve (0 and 5 steps) for the in-process runs."""
    ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax-cache"))
    p = presets.BENCHMARKS["cosmixture"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(presets.BENCHMARKS, "cosmixture", dataclasses.replace(p, eval_steps=(0, 5), eval_every=5))
        yield


def _rows(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _without_seconds(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "seconds"}


def _final_state(run):
    """The state of the run's newest checkpoint, loaded through the library."""
    config = json.loads((run / "config.json").read_text())
    exp = presets.build(config, progress=False, log=lambda *_: None)
    state, _, path = RunDir(run).load_latest(exp.learner.init(exp.run_key), warn=lambda *_: None)
    return state, path


def _assert_same_run(a, b, total):
    ra, rb = _rows(a), _rows(b)
    assert len(ra) == len(rb) == total
    # Every row (the final one included) equal, to the last bit of its repr; seconds aside.
    assert [_without_seconds(r) for r in ra] == [_without_seconds(r) for r in rb]
    sa, pa = _final_state(a)
    sb, pb = _final_state(b)
    assert pa.name == pb.name == f"ckpt-{total}.eqx"
    assert pa.read_bytes() == pb.read_bytes()  # params, optimiser state, key, iteration
    la, lb = jax.tree.leaves(sa), jax.tree.leaves(sb)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # The meta-test error at the steps both evaluated (the in-process runs use a shorter curve).
    res_a, res_b = (json.loads((r / "results.json").read_text()) for r in (a, b))
    common = sorted(set(res_a["curve_steps"]) & set(res_b["curve_steps"]))
    assert common and 0 in common
    for step in common:
        ia, ib = res_a["curve_steps"].index(step), res_b["curve_steps"].index(step)
        assert res_a["learned"]["mean"][ia] == res_b["learned"]["mean"][ib]


def _wait_for_checkpoint(proc, out, min_iteration, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        its = [i for i, p in RunDir(out).checkpoints() if p.with_suffix(".json").exists()]
        if its and max(its) >= min_iteration:
            return max(its)
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no checkpoint >= {min_iteration} while the run was going: {proc.communicate()[1][-2000:]}")


def test_sigterm_then_kill_9_then_resume_ends_bit_for_bit_as_an_uninterrupted_run(tmp_path, capsys):
    """SIGTERM: a checkpoint and a message; resume; kill -9 mid-way; resume:
    the final metrics row, every row, and the parameters, optimiser state and
    key equal an uninterrupted run's, bit for bit."""
    reference = tmp_path / "reference"
    assert main(["train", *LONG, "--out", str(reference)]) == 0  # uninterrupted, in-process
    out = tmp_path / "interrupted"

    # 1. SIGTERM after the first periodic checkpoint.
    proc = subprocess.Popen([*_ctmeta(), "train", *LONG, "--out", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(proc, out, EVERY)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and f"ctmeta train --resume {out}" in lines[0]
    # The checkpoint is of the last completed iteration: every metrics row has its state.
    termed_at = max(i for i, _ in RunDir(out).checkpoints())
    assert EVERY <= termed_at < TOTAL and int(_rows(out)[-1]["iteration"]) == termed_at

    # 2. Resume, then kill -9 once it has written a further checkpoint.
    proc = subprocess.Popen([*_ctmeta(), "train", "--resume", str(out), "--quiet"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    nxt = (termed_at // EVERY + 1) * EVERY
    _wait_for_checkpoint(proc, out, min(nxt, TOTAL - EVERY))
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert running and proc.returncode == -signal.SIGKILL, "the resumed run ended before kill -9"
    killed_at = max(i for i, _ in RunDir(out).checkpoints())
    assert termed_at < killed_at < TOTAL

    # 3. Resume to the end (in-process).
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert "resuming" in capsys.readouterr().out
    _assert_same_run(reference, out, TOTAL)
    resumes = json.loads((out / "config.json").read_text())["resumes"]
    assert [r["from_iteration"] for r in resumes][0] == termed_at and len(resumes) == 2
    assert resumes[1]["from_iteration"] >= killed_at - EVERY


# ------------------------------------------------------------- corrupted checkpoints

TINY = [*SMALL, "--meta-iterations", "4", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def _truncate(p):
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _flip(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _bad_shapes(p):
    side = p.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["leaves"][0] = "float32[3,7]"
    side.write_text(json.dumps(meta))


def _no_sidecar(p):
    p.with_suffix(".json").unlink()


def _other_config(p):
    side = p.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["metadata"]["config"]["steps"] = 99
    side.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [_truncate, _flip, _bad_shapes, _no_sidecar, _other_config])
def test_resume_falls_back_from_a_bad_newest_checkpoint(tiny_run, tmp_path, capsys, damage):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    damage(run / "checkpoints" / "ckpt-4.eqx")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    cap = capsys.readouterr()
    assert "skipping ckpt-4.eqx" in cap.err and "falling back" in cap.err
    assert "resuming from ckpt-2.eqx (iteration 2)" in cap.err
    assert "from ckpt-2.eqx (iteration 2)" in cap.out
    # It trained iterations 3 and 4 again, to the same result.
    assert [_without_seconds(r) for r in _rows(run)] == [_without_seconds(r) for r in _rows(tiny_run)]
    assert (run / "checkpoints" / "ckpt-4.eqx").read_bytes() == (tiny_run / "checkpoints" / "ckpt-4.eqx").read_bytes()


def test_resume_with_no_good_checkpoint_exits_2(tiny_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    _truncate(run / "checkpoints" / "ckpt-4.eqx")
    _flip(run / "checkpoints" / "ckpt-2.eqx")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ctmeta: error: no usable checkpoint in") and "2 tried" in err[-1]
    assert "start a new run" in err[-1] and "Traceback" not in "\n".join(err)
    # The same through the API.
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        _final_state(run)


def test_leftover_temporaries_are_removed_and_the_run_dir_is_locked(tiny_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    leftover = run / "checkpoints" / ".ckpt-6.eqx.abc123.tmp"
    leftover.write_bytes(b"partial")
    held = RunDir(run)
    held.lock()  # as if another process were training in it
    try:
        code = subprocess.run([*_ctmeta(), "train", "--resume", str(run), "--quiet"], env=ENV,
                              capture_output=True, text=True, timeout=120)
        assert code.returncode == 2 and "in use by another ctmeta process" in code.stderr
    finally:
        held.unlock()
    assert main(["train", "--resume", str(run), "--meta-iterations", "6", "--quiet"]) == 0
    assert not leftover.exists()
    assert [i for i, _ in RunDir(run).checkpoints()] == [4, 6]


def test_checkpoint_holds_config_and_sampler_without_pickle(tiny_run):
    side = json.loads((tiny_run / "checkpoints" / "ckpt-4.json").read_text())
    meta = side["metadata"]
    assert meta["config"]["method"] == "maml" and meta["config"]["steps"] == 5
    assert meta["sampler"]["rule"] == "fold_in(key, iteration)"
    assert side["iteration"] == 4 and len(side["sha256"]) == 64
    data = (tiny_run / "checkpoints" / "ckpt-4.eqx").read_bytes()
    assert not data.startswith(b"\x80")  # not a pickle stream


def test_sgd_with_a_schedule_resumes_bit_for_bit_after_kill_9(tmp_path, capsys):
    """COMLN's outer optimiser (SGD, Nesterov momentum, Lee et al.'s step
    schedule): the momentum and the schedule's update count are in the
    checkpoint, so a run killed after its iteration-4 checkpoint resumes to
    the uninterrupted run's iteration 6, bit for bit. (Iterations 5 and 6 use
    the schedule's 3rd and 4th learning rates; a lost count would restart it.)"""
    flags = [*SMALL, "--optimizer", "sgd", "--meta-lr", "0.01", "--meta-iterations", "6", "--checkpoint-every", "2"]
    full = tmp_path / "full"
    assert main(["train", *flags, "--out", str(full)]) == 0
    config = json.loads((full / "config.json").read_text())
    assert config["optimizer"] == {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9, "nesterov": True,
                                   "schedule": "step", "decay_steps": 6}
    state, _ = _final_state(full)
    counts = [int(x) for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer)]
    assert counts and set(counts) == {6}  # the schedule's update count
    # kill -9 after the iteration-4 checkpoint: ckpt-6 never written, rows 5-6 torn or absent.
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    for p in (killed / "checkpoints").glob("ckpt-6.*"):
        p.unlink()
    for p in ("results.json", "results.md"):
        (killed / p).unlink()
    lines = (killed / "metrics.csv").read_text().splitlines()
    (killed / "metrics.csv").write_text("\n".join(lines[:6]) + "\n" + lines[6][:7])  # rows 1-5, row 6 torn
    capsys.readouterr()
    # The schedule is part of the run: resuming past its end, or with another optimiser, is refused.
    assert main(["train", "--resume", str(killed), "--meta-iterations", "8", "--quiet"]) == 2
    assert "past the end of the run's step learning-rate schedule" in capsys.readouterr().err
    assert main(["train", "--resume", str(killed), "--optimizer", "adam", "--quiet"]) == 2
    assert main(["train", "--resume", str(killed), "--quiet"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert [_without_seconds(r) for r in _rows(killed)] == [_without_seconds(r) for r in _rows(full)]
    assert (killed / "checkpoints" / "ckpt-6.eqx").read_bytes() == (full / "checkpoints" / "ckpt-6.eqx").read_bytes()


# ------------------------------------------------------------- non-finite tasks


def _poisoned_family(monkeypatch, *, every_task=False):
    """CosMixture whose training task 0 (or every task) has a NaN query target."""
    from ctmeta.tasks.regression import CosMixture

    class Poisoned(CosMixture):
        def sample(self, key, meta_batch, split="train"):
            b = super().sample(key, meta_batch, split)
            if split != "train":
                return b
            bad = b.query_y.at[:, 0, 0].set(jnp.nan) if every_task else b.query_y.at[0, 0, 0].set(jnp.nan)
            return b._replace(query_y=bad)

    original = presets.build_family

    def build_family(config, **kw):
        fam = original(config, **kw)
        return Poisoned(shots=fam.shots, queries=fam.queries, seed=0)

    monkeypatch.setattr(presets, "build_family", build_family)


def test_nonfinite_task_errors_by_default_naming_iteration_and_task(monkeypatch, tmp_path, capsys):
    _poisoned_family(monkeypatch)
    out = tmp_path / "nan"
    assert main(["train", *TINY, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "meta-iteration 1" in err[0] and "task 0" in err[0] and "non-finite" in err[0]
    assert f"--resume {out} --on-nonfinite skip-task" in err[0]
    # The run can go on with the skip policy, from the saved state.
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--on-nonfinite", "skip-task", "--quiet"]) == 0
    rows = _rows(out)
    assert [int(r["skipped"]) for r in rows] == [1, 1, 1, 1]
    assert all(np.isfinite(float(r["meta_loss"])) for r in rows)


def test_skip_task_counts_skipped_tasks_in_metrics(monkeypatch, tmp_path, capsys):
    _poisoned_family(monkeypatch)
    out = tmp_path / "skip"
    assert main(["train", *TINY, "--on-nonfinite", "skip-task", "--out", str(out)]) == 0
    rows = _rows(out)
    assert [int(r["skipped"]) for r in rows] == [1, 1, 1, 1]
    assert json.loads((out / "config.json").read_text())["on_nonfinite"] == "skip-task"
    state, _ = _final_state(out)
    assert int(state.iteration) == 4
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.params))


def test_skip_task_with_every_task_nonfinite_fails_loudly(monkeypatch, tmp_path, capsys):
    _poisoned_family(monkeypatch, every_task=True)
    assert main(["train", *TINY, "--on-nonfinite", "skip-task", "--out", str(tmp_path / "all")]) == 1
    err = capsys.readouterr().err
    assert "meta-iteration 1" in err and "every task" in err


# ------------------------------------------------------------- inner solves out of steps


class _Scale(eqx.Module):
    """A one-layer embedding `x * w` for the COMLN cases."""

    w: jax.Array

    def __call__(self, x):
        return x * self.w


def _one_stiff_task(method: str, policy: str):
    """A learner whose inner solve has a step budget of 64, and a meta-batch of
    three tasks of which task 1 alone is too stiff for it.

    A-MAML (an MLP's gradient flow): task 1's inputs and targets are scaled by
    30, which scales the curvature of its loss (the Hessian), hence the
    stiffness of the flow: Dopri5 needs more than 256 steps where the others
    need fewer than 32. (10 stored states, h = 0.2: the others' curvature,
    about 5, makes h * lambda_max = 2.0 at 5 states, an unstable Heun sweep
    that the adjoint's stability check would flag.) COMLN (a linear head's flow): task 1's support
    examples are one point of norm 100 with both labels, so its loss cannot
    saturate and the flow stays stiff (curvature ~ 100^2 / 4) up to T.
    """
    if method == "amaml":
        learner = MetaLearner(MLP(2, 1, 8, 1, key=jax.random.PRNGKey(0)), Adjoint(steps=10, max_steps=64),
                              optax.sgd(0.1), mse, T=2.0, on_nonfinite=policy)
        batch = CosMixture(shots=5, queries=5).sample(jax.random.PRNGKey(1), 3, "train")
        batch = batch._replace(support_x=batch.support_x.at[1].multiply(30.0),
                               support_y=batch.support_y.at[1].multiply(30.0))
        return learner, batch
    model = EmbeddingHead(embedding=_Scale(jnp.ones((3,))), head=jnp.zeros((2, 3)))
    learner = MetaLearner(model, LinearFlow(max_steps=64), optax.sgd(0.1), cross_entropy, T=5.0,
                          adapt="head", on_nonfinite=policy)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 6, 3))
    y = jnp.tile(jnp.array([0, 1, 0, 1, 0, 1]), (3, 1))
    support = x.at[1].set(100.0 * jnp.ones((6, 3)) / jnp.sqrt(3.0))
    return learner, Batch(support, y, x, y)


@pytest.mark.parametrize("method", ["amaml", "comln"])
def test_skip_task_skips_exactly_the_task_whose_inner_solve_exhausts_max_steps(method, assert_skips_exactly):
    """One task's solve runs out of steps inside the vmapped meta-batch: with
    skip-task, that task alone is left out (and counted), and the update is
    the one from the other tasks alone."""
    learner, batch = _one_stiff_task(method, "skip-task")
    state, new = assert_skips_exactly(learner, batch, 1, SolveStatus.MAX_STEPS)
    # ... and it is an update: the parameters moved.
    assert any(not np.array_equal(a, before)
               for a, before in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)))


def test_raise_names_the_task_whose_inner_solve_exhausts_max_steps():
    learner, batch = _one_stiff_task("amaml", "raise")
    with pytest.raises(NumericalError, match=r"^meta-iteration 1: the inner solve of task 1 of the meta-batch "
                                             r"exhausted its step budget \(max_steps=64\)") as raised:
        learner.meta_step(learner.init(jax.random.PRNGKey(0)), batch)
    assert "task 0" not in str(raised.value) and "task 2" not in str(raised.value)
    assert "on_nonfinite='skip-task'" in str(raised.value)


def test_solver_out_of_steps_is_a_numerical_error_naming_the_iteration():
    """COMLN with a step budget that no task fits in: NumericalError naming
    the iteration, the tasks and the budget."""
    model = EmbeddingHead(embedding=_Scale(jnp.ones((3,))), head=jnp.zeros((2, 3)))
    learner = MetaLearner(model, LinearFlow(max_steps=2, rtol=1e-12, atol=1e-12), optax.sgd(0.1),
                          cross_entropy, T=50.0, adapt="head")
    state = learner.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 3)) * 10
    y = jnp.tile(jnp.array([0, 1, 0, 1, 0, 1]), (2, 1))
    with pytest.raises(NumericalError, match=r"meta-iteration 1: the inner solve of tasks 0, 1 of the "
                                             r"meta-batch exhausted its step budget \(max_steps=2\)"):
        learner.meta_step(state, Batch(x, y, x, y))


@pytest.mark.parametrize("policy", ["raise", "skip-task"])
def test_adjoint_solve_out_of_steps_in_every_task_is_a_numerical_error(policy):
    """A-MAML's forward solve with too small a step budget for every task:
    NumericalError naming the iteration and the budget, under either policy
    (skip-task has no task left to average)."""
    learner = MetaLearner(MLP(2, 1, 8, 1, key=jax.random.PRNGKey(0)), Adjoint(steps=5, max_steps=2),
                          optax.adam(1e-3), mse, T=2.0, on_nonfinite=policy)
    state = learner.init(jax.random.PRNGKey(0))
    batch = CosMixture(shots=5, queries=5).sample(jax.random.PRNGKey(1), 2, "train")
    match = "every task" if policy == "skip-task" else "the inner solve of tasks 0, 1"
    with pytest.raises(NumericalError, match=rf"meta-iteration 1: {match}.*step budget \(max_steps=2\)"):
        learner.meta_step(state, batch)
    # The same through meta_gradient.
    if policy == "raise":
        with pytest.raises(NumericalError, match=r"meta_gradient: the inner solve of tasks 0, 1 .*max_steps=2"):
            learner.meta_gradient(state, batch)


def _stiff_family(monkeypatch):
    """CosMixture whose training task 0 is too stiff for A-MAML's solve, and
    A-MAML with a step budget of 64 (see `_one_stiff_task`)."""

    class Stiff(CosMixture):
        def sample(self, key, meta_batch, split="train"):
            b = super().sample(key, meta_batch, split)
            if split != "train":
                return b
            return b._replace(support_x=b.support_x.at[0].multiply(30.0), support_y=b.support_y.at[0].multiply(30.0))

    original = presets.build_family

    def build_family(config, **kw):
        fam = original(config, **kw)
        return Stiff(shots=fam.shots, queries=fam.queries, seed=0)

    monkeypatch.setattr(presets, "build_family", build_family)
    monkeypatch.setattr(presets, "build_method", lambda config: Adjoint(steps=config["steps"], max_steps=64))


def test_cli_counts_a_task_whose_inner_solve_runs_out_of_steps(monkeypatch, tmp_path, capsys):
    _stiff_family(monkeypatch)
    # 20 stored states (h = 0.1): at 5 (h = 0.4) the other task's Heun sweep is unstable, and flagged.
    flags = ["--benchmark", "cosmixture", "--method", "amaml", "--steps", "20", "--meta-batch", "2", "--quiet",
             "--meta-iterations", "2", "--checkpoint-every", "2"]
    out = tmp_path / "stiff"
    capsys.readouterr()
    assert main(["train", *flags, "--on-nonfinite", "skip-task", "--out", str(out)]) == 0
    assert [int(r["skipped"]) for r in _rows(out)] == [1, 1]
    assert all(np.isfinite(float(r["meta_loss"])) for r in _rows(out))
    logged = "".join(capsys.readouterr())
    assert ("meta-iteration 1: skipped 1 of 2 tasks with a non-finite loss or meta-gradient (the inner solve "
            "of task 0 of the meta-batch exhausted its step budget (max_steps=64)") in logged
    # By default: an error naming the iteration, the task and the budget.
    assert main(["train", *flags, "--out", str(tmp_path / "error")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "meta-iteration 1: the inner solve of task 0 of the meta-batch" in err[0]
    assert "max_steps=64" in err[0]
