"""Inner flows (ctmeta.flows): meta-gradients in the initialisation, rho, gamma and T
against central finite differences (Adjoint, both backward forms; Unrolled) and, for
Unrolled on a quadratic, against the closed form of the discrete map; the stability
check of the stored sweep for the preconditioned flow; refusals; the default flow
unchanged; the loss along the flow against closed forms. Float64 (conftest)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import expm

import ctmeta
from ctmeta import Adjoint, FirstOrder, Gradient, HeavyBall, Implicit, InputError, LinearFlow, Preconditioned, Reptile, Unrolled
from ctmeta import ode
from ctmeta.flows import GradientField, HeavyBallField, PreconditionedField

from quadratic import quadratic

# A small nonlinear regression: parameters a dict with a vector and a scalar leaf.
X = jnp.linspace(-1, 1, 24).reshape(8, 3)
Y = jnp.sin(jnp.arange(8.0))
XQ = jnp.linspace(-0.7, 1.3, 18).reshape(6, 3)
YQ = jnp.cos(jnp.arange(6.0))
PARAMS = {"w": jnp.array([0.3, -0.2, 0.5]), "b": jnp.array(0.1)}


def loss(p, d):
    x, y = d
    return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2) + 0.05 * jnp.sum(p["w"] ** 4)


def flows():
    rho = {"w": jnp.array([0.2, -0.3, 0.1]), "b": jnp.array(-0.2)}
    return {
        "preconditioned": Preconditioned(rho, "parameter"),
        "per-layer": Preconditioned({"w": jnp.array(0.3), "b": jnp.array(-0.4)}, "layer"),
        "heavy-ball": HeavyBall(jnp.log(jnp.asarray(1.3))),
    }


TIGHT = Adjoint(rtol=1e-11, atol=1e-13, dense_steps=2048)


def outer(method, flow):
    """J(theta, flow, T): the query loss after adaptation."""

    def J(params, flow_, T):
        u = ctmeta.gradient_flow(loss, params, (X, Y), T, method=method, flow=flow_)
        return loss(u, (XQ, YQ))

    return J


def _direction(args, i, key):
    """A random direction in argument i (its inexact arrays)."""
    leaves, treedef = jax.tree.flatten(eqx.filter(args[i], eqx.is_inexact_array))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def directional_grad(f, args, i, key):
    """grad_i f . d for the random direction d of `_direction(args, i, key)`."""
    d = _direction(args, i, key)
    g = eqx.filter_jit(jax.grad(f, argnums=i))(*args)
    return float(sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(eqx.filter(g, eqx.is_inexact_array)),
                                                     jax.tree.leaves(d))))


def central_difference(f, args, i, key, eps=1e-5):
    """(f(args_i + eps d) - f(args_i - eps d)) / (2 eps) along the same direction d."""
    d = _direction(args, i, key)
    f_jit = eqx.filter_jit(f)  # compiled once for the two shifted points

    def shifted(s):
        moved = eqx.apply_updates(args[i], jax.tree.map(lambda di: s * di, d))
        return f_jit(*args[:i], moved, *args[i + 1:])

    return float((shifted(eps) - shifted(-eps)) / (2 * eps))


# ---------------------------------------------------------------------------
# Meta-gradients against finite differences
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["preconditioned", "per-layer", "heavy-ball"])
@pytest.mark.parametrize("rule", ["adaptive", "stored", "unrolled"])
def test_meta_gradients_match_finite_differences(name, rule):
    flow = flows()[name]
    T = jnp.asarray(1.2)
    if rule == "unrolled":  # the discrete map: exact, so FD of the same map, tight
        grad_method = fd_method = Unrolled(steps=30)
        rtol = 1e-7
    elif rule == "adaptive":  # the adaptive adjoint vs FD of a converged forward
        grad_method, fd_method, rtol = TIGHT, TIGHT, 1e-6
    else:  # the stored Heun sweep is O(h^2) off the exact flow's derivative
        grad_method, fd_method, rtol = Adjoint(steps=400, rtol=1e-11, atol=1e-13), TIGHT, 1e-4
    for i, what in enumerate(["init", "flow", "T"]):
        args = (PARAMS, flow, T)
        # The derivative by the rule under test; the difference quotient of a converged forward (each
        # computed once: neither the rule's own difference nor the reference's gradient is needed).
        analytic = directional_grad(outer(grad_method, flow), args, i, jax.random.PRNGKey(i))
        fd = central_difference(outer(fd_method, flow), args, i, jax.random.PRNGKey(i))
        assert abs(fd) > 1e-4, (what, fd)  # a derivative that is there to check
        np.testing.assert_allclose(analytic, fd, rtol=rtol, atol=1e-9, err_msg=f"{name} {rule}: d/d{what}")


@pytest.mark.parametrize("name", ["preconditioned", "per-layer", "heavy-ball"])
def test_field_vjp_matches_reverse_mode(name):
    """Each field's hand-written vjp against reverse mode through its __call__ (the default vjp)."""
    flow = flows()[name]
    field = flow.field(loss).closure_convert(0.0, flow.init_state(PARAMS), (X, Y))
    y = flow.init_state(PARAMS)
    if name == "heavy-ball":
        y = (y[0], {"w": jnp.array([0.2, 0.1, -0.3]), "b": jnp.array(0.4)})
    a = jax.tree.map(lambda x: jnp.cos(3.0 * x + 1.0), y)
    mine = field.vjp(0.3, y, (X, Y), a)
    ref = ode.AbstractVectorField.vjp(field, 0.3, y, (X, Y), a)
    for m, r in zip(jax.tree.leaves(mine), jax.tree.leaves(ref)):
        np.testing.assert_allclose(m, r, rtol=1e-12, atol=1e-14)
    assert len(jax.tree.leaves(mine)) == len(jax.tree.leaves(ref))


# ---------------------------------------------------------------------------
# Unrolled: the closed form of the discrete map on a quadratic
# ---------------------------------------------------------------------------

A, B, U0, C, _ = quadratic(jnp.array([0.5, 1.0, 2.0, 3.0]))
K = 25


def quad_loss(u, d):
    return 0.5 * u @ d[0] @ u - d[1] @ u


def unrolled_J(u0, flow, T):
    return C @ ctmeta.gradient_flow(quad_loss, u0, (A, B), T, method=Unrolled(steps=K), flow=flow)


def closed_preconditioned(u0, rho, T):
    """u_K of u_{k+1} = (I - h P A) u_k + h P b, by matrix powers."""
    h, P = T / K, jnp.diag(jnp.exp(rho) * jnp.ones(4))
    M = jnp.eye(4) - h * P @ A
    powers = sum(jnp.linalg.matrix_power(M, j) for j in range(K))
    return jnp.linalg.matrix_power(M, K) @ u0 + powers @ (h * P @ B)


def closed_heavy_ball(u0, log_gamma, T):
    """u_K of Euler on (u, v): z_{k+1} = [[I, hI], [-hA, (1 - h gamma) I]] z_k + [0; h b]."""
    h, gamma = T / K, jnp.exp(log_gamma)
    n = 4
    M = jnp.block([[jnp.eye(n), h * jnp.eye(n)], [-h * A, (1 - h * gamma) * jnp.eye(n)]])
    c = jnp.concatenate([jnp.zeros(n), h * B])
    powers = sum(jnp.linalg.matrix_power(M, j) for j in range(K))
    z = jnp.linalg.matrix_power(M, K) @ jnp.concatenate([u0, jnp.zeros(n)]) + powers @ c
    return z[:n]


@pytest.mark.parametrize("per", ["parameter", "layer"])
def test_unrolled_preconditioned_is_the_discrete_map(per):
    rho = jnp.array([0.3, -0.2, 0.1, 0.4]) if per == "parameter" else jnp.array(0.25)
    flow, T = Preconditioned(rho, per), jnp.asarray(0.9)
    u = ctmeta.gradient_flow(quad_loss, U0, (A, B), T, method=Unrolled(steps=K), flow=flow)
    np.testing.assert_allclose(u, closed_preconditioned(U0, rho, T), rtol=1e-12, atol=1e-13)
    gu, gflow, gT = jax.grad(unrolled_J, argnums=(0, 1, 2))(U0, flow, T)
    closed_J = lambda u0, r, t: C @ closed_preconditioned(u0, r, t)
    cu, crho, cT = jax.grad(closed_J, argnums=(0, 1, 2))(U0, rho, T)
    h, P = T / K, jnp.diag(jnp.exp(rho) * jnp.ones(4))
    # dJ/du0 = (M^T)^K c, written out.
    np.testing.assert_allclose(gu, jnp.linalg.matrix_power((jnp.eye(4) - h * P @ A).T, K) @ C, rtol=1e-11)
    np.testing.assert_allclose(gu, cu, rtol=1e-11)
    np.testing.assert_allclose(gflow.rho, crho, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(gT, cT, rtol=1e-11)


def test_unrolled_heavy_ball_is_the_discrete_map():
    flow, T = HeavyBall(jnp.log(jnp.asarray(1.7))), jnp.asarray(2.0)
    u = ctmeta.gradient_flow(quad_loss, U0, (A, B), T, method=Unrolled(steps=K), flow=flow)
    np.testing.assert_allclose(u, closed_heavy_ball(U0, flow.log_gamma, T), rtol=1e-12, atol=1e-13)
    gu, gflow, gT = jax.grad(unrolled_J, argnums=(0, 1, 2))(U0, flow, T)
    closed_J = lambda u0, lg, t: C @ closed_heavy_ball(u0, lg, t)
    cu, cg, cT = jax.grad(closed_J, argnums=(0, 1, 2))(U0, flow.log_gamma, T)
    np.testing.assert_allclose(gu, cu, rtol=1e-11)
    np.testing.assert_allclose(gflow.log_gamma, cg, rtol=1e-10)
    np.testing.assert_allclose(gT, cT, rtol=1e-11)
    assert abs(float(cg)) > 1e-3


def test_first_order_runs_the_flow_with_an_identity_jacobian():
    flow = Preconditioned(jnp.array([0.3, -0.2, 0.1, 0.4]), "parameter")
    T = jnp.asarray(0.9)
    u = ctmeta.gradient_flow(quad_loss, U0, (A, B), T, method=FirstOrder(steps=K), flow=flow)
    np.testing.assert_allclose(u, closed_preconditioned(U0, flow.rho, T), rtol=1e-12, atol=1e-13)
    J = lambda u0, f, t: C @ ctmeta.gradient_flow(quad_loss, u0, (A, B), t, method=FirstOrder(steps=K), flow=f)
    np.testing.assert_array_equal(jax.grad(J)(U0, flow, T), C)
    # No derivative in the flow's meta-parameters or in T: refused, not a silent 0.
    with pytest.raises(InputError, match=r"FirstOrder\(steps=%d\) does not differentiate the flow's" % K):
        jax.grad(J, argnums=1)(U0, flow, T)
    with pytest.raises(InputError, match=r"does not differentiate T"):
        jax.grad(J, argnums=2)(U0, flow, T)


# ---------------------------------------------------------------------------
# The stored sweep's stability check for the preconditioned flow
# ---------------------------------------------------------------------------


def test_stored_sweep_stability_check_reads_the_preconditioned_curvature():
    """h lambda_max(P^1/2 A P^1/2) decides, not lambda_max(A): the same grid is flagged
    with a large P and passes with P = I."""
    A4, B4, u0, c, _ = quadratic(jnp.array([0.5, 1.0, 2.0, 3.0]))
    T, steps = 1.0, 10  # h lambda_max(A) = 0.3: stable for the gradient flow
    method = Adjoint(steps=steps)

    def status(flow):
        def J(u0_):
            u, st = ctmeta.gradient_flow(quad_loss, u0_, (A4, B4), T, method=method, flow=flow, throw=False)
            return c @ u, st

        (_, st), g = jax.value_and_grad(J, has_aux=True)(u0)
        return int(st), g

    ok, g_ok = status(Preconditioned(jnp.zeros(4), "parameter"))
    assert ok == ode.SolveStatus.SUCCESS and np.all(np.isfinite(g_ok))
    # P = 8 I: h lambda_max(PA) = 2.4 > 0.95 * 2 (Heun)
    bad, g_bad = status(Preconditioned(jnp.full(4, jnp.log(8.0)), "parameter"))
    assert bad == ode.SolveStatus.UNSTABLE_ADJOINT and np.all(np.isnan(g_bad))
    # The curvature the check estimates is that of P^1/2 A P^1/2.
    field = Preconditioned(jnp.array([0.3, -0.2, 0.1, 0.4]), "parameter").field(quad_loss)
    s = jnp.exp(0.5 * jnp.array([0.3, -0.2, 0.1, 0.4]))
    lam = ode.max_curvature(field, 0.0, u0, (A4, B4))
    np.testing.assert_allclose(lam, jnp.max(jnp.linalg.eigvalsh(s[:, None] * A4 * s[None, :])), rtol=1e-8)
    assert PreconditionedField.symmetric_jacobian and GradientField.symmetric_jacobian
    assert not HeavyBallField.symmetric_jacobian


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", [Implicit(steps=5), Reptile(steps=5)])
@pytest.mark.parametrize("flow", [Preconditioned(jnp.zeros(4), "parameter"), HeavyBall(jnp.asarray(0.0))])
def test_rules_that_cannot_take_a_flow_refuse_it(method, flow):
    with pytest.raises(InputError) as err:
        ctmeta.gradient_flow(quad_loss, U0, (A, B), 1.0, method=method, flow=flow)
    msg = str(err.value)
    assert type(method).__name__ in msg and type(flow).__name__ in msg and "\n" not in msg
    with pytest.raises(InputError, match=type(flow).__name__):
        method.adapt(quad_loss, U0, (A, B), 1.0, flow=flow)
    # the gradient flow is fine
    ctmeta.gradient_flow(quad_loss, U0, (A, B), 1.0, method=method, flow=Gradient())


def test_linear_flow_refuses_a_flow_and_bad_flows_are_named():
    with pytest.raises(InputError, match="LinearFlow cannot run flow=HeavyBall"):
        LinearFlow().adapt(quad_loss, U0, (A, B), 1.0, flow=HeavyBall(jnp.asarray(0.0)))
    with pytest.raises(InputError, match="flow must be an inner flow"):
        ctmeta.gradient_flow(quad_loss, U0, (A, B), 1.0, flow="heavy-ball")
    with pytest.raises(InputError, match="per="):
        Preconditioned.like(U0, per="row")
    with pytest.raises(InputError, match="gamma"):
        HeavyBall.with_gamma(-1.0)


# ---------------------------------------------------------------------------
# The default flow is unchanged
# ---------------------------------------------------------------------------

# J and its gradient (w, b, T) on the regression problem, from ctmeta before flows (commit ccc57f0).
_BEFORE = {
    "Adjoint": ["0x1.5f3cf4c277d98p-2", ["0x1.226143e3fe8dap-2", "-0x1.9db18699e315dp-1", "0x1.00391da7075a1p-1"],
                "0x1.5cd73060eb069p-5", "0x1.88fa56191a68ap-7"],
    "Adjoint50": ["0x1.5f3cf4f278f15p-2", ["0x1.22583f5229832p-2", "-0x1.9db4b46510c88p-1", "0x1.0037445996780p-1"],
                  "0x1.5dcbeab36099fp-5", "0x1.88fa4cd331380p-7"],
    "Unrolled": ["0x1.60d34698da280p-2", ["0x1.24d0847594910p-2", "-0x1.9cfe725e1dcf9p-1", "0x1.0067a5d5c6e4cp-1"],
                 "0x1.09d231c1a495fp-5", "0x1.7cc87f5755d81p-7"],
    "FirstOrder": ["0x1.60d34698da280p-2", ["-0x1.c267f49451500p-8", "-0x1.03ebe52bfe609p+0", "0x1.8144100bf7da0p-2"],
                   "0x1.0000000000000p+0", "0x0.0p+0"],
}


@pytest.mark.parametrize("name", list(_BEFORE))
def test_default_flow_is_unchanged(name):
    method = {"Adjoint": Adjoint(), "Adjoint50": Adjoint(steps=50), "Unrolled": Unrolled(steps=20),
              "FirstOrder": FirstOrder(steps=20)}[name]

    def loss_before(p, d):  # the loss the reference values were computed with
        x, y = d
        return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2)

    def J(p, T, flow):
        u = ctmeta.gradient_flow(loss_before, p, (X, Y), T, method=method, flow=flow)
        return jnp.sum(u["w"] ** 2) + u["b"]

    results = []
    for flow in (None, Gradient()):
        if "T" not in method.differentiates:  # refused in T (its 0 was recorded): the rest
            v, g = jax.value_and_grad(J)(PARAMS, jnp.asarray(1.5), flow)
            gT = 0.0
        else:
            v, (g, gT) = jax.value_and_grad(J, argnums=(0, 1))(PARAMS, jnp.asarray(1.5), flow)
        results.append(np.array([float(v), *g["w"].tolist(), float(g["b"]), float(gT)]))
    np.testing.assert_array_equal(results[0], results[1])  # flow=None and Gradient(): bitwise
    v, w, b, t = _BEFORE[name]
    before = np.array([float.fromhex(x) for x in [v, *w, b, t]])
    # Bitwise on the machine that recorded them; a different XLA build may round differently.
    np.testing.assert_allclose(results[0], before, rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------
# The loss along the flow
# ---------------------------------------------------------------------------


def _quad_value(u):
    return 0.5 * u @ A @ u - B @ u


@pytest.mark.parametrize("name", ["gradient", "preconditioned", "heavy-ball"])
def test_loss_along_flow_matches_the_closed_form_flow(name):
    T, ts = 2.0, jnp.linspace(0.0, 2.0, 9)
    ustar = jnp.linalg.solve(A, B)
    if name == "gradient":
        flow, G = None, -A
    elif name == "preconditioned":
        rho = jnp.array([0.3, -0.2, 0.1, 0.4])
        flow, G = Preconditioned(rho, "parameter"), -jnp.diag(jnp.exp(rho)) @ A
    else:
        gamma = 1.3
        flow = HeavyBall(jnp.log(jnp.asarray(gamma)))
        G = jnp.block([[jnp.zeros((4, 4)), jnp.eye(4)], [-A, -gamma * jnp.eye(4)]])
    n = G.shape[0]
    z0 = jnp.concatenate([U0, jnp.zeros(n - 4)])
    zstar = jnp.concatenate([ustar, jnp.zeros(n - 4)])
    exact_u = jnp.stack([(zstar + expm(G * t) @ (z0 - zstar))[:4] for t in ts])
    q = (A + jnp.eye(4), B)  # a query loss of its own
    out = ctmeta.loss_along_flow(quad_loss, U0, (A, B), T, ts, flow=flow, query_data=q,
                                 method=Adjoint(rtol=1e-10, atol=1e-12, dense_steps=1024))
    np.testing.assert_allclose(out.support, jax.vmap(_quad_value)(exact_u), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(out.query, jax.vmap(lambda u: quad_loss(u, q))(exact_u), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(out.adapted, exact_u[-1], rtol=1e-8, atol=1e-10)
    assert int(out.status) == ode.SolveStatus.SUCCESS
    # Its end point is the adapting solve's: the same forward.
    method = Adjoint(rtol=1e-10, atol=1e-12, dense_steps=1024)
    np.testing.assert_array_equal(out.adapted, ctmeta.gradient_flow(quad_loss, U0, (A, B), T, method=method, flow=flow))


def test_loss_along_flow_between_steps_matches_a_fine_fixed_step_solve():
    """On the nonlinear regression, the dense output at times between accepted steps
    against RK4 with 2,000 steps to each time."""
    flow = flows()["heavy-ball"]
    ts = jnp.array([0.13, 0.5, 0.91, 1.2])
    out = ctmeta.loss_along_flow(loss, PARAMS, (X, Y), 1.2, ts, flow=flow)
    field = flow.field(loss)
    for t, value in zip(ts, out.support):
        y = ode.solve(field, flow.init_state(PARAMS), t, (X, Y), steps=2000, solver="rk4", sensitivity=ode.Backprop())
        np.testing.assert_allclose(value, loss(flow.params_of(y), (X, Y)), rtol=1e-6)


def test_loss_along_flow_reports_a_failed_forward():
    out = ctmeta.loss_along_flow(quad_loss, U0, (A, B), 50.0, jnp.array([1.0, 2.0]), throw=False,
                                 method=Adjoint(dense_steps=2))
    assert int(out.status) == ode.SolveStatus.DENSE_OVERFLOW and np.all(np.isnan(out.support))
    with pytest.raises(InputError, match="Adjoint"):
        ctmeta.loss_along_flow(quad_loss, U0, (A, B), 1.0, jnp.array([1.0]), method=Unrolled(steps=5))


# ---------------------------------------------------------------------------
# The meta-learner learns the flow
# ---------------------------------------------------------------------------


def _learner(flow, method=None, **kw):
    import optax

    from ctmeta.meta import MetaLearner
    from ctmeta.models import MLP

    model = MLP(1, 1, 8, 1, key=jax.random.PRNGKey(0))
    flow = flow(model) if callable(flow) else flow
    return MetaLearner(model, method or Unrolled(steps=4), optax.adam(1e-2), ctmeta.mse, T=0.3, flow=flow, **kw)


def _sine_batch(key, meta_batch=3, shots=6):
    from ctmeta.tasks.base import Batch

    ka, kx = jax.random.split(key)
    a = jax.random.uniform(ka, (meta_batch, 1, 1), minval=0.5, maxval=1.5)
    x = jax.random.uniform(kx, (meta_batch, 2 * shots, 1), minval=-2.0, maxval=2.0)
    y = a * jnp.sin(x)
    return Batch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


@pytest.mark.parametrize("make", [lambda m: Preconditioned.like(m, per="layer"), lambda m: HeavyBall.with_gamma(2.0)],
                         ids=["preconditioned", "heavy-ball"])
def test_meta_learner_learns_the_flow_and_resumes_exactly(make, tmp_path):
    learner = _learner(make, learn_T=True)
    state = learner.init(jax.random.PRNGKey(1))
    batch = _sine_batch(jax.random.PRNGKey(2))
    # The flow's meta-gradient is the mean of the tasks' jax.grad.
    _, grads = learner.meta_gradient(state, batch)
    one = jax.grad(learner.task_objective)
    per_task = [one(state.params, jax.tree.map(lambda a: a[i], tuple(batch))) for i in range(3)]
    for g, *gs in zip(jax.tree.leaves(grads.flow), *[jax.tree.leaves(p.flow) for p in per_task]):
        np.testing.assert_allclose(g, sum(gs) / 3, rtol=1e-10, atol=1e-14)
        assert np.all(np.abs(np.asarray(g)) > 0)
    before = learner.inner_flow(state)
    for _ in range(2):
        state, _ = learner.meta_step(state, _sine_batch(learner.iteration_key(state)))
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(learner.inner_flow(state)))]
    assert all(moved)  # the optimiser updated the flow
    path = tmp_path / "ckpt-2.eqx"
    learner.save(path, state)
    restored, _ = learner.load(path)
    nxt = _sine_batch(learner.iteration_key(state))
    s1, _ = learner.meta_step(state, nxt)
    s2, _ = learner.meta_step(restored, nxt)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert len(jax.tree.leaves(s1.params.flow)) == len(jax.tree.leaves(before))


def test_meta_learner_evaluates_with_the_flows_euler_steps():
    learner = _learner(lambda m: Preconditioned.like(m, scale=2.0))
    state = learner.init(jax.random.PRNGKey(1))
    batch = _sine_batch(jax.random.PRNGKey(5), meta_batch=2)
    ev = learner.evaluate(state, batch, (0, 3), lr=0.05, metric=lambda p, y, mask=None: jnp.mean((p - y) ** 2))
    plain = _learner(None).evaluate(_learner(None).init(jax.random.PRNGKey(1)), batch, (0, 3), lr=0.1,
                                    metric=lambda p, y, mask=None: jnp.mean((p - y) ** 2))
    # P = 2 I with lr 0.05 is plain GD with lr 0.1.
    np.testing.assert_allclose(ev.per_task, plain.per_task, rtol=1e-10)


@pytest.mark.parametrize("make", [lambda m: Preconditioned.like(m, scale=2.0), lambda m: HeavyBall.with_gamma(2.0)],
                         ids=["preconditioned", "heavy-ball"])
def test_meta_learner_loss_along_flow_is_the_loss_of_the_flow_solved_to_each_time(make):
    from ctmeta import gradient_flow
    from ctmeta.models import apply_to_set

    learner = _learner(make, Adjoint(rtol=1e-10, atol=1e-12))
    state = learner.init(jax.random.PRNGKey(1))
    batch = _sine_batch(jax.random.PRNGKey(5), meta_batch=2)
    ts = jnp.array([0.0, 0.1, 0.25, 0.4])
    support, query = learner.loss_along_flow(state, batch, ts)
    assert support.shape == query.shape == (2, 4)
    model, flow = learner.model(state), learner.inner_flow(state)

    def loss(m, data):
        return ctmeta.mse(apply_to_set(m, data[0]), data[1])

    for i in range(2):
        sx, sy, qx, qy = (a[i] for a in batch)
        for j, t in enumerate(ts):  # an independent solve to each time
            u = model if t == 0 else gradient_flow(loss, model, (sx, sy), t, flow=flow,
                                                   method=Adjoint(rtol=1e-10, atol=1e-12))
            np.testing.assert_allclose(support[i, j], loss(u, (sx, sy)), rtol=1e-6)
            np.testing.assert_allclose(query[i, j], loss(u, (qx, qy)), rtol=1e-6)
    assert support[0, -1] < support[0, 0]


def test_meta_learner_refuses_a_flow_it_cannot_learn():
    with pytest.raises(InputError, match="FirstOrder gives the flow's parameters"):
        _learner(lambda m: Preconditioned.like(m), FirstOrder(steps=3))
    with pytest.raises(InputError, match="Implicit cannot run flow=HeavyBall"):
        _learner(HeavyBall.with_gamma(1.0), Implicit(steps=3))
    fixed = _learner(lambda m: Preconditioned.like(m), FirstOrder(steps=3), learn_flow=False)
    assert fixed.init(jax.random.PRNGKey(0)).params.flow is None
    assert _learner(None).init(jax.random.PRNGKey(0)).params.flow is None  # the gradient flow: as before


# ---------------------------------------------------------------------------
# Presets and the command line
# ---------------------------------------------------------------------------


def test_presets_resolve_and_build_the_flow():
    from ctmeta import presets
    from ctmeta.cli._messages import as_flags

    config = presets.resolve_config("cosmixture", "amaml", flow="heavy-ball")
    assert config["flow"] == {"name": "heavy-ball", "gamma": 1.0}
    assert presets.resolve_config("cosmixture", "maml")["flow"] == {"name": "gradient"}
    with pytest.raises(InputError) as err:
        presets.resolve_config("cosmixture", "imaml", flow="preconditioned")
    assert "`flow`" in str(err.value) and as_flags(str(err.value)).startswith("--flow preconditioned")
    with pytest.raises(InputError, match="unknown `flow`"):
        presets.resolve_config("cosmixture", "amaml", flow="adam")
    model = {"w": jnp.ones(3)}
    old = {k: v for k, v in config.items() if k != "flow"}  # a run written before flows
    assert isinstance(presets.build_flow(old, model), Gradient)
    flow = presets.build_flow(dict(config, flow={"name": "preconditioned", "per": "layer", "scale": 2.0}), model)
    assert flow.per == "layer" and np.allclose(flow.preconditioner["w"], 2.0)


def test_cli_train_with_a_flow_saves_it_and_refuses_bad_combinations(tmp_path, capsys):
    import json

    from cli_helpers import train_tiny
    from ctmeta.cli import main

    out = tmp_path / "run"
    assert train_tiny(out, ["--method", "maml", "--steps", "3", "--meta-batch", "2", "--flow", "heavy-ball",
                            "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["flow"] == {"name": "heavy-ball", "gamma": 1.0}
    results = json.loads((out / "results.json").read_text())
    assert results["flow"] == "heavy-ball" and "heavy-ball inner flow" in (out / "results.md").read_text()
    # the look inside: the learned friction and the loss along the flow of 4 test tasks, learned and random
    saved = eqx_state_gamma(out)
    assert results["learned_flow"] == {"gamma": pytest.approx(saved, rel=1e-6)} and saved != 1.0
    inner = results["inner_loss"]
    assert inner["tasks"] == 4 and inner["ts"][0] == 0.0 and len(inner["ts"]) == 41
    assert inner["ts"][-1] == pytest.approx(20 * results["lr"])  # the curve's last step, as a time
    for name in ("learned", "random"):
        support = np.array(inner[name]["support"])
        assert support.shape == (4, 41) and np.isfinite(support).all()
    assert (out / "figures" / "inner_loss.png").stat().st_size > 0
    # `ctmeta evaluate` adapts with the learned flow, and --inner-loss-tasks 0 drops the look inside
    capsys.readouterr()
    assert main(["evaluate", str(out), "--inner-loss-tasks", "0", "--quiet"]) == 0
    folder = out / "evaluations" / "iteration-4_inner-loss-tasks-0"  # other options: beside the run's results
    again = json.loads((folder / "results.json").read_text())
    assert again["learned"] == results["learned"] and again["learned_flow"] == results["learned_flow"]
    assert "inner_loss" not in again and not (folder / "figures" / "inner_loss.png").exists()
    assert json.loads((out / "results.json").read_text()) == results
    assert main(["evaluate", str(out), "--inner-loss-tasks", "-1"]) == 2
    assert "--inner-loss-tasks must be 0 or a positive integer" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["train", "--method", "reptile", "--flow", "preconditioned", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--flow preconditioned" in err and "reptile" in err and len(err.strip().splitlines()) == 1
    # --resume keeps the flow
    assert main(["train", "--resume", str(out), "--flow", "gradient"]) == 2
    assert "--flow gradient differs" in capsys.readouterr().err


def eqx_state_gamma(run_dir) -> float:
    """The heavy-ball friction in a run's latest checkpoint, read from the file."""
    from ctmeta.presets import build
    from ctmeta.runs import RunDir

    run = RunDir.open(run_dir)
    config = run.read_config()
    learner = build(config, progress=False).learner
    state, _, _ = run.load_latest(learner.init(jax.random.PRNGKey(0)), config=config)
    return float(jnp.exp(state.params.flow.log_gamma))
