"""The meta-learner: meta-steps, compilation, vmap vs loop, save/load, guards."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ctmeta import Adjoint, CheckpointError, FirstOrder, Implicit, InputError, NumericalError, Reptile, Unrolled
from ctmeta.models import EmbeddingHead
from ctmeta.methods import LinearFlow
from ctmeta.meta import MetaLearner
from ctmeta.losses import cross_entropy, mse, summarize
from ctmeta.checkpoint import load_state, save_state
from ctmeta.models import MLP
from ctmeta.tasks.base import Batch


def sine_batch(key, meta_batch=4, shots=8, queries=8):
    """Tiny 1-D regression tasks y = a sin(x + b)."""
    ka, kb, kx = jax.random.split(key, 3)
    a = jax.random.uniform(ka, (meta_batch, 1, 1), minval=0.5, maxval=1.5)
    b = jax.random.uniform(kb, (meta_batch, 1, 1), minval=0.0, maxval=1.0)
    x = jax.random.uniform(kx, (meta_batch, shots + queries, 1), minval=-2.0, maxval=2.0)
    y = a * jnp.sin(x + b) + 0.5
    return Batch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def make_learner(method, lr=1e-2, **kw):
    model = MLP(1, 1, 8, 1, key=jax.random.PRNGKey(0))
    return MetaLearner(model, method, optax.adam(lr), mse, T=kw.pop("T", 0.2), **kw)


METHODS = {
    "adjoint": Adjoint(steps=8),
    "unrolled": Unrolled(steps=4),
    "firstorder": FirstOrder(steps=4),
    "implicit": Implicit(steps=4, lam=1.0, cg_steps=3),
    "reptile": Reptile(steps=4),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_meta_step_reduces_meta_loss_and_compiles_once(name):
    learner = make_learner(METHODS[name])
    state = learner.init(jax.random.PRNGKey(1))
    fixed = sine_batch(jax.random.PRNGKey(2))
    first = float(learner.meta_gradient(state, fixed)[0])
    for i in range(25):
        # Different tasks each iteration (same shapes): still one compilation.
        batch = fixed if i % 2 else sine_batch(learner.iteration_key(state))
        state, metrics = learner.meta_step(state, batch)
        assert set(metrics) >= {"meta_loss", "grad_norm", "T"}
    last = float(learner.meta_gradient(state, fixed)[0])
    assert last < 0.8 * first, (first, last)
    assert int(state.iteration) == 25
    assert learner.num_traces == 1  # traced (hence compiled) once for the whole loop


def test_vmapped_meta_gradient_equals_loop_over_tasks():
    learner = make_learner(Unrolled(steps=3), T=0.3, learn_T=True)
    state = learner.init(jax.random.PRNGKey(0))
    batch = sine_batch(jax.random.PRNGKey(3), meta_batch=3)
    loss, grads = learner.meta_gradient(state, batch)
    one_task = eqx.filter_jit(jax.value_and_grad(learner.task_objective))
    per_task = [one_task(state.params, jax.tree.map(lambda a: a[i], batch)) for i in range(3)]
    np.testing.assert_allclose(loss, np.mean([l for l, _ in per_task]), rtol=1e-12)
    mean_grads = jax.tree.map(lambda *g: sum(g) / 3, *[g for _, g in per_task])
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(mean_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    assert float(jnp.abs(grads.log_T)) > 0  # the horizon gets a meta-gradient


def test_reptile_direction_is_theta_minus_adapted():
    learner = make_learner(Reptile(steps=3), T=0.3)
    state = learner.init(jax.random.PRNGKey(0))
    batch = sine_batch(jax.random.PRNGKey(4), meta_batch=2)
    _, direction = learner.meta_gradient(state, batch)
    from ctmeta import gradient_flow

    model = learner.model(state)

    def adapted(i):
        task = jax.tree.map(lambda a: a[i], batch)
        loss = lambda m, d: mse(jax.vmap(m)(d[0]), d[1])
        return gradient_flow(loss, model, (task.support_x, task.support_y), 0.3, method=Reptile(steps=3))

    expected = jax.tree.map(
        lambda th, u0, u1: th - (u0 + u1) / 2,
        eqx.filter(model, eqx.is_inexact_array),
        eqx.filter(adapted(0), eqx.is_inexact_array),
        eqx.filter(adapted(1), eqx.is_inexact_array),
    )
    for a, b in zip(jax.tree.leaves(direction.model), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_save_load_round_trip_is_exact(tmp_path):
    learner = make_learner(FirstOrder(steps=3))
    state = learner.init(jax.random.PRNGKey(7))
    for _ in range(3):
        state, _ = learner.meta_step(state, sine_batch(learner.iteration_key(state)))
    path = tmp_path / "ckpt-3.eqx"
    save_state(path, state, {"note": "hi"})
    side = json.loads((tmp_path / "ckpt-3.json").read_text())
    assert side["iteration"] == 3 and side["metadata"] == {"note": "hi"}
    restored, meta = load_state(path, learner.init(jax.random.PRNGKey(0)))
    assert meta == {"note": "hi"}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    # Continuing from either gives the same next state, bit for bit.
    batch = sine_batch(learner.iteration_key(state))
    s1, m1 = learner.meta_step(state, batch)
    s2, m2 = learner.meta_step(restored, batch)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave nothing behind


def test_load_rejects_corrupted_and_mismatched_checkpoints(tmp_path):
    learner = make_learner(FirstOrder(steps=2))
    state = learner.init(jax.random.PRNGKey(0))
    path = tmp_path / "s.eqx"
    save_state(path, state)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_state(path, state)
    save_state(path, state)
    other = MetaLearner(MLP(1, 1, 4, 1, key=jax.random.PRNGKey(0)), FirstOrder(2), optax.adam(1e-3), mse)
    with pytest.raises(CheckpointError, match="does not match"):
        load_state(path, other.init(jax.random.PRNGKey(0)))
    (tmp_path / "s.json").unlink()
    with pytest.raises(CheckpointError, match="sidecar"):
        load_state(path, state)


def test_nonfinite_meta_gradient_raises_and_keeps_parameters():
    learner = make_learner(Unrolled(steps=2))
    state = learner.init(jax.random.PRNGKey(0))
    batch = sine_batch(jax.random.PRNGKey(1))
    bad = batch._replace(query_y=batch.query_y.at[1, 0, 0].set(jnp.nan))
    with pytest.raises(NumericalError, match="meta-iteration 1"):
        learner.meta_step(state, bad)
    new, metrics = learner.meta_step(state, bad, check=False)
    assert not bool(metrics["finite"]) and int(new.iteration) == 0
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # The skip-task hook drops the bad task and updates with the others.
    skipper = make_learner(Unrolled(steps=2), on_nonfinite="skip-task")
    new, metrics = skipper.meta_step(skipper.init(jax.random.PRNGKey(0)), bad)
    assert int(metrics["skipped"]) == 1 and bool(metrics["finite"]) and int(new.iteration) == 1
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))


def test_evaluate_records_error_after_each_number_of_steps():
    learner = make_learner(FirstOrder(steps=2))
    state = learner.init(jax.random.PRNGKey(0))
    batch = sine_batch(jax.random.PRNGKey(5), meta_batch=7)
    ev = learner.evaluate(state, batch, [0, 3, 10], lr=0.05, chunk_size=3)
    assert ev.per_task.shape == (7, 3) and list(ev.steps) == [0, 3, 10]
    # Step 0 is the initialisation's own error; GD lowers it on average.
    model = learner.model(state)
    from ctmeta.tasks.metrics import nrmse

    direct = nrmse(jax.vmap(jax.vmap(model))(batch.query_x), batch.query_y)
    np.testing.assert_allclose(ev.per_task[:, 0], direct, rtol=1e-10)
    assert ev.mean[2] < ev.mean[0]
    mean, ci = summarize(ev.per_task[:, 1])
    assert ev.at(3) == (mean, ci)
    with pytest.raises(InputError):
        ev.at(7)


def _tiny_classification(key, meta_batch=2, ways=3, shots=2, queries=3, dim=5):
    """Gaussian blobs: class c centred at a task-specific random mean."""
    kc, ks, kq = jax.random.split(key, 3)
    centres = 2.0 * jax.random.normal(kc, (meta_batch, ways, dim))
    sy = jnp.tile(jnp.repeat(jnp.arange(ways), shots), (meta_batch, 1))
    qy = jnp.tile(jnp.repeat(jnp.arange(ways), queries), (meta_batch, 1))
    sx = jnp.take_along_axis(centres, sy[..., None], 1) + jax.random.normal(ks, sy.shape + (dim,))
    qx = jnp.take_along_axis(centres, qy[..., None], 1) + jax.random.normal(kq, qy.shape + (dim,))
    return Batch(sx, sy, qx, qy)


@pytest.mark.parametrize(
    "method", [LinearFlow(solver="euler", steps=4), Unrolled(steps=3)], ids=["comln", "anil"]
)
def test_head_adaptation_learns_embedding_head_and_T(method):
    emb = MLP(5, 4, 8, 1, key=jax.random.PRNGKey(0))
    model = EmbeddingHead(embedding=emb, head=jnp.zeros((3, 4)))
    learn_T = isinstance(method, LinearFlow)
    learner = MetaLearner(model, method, optax.adam(1e-2), cross_entropy, T=0.5, learn_T=learn_T, adapt="head")
    state = learner.init(jax.random.PRNGKey(1))
    batch = _tiny_classification(jax.random.PRNGKey(2))
    loss0, grads = learner.meta_gradient(state, batch)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(optax.tree.norm(grads.model.embedding)) > 0
    for _ in range(5):
        state, m = learner.meta_step(state, batch)
    assert float(learner.meta_gradient(state, batch)[0]) < float(loss0)
    if learn_T:
        assert float(m["T"]) != 0.5
    ev = learner.evaluate(state, batch, [0, 5], lr=0.1)
    assert ev.per_task.shape == (2, 2) and np.all((ev.per_task >= 0) & (ev.per_task <= 1))


def test_bad_arguments_raise_input_error():
    model = MLP(1, 1, 4, 1, key=jax.random.PRNGKey(0))
    with pytest.raises(InputError, match="method"):
        MetaLearner(model, "adjoint", optax.adam(1e-3))
    with pytest.raises(InputError, match="T"):
        MetaLearner(model, Adjoint(), optax.adam(1e-3), T=-1.0)
    with pytest.raises(InputError, match="learn_T"):
        MetaLearner(model, FirstOrder(), optax.adam(1e-3), learn_T=True)
    with pytest.raises(InputError, match="EmbeddingHead"):
        MetaLearner(model, Unrolled(steps=5), optax.adam(1e-3), adapt="head")


def test_evaluate_uses_the_query_mask_of_a_masked_batch():
    from ctmeta.tasks.ratings import MaskedBatch

    learner = make_learner(FirstOrder(steps=2))
    state = learner.init(jax.random.PRNGKey(0))
    batch = sine_batch(jax.random.PRNGKey(6), meta_batch=3, queries=6)
    # Pad each query set with 4 rows of garbage that the mask leaves out.
    pad = lambda a, v: jnp.concatenate([a, jnp.full(a.shape[:1] + (4,) + a.shape[2:], v)], axis=1)
    masked = MaskedBatch(
        batch.support_x, batch.support_y, pad(batch.query_x, 3.0), pad(batch.query_y, 1e6),
        jnp.concatenate([jnp.ones((3, 6), bool), jnp.zeros((3, 4), bool)], axis=1),
    )
    a = learner.evaluate(state, batch, [0, 4], lr=0.05)
    b = learner.evaluate(state, masked, [0, 4], lr=0.05)
    np.testing.assert_allclose(a.per_task, b.per_task, rtol=1e-12)


def test_per_task_horizons_are_learned_with_exact_gradients():
    emb = MLP(5, 4, 8, 1, key=jax.random.PRNGKey(0))
    model = EmbeddingHead(embedding=emb, head=jnp.zeros((3, 4)))
    learner = MetaLearner(model, LinearFlow(rtol=1e-10, atol=1e-12), optax.adam(1e-2), cross_entropy,
                          T=0.5, learn_T="per-task", adapt="head")
    state = learner.init(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(state.params.T_weights, jnp.zeros(4))  # every task starts at T
    batch = _tiny_classification(jax.random.PRNGKey(2))
    _, grads = learner.meta_gradient(state, batch)
    # The gradient in T_weights against central differences of the meta-loss.
    direction = jnp.array([0.3, -0.2, 0.5, 0.1])
    meta_loss = lambda p: learner.meta_gradient(p, batch)[0]
    shifted = lambda eps: eqx.tree_at(lambda p: p.T_weights, state.params, state.params.T_weights + eps * direction)
    eps = 1e-5
    fd = (meta_loss(shifted(eps)) - meta_loss(shifted(-eps))) / (2 * eps)
    np.testing.assert_allclose(jnp.dot(grads.T_weights, direction), fd, rtol=1e-5)
    assert float(jnp.linalg.norm(grads.T_weights)) > 0
    with pytest.raises(InputError, match="per-task"):
        MetaLearner(MLP(1, 1, 4, 1, key=jax.random.PRNGKey(0)), Adjoint(), optax.adam(1e-3), learn_T="per-task")


@pytest.mark.parametrize("method", [Adjoint(), Adjoint(steps=8), Reptile(steps=4)], ids=["adaptive", "stored", "reptile"])
def test_task_map_one_after_the_other_gives_vmaps_meta_gradient(method):
    batch = sine_batch(jax.random.PRNGKey(2))
    batched, sequential = make_learner(method), make_learner(method, task_map="map")
    state = batched.init(jax.random.PRNGKey(1))
    (l1, g1), (l2, g2) = batched.meta_gradient(state, batch), sequential.meta_gradient(state, batch)
    np.testing.assert_allclose(l1, l2, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    new, _ = sequential.meta_step(state, batch)
    assert int(new.iteration) == 1


def test_task_map_keeps_each_tasks_failure_its_own():
    batch = sine_batch(jax.random.PRNGKey(2))
    x = batch.support_x.at[1].set(jnp.nan)  # task 1's inner solve cannot succeed
    bad = Batch(x, batch.support_y, batch.query_x, batch.query_y)
    learner = make_learner(Adjoint(), task_map="map", on_nonfinite="skip-task")
    state = learner.init(jax.random.PRNGKey(1))
    new, info = learner.meta_step(state, bad)
    assert int(info["skipped"]) == 1 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new.params))
    with pytest.raises(InputError, match="task_map"):
        make_learner(Adjoint(), task_map="scan")
