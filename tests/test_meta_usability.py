"""Issue 15, the Python API as a new user meets it: the evaluation metric
after a custom loss, shape checks of the losses, a model without `apply=`,
a batch without its task axis, a missing checkpoint, the two kinds of
metrics of `meta_step`, and the mode of written files."""

from __future__ import annotations

import os
import stat
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ctmeta import CheckpointError, FirstOrder, InputError
from ctmeta.meta import MetaLearner, SCALAR_METRICS, TASK_METRICS
from ctmeta.losses import accuracy, cross_entropy, mse
from ctmeta._io import atomic_write_bytes
from ctmeta.models import MLP
from ctmeta.tasks.base import Batch


def regression_batch(tasks=3, k=6, outputs=1):
    kx, ky = jax.random.split(jax.random.PRNGKey(3))
    x = jax.random.normal(kx, (tasks, 2 * k, 2))
    y = jnp.sin(x[..., :1]) + 0.1 * jax.random.normal(ky, (tasks, 2 * k, outputs))
    return Batch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


def classification_batch(tasks=3, k=6, ways=3):
    x = jax.random.normal(jax.random.PRNGKey(4), (tasks, 2 * k, 2))
    labels = jnp.tile(jnp.arange(2 * k) % ways, (tasks, 1)).astype(jnp.int32)
    return Batch(x[:, :k], labels[:, :k], x[:, k:], labels[:, k:])


def my_cross_entropy(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def huber(pred, y):
    return jnp.mean(optax.huber_loss(pred, y))


def learner(loss, outputs=1, **kw):
    return MetaLearner(MLP(2, outputs, 8, 1, key=jax.random.PRNGKey(0)), FirstOrder(steps=2), optax.sgd(0.1), loss,
                       T=0.1, **kw)


# ------------------------------------------------------------- the metric


def test_the_metric_of_ctmeta_losses_is_known_at_construction_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert learner(mse).metric_name == "nrmse"
        assert learner(cross_entropy, outputs=3).metric_name == "accuracy"
        assert learner(huber, metric="loss").metric_name == "loss"
        assert learner(huber, metric=accuracy).metric_name == "accuracy"


def test_a_custom_classification_loss_is_scored_by_accuracy_and_said_so():
    with pytest.warns(UserWarning, match="no metric given for the loss my_cross_entropy.*accuracy.*integer"):
        lrn = learner(my_cross_entropy, outputs=3)
    assert lrn.metric_name == "inferred"
    ev = lrn.evaluate(lrn.init(jax.random.PRNGKey(1)), classification_batch(), [0, 2], lr=0.1)
    assert ev.metric == "accuracy"
    assert np.all((ev.per_task >= 0) & (ev.per_task <= 1))
    # Accuracy is a multiple of 1/6 with 6 query examples per task.
    np.testing.assert_allclose(ev.per_task * 6, np.round(ev.per_task * 6), atol=1e-6)


def test_a_custom_regression_loss_is_scored_by_nrmse_and_said_so():
    with pytest.warns(UserWarning, match="huber.*nRMSE"):
        lrn = learner(huber)
    ev = lrn.evaluate(lrn.init(jax.random.PRNGKey(1)), regression_batch(), [0, 2], lr=0.1)
    assert ev.metric == "nrmse"
    ref = learner(mse).evaluate(lrn.init(jax.random.PRNGKey(1)), regression_batch(), [0], lr=0.1)
    np.testing.assert_allclose(ev.per_task[:, 0], ref.per_task[:, 0], rtol=1e-6)  # step 0: same model, same metric


def test_metric_loss_scores_the_learners_own_loss():
    lrn = learner(huber, metric="loss")
    state = lrn.init(jax.random.PRNGKey(1))
    batch = regression_batch()
    ev = lrn.evaluate(state, batch, [0], lr=0.1)
    model = lrn.model(state)
    expected = [float(huber(jax.vmap(model)(batch.query_x[i]), batch.query_y[i])) for i in range(3)]
    np.testing.assert_allclose(ev.per_task[:, 0], expected, rtol=1e-6)
    assert ev.metric == "loss"


def test_an_unknown_metric_name_is_refused():
    with pytest.raises(InputError, match="unknown metric 'rmse'"):
        learner(mse, metric="rmse")


# ------------------------------------------------------------- shapes


def test_mse_refuses_targets_of_another_shape():
    with pytest.raises(InputError, match=r"mse: the predictions have shape \(6, 1\) but the targets have shape \(6, 2\)"):
        mse(jnp.zeros((6, 1)), jnp.zeros((6, 2)))
    with pytest.raises(InputError, match="mse"):
        mse(jnp.zeros((6, 1)), jnp.zeros((6,)))
    assert float(mse(jnp.zeros((6, 2)), jnp.ones((6, 2)))) == 1.0


def test_cross_entropy_and_accuracy_refuse_labels_of_another_shape():
    with pytest.raises(InputError, match="one-hot"):
        cross_entropy(jnp.zeros((6, 3)), jnp.zeros((6, 3)))
    with pytest.raises(InputError, match="accuracy"):
        accuracy(jnp.zeros((6, 3)), jnp.zeros((5,), jnp.int32))


def test_meta_step_refuses_two_column_targets_for_a_one_output_model():
    lrn = learner(mse)
    batch = regression_batch(outputs=2)
    with pytest.raises(InputError, match=r"\(6, 1\) but the targets have shape \(6, 2\).*leading task axis"):
        lrn.meta_step(lrn.init(jax.random.PRNGKey(1)), batch)


def test_a_batch_without_the_task_axis_says_so():
    lrn = learner(mse)
    state = lrn.init(jax.random.PRNGKey(1))
    one_task = Batch(*(a[0] for a in regression_batch()))  # (K, 2) inputs, (K, 1) targets
    for call in (lambda b: lrn.meta_step(state, b), lambda b: lrn.meta_gradient(state, b),
                 lambda b: lrn.evaluate(state, b, [0], lr=0.1)):
        with pytest.raises(InputError, match="leading task axis"):
            call(one_task)
    # Inputs and targets of the same width (1-D regression): the model's own error, with the hint.
    one = MetaLearner(MLP(1, 1, 8, 1, key=jax.random.PRNGKey(0)), FirstOrder(steps=2), optax.sgd(0.1), mse, T=0.1)
    x = jnp.ones((6, 1))
    with pytest.raises(InputError, match="leading task axis of the batch: support_x .6, 1. is 6 tasks"):
        one.meta_step(one.init(jax.random.PRNGKey(1)), Batch(x, x, x, x))


def test_a_dict_model_without_apply_is_refused_at_construction():
    params = {"w": jnp.zeros((2, 1)), "b": jnp.zeros(1)}
    with pytest.raises(InputError, match="apply="):
        MetaLearner(params, FirstOrder(steps=2), optax.sgd(0.1), mse, T=0.1)
    # With apply= it works.
    lrn = MetaLearner(params, FirstOrder(steps=2), optax.sgd(0.1), mse, T=0.1,
                      apply=lambda p, x: x @ p["w"] + p["b"])
    _, metrics = lrn.meta_step(lrn.init(jax.random.PRNGKey(1)), regression_batch())
    assert np.isfinite(float(metrics["meta_loss"]))


# ------------------------------------------------------------- metrics, checkpoints, files


def test_meta_step_metrics_are_scalars_and_per_task_arrays_as_documented():
    lrn = learner(mse)
    _, metrics = lrn.meta_step(lrn.init(jax.random.PRNGKey(1)), regression_batch(tasks=3))
    assert set(metrics) == set(SCALAR_METRICS) | set(TASK_METRICS)
    assert all(np.shape(metrics[k]) == () for k in SCALAR_METRICS)
    assert all(np.shape(metrics[k]) == (3,) for k in TASK_METRICS)
    row = {k: float(metrics[k]) for k in SCALAR_METRICS}  # the documented idiom
    assert row["skipped"] == 0.0 and row["finite"] == 1.0


def test_loading_a_missing_checkpoint_names_the_checkpoint(tmp_path):
    lrn = learner(mse)
    with pytest.raises(CheckpointError, match="missing.eqx does not exist") as err:
        lrn.load(tmp_path / "missing.eqx")
    assert "sidecar" not in str(err.value)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_get_the_umask_mode_not_0600(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
