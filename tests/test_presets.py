"""Presets: each paper's outer optimiser and schedule, the ResNet-12 backbone,
and the checks on both (pure Python until a model is built)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ctmeta import presets
from ctmeta._errors import InputError
from ctmeta.models import EmbeddingHead
from ctmeta.tasks.base import Batch


@pytest.fixture
def image_dir(tmp_path):
    """`resolve_config` only checks that an image benchmark's data directory exists."""
    return str(tmp_path)


# ------------------------------------------------------------------ optimiser


def test_each_method_defaults_to_its_papers_outer_optimiser(image_dir):
    # A-MAML (Sec. 5): Adam 1e-3 for every method it runs.
    for method in ("amaml", "maml", "fomaml", "reptile", "imaml"):
        assert presets.resolve_config("cosmixture", method)["optimizer"] == {
            "name": "adam", "learning_rate": 1e-3, "schedule": None}
    # COMLN (App. E.5): SGD, Nesterov momentum 0.9, lr 0.1, Lee et al.'s schedule over the run.
    for method in ("comln", "anil"):
        config = presets.resolve_config("omniglot", method, data_dir=image_dir, meta_iterations=600)
        assert config["optimizer"] == {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": True,
                                       "schedule": "step", "decay_steps": 600}
    # MAML on images is an A-MAML method unless told otherwise.
    assert presets.resolve_config("omniglot", "maml", data_dir=image_dir)["optimizer"]["name"] == "adam"


def test_optimizer_flags_override_the_defaults(image_dir):
    opt = presets.resolve_config("omniglot", "maml", data_dir=image_dir, optimizer="sgd", meta_iterations=30)["optimizer"]
    assert opt == {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": True, "schedule": "step",
                   "decay_steps": 30}
    opt = presets.resolve_config("omniglot", "comln", data_dir=image_dir, optimizer="adam")["optimizer"]
    assert opt == {"name": "adam", "learning_rate": 1e-3, "schedule": None}
    opt = presets.resolve_config("omniglot", "comln", data_dir=image_dir, meta_lr=0.05, lr_schedule="none")["optimizer"]
    assert opt == {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "nesterov": True, "schedule": None}
    opt = presets.resolve_config("cosmixture", "amaml", lr_schedule="cosine", meta_iterations=7)["optimizer"]
    assert opt == {"name": "adam", "learning_rate": 1e-3, "schedule": "cosine", "decay_steps": 7}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(optimizer="rmsprop"), "`optimizer`"),
        (dict(meta_lr=0.0), "`meta_lr`"),
        (dict(meta_lr=-1e-3), "`meta_lr`"),
        (dict(meta_lr=float("nan")), "`meta_lr`"),
        (dict(lr_schedule="exponential"), "`lr_schedule`"),
        (dict(backbone="resnet12"), "`backbone`"),  # cosmixture has no images
        (dict(benchmark="omniglot", backbone="vgg"), "`backbone`"),
    ],
)
def test_bad_optimizer_and_backbone_choices_raise_input_error(kwargs, message, image_dir):
    benchmark = kwargs.pop("benchmark", "cosmixture")
    data = image_dir if benchmark != "cosmixture" else None
    with pytest.raises(InputError, match=message):
        presets.resolve_config(benchmark, "maml", data_dir=data, **kwargs)


def test_lee_step_schedule_over_the_run():
    # Lee et al. over 60 "epochs": x1 for 0-19, x0.06 for 20-39, x0.012 for 40-49, x0.0024 for 50-59.
    spec = presets.optimizer_config("comln", meta_iterations=60)
    lr = presets.learning_rate_schedule(spec)
    got = [float(lr(jnp.asarray(c))) for c in (0, 19, 20, 39, 40, 49, 50, 59)]
    np.testing.assert_allclose(got, [0.1, 0.1, 0.006, 0.006, 0.0012, 0.0012, 0.00024, 0.00024], rtol=1e-6)
    # Integer boundaries: 6 iterations get 2, 2, 1, 1 updates per piece.
    lr = presets.learning_rate_schedule(presets.optimizer_config("comln", meta_iterations=6))
    np.testing.assert_allclose([float(lr(jnp.asarray(c))) for c in range(6)],
                               [0.1, 0.1, 0.006, 0.006, 0.0012, 0.00024], rtol=1e-6)
    cosine = presets.learning_rate_schedule(presets.optimizer_config("amaml", "adam", None, "cosine", 10))
    assert float(cosine(0)) == pytest.approx(1e-3) and float(cosine(10)) == pytest.approx(0.0, abs=1e-12)


def test_build_optimizer_is_optax_sgd_with_nesterov_momentum():
    spec = presets.optimizer_config("comln", "sgd", 0.1, "none")
    ours, ref = presets.build_optimizer(spec), optax.sgd(0.1, momentum=0.9, nesterov=True)
    params = {"w": jnp.arange(3.0)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    so, sr = ours.init(params), ref.init(params)
    for _ in range(3):
        uo, so = ours.update(grads, so, params)
        ur, sr = ref.update(grads, sr, params)
        np.testing.assert_array_equal(uo["w"], ur["w"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda o: o.update(name="rmsprop"), "unknown optimizer"),
        (lambda o: o.update(learning_rate=-1.0), "learning_rate"),
        (lambda o: o.update(schedule="exponential"), "schedule"),
        (lambda o: o.pop("decay_steps"), "decay_steps"),
        (lambda o: o.update(momentum=1.5), "momentum"),
        (lambda o: o.update(nesterov="yes"), "nesterov"),
    ],
)
def test_a_malformed_optimizer_entry_is_refused_before_building(edit, message):
    spec = presets.optimizer_config("comln", meta_iterations=10)
    edit(spec)
    with pytest.raises(InputError, match=message):
        presets.build_optimizer(spec)


# ------------------------------------------------------------------ ResNet-12


class _Images:
    """A stand-in image family: only what `build_learner` reads."""

    kind = "classification"

    def __init__(self, shape, ways):
        self.input_shape, self.output_size = shape, ways


def test_resnet12_presets_follow_comln(image_dir):
    head = presets.resolve_config("miniimagenet", "comln", data_dir=image_dir, backbone="resnet12")
    assert head["backbone"] == "resnet12"
    assert head["model"] == {"name": "resnet12-embedding+linear-head", "channels": [64, 160, 320, 640],
                             "global_pool": False, "head_init": "zeros"}
    whole = presets.resolve_config("miniimagenet", "maml", data_dir=image_dir, backbone="resnet12")
    assert whole["model"]["name"] == "resnet12+linear-head" and whole["model"]["head_init"] == "uniform"
    assert presets.resolve_config("miniimagenet", "comln", data_dir=image_dir)["backbone"] == "conv4"
    # No global pooling: 640 x 5 x 5 = 16,000 features on 84x84 images (COMLN Sec. 5.1).
    model = presets.build_model(head, _Images((3, 84, 84), 5), jax.random.PRNGKey(0))
    assert isinstance(model, EmbeddingHead) and model.head.shape == (5, 16000)
    assert not np.any(np.asarray(model.head))
    model = presets.build_model(whole, _Images((3, 84, 84), 5), jax.random.PRNGKey(0))
    assert model.head.shape == (5, 16000) and np.all(np.abs(np.asarray(model.head)) <= 16000**-0.5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["comln", "anil"])
def test_resnet12_preset_takes_a_meta_step(method, image_dir):
    """One meta-step of COMLN/ANIL on a ResNet-12 from the presets, with
    COMLN's SGD, on a tiny synthetic batch (thin blocks, 16x16 images)."""
    config = presets.resolve_config("miniimagenet", method, data_dir=image_dir, backbone="resnet12",
                                    meta_iterations=3, meta_batch=2, steps=2)
    config["model"]["channels"] = [4, 4, 4, 4]  # the four blocks, thin
    learner = presets.build_learner(config, _Images((3, 16, 16), 5), jax.random.PRNGKey(0))
    state = learner.init(jax.random.PRNGKey(1))
    kx, kq = jax.random.split(jax.random.PRNGKey(2))
    labels = jnp.tile(jnp.arange(5), (2, 1))
    batch = Batch(jax.random.uniform(kx, (2, 5, 3, 16, 16)), labels, jax.random.uniform(kq, (2, 5, 3, 16, 16)), labels)
    new, metrics = learner.meta_step(state, batch)
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["meta_loss"]))
    assert int(new.iteration) == 1
    before, after = learner.model(state), learner.model(new)
    assert not np.array_equal(np.asarray(before.embedding.blocks[0].convs[0].weight),
                              np.asarray(after.embedding.blocks[0].convs[0].weight))
    assert np.any(np.asarray(after.head))  # the head's initialisation is learned too


def test_amaml_uses_the_adaptive_adjoint_unless_steps_are_given(tmp_path):
    from ctmeta import ode
    from ctmeta.presets import build_method, resolve_config

    adaptive = build_method(resolve_config("cosmixture", "amaml"))
    assert adaptive.steps is None and isinstance(adaptive.sensitivity, ode.AdaptiveAdjoint)
    assert adaptive.dense_steps == 128
    assert build_method(resolve_config("alpine", "amaml")).dense_steps == 1024
    stored = build_method(resolve_config("cosmixture", "amaml", steps=200))
    assert stored.steps == 200 and isinstance(stored.sensitivity, ode.StoredAdjoint)
    # Images: the adaptive rule at float32 tolerances, on the smooth Conv-4, tasks one after the other.
    (tmp_path / "omniglot").mkdir()
    config = resolve_config("omniglot", "amaml", data_dir=str(tmp_path / "omniglot"))
    images = build_method(config)
    assert images.steps is None and isinstance(images.sensitivity, ode.AdaptiveAdjoint)
    assert (images.rtol, images.atol, images.dense_steps) == (1e-5, 1e-6, 256)
    assert config["backbone"] == "conv4-smooth"
    assert (config["model"]["activation"], config["model"]["pool"]) == ("softplus", "avg")
    # --solver rk4: K = T / 0.01 fixed RK4 steps and the RK4 sweep; the other methods keep the ReLU Conv-4.
    rk4_images = build_method(resolve_config("omniglot", "amaml", solver="rk4", data_dir=str(tmp_path / "omniglot")))
    assert (rk4_images.steps, rk4_images.solver, rk4_images.scheme) == (50, "rk4", "rk4")
    maml = resolve_config("omniglot", "maml", data_dir=str(tmp_path / "omniglot"))
    assert maml["backbone"] == "conv4" and "activation" not in maml["model"]
    rk4 = build_method(resolve_config("cosmixture", "amaml", solver="rk4"))
    assert (rk4.steps, rk4.solver, rk4.scheme) == (200, "rk4", "rk4")


def test_whole_network_image_learners_map_tasks_one_after_the_other(image_dir):
    class Family:
        input_shape, output_size, kind = (1, 28, 28), 3, "classification"

    for method, task_map in (("amaml", "map"), ("maml", "map"), ("comln", "vmap")):
        config = presets.resolve_config("omniglot", method, ways=3, data_dir=image_dir)
        assert presets.build_learner(config, Family(), jax.random.PRNGKey(0)).task_map == task_map
    config = presets.resolve_config("cosmixture", "amaml")

    class Regression:
        input_shape, output_size, kind = (2,), 1, "regression"

    assert presets.build_learner(config, Regression(), jax.random.PRNGKey(0)).task_map == "vmap"


def test_solver_applies_to_amaml_only():
    with pytest.raises(InputError, match="`solver` applies to `method` amaml"):
        presets.resolve_config("cosmixture", "maml", solver="rk4")
    with pytest.raises(InputError, match="unknown `solver`"):
        presets.resolve_config("cosmixture", "amaml", solver="euler")


def test_smooth_backbone_builds_a_softplus_avg_pool_conv4(image_dir):
    from ctmeta.models import avg_pool2x2

    config = presets.resolve_config("omniglot", "amaml", ways=3, data_dir=image_dir)

    class Family:
        input_shape, output_size, kind = (1, 28, 28), 3, "classification"

    model = presets.build_model(config, Family(), jax.random.PRNGKey(0))
    assert all(b.activation is jax.nn.softplus and b.pool == "avg" for b in model.blocks)
    relu = presets.build_model(presets.resolve_config("omniglot", "maml", ways=3, data_dir=image_dir),
                               Family(), jax.random.PRNGKey(0))
    assert all(b.activation is jax.nn.relu and b.pool == "max" for b in relu.blocks)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 1, 28, 28))
    assert model(x).shape == relu(x).shape == (2, 3)
    assert not np.allclose(model(x), relu(x))  # same weights, another network
    # The average pool is the mean of each 2x2 window, floor on an odd size.
    y = jnp.arange(2 * 5 * 5, dtype=float).reshape(1, 2, 5, 5)
    np.testing.assert_allclose(avg_pool2x2(y)[0, 0], [[3.0, 5.0], [13.0, 15.0]])
