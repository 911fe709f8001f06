"""gradient_flow and the meta-gradient rules against closed forms (float64)."""

import re

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import ctmeta
from ctmeta import InputError

N, D = 24, 5


@pytest.fixture(scope="module")
def lsq():
    """A least-squares task: L(u) = |X u - y|^2 / 2n, J(u) = |Xv u - yv|^2 / 2n."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    X = jax.random.normal(keys[0], (N, D))
    y = jax.random.normal(keys[1], (N,))
    Xv = jax.random.normal(keys[2], (N, D))
    yv = jax.random.normal(keys[3], (N,))
    H = np.asarray(X.T @ X / N)
    b = np.asarray(X.T @ y / N)
    return X, y, Xv, yv, H, b


def train_loss(p, data):
    X, y = data
    return 0.5 * jnp.mean((X @ p["w"] - y) ** 2)


def outer(method, lsq, argnums=(0, 1, 2)):
    X, y, Xv, yv, _, _ = lsq

    def J(theta, T, y_train):
        u = ctmeta.gradient_flow(train_loss, theta, (X, y_train), T, method=method)
        return 0.5 * jnp.mean((Xv @ u["w"] - yv) ** 2)

    return jax.jit(jax.grad(J, argnums=argnums))


def grad_J(lsq, u):
    _, _, Xv, yv, _, _ = lsq
    return np.asarray(Xv.T @ (Xv @ u - yv) / N)


def flow_closed_form(lsq, w0, T):
    """u(T) = w* + V exp(-Lambda T) V^T (w0 - w*) through H's eigendecomposition."""
    _, _, _, _, H, b = lsq
    evals, V = np.linalg.eigh(H)
    wstar = np.linalg.solve(H, b)
    return wstar + V @ np.diag(np.exp(-evals * T)) @ V.T @ (w0 - wstar), V @ np.diag(np.exp(-evals * T)) @ V.T


THETA = {"w": jnp.linspace(-1.0, 1.0, D)}
T = 1.5


def rel(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


@pytest.mark.parametrize("scheme,steps", [("heun", 400), ("rk4", 50), ("heun-ckpt", 400)])
def test_adjoint_matches_closed_form_flow(lsq, scheme, steps):
    kwargs = dict(scheme="heun", checkpoints=20) if scheme == "heun-ckpt" else dict(scheme=scheme)
    g, gT, _ = outer(ctmeta.Adjoint(steps=steps, rtol=1e-10, atol=1e-12, **kwargs), lsq)(THETA, T, lsq[1])
    uT, E = flow_closed_form(lsq, np.asarray(THETA["w"]), T)
    gJ = grad_J(lsq, uT)
    assert rel(g["w"], E @ gJ) < 1e-5  # E = du(T)/dtheta, symmetric
    _, _, _, _, H, b = lsq
    dT = -gJ @ (H @ uT - b)  # -<grad J, grad L> at u(T)
    assert abs(gT - dT) / abs(dT) < 1e-5


def test_adjoint_gradient_in_the_data_matches_finite_differences(lsq):
    X, y, Xv, yv, H, b = lsq
    _, _, gy = outer(ctmeta.Adjoint(steps=50, scheme="rk4", rtol=1e-10, atol=1e-12), lsq)(THETA, T, y)

    def J_closed(y_train):
        bb = np.asarray(X).T @ y_train / N
        wstar = np.linalg.solve(H, bb)
        evals, V = np.linalg.eigh(H)
        u = wstar + V @ np.diag(np.exp(-evals * T)) @ V.T @ (np.asarray(THETA["w"]) - wstar)
        return 0.5 * np.mean((np.asarray(Xv) @ u - np.asarray(yv)) ** 2)

    eps = 1e-6
    fd = [(J_closed(np.asarray(y) + eps * e) - J_closed(np.asarray(y) - eps * e)) / (2 * eps) for e in np.eye(N)]
    assert rel(gy, fd) < 1e-6


def test_unrolled_matches_the_discrete_map(lsq):
    _, _, _, _, H, b = lsq
    K = 30
    g, gT, _ = outer(ctmeta.Unrolled(steps=K), lsq)(THETA, T, lsq[1])
    h = T / K
    P = np.eye(D) - h * H
    wstar = np.linalg.solve(H, b)
    uK = wstar + np.linalg.matrix_power(P, K) @ (np.asarray(THETA["w"]) - wstar)
    assert rel(g["w"], np.linalg.matrix_power(P, K) @ grad_J(lsq, uK)) < 1e-8
    # d u_K / dT through h = T/K: -K/T... differentiate (I - hH)^K (theta - w*) in h.
    du_dh = -K * H @ np.linalg.matrix_power(P, K - 1) @ (np.asarray(THETA["w"]) - wstar)
    assert abs(gT - grad_J(lsq, uK) @ du_dh / K) / abs(gT) < 1e-8


def test_first_order_returns_grad_at_adapted_params(lsq):
    _, _, _, _, H, b = lsq
    K = 30
    g, gy = outer(ctmeta.FirstOrder(steps=K), lsq, argnums=(0, 2))(THETA, T, lsq[1])
    wstar = np.linalg.solve(H, b)
    uK = wstar + np.linalg.matrix_power(np.eye(D) - T / K * H, K) @ (np.asarray(THETA["w"]) - wstar)
    np.testing.assert_allclose(g["w"], grad_J(lsq, uK), rtol=1e-10)
    assert np.all(np.asarray(gy) == 0)  # the data: the first-order approximation's 0, by design


def test_implicit_matches_the_proximal_optimum(lsq):
    _, _, _, _, H, b = lsq
    lam = 1.0
    # Long enough to converge to the proximal optimum; CG in D steps is exact for D x D.
    g, _ = outer(ctmeta.Implicit(steps=3000, lam=lam, cg_steps=D), lsq, argnums=(0, 2))(THETA, 30.0, lsq[1])
    ustar = np.linalg.solve(H + lam * np.eye(D), b + lam * np.asarray(THETA["w"]))
    want = np.linalg.solve(np.eye(D) + H / lam, grad_J(lsq, ustar))
    assert rel(g["w"], want) < 1e-8


@pytest.mark.parametrize("method", [ctmeta.FirstOrder(steps=100), ctmeta.Reptile(steps=100),
                                    ctmeta.Implicit(steps=100, lam=1.0)], ids=repr)
def test_a_rule_without_a_derivative_in_T_refuses_it(lsq, method):
    """jax.grad in T through a rule whose `differentiates` lacks "T": one InputError line at trace
    time (jit or not), not a silent 0; the derivative in the initialisation still works."""
    assert "T" not in method.differentiates
    for jit in (False, True):
        grad_T = outer(method, lsq, argnums=1)
        with pytest.raises(InputError, match=rf"^{re.escape(repr(method))} does not differentiate T .*Adjoint\(\)"):
            (grad_T if jit else grad_T.__wrapped__)(THETA, T, lsq[1])
    g = outer(method, lsq, argnums=0)(THETA, T, lsq[1])
    assert np.all(np.isfinite(g["w"])) and np.linalg.norm(g["w"]) > 0
    # Held fixed by stop_gradient, T is no longer differentiated: no error.
    X, y, *_ = lsq
    fixed = jax.grad(lambda t: jnp.sum(ctmeta.gradient_flow(train_loss, THETA, (X, y), jax.lax.stop_gradient(t),
                                                            method=method)["w"]))(T)
    assert float(fixed) == 0.0


def test_reprs_show_the_step_count_and_unrolled_requires_it():
    assert repr(ctmeta.FirstOrder(steps=100)) == "FirstOrder(steps=100)"
    assert repr(ctmeta.Reptile()) == "Reptile(steps=100)"
    assert repr(ctmeta.Implicit(steps=100, lam=1.0)) == "Implicit(steps=100, lam=1.0)"
    assert repr(ctmeta.Implicit(steps=7, lam=0.5, cg_steps=9)) == "Implicit(steps=7, lam=0.5, cg_steps=9)"
    assert repr(ctmeta.Unrolled(steps=5)) == "Unrolled(steps=5)"
    assert repr(ctmeta.Adjoint()) == "Adjoint()"  # adaptive: no step count
    assert repr(ctmeta.Adjoint(steps=50, rtol=1e-8)) == "Adjoint(steps=50, rtol=1e-08)"
    with pytest.raises(InputError, match=r"Unrolled needs steps=K"):
        ctmeta.Unrolled()


def test_reptile_direction(lsq):
    X, y, *_ = lsq
    K = 20
    u = ctmeta.gradient_flow(train_loss, THETA, (X, y), T, method=ctmeta.Reptile(steps=K))
    u_fo = ctmeta.gradient_flow(train_loss, THETA, (X, y), T, method=ctmeta.FirstOrder(steps=K))
    np.testing.assert_allclose(u["w"], u_fo["w"])
    d = ctmeta.reptile_direction(THETA, u)
    np.testing.assert_allclose(d["w"], THETA["w"] - u["w"])
    batch = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), u)
    np.testing.assert_allclose(ctmeta.reptile_direction(THETA, batch)["w"], THETA["w"] - 1.5 * u["w"], rtol=1e-12)


# ---- a 2-layer tanh MLP (the CosMixture network) -------------------------------------------


@pytest.fixture(scope="module")
def mlp_task():
    key = jax.random.PRNGKey(3)
    k1, k2, k3 = jax.random.split(key, 3)
    model = eqx.nn.MLP(2, 1, 8, 2, activation=jnp.tanh, key=k1)
    x = jax.random.uniform(k2, (20, 2), minval=-1, maxval=1)
    y = jnp.sin(3 * x[:, :1]) + x[:, 1:] ** 2
    xq = jax.random.uniform(k3, (20, 2), minval=-1, maxval=1)
    yq = jnp.sin(3 * xq[:, :1]) + xq[:, 1:] ** 2
    return model, (x, y), (xq, yq)


def mse(model, data):
    x, y = data
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def test_mlp_adjoint_matches_finite_differences_of_the_flow(mlp_task):
    model, data, query = mlp_task
    T_ = 0.5
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def J_adjoint(p):
        u = ctmeta.gradient_flow(mse, eqx.combine(p, static), data, T_, method=ctmeta.Adjoint(steps=40, scheme="rk4", rtol=1e-10, atol=1e-12))
        return mse(u, query)

    def J_flow(p):  # an independent, tightly-toleranced solve of the same flow
        f = lambda t, u, _: jax.tree.map(jnp.negative, jax.grad(lambda q: mse(eqx.combine(q, static), data))(u))
        sol = diffrax.diffeqsolve(diffrax.ODETerm(f), diffrax.Dopri8(), 0.0, T_, None, p,
                                  stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12))
        return mse(eqx.combine(jax.tree.map(lambda x: x[-1], sol.ys), static), query)

    g = jax.jit(jax.grad(J_adjoint))(params)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    direction = jax.random.normal(jax.random.PRNGKey(9), flat.shape)
    direction = direction / jnp.linalg.norm(direction)
    eps = 1e-5
    J_flow = jax.jit(J_flow)
    fd = (J_flow(unravel(flat + eps * direction)) - J_flow(unravel(flat - eps * direction))) / (2 * eps)
    ours = jnp.dot(jax.flatten_util.ravel_pytree(g)[0], direction)
    assert abs(ours - fd) / abs(fd) < 1e-6


def test_mlp_adjoint_and_unrolled_converge_together(mlp_task):
    model, data, query = mlp_task
    T_ = 0.5

    def grad_for(method):
        J = lambda m: mse(ctmeta.gradient_flow(mse, m, data, T_, method=method), query)
        return jax.flatten_util.ravel_pytree(eqx.filter_jit(eqx.filter_grad(J))(model))[0]

    gaps = [rel(grad_for(ctmeta.Unrolled(steps=K)), grad_for(ctmeta.Adjoint(steps=K))) for K in (10, 40, 160)]
    # Both approach the continuous flow's gradient, Unrolled at O(h): the gap shrinks ~4x per 4x K.
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < gaps[0] / 8


def test_vmap_over_tasks_equals_a_loop(mlp_task):
    model, (x, y), (xq, yq) = mlp_task
    xs = jnp.stack([x, x[::-1], -x])
    ys = jnp.stack([y, y[::-1] * 2, y - 1])
    Ts = jnp.array([0.2, 0.5, 0.9])  # per-task horizons: early stopping
    for method in (ctmeta.Adjoint(steps=20), ctmeta.Unrolled(steps=5), ctmeta.Implicit(steps=20, cg_steps=3)):
        def J(m, xt, yt, Tt):
            return mse(ctmeta.gradient_flow(mse, m, (xt, yt), Tt, method=method), (xq, yq))

        batched = eqx.filter_jit(eqx.filter_vmap(eqx.filter_grad(J), in_axes=(None, 0, 0, 0)))(model, xs, ys, Ts)
        single = eqx.filter_jit(eqx.filter_grad(J))
        for i in range(3):
            looped = single(model, xs[i], ys[i], Ts[i])
            for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(looped)):
                np.testing.assert_allclose(a[i], b, rtol=1e-9, atol=1e-12)


# ---- bad input -------------------------------------------------------------------------------


def test_bad_inputs(lsq):
    X, y, *_ = lsq
    with pytest.raises(InputError, match="positive, finite"):
        ctmeta.gradient_flow(train_loss, THETA, (X, y), -1.0)
    with pytest.raises(InputError, match="positive, finite"):
        ctmeta.gradient_flow(train_loss, THETA, (X, y), float("nan"))
    with pytest.raises(InputError, match="scalar"):
        ctmeta.gradient_flow(lambda p, d: d[0] @ p["w"], THETA, (X, y), 1.0)
    with pytest.raises(InputError, match="fails"):
        ctmeta.gradient_flow(train_loss, {"w": jnp.ones(D + 1)}, (X, y), 1.0)
    with pytest.raises(InputError, match="no floating-point"):
        ctmeta.gradient_flow(train_loss, {"w": jnp.ones(D, dtype=jnp.int32)}, (X, y), 1.0)
    with pytest.raises(InputError, match="method"):
        ctmeta.gradient_flow(train_loss, THETA, (X, y), 1.0, method="adjoint")
    for bad in (0, -1, 1.5):
        for cls in (ctmeta.Adjoint, ctmeta.Unrolled, ctmeta.FirstOrder, ctmeta.Implicit, ctmeta.Reptile):
            with pytest.raises(InputError, match="steps"):
                cls(steps=bad)
    with pytest.raises(InputError, match="lam"):
        ctmeta.Implicit(lam=0.0)
    with pytest.raises(InputError, match="divide"):
        ctmeta.Adjoint(steps=10, checkpoints=3)


def test_diverging_flow_fails_loudly():
    # Gradient *ascent* on a quadratic (a negative-definite "loss") explodes.
    loss = lambda p, d: -jnp.exp(jnp.sum(p["w"] ** 2))
    with pytest.raises(Exception, match=r"(?i)non-finite|max.*steps"):
        jax.block_until_ready(ctmeta.gradient_flow(loss, {"w": jnp.ones(2)}, None, 5.0,
                                                    method=ctmeta.Adjoint(steps=10, max_steps=256)))



_EAGER_FAILURES = r"""
import jax, jax.numpy as jnp, ctmeta
ascent = lambda p, d: -jnp.exp(jnp.sum(p["w"] ** 2))  # a diverging flow: the step budget runs out
w = {"w": jnp.ones(2)}
calls = {
    "gradient_flow": lambda: ctmeta.gradient_flow(ascent, w, None, 5.0, method=ctmeta.Adjoint(max_steps=64)),
    "grad": lambda: jax.grad(lambda p: ctmeta.gradient_flow(ascent, p, None, 5.0,
                                                            method=ctmeta.Adjoint(max_steps=64))["w"][0])(w),
}
for name, call in calls.items():
    try:
        call()
        print(name, "no error")
    except ctmeta.NumericalError as err:
        print(name, "NumericalError:", err)
"""


def test_gradient_flow_called_eagerly_fails_as_a_numerical_error_and_nothing_else(tmp_path):
    """gradient_flow called eagerly, plain and under jax.grad without jit: a step budget that runs
    out is `ctmeta.NumericalError`, and nothing more is printed, at exit either (no JAX callback
    traceback, no equinox filter_jit banner, no "Exception ignored in atexit callback")."""
    import subprocess
    import sys

    script = tmp_path / "eager.py"
    script.write_text(_EAGER_FAILURES)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["gradient_flow", "grad"], proc.stdout
    assert lines[0].startswith("gradient_flow NumericalError: gradient_flow: the inner solve exhausted its step "
                               "budget (max_steps=64)"), lines[0]
    assert lines[1].startswith("grad NumericalError: gradient_flow:") and "max_steps=64" in lines[1], lines[1]
    for noise in ("Exception ignored", "filter_jit", "pure_callback failed", "Traceback"):
        assert noise not in proc.stderr, proc.stderr


def test_loss_along_flow_and_linear_flow_called_eagerly_fail_as_a_numerical_error(caplog):
    """The other eager entry points with a solve: `NumericalError`, and no log of JAX's failed callback."""
    ascent = lambda p, d: -jnp.exp(jnp.sum(p["w"] ** 2))
    with pytest.raises(ctmeta.NumericalError, match=r"^loss_along_flow: the inner solve exhausted .*max_steps=64"):
        ctmeta.loss_along_flow(ascent, {"w": jnp.ones(2)}, None, 5.0, jnp.array([1.0]),
                               method=ctmeta.Adjoint(max_steps=64))
    features = 10 * jnp.ones((6, 4)) * jnp.arange(6)[:, None]
    with pytest.raises(ctmeta.NumericalError, match=r"^ctmeta.linear_flow: .*max_steps=4 exhausted"):
        ctmeta.linear_flow(jnp.zeros((3, 4)), features, jax.nn.one_hot(jnp.arange(6) % 3, 3), 1e4, max_steps=4)
    assert not [r for r in caplog.records if r.name.startswith("jax")], [r.getMessage() for r in caplog.records]
