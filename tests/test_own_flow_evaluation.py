"""Issue 30, item 15: COMLN evaluated by its own adaptation, the head's flow (`linear_flow`) up
to its learned horizon T, beside the gradient-descent curve; T marked on the figure."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ctmeta.runs.results as run_results
from ctmeta import linear_flow
from ctmeta.losses import cross_entropy
from ctmeta.meta import MetaLearner
from ctmeta.methods import LinearFlow
from ctmeta.models import MLP, EmbeddingHead
from ctmeta.presets import Experiment
from ctmeta.runs import Reporter, RunDir, evaluate_run
from ctmeta.tasks.base import Batch


def _blobs(key, tasks=6, ways=3, shots=2, queries=4, dim=5):
    """Gaussian blobs: class c of a task centred at a task-specific random mean."""
    kc, ks, kq = jax.random.split(key, 3)
    centres = 2.0 * jax.random.normal(kc, (tasks, ways, dim))
    sy = jnp.tile(jnp.repeat(jnp.arange(ways), shots), (tasks, 1))
    qy = jnp.tile(jnp.repeat(jnp.arange(ways), queries), (tasks, 1))
    sx = jnp.take_along_axis(centres, sy[..., None], 1) + jax.random.normal(ks, sy.shape + (dim,))
    qx = jnp.take_along_axis(centres, qy[..., None], 1) + jax.random.normal(kq, qy.shape + (dim,))
    return Batch(sx, sy, qx, qy)


def test_comln_is_evaluated_by_its_own_flow_to_the_learned_T(tmp_path, monkeypatch):
    model = EmbeddingHead(embedding=MLP(5, 4, 8, 1, key=jax.random.PRNGKey(0)), head=jnp.zeros((3, 4)))
    learner = MetaLearner(model, LinearFlow(), optax.adam(5e-2), cross_entropy, T=0.5, learn_T=True, adapt="head")
    state = learner.init(jax.random.PRNGKey(1))
    # As if meta-trained: another horizon (learned T = exp(log_T)) and head than the initial ones.
    state = eqx.tree_at(lambda s: (s.params.log_T, s.params.model.head), state,
                        (jnp.log(jnp.asarray(0.8, state.params.log_T.dtype)), 0.3 * jnp.eye(3, 4)))
    T = float(learner.horizon(state))
    assert T == pytest.approx(0.8)
    batch = _blobs(jax.random.PRNGKey(3), tasks=4)
    config = {"benchmark": "omniglot", "method": "comln",
              "eval": {"steps": [0, 20], "curve": [0, 10, 20], "lr": 0.1, "tasks": 4}}
    exp = Experiment(config=config, family=None, learner=learner, model_key=None, run_key=jax.random.PRNGKey(4),
                     lower_is_better=False, metric_name="accuracy", eval_chunk=3, _eval_batch=batch)
    figures = {}
    monkeypatch.setattr(run_results, "save_figure", lambda fig, path: figures.__setitem__(path.name, fig))
    monkeypatch.setattr("matplotlib.pyplot.close", lambda fig: None)
    results = evaluate_run(exp, RunDir(tmp_path), state, reporter=Reporter(quiet=True, silent=True))

    own = results["own_flow"]
    assert own["learned"]["T"] == T and own["random"]["T"] == 0.5 and own["learned"]["failed"] == 0
    # Each task's accuracy after its head's flow to the learned T: linear_flow on the task's features.
    m = learner.model(state)

    def accuracy(sx, sy, qx, qy):
        fs, fq = m.features(sx), m.features(qx)
        W = linear_flow(m.head, fs, jax.nn.one_hot(sy, 3, dtype=fs.dtype), T)
        return jnp.mean(jnp.argmax(fq @ W.T, axis=-1) == qy)

    np.testing.assert_allclose(own["learned"]["per_task"], jax.vmap(accuracy)(*batch), atol=1e-7)
    assert own["learned"]["mean"] == pytest.approx(np.mean(own["learned"]["per_task"]))
    assert json.loads((tmp_path / "results.json").read_text())["own_flow"] == own
    # Beside the GD columns in the table, and on the figure at k = T / lr with the GD curve.
    table = (tmp_path / "results.md").read_text()
    assert "| initialisation | 0 steps | 20 steps | own flow to T |" in table
    assert f"(T = {T:.3g}) |" in table and "linear_flow" in table
    ax = figures["error_vs_steps.png"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"learned (comln): own flow to T = {T:.3g}" in labels and "random init: own flow to T = 0.5" in labels
    assert any(label.startswith(f"comln's horizon T = {T:.3g} (k = T/lr = {T / 0.1:.3g})") for label in labels)
