"""COMLN's `linear_flow`: exact meta-gradients, the meta-test path, the ANIL
equivalence, constant memory, vmap, and the boundary checks (float64)."""

import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctmeta._errors import InputError, NumericalError
from ctmeta.linear_flow import linear_flow, linear_flow_adapt

M, N, D, Q = 6, 3, 5, 8  # support size, classes, embedding dimension, query size
TIGHT = dict(rtol=1e-10, atol=1e-12)


def make_task(seed, M=M, N=N, d=D, Q=Q):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    features = jax.random.normal(keys[0], (M, d))
    labels = jax.nn.one_hot(jax.random.permutation(keys[1], jnp.arange(M) % N), N)
    W0 = 0.5 * jax.random.normal(keys[2], (N, d))
    query_features = jax.random.normal(keys[3], (Q, d))
    query_labels = jax.nn.one_hot(jax.random.randint(keys[4], (Q,), 0, N), N)
    return W0, features, labels, query_features, query_labels


def cross_entropy(W, features, labels):
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(features @ W.T), axis=-1))


def inner_loss(W, W0, features, labels, lam):
    return cross_entropy(W, features, labels) + 0.5 * lam * jnp.sum((W - W0) ** 2)


def direct_flow(W0, features, labels, T, lam):
    """dW/dt = -grad L(W) solved on W itself, differentiated by autodiff."""

    def field(t, W, args):
        W0, features, labels, lam = args
        return -jax.grad(inner_loss)(W, W0, features, labels, lam)

    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Dopri5(),
        t0=0.0,
        t1=T,
        dt0=None,
        y0=W0,
        args=(W0, features, labels, lam),
        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
        # A checkpoint per step: plain backprop through the solver steps.
        adjoint=diffrax.RecursiveCheckpointAdjoint(checkpoints=8192),
        max_steps=8192,
    )
    return solution.ys[-1]


@jax.jit
def reference_meta_gradients(W0, features, labels, T, lam, query_features, query_labels):
    def outer(W0, features, T):
        W_T = direct_flow(W0, features, labels, T, lam)
        return cross_entropy(W_T, query_features, query_labels)

    return jax.grad(outer, argnums=(0, 1, 2))(W0, features, T)


def comln_meta_gradients(W0, features, labels, T, lam, query_features, query_labels, **options):
    """Eager `jax.grad`: linear_flow's own compilation is shared by every T and lam."""

    def outer(W0, features, T):
        W_T = linear_flow(W0, features, labels, T, lam=lam, **options)
        return cross_entropy(W_T, query_features, query_labels)

    return jax.grad(outer, argnums=(0, 1, 2))(W0, features, T)


def relative_error(a, b):
    return float(jnp.linalg.norm(jnp.ravel(a - b)) / jnp.linalg.norm(jnp.ravel(b)))


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_meta_gradients_match_autodiff_through_direct_solve(lam):
    W0, features, labels, query_features, query_labels = make_task(0)
    for T in (0.1, 12.0):
        expected = reference_meta_gradients(
            W0, features, labels, T, lam, query_features, query_labels
        )
        got = comln_meta_gradients(
            W0, features, labels, T, lam, query_features, query_labels, **TIGHT
        )
        for name, g, e in zip(("W0", "features", "T"), got, expected):
            assert jnp.all(jnp.isfinite(g)), name
            assert relative_error(g, e) < 1e-6, (lam, T, name, relative_error(g, e))
        # The T meta-gradient is Proposition 4: -<dJ/dW(T), grad L(W(T))>.
        W_T = linear_flow_adapt(W0, features, labels, T, lam=lam, **TIGHT)
        V = jax.grad(cross_entropy)(W_T, query_features, query_labels)
        train_grad = jax.grad(inner_loss)(W_T, W0, features, labels, lam)
        np.testing.assert_allclose(got[2], -jnp.vdot(V, train_grad), rtol=1e-6, atol=1e-12)


def test_meta_gradients_at_default_tolerances_are_close():
    W0, features, labels, query_features, query_labels = make_task(1)
    expected = reference_meta_gradients(
        W0, features, labels, 3.0, 0.0, query_features, query_labels
    )
    got = comln_meta_gradients(W0, features, labels, 3.0, 0.0, query_features, query_labels)
    for g, e in zip(got, expected):
        assert relative_error(g, e) < 1e-4


def test_meta_test_path_equals_training_path():
    W0, features, labels, _, _ = make_task(2)
    lam = 0.5
    for T in (0.3, 20.0):
        trained = linear_flow(W0, features, labels, T, lam=lam, **TIGHT)
        adapted = linear_flow_adapt(W0, features, labels, T, lam=lam, **TIGHT)
        # The adaptive steps differ (the training path also controls the error
        # of B and z), so the two agree to the solver tolerance.
        np.testing.assert_allclose(adapted, trained, rtol=0, atol=1e-9)
        assert jnp.max(jnp.abs(adapted - W0)) > 0.1  # the head really moved
    # (With fixed Euler steps they agree to rounding: see test_euler_is_anil.)


@functools.partial(jax.jit, static_argnames="K")
def anil(W0, features, labels, lam, lr, K):
    """K steps of gradient descent on the head, as ANIL's inner loop."""

    def step(k, W):
        return W - lr * jax.grad(inner_loss)(W, W0, features, labels, lam)

    return jax.lax.fori_loop(0, K, step, W0)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_euler_is_anil(lam):
    W0, features, labels, query_features, query_labels = make_task(3)
    h, K = 0.1, 30
    T = h * K
    expected = anil(W0, features, labels, lam, h, K)
    assert jnp.max(jnp.abs(expected - W0)) > 0.1  # the head really moved
    for W_T in (
        linear_flow(W0, features, labels, T, lam=lam, solver="euler", steps=K),
        linear_flow(W0, features, labels, T, lam=lam, solver="euler", dt0=h),
        linear_flow_adapt(W0, features, labels, T, lam=lam, solver="euler", steps=K),
    ):
        np.testing.assert_allclose(W_T, expected, rtol=0, atol=1e-12)

    # Euler on the augmented system is forward-mode differentiation of the
    # Euler map: the W0 and features meta-gradients are ANIL's, exactly.
    def anil_outer(W0, features):
        W_K = anil(W0, features, labels, lam, h, K)
        return cross_entropy(W_K, query_features, query_labels)

    expected_grads = jax.grad(anil_outer, argnums=(0, 1))(W0, features)
    got = comln_meta_gradients(
        W0, features, labels, T, lam, query_features, query_labels, solver="euler", steps=K
    )
    for g, e in zip(got[:2], expected_grads):
        assert relative_error(g, e) < 1e-12
    # The T meta-gradient is the continuous-time formula at the Euler end point
    # (an O(h) approximation of d/dT of the discrete map, which is not returned).
    V = jax.grad(cross_entropy)(expected, query_features, query_labels)
    train_grad = jax.grad(inner_loss)(expected, W0, features, labels, lam)
    np.testing.assert_allclose(got[2], -jnp.vdot(V, train_grad), rtol=1e-10)


def meta_gradient_memory(outer, *args):
    compiled = jax.jit(jax.grad(outer, argnums=(0, 1))).lower(*args).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    fields = ("temp_size_in_bytes", "output_size_in_bytes", "argument_size_in_bytes")
    if not all(hasattr(analysis, field) for field in fields):
        pytest.skip("this backend's memory analysis lacks the size fields")
    return sum(getattr(analysis, field) for field in fields)


def test_memory_is_constant_in_T_while_anil_grows():
    W0, features, labels, query_features, query_labels = make_task(4, d=32)

    def comln_outer(T, **options):
        def outer(W0, features):
            W_T = linear_flow(W0, features, labels, T, **options)
            return cross_entropy(W_T, query_features, query_labels)

        return outer

    # T is a compile-time constant here, and the step budget grows 16-fold:
    # nothing is stored per step, so neither changes the footprint.
    short = meta_gradient_memory(comln_outer(0.1), W0, features)
    long = meta_gradient_memory(comln_outer(100.0, max_steps=65536), W0, features)
    assert short == long

    def anil_outer(K, h=0.01):
        def outer(W0, features):
            def step(W, _):
                return W - h * jax.grad(cross_entropy)(W, features, labels), None

            W_K, _ = jax.lax.scan(step, W0, None, length=K)
            return cross_entropy(W_K, query_features, query_labels)

        return outer

    anil_memory = [meta_gradient_memory(anil_outer(K), W0, features) for K in (10, 100, 1000)]
    assert anil_memory[0] < anil_memory[1] < anil_memory[2]
    # Backprop through K steps stores about one head per step.
    assert anil_memory[2] - anil_memory[1] >= 900 * W0.size * W0.dtype.itemsize
    assert anil_memory[2] > long


def test_vmap_over_tasks_and_horizons_equals_loop():
    tasks = [make_task(seed) for seed in (5, 6, 7)]
    W0 = tasks[0][0]
    features, labels, query_features, query_labels = (
        jnp.stack([task[i] for task in tasks]) for i in (1, 2, 3, 4)
    )
    T = jnp.array([0.2, 2.0, 15.0])  # per-task horizons
    batched = jax.jit(
        jax.vmap(
            lambda W0, features, labels, T, query_features, query_labels: (
                comln_meta_gradients(W0, features, labels, T, 0.5, query_features, query_labels)
            ),
            in_axes=(None, 0, 0, 0, 0, 0),
        )
    )(W0, features, labels, T, query_features, query_labels)
    for b in range(3):
        single = comln_meta_gradients(
            W0, features[b], labels[b], T[b], 0.5, query_features[b], query_labels[b]
        )
        for got, expected in zip(batched, single):
            np.testing.assert_allclose(got[b], expected, rtol=1e-10, atol=1e-13)
    # The batched meta-gradients differ across tasks (the batch was not collapsed).
    assert relative_error(batched[0][0], batched[0][2]) > 1e-3


def test_solver_failure_raises_numerical_error():
    W0, features, labels, _, _ = make_task(8)
    # Euler with h * lam > 2 diverges (|1 - h lam| = 4 on the proximal part).
    with pytest.raises(NumericalError, match="not finite"):
        linear_flow(W0, features, labels, 60.0, lam=50.0, solver="euler", dt0=0.1)
    # Under the caller's jit the labels are traced, so their values are not
    # checked at the boundary, and the solver check fires when the compiled
    # function runs, as JAX's runtime error with the same message.
    with pytest.raises(Exception, match="max_steps") as raised:
        jax.block_until_ready(jax.jit(lambda labels: linear_flow(W0, features, labels, 50.0, max_steps=3))(labels))
    assert not isinstance(raised.value, InputError)


def _bad(**changes):
    W0, features, labels, _, _ = make_task(9)
    arguments = dict(W0=W0, features=features, labels=labels, T=1.0)
    arguments.update(changes)
    return arguments


_W0, _FEATURES, _LABELS, _, _ = make_task(9)
BAD_INPUTS = {
    "labels not one-hot (soft)": (_bad(labels=_LABELS * 0.5), {}, "one-hot"),
    "labels not one-hot (two ones)": (_bad(labels=_LABELS.at[0].set(1.0)), {}, "one-hot"),
    "labels row count": (_bad(labels=_LABELS[:-1]), {}, "rows"),
    "integer labels": (_bad(labels=jnp.argmax(_LABELS, axis=1)), {}, r"jax\.nn\.one_hot\(labels, N\)"),
    "N mismatch": (_bad(labels=jax.nn.one_hot(jnp.arange(M) % 2, 2)), {}, "classes"),
    "d mismatch": (_bad(features=_FEATURES[:, :-1]), {}, "dimension"),
    "features 1-D": (_bad(features=_FEATURES[0]), {}, "2-D"),
    "T zero": (_bad(T=0.0), {}, "`T`"),
    "T negative": (_bad(T=-1.0), {}, "`T`"),
    "T nan": (_bad(T=float("nan")), {}, "`T`"),
    "T inf": (_bad(T=float("inf")), {}, "`T`"),
    "T not scalar": (_bad(T=jnp.ones(3)), {}, "scalar"),
    "features nan": (_bad(features=_FEATURES.at[1, 2].set(jnp.nan)), {}, "features"),
    "features inf": (_bad(features=_FEATURES.at[0, 0].set(jnp.inf)), {}, "features"),
    "W0 nan": (_bad(W0=_W0.at[0, 0].set(jnp.nan)), {}, "W0"),
    "unknown solver": (_bad(), {"solver": "rk4"}, "solver"),
    "euler without step": (_bad(), {"solver": "euler"}, "dt0"),
    "euler with both": (_bad(), {"solver": "euler", "dt0": 0.1, "steps": 10}, "dt0"),
    "steps with dopri5": (_bad(), {"steps": 10}, "steps"),
    "negative lam": (_bad(), {"lam": -0.1}, "lam"),
    "non-integer steps": (_bad(), {"solver": "euler", "steps": 2.5}, "steps"),
    "zero rtol": (_bad(), {"rtol": 0.0}, "rtol"),
}


@pytest.mark.parametrize("function", [linear_flow, linear_flow_adapt])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_input_error(function, case):
    arguments, options, match = BAD_INPUTS[case]
    with pytest.raises(InputError, match=match):
        function(**arguments, **options)


def test_traced_lam_is_rejected_and_traced_shapes_are_checked():
    W0, features, labels, _, _ = make_task(10)
    with pytest.raises(InputError, match="lam"):
        jax.jit(lambda lam: linear_flow(W0, features, labels, 1.0, lam=lam))(0.1)
    # Values are unknown under jit, but shapes are still checked.
    with pytest.raises(InputError, match="classes"):
        jax.jit(lambda y: linear_flow(W0, features, y, 1.0))(labels[:, :2])


def test_integer_labels_and_float32_inputs():
    W0, features, labels, _, _ = make_task(11)
    W_float = linear_flow(W0, features, labels, 1.0, **TIGHT)
    W_int = linear_flow(W0, features, labels.astype(jnp.int32), 1.0, **TIGHT)
    np.testing.assert_allclose(W_int, W_float, rtol=0, atol=1e-14)
    W32 = linear_flow(W0.astype(jnp.float32), features.astype(jnp.float32), labels, 1.0)
    assert W32.dtype == jnp.float32
    np.testing.assert_allclose(W32, W_float, rtol=0, atol=1e-4)
