"""CosMixture and Alpine (A-MAML Sec. 5.1) and the nRMSE metric."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctmeta._errors import InputError
from ctmeta.tasks.base import Batch
from ctmeta.tasks.metrics import nrmse
from ctmeta.tasks.regression import Alpine, CosMixture, FunctionRegression
from ctmeta.tasks.regression import nrmse as nrmse_reexported

FAMILIES = [CosMixture, Alpine]


@pytest.fixture(scope="module")
def cos():
    return CosMixture(seed=0)


@pytest.fixture(scope="module")
def alpine():
    return Alpine(seed=0)


def _batches(family):
    return {"train": family.train_batch(), "test": family.test_batch()}


# -- layout ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", FAMILIES)
@pytest.mark.parametrize("shots,queries", [(50, 50), (100, 100), (7, 3)])
def test_shapes(cls, shots, queries):
    family = cls(shots=shots, queries=queries, num_train_tasks=12, num_test_tasks=9, test_queries=20)
    assert isinstance(family, FunctionRegression)
    assert family.kind == "regression"
    assert family.input_shape == (2,) and family.output_size == 1
    train = family.sample(jax.random.key(0), 5)
    assert isinstance(train, Batch)
    assert train.support_x.shape == (5, shots, 2) and train.support_y.shape == (5, shots, 1)
    assert train.query_x.shape == (5, queries, 2) and train.query_y.shape == (5, queries, 1)
    test = family.test_batch()
    assert test.support_x.shape == (9, shots, 2) and test.support_y.shape == (9, shots, 1)
    assert test.query_x.shape == (9, 20, 2) and test.query_y.shape == (9, 20, 1)
    assert family.sample(jax.random.key(1), 4, split="test").query_x.shape == (4, 20, 2)
    # The test session runs with x64 on: the arrays keep numpy's float64.
    assert train.support_x.dtype == jnp.float64


def test_default_protocol_is_the_papers(cos):
    assert (cos.shots, cos.queries, cos.num_train_tasks, cos.num_test_tasks, cos.test_queries) == (
        50, 50, 100, 100, 100,
    )
    assert cos.train_batch().support_x.shape == (100, 50, 2)
    assert cos.test_batch().query_x.shape == (100, 100, 2)


# -- the functions ----------------------------------------------------------------


def test_cosmixture_formula_by_hand(cos):
    # A = 0.5, omega = pi, phi = 0 at x = (0, 1): -0.1 * 0.5 * (cos 0 + cos pi) - 1 = -1.
    # A = 1, omega = 2, phi = 3 at x = (0.5, -0.25).
    params = np.array([[0.5, math.pi, 0.0], [1.0, 2.0, 3.0]])
    x = np.array([[[0.0, 1.0]], [[0.5, -0.25]]])
    expected = [
        -1.0,
        -0.1 * (math.cos(1.0 + 3.0) + math.cos(-0.5 + 3.0)) - (0.25 + 0.0625),
    ]
    np.testing.assert_allclose(cos.function(params, x)[:, 0], expected, rtol=1e-14)


def test_alpine_formula_by_hand(alpine):
    params = np.array([[0.0, 0.0], [0.3, -1.0]])
    x = np.array([[[math.pi / 2, -1.0]], [[2.0, -7.0]]])
    expected = [
        1.1 * math.pi / 2 + abs(math.sin(1.0) - 0.1),
        abs(2.0 * math.sin(2.3) + 0.2) + abs(-7.0 * math.sin(-8.0) - 0.7),
    ]
    np.testing.assert_allclose(alpine.function(params, x)[:, 0], expected, rtol=1e-14)


def test_cosmixture_ranges(cos):
    for params in (cos.train_params, cos.test_params):
        amplitude, omega, phase = params.T
        assert np.all((amplitude >= 0.1) & (amplitude <= 1.0))
        assert np.all((omega >= 0.5 * np.pi) & (omega <= 2.0 * np.pi))
        assert np.all((phase >= 3.0) & (phase <= 6.0))
        # Uniform draws fill their range (not, say, a constant).
        assert amplitude.max() - amplitude.min() > 0.5
    for name, batch in _batches(cos).items():
        for x, y in [(batch.support_x, batch.support_y), (batch.query_x, batch.query_y)]:
            x, y = np.asarray(x), np.asarray(y)
            assert np.all(np.abs(x) <= 1.0), name
            assert np.all((y >= -2.2) & (y <= 0.2)), name
            assert x.min() < -0.9 and x.max() > 0.9, name


def test_alpine_ranges(alpine):
    bound = 5 * np.pi / 12
    for params in (alpine.train_params, alpine.test_params):
        assert params.shape[1] == 2
        assert np.all(np.abs(params) <= bound)
    for name, batch in _batches(alpine).items():
        for x, y in [(batch.support_x, batch.support_y), (batch.query_x, batch.query_y)]:
            x, y = np.asarray(x), np.asarray(y)
            # The domain is [-10, 10]^2 (the paper's "[10, 10]" is a typo).
            assert np.all(np.abs(x) <= 10.0), name
            assert x.min() < -9.0 and x.max() > 9.0, name
            assert np.all((y >= 0.0) & (y <= 22.0)), name


@pytest.mark.parametrize("cls", FAMILIES)
def test_targets_are_the_function_of_the_task(cls):
    family = cls(num_train_tasks=10, num_test_tasks=10)
    for params, batch in [
        (family.train_params, family.train_batch()),
        (family.test_params, family.test_batch()),
    ]:
        for x, y in [(batch.support_x, batch.support_y), (batch.query_x, batch.query_y)]:
            np.testing.assert_allclose(family.function(params, np.asarray(x)), np.asarray(y)[..., 0])


# -- the fixed task sets ------------------------------------------------------------


@pytest.mark.parametrize("cls", FAMILIES)
def test_task_set_is_fixed_by_seed(cls):
    a, b, c = cls(seed=3), cls(seed=3), cls(seed=4)
    for x, y in zip(jax.tree.leaves((a.train_batch(), a.test_batch())),
                    jax.tree.leaves((b.train_batch(), b.test_batch()))):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.train_params, b.train_params)
    assert not np.allclose(a.train_params, c.train_params)
    assert not np.allclose(a.train_batch().support_x, c.train_batch().support_x)


@pytest.mark.parametrize("cls", FAMILIES)
def test_functions_do_not_depend_on_the_number_of_points(cls):
    # The 50shot and 100shot settings meta-train on the same 100 functions.
    small, large = cls(shots=50, queries=50), cls(shots=100, queries=100)
    np.testing.assert_array_equal(small.train_params, large.train_params)
    np.testing.assert_array_equal(small.test_params, large.test_params)


@pytest.mark.parametrize("cls", FAMILIES)
def test_train_and_test_tasks_differ(cls):
    family = cls()
    train, test = family.train_params, family.test_params
    # No test function is a training function.
    distance = np.abs(test[:, None, :] - train[None, :, :]).max(-1)
    assert distance.min() > 0
    assert not np.allclose(family.train_batch().support_x, family.test_batch().support_x)


@pytest.mark.parametrize("cls", FAMILIES)
def test_support_and_query_points_do_not_overlap(cls):
    family = cls(num_train_tasks=20, num_test_tasks=20)
    for batch in (family.train_batch(), family.test_batch()):
        s, q = np.asarray(batch.support_x), np.asarray(batch.query_x)
        gap = np.abs(s[:, :, None, :] - q[:, None, :, :]).max(-1)
        assert gap.min() > 0
        # Within the support, too, every point is distinct.
        within = np.abs(s[:, :, None, :] - s[:, None, :, :]).max(-1)
        within[:, np.arange(s.shape[1]), np.arange(s.shape[1])] = np.inf
        assert within.min() > 0


# -- sampling -------------------------------------------------------------------------


def _task_index(tasks: Batch, batch: Batch) -> np.ndarray:
    """Which task of the fixed set each sampled task is (by its support)."""
    fixed = np.asarray(tasks.support_x).reshape(tasks.support_x.shape[0], -1)
    drawn = np.asarray(batch.support_x).reshape(batch.support_x.shape[0], -1)
    match = (fixed[None, :, :] == drawn[:, None, :]).all(-1)
    assert np.all(match.sum(1) == 1)
    return match.argmax(1)


def test_sample_draws_distinct_tasks_from_the_fixed_sets(cos):
    for split, tasks in _batches(cos).items():
        batch = cos.sample(jax.random.key(7), 25, split=split)
        idx = _task_index(tasks, batch)
        assert len(set(idx.tolist())) == 25
        for got, full in zip(batch, tasks):
            np.testing.assert_array_equal(got, np.asarray(full)[idx])


def test_sample_is_a_function_of_the_key(cos):
    a = cos.sample(jax.random.key(1), 5)
    b = cos.sample(jax.random.key(1), 5)
    c = cos.sample(jax.random.key(2), 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.support_x, c.support_x)
    # Legacy uint32 keys work too, and jit gives the same draw.
    legacy = cos.sample(jax.random.PRNGKey(1), 5)
    assert legacy.support_x.shape == (5, 50, 2)
    jitted = jax.jit(cos.sample, static_argnums=(1, 2))(jax.random.key(1), 5)
    for x, y in zip(a, jitted):
        np.testing.assert_array_equal(x, y)


def test_sample_covers_the_training_set(cos):
    seen = set()
    for i in range(40):
        seen.update(_task_index(cos.train_batch(), cos.sample(jax.random.key(i), 5)).tolist())
    # 200 draws of 100 tasks: missing more than 30 would be a biased sampler.
    assert len(seen) > 70


# -- argument checks -----------------------------------------------------------------


@pytest.mark.parametrize("cls", FAMILIES)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"shots": 0},
        {"queries": -3},
        {"shots": 2.5},
        {"num_train_tasks": True},
        {"num_test_tasks": "100"},
        {"test_queries": 0},
        {"seed": -1},
    ],
)
def test_bad_arguments(cls, kwargs):
    with pytest.raises(InputError):
        cls(**kwargs)


def test_numpy_integers_are_accepted():
    family = CosMixture(shots=np.int64(5), queries=np.int32(6), num_train_tasks=3, num_test_tasks=2)
    assert family.shots == 5 and type(family.shots) is int


def test_bad_sample_calls(cos):
    with pytest.raises(InputError, match="at most 100"):
        cos.sample(jax.random.key(0), 101)
    with pytest.raises(InputError, match="split"):
        cos.sample(jax.random.key(0), 5, split="val")
    with pytest.raises(InputError):
        cos.sample(jax.random.key(0), 0)


# -- nrmse -------------------------------------------------------------------------


def test_nrmse_by_hand():
    y = jnp.array([[3.0], [4.0]])
    assert nrmse(jnp.zeros((2, 1)), y) == pytest.approx(1.0)
    # ||(1, -2)|| / ||(3, 4)|| = sqrt(5) / 5.
    assert nrmse(jnp.array([[4.0], [2.0]]), y) == pytest.approx(math.sqrt(5) / 5)
    assert nrmse(y, y) == 0.0
    assert nrmse_reexported is nrmse


def test_nrmse_is_per_task():
    y = jnp.array([[[3.0], [4.0]], [[1.0], [0.0]]])
    pred = jnp.array([[[3.0], [4.0]], [[3.0], [0.0]]])
    np.testing.assert_allclose(nrmse(pred, y), [0.0, 2.0])
    assert jax.jit(nrmse)(pred, y).shape == (2,)


def test_nrmse_mask_ignores_padding():
    y = jnp.array([[[3.0], [4.0], [0.0]]])
    pred = jnp.array([[[3.0], [2.0], [jnp.nan]]])
    mask = jnp.array([[True, True, False]])
    np.testing.assert_allclose(nrmse(pred, y, mask), [2.0 / 5.0])
    np.testing.assert_allclose(nrmse(pred[:, :2], y[:, :2]), [2.0 / 5.0])


def test_nrmse_shape_errors():
    with pytest.raises(InputError, match="shape"):
        nrmse(jnp.zeros((3, 1)), jnp.zeros((4, 1)))
    with pytest.raises(InputError):
        nrmse(jnp.zeros(3), jnp.zeros(3))
    with pytest.raises(InputError, match="mask"):
        nrmse(jnp.zeros((2, 3, 1)), jnp.ones((2, 3, 1)), jnp.ones((2, 4), bool))
