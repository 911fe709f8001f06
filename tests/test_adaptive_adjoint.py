"""ctmeta.ode.AdaptiveAdjoint (the default A-MAML rule, `Adjoint()`): the adjoint
solved backward by an adaptive Dopri5 over the forward's dense output, against
closed forms and autodiff through a tight solve, in float64."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctmeta import Adjoint, InputError, ode
from ctmeta.adaptation import gradient_flow
from ctmeta.methods import GradientField
from ctmeta._internal import dense_forward
from ctmeta.ode import SolveStatus
from quadratic import loss as _loss
from quadratic import quadratic

# A stiff quadratic: L(u) = 1/2 u^T A u - b^T u with curvatures 1 .. 400. At T = 1
# the paper's h = 0.01 puts h * lambda_max = 4 past Heun's limit 2: the stored
# sweep is wrong there (and flagged), the adaptive backward is not.
EIGS = jnp.array([1.0, 3.0, 30.0, 400.0])


def _quadratic(key=jax.random.PRNGKey(0)):
    return quadratic(EIGS, key)


def _closed_form(A, b, u0, c, q, T):
    """J = 1/2 |u(T) - c|^2 for u(T) = u* + e^{-AT}(u0 - u*), u* = A^{-1} b, and its derivatives."""
    E = q @ jnp.diag(jnp.exp(-EIGS * T)) @ q.T
    ustar = jnp.linalg.solve(A, b)
    uT = ustar + E @ (u0 - ustar)
    r = uT - c
    d_u0 = E @ r
    d_b = (jnp.eye(4) - E) @ jnp.linalg.solve(A, r)  # du(T)/db = (I - e^{-AT}) A^{-1}, symmetric
    d_T = -r @ (A @ uT - b)  # dJ/dT = -<grad J, grad L(u(T))>
    return 0.5 * r @ r, d_u0, d_b, d_T


def _J(rule, c):
    def J(u0, b, T, A):
        u = gradient_flow(_loss, u0, (A, b), T, method=rule)
        return 0.5 * jnp.sum((u - c) ** 2)

    return J


def test_stiff_quadratic_matches_the_closed_form_where_the_paper_step_is_unstable():
    A, b, u0, c, q = _quadratic()
    T = 1.0
    value, d_u0, d_b, d_T = _closed_form(A, b, u0, c, q, T)
    J = _J(Adjoint(rtol=1e-10, atol=1e-12, dense_steps=2048), c)
    v, (g_u0, g_b, g_T) = jax.value_and_grad(J, argnums=(0, 1, 2))(u0, b, T, A)
    np.testing.assert_allclose(v, value, rtol=1e-9)
    np.testing.assert_allclose(g_u0, d_u0, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(g_b, d_b, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(g_T, d_T, rtol=1e-7)
    # The stored sweep at the paper's h = 0.01 is past its stability limit here.
    stored = _J(Adjoint(steps=100, rtol=1e-10, atol=1e-12), c)
    with pytest.raises(Exception, match="unstable backward adjoint"):
        jax.block_until_ready(jax.grad(stored)(u0, b, T, A))


def test_default_tolerances_are_as_accurate_as_the_paper_grid_is_on_a_stable_problem():
    # Curvature 30 at most: h = 0.01 is stable for Heun; the default adaptive rule is
    # at least as accurate as the stored sweep at h = 0.01 (the paper's grid).
    A, b, u0, c, q = _quadratic()
    A = A - q @ jnp.diag(jnp.array([0.0, 0.0, 0.0, 370.0])) @ q.T
    T = 2.0
    E = q @ jnp.diag(jnp.exp(-jnp.array([1.0, 3.0, 30.0, 30.0]) * T)) @ q.T
    ustar = jnp.linalg.solve(A, b)
    exact = E @ (ustar + E @ (u0 - ustar) - c)
    err = {}
    for name, rule in {"adaptive": Adjoint(), "stored": Adjoint(steps=200)}.items():
        g = jax.grad(_J(rule, c))(u0, b, T, A)
        err[name] = float(jnp.linalg.norm(g - exact) / jnp.linalg.norm(exact))
    assert err["adaptive"] <= err["stored"], err
    assert err["adaptive"] < 1e-5, err


@pytest.fixture(scope="module")
def mlp_problem():
    model = eqx.nn.MLP(2, 1, 8, 2, activation=jnp.tanh, key=jax.random.PRNGKey(1))
    model = jax.tree.map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x = jax.random.normal(jax.random.PRNGKey(2), (20, 2))
    y = jnp.sin(x[:, :1]) + 0.5 * x[:, 1:]
    scale = jnp.asarray(1.3)  # a closed-over array of the loss

    def loss(u, data):
        xs, ys = data
        pred = jax.vmap(eqx.combine(u, static))(xs)
        return scale * jnp.mean((pred - ys) ** 2)

    def outer(u):
        return jnp.mean((jax.vmap(eqx.combine(u, static))(x + 0.1) - y) ** 2)

    return params, (x, y), loss, outer, static


def _reference(params, data, loss, outer, T):
    """Reverse-mode through a tight Dopri5 solve of the same flow (diffrax): an independent computation."""
    field = GradientField(loss)

    def J(u0, data_, T_):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, a: field(t, y, a)), diffrax.Dopri5(), 0.0, T_, None, u0, args=data_,
            stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-14), max_steps=100_000,
        )
        return outer(jax.tree.map(lambda v: v[-1], sol.ys))

    return jax.grad(J, argnums=(0, 1, 2))(params, data, T)


def _rel(a, b):
    fa, fb = (jnp.concatenate([v.ravel() for v in jax.tree.leaves(t)]) for t in (a, b))
    return float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))


def test_mlp_flow_matches_autodiff_through_a_tight_solve(mlp_problem):
    params, data, loss, outer, _ = mlp_problem
    T = 2.0
    ref_u0, ref_data, ref_T = _reference(params, data, loss, outer, T)

    def J(u0, data_, T_):
        return outer(gradient_flow(loss, u0, data_, T_, method=Adjoint(rtol=1e-10, atol=1e-12, dense_steps=2048)))

    g_u0, g_data, g_T = jax.jit(jax.grad(J, argnums=(0, 1, 2)))(params, data, T)
    assert _rel(g_u0, ref_u0) < 1e-7
    assert _rel(g_data, ref_data) < 1e-7
    np.testing.assert_allclose(g_T, ref_T, rtol=1e-7)


def test_gradient_reaches_closed_over_arrays_and_matches_finite_differences(mlp_problem):
    params, data, _, outer, static = mlp_problem

    def J(scale):
        def loss(u, d):
            xs, ys = d
            return scale * jnp.mean((jax.vmap(eqx.combine(u, static))(xs) - ys) ** 2)

        return outer(gradient_flow(loss, params, data, 1.0, method=Adjoint(rtol=1e-9, atol=1e-11, dense_steps=1024)))

    s, eps = 1.3, 1e-4
    fd = (J(s + eps) - J(s - eps)) / (2 * eps)
    np.testing.assert_allclose(jax.grad(J)(s), fd, rtol=1e-5)


def test_vmap_with_per_task_horizons_equals_a_loop(mlp_problem):
    params, data, loss, outer, _ = mlp_problem
    Ts = jnp.array([0.5, 2.0])

    def J(u0, T):
        return outer(gradient_flow(loss, u0, data, T, method=Adjoint()))

    batched = jax.jit(jax.vmap(jax.grad(J, argnums=(0, 1)), in_axes=(None, 0)))(params, Ts)
    for i, T in enumerate(Ts):
        g, gT = jax.grad(J, argnums=(0, 1))(params, T)
        assert _rel(jax.tree.map(lambda v: v[i], batched[0]), g) < 1e-12
        np.testing.assert_allclose(batched[1][i], gT, rtol=1e-12)


def test_undifferentiated_solve_is_the_recording_solve(mlp_problem):
    # The primal path records nothing but takes the same steps: the same u(T), bit for bit.
    params, data, loss, outer, _ = mlp_problem
    T = 2.0
    plain = gradient_flow(loss, params, data, T, method=Adjoint())
    recorded, _ = jax.vjp(lambda p: gradient_flow(loss, p, data, T, method=Adjoint()), params)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(recorded)):
        np.testing.assert_array_equal(a, b)


def test_dense_output_interpolates_to_fourth_order():
    # dy/dt = -y^3 + sin t: the interpolant between accepted steps against a tight solve.
    f = lambda t, y, a: -(y ** 3) + jnp.sin(t)
    opts = ode.SolveOptions(steps=1, rtol=1e-6, atol=1e-9, max_steps=4096, solver="dopri5")
    y0 = jnp.array([1.0, -0.5, 2.0])
    _, dense, status, _ = dense_forward(ode.VectorField(f), y0, jnp.asarray(4.0), None, opts, 200, midpoints=True)
    assert int(status) == SolveStatus.SUCCESS and 5 < int(dense.n) < 200
    ts = jnp.linspace(0.0, 4.0, 97)
    tight = diffrax.diffeqsolve(diffrax.ODETerm(f), diffrax.Dopri5(), 0.0, 4.0, None, y0,
                                saveat=diffrax.SaveAt(ts=ts),
                                stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-14)).ys
    interp = jax.vmap(dense.evaluate)(ts)
    assert float(jnp.max(jnp.abs(interp - tight))) < 1e-5  # the forward's own tolerance level
    # Exact at the accepted steps.
    np.testing.assert_array_equal(dense.evaluate(dense.ts[3]), dense.ys[3])


def _tasks():
    A, b, u0, c, q = _quadratic()
    return A, b, u0, c


def test_dense_overflow_is_the_status_of_that_task_alone_under_vmap():
    A, b, u0, c = _tasks()
    rule = Adjoint(dense_steps=40)
    Ts = jnp.array([0.05, 20.0, 0.1])  # the long horizon needs more than 40 accepted steps

    def J(u0_, T):
        u, status = gradient_flow(_loss, u0_, (A, b), T, method=rule, throw=False)
        return 0.5 * jnp.sum((u - c) ** 2), status

    (vals, status), grads = jax.jit(jax.vmap(jax.value_and_grad(J, has_aux=True), in_axes=(None, 0)))(u0, Ts)
    assert status.tolist() == [SolveStatus.SUCCESS, SolveStatus.DENSE_OVERFLOW, SolveStatus.SUCCESS]
    vals, grads = np.asarray(vals), np.asarray(grads)
    assert np.isnan(vals[1]) and np.all(np.isnan(grads[1]))
    assert np.all(np.isfinite(vals[[0, 2]])) and np.all(np.isfinite(grads[[0, 2]]))
    # Only a differentiated solve records its steps, so only it can overflow.
    loss = lambda u: jnp.sum(gradient_flow(_loss, u, (A, b), 20.0, method=rule))
    assert np.isfinite(loss(u0))
    with pytest.raises(Exception, match=r"filled its dense output \(dense_steps=40"):
        jax.block_until_ready(jax.grad(loss)(u0))


def test_a_failed_backward_solve_gives_nan_or_raises_never_a_wrong_gradient():
    A, b, u0, c = _tasks()
    # Backward budget of 3 steps: too few for T = 1 on this stiff flow.
    rule = ode.AdaptiveAdjoint(max_steps=3)

    def J(u0_, throw):
        out = ode.solve(GradientField(_loss), u0_, 1.0, (A, b), sensitivity=rule, throw=throw)
        u = out if throw else out[0]
        return 0.5 * jnp.sum((u - c) ** 2)

    g = jax.grad(J)(u0, False)
    assert np.all(np.isnan(g))
    with pytest.raises(Exception, match="backward adjoint solve of AdaptiveAdjoint"):
        jax.block_until_ready(jax.grad(J)(u0, True))


def test_forward_failures_keep_their_status():
    A, b, u0, c = _tasks()
    y, status = ode.solve(GradientField(_loss), u0, 1.0, (A, b), sensitivity=ode.AdaptiveAdjoint(), max_steps=5,
                          throw=False)
    assert int(status) == SolveStatus.MAX_STEPS and np.all(np.isnan(y))


def test_t1_alone_needs_no_backward_solve():
    A, b, u0, c, q = _quadratic()
    J = _J(Adjoint(rtol=1e-10, atol=1e-12, dense_steps=2048), c)
    np.testing.assert_allclose(jax.grad(J, argnums=2)(u0, b, 1.0, A), _closed_form(A, b, u0, c, q, 1.0)[3],
                               rtol=1e-7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dense_steps=0), "dense_steps"),
    (dict(rtol=-1.0), "rtol"),
    (dict(max_steps=0), "max_steps"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        ode.AdaptiveAdjoint(**kwargs)


def test_adjoint_contract():
    # `Adjoint()` is the adaptive rule; `Adjoint(steps=K)` the stored sweep, as before.
    assert isinstance(Adjoint().sensitivity, ode.AdaptiveAdjoint)
    assert isinstance(Adjoint(steps=50).sensitivity, ode.StoredAdjoint)
    assert Adjoint(steps=50, scheme="rk4", checkpoints=5).sensitivity == ode.StoredAdjoint("rk4", 5)
    with pytest.raises(InputError, match="checkpoints"):
        Adjoint(checkpoints=4)
    with pytest.raises(InputError, match="solver"):
        ode.solve(lambda t, y, a: -y, jnp.ones(2), 1.0, sensitivity=ode.AdaptiveAdjoint(), solver="euler")


def test_meta_learner_names_a_dense_overflow_and_what_to_raise():
    import optax

    from ctmeta import NumericalError
    from ctmeta.meta import MetaLearner
    from ctmeta.losses import mse
    from ctmeta.models import MLP
    from ctmeta.tasks import CosMixture

    tasks = CosMixture(shots=10, queries=10)
    learner = MetaLearner(MLP(2, 1, 8, 1, key=jax.random.PRNGKey(0)), Adjoint(dense_steps=2), optax.adam(1e-3),
                          mse, T=2.0)
    state = learner.init(jax.random.PRNGKey(1))
    with pytest.raises(NumericalError, match=r"filled its dense output \(dense_steps=2 .*Raise the method's dense_steps"):
        learner.meta_step(state, tasks.sample(learner.iteration_key(state), 2))


def test_tight_tolerance_on_a_small_state_just_works():
    """`Adjoint(rtol=1e-10)` on an 8-parameter least squares: the default dense output is sized from
    the state (thousands of slots, not 256), and the meta-gradient matches the closed form."""
    key1, key2 = jax.random.split(jax.random.PRNGKey(4))
    A = jax.random.normal(key1, (20, 8), jnp.float64)
    b = jax.random.normal(key2, (20,), jnp.float64)
    H = A.T @ A / 20
    u0, T = jnp.linspace(-1.0, 1.0, 8), 3.0
    loss = lambda u, d: 0.5 * jnp.mean((d[0] @ u - d[1]) ** 2)
    method = Adjoint(rtol=1e-10, atol=1e-12)
    assert method.sensitivity.sized_for(u0, method.max_steps).dense_steps == method.max_steps
    got = jax.jit(jax.grad(lambda u: jnp.sum(gradient_flow(loss, u, (A, b), T, method=method) ** 2)))(u0)
    star = jnp.linalg.solve(H, A.T @ b / 20)
    E = jax.scipy.linalg.expm(-H * T)
    want = 2 * E.T @ (star + E @ (u0 - star))  # u(T) = u* + exp(-HT)(u0 - u*), J = |u(T)|^2
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
