"""RKC2, the stabilized solver for gradient flows: order, stability, meta-gradients against closed forms."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ctmeta
from ctmeta import ode
from ctmeta._errors import InputError
from ctmeta.flows import GradientField, HeavyBall
from ctmeta.ode._rkc import power_iteration, rkc2_step, stability_interval, stages_for

jax.config.update("jax_enable_x64", True)

N = 12
LAM = jnp.logspace(0, 4, N)  # Hessian eigenvalues 1 .. 1e4: T lambda_max = 1e4 at T = 1
B = jnp.linspace(-1.0, 1.0, N)
C = jnp.cos(jnp.arange(N, dtype=jnp.float64))
U0 = jnp.sin(jnp.arange(N, dtype=jnp.float64) + 1.0)


def quadratic(u, data):
    lam, b = data
    return 0.5 * jnp.sum(lam * u * u) - jnp.sum(b * u)


def closed_form(u0, data, T):
    lam, b = data
    star = b / lam
    return star + jnp.exp(-lam * T) * (u0 - star)


def outer(u):
    return 0.5 * jnp.sum((u - C) ** 2)


def test_second_order_on_a_linear_problem():
    """Halving h divides the error of one step by ~8 (local error h^3), at a fixed stage count."""
    a = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    rhs = lambda t, y: -a @ y
    y0 = jnp.array([1.0, -0.5])
    exact = lambda h: jax.scipy.linalg.expm(-a * h) @ y0
    f0 = rhs(0.0, y0)
    errs = [float(jnp.linalg.norm(rkc2_step(rhs, 0.0, y0, f0, jnp.asarray(h), jnp.asarray(5)) - exact(h)))
            for h in (0.2, 0.1, 0.05)]
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(6.5 < r < 9.5 for r in ratios), (errs, ratios)


@pytest.mark.parametrize("s", [4, 10, 30])
def test_stable_far_beyond_dopri5(s):
    """y' = -lambda y with h lambda at 95% of RKC2's interval (0.65 s^2; Dopri5's is 3.3) stays bounded."""
    beta = stability_interval(s)
    assert 0.55 * s ** 2 < beta < 0.66 * s ** 2
    lam = 0.95 * beta  # h = 1
    rhs = lambda t, y: -lam * y
    step = lambda _, y: rkc2_step(rhs, 0.0, y, rhs(0.0, y), jnp.asarray(1.0), jnp.asarray(s))
    y = jax.jit(lambda y: jax.lax.fori_loop(0, 50, step, y))(jnp.array([1.0]))
    assert float(jnp.abs(y[0])) < 1.0
    # and the stage rule picks enough stages for that h * lambda
    assert stability_interval(int(stages_for(jnp.asarray(0.95 * beta), 1000))) >= 0.95 * beta


def test_spectral_estimate_against_eigh():
    key = jax.random.PRNGKey(3)
    q, _ = jnp.linalg.qr(jax.random.normal(key, (30, 30)))
    eig = jnp.concatenate([jnp.array([-40.0, 25.0]), jnp.linspace(-5, 5, 28)])  # largest |lambda| is negative
    m = q @ jnp.diag(eig) @ q.T
    v = jax.random.normal(jax.random.PRNGKey(1), (30,))
    rho, v = power_iteration(lambda x: m @ x, v / jnp.linalg.norm(v), 200)
    assert float(rho) == pytest.approx(float(jnp.max(jnp.abs(jnp.linalg.eigvalsh(m)))), rel=1e-6)


@pytest.mark.parametrize("error_scale", ["state", "displacement"])
def test_stiff_quadratic_against_closed_form(error_scale):
    """u(T), dJ/du0, dJ/d(lambda, b) and dJ/dT of a flow with T lambda_max = 1e4, float64."""
    data, T = (LAM, B), jnp.asarray(1.0)
    sens = ode.AdaptiveAdjoint(dense_steps=8192, rtol=1.0, atol=1.0)

    def solve(u0, data, T):
        return ode.solve(GradientField(quadratic), u0, T, data, sensitivity=sens, solver="rkc2", rtol=1e-7,
                         atol=1e-9, max_steps=20000, error_scale=error_scale)

    u1 = jax.jit(solve)(U0, data, T)
    np.testing.assert_allclose(u1, closed_form(U0, data, T), atol=5e-6)
    got = jax.jit(jax.grad(lambda u0, d, T: outer(solve(u0, d, T)), argnums=(0, 1, 2)))(U0, data, T)
    want = jax.grad(lambda u0, d, T: outer(closed_form(u0, d, T)), argnums=(0, 1, 2))(U0, data, T)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=3e-5, atol=3e-6)


def _logistic_problem():
    key1, key2 = jax.random.split(jax.random.PRNGKey(0))
    scales = jnp.array([30.0, 10.0, 1.0, 0.3, 0.1])  # badly scaled features: Hessian eigenvalues ~1e3 .. 1e-2
    x = jax.random.normal(key1, (40, 5)) * scales
    y = (jax.random.uniform(key2, (40,)) < jax.nn.sigmoid(x @ jnp.array([0.1, -0.2, 1.0, 2.0, -3.0]))).astype(float)
    return x, y


def logistic(w, data):
    x, y = data
    z = x @ w
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.01 * jnp.sum(w ** 2)


def test_nonlinear_stiff_flow_against_dopri8_backprop():
    data = _logistic_problem()
    w0, T = jnp.array([0.3, -0.1, 0.2, 0.5, -0.4]), jnp.asarray(3.0)
    J = lambda w: jnp.sum(jnp.sin(w))

    def ours(w0, data, T):
        sens = ode.AdaptiveAdjoint(dense_steps=4096, rtol=1.0, atol=1.0)
        return J(ode.solve(GradientField(logistic), w0, T, data, sensitivity=sens, solver="rkc2", rtol=1e-9,
                           atol=1e-11, max_steps=20000))

    def reference(w0, data, T):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(lambda t, w, d: -jax.grad(logistic)(w, d)), diffrax.Dopri8(), 0.0, T,
                                  None, w0, data, stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-14),
                                  max_steps=200000)
        return J(sol.ys[-1])

    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(w0, data, T)
    want = jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(w0, data, T)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-8)


def test_meta_gradient_through_adjoint_and_vmap_with_per_task_T():
    """`Adjoint(solver="rkc2")` under vmap with one T per task equals a loop over the tasks."""
    method = ctmeta.Adjoint(solver="rkc2", rtol=1e-6, atol=1e-8, dense_steps=4096)
    bs = jnp.stack([B, -B, 2 * B])
    Ts = jnp.array([0.5, 1.0, 2.0])

    def objective(u0, b, T):
        return outer(ctmeta.gradient_flow(quadratic, u0, (LAM, b), T, method=method))

    grad = jax.jit(jax.grad(objective, argnums=(0, 2)))
    batched = jax.jit(jax.vmap(jax.grad(objective, argnums=(0, 2)), in_axes=(None, 0, 0)))(U0, bs, Ts)
    for i in range(3):
        one = grad(U0, bs[i], Ts[i])
        np.testing.assert_allclose(batched[0][i], one[0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(batched[1][i], one[1], rtol=1e-10, atol=1e-12)
        want = jax.grad(lambda u0, T: outer(closed_form(u0, (LAM, bs[i]), T)), argnums=(0, 1))(U0, Ts[i])
        np.testing.assert_allclose(one[0], want[0], rtol=1e-4, atol=1e-5)


def test_statuses_under_vmap():
    """A task with a non-finite curvature fails alone, with its own status; the others succeed."""
    lams = jnp.stack([LAM, LAM.at[3].set(jnp.inf), 0.5 * LAM])
    sens = ode.AdaptiveAdjoint(dense_steps=4096)

    def one(lam):
        return ode.solve(GradientField(quadratic), U0, 1.0, (lam, B), sensitivity=sens, solver="rkc2", rtol=1e-6,
                         atol=1e-8, max_steps=20000, throw=False)

    y, status = jax.jit(jax.vmap(one))(lams)
    assert [int(s) for s in status] == [0, int(ode.SolveStatus.SPECTRAL_ESTIMATE), 0]
    assert bool(jnp.all(jnp.isnan(y[1]))) and bool(jnp.all(jnp.isfinite(y[0])))
    # A dense output too small for the flow is its own status, when differentiated (undifferentiated, nothing
    # is recorded).
    small = ode.AdaptiveAdjoint(dense_steps=4)

    def loss_and_status(u):
        y, st = ode.solve(GradientField(quadratic), u, 1.0, (LAM, B), sensitivity=small, solver="rkc2", throw=False)
        return jnp.sum(y), st

    assert int(jax.jit(loss_and_status)(U0)[1]) == 0
    grad, st = jax.jit(jax.grad(loss_and_status, has_aux=True))(U0)
    assert int(st) == int(ode.SolveStatus.DENSE_OVERFLOW) and bool(jnp.all(jnp.isnan(grad)))


def test_bad_arguments_refused_in_one_line():
    hb = HeavyBall.with_gamma(1.0)
    with pytest.raises(InputError, match="symmetric Jacobian"):
        ctmeta.gradient_flow(quadratic, U0, (LAM, B), 1.0, method=ctmeta.Adjoint(solver="rkc2"), flow=hb)
    with pytest.raises(InputError, match="AdaptiveAdjoint"):
        ode.solve(GradientField(quadratic), U0, 1.0, (LAM, B), solver="rkc2")
    with pytest.raises(InputError, match="steps=None"):
        ctmeta.Adjoint(steps=10, solver="rkc2")
    with pytest.raises(InputError, match="error_scale"):
        ctmeta.Adjoint(error_scale="relative")
    with pytest.raises(InputError, match="backward_solver"):
        ode.AdaptiveAdjoint(backward_solver="euler")
    with pytest.raises(InputError, match="symmetric Jacobian"):
        ode.solve(lambda t, y, a: -y, U0, 1.0, sensitivity=ode.AdaptiveAdjoint(), solver="rkc2")


def test_rkc2_backward_after_a_dopri5_forward_estimates_its_own_stiffness():
    """`backward_solver="rkc2"` after Dopri5 (no recorded spectral radius): power iteration on the adjoint."""
    method = ctmeta.Adjoint(rtol=1e-8, atol=1e-10, backward_solver="rkc2", adjoint_rtol=1.0, adjoint_atol=1.0,
                            dense_steps=8192)
    lam = LAM[:8] / 10  # T lambda_max = 1e3
    C8 = C[:8]
    objective = lambda u, f: 0.5 * jnp.sum((f(u) - C8) ** 2)
    got = jax.jit(jax.grad(lambda u: objective(u, lambda v: ctmeta.gradient_flow(quadratic, v, (lam, B[:8]), 1.0,
                                                                                 method=method))))(U0[:8])
    want = jax.grad(lambda u: objective(u, lambda v: closed_form(v, (lam, B[:8]), 1.0)))(U0[:8])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
