"""A-MAML with a fixed-step forward: `Adjoint(steps=K, solver="rk4")` (K classical
RK4 steps of T/K, the RK4 sweep back over them), against the closed forms of a
quadratic flow and of its discrete map, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctmeta import Adjoint, InputError, ode
from ctmeta.adaptation import gradient_flow
from ctmeta.methods import GradientField
from ctmeta.ode import SolveStatus
from quadratic import loss as _loss
from quadratic import quadratic

EIGS = jnp.array([1.0, 3.0, 10.0, 30.0])


def _quadratic(eigs=EIGS, key=jax.random.PRNGKey(0)):
    return quadratic(eigs, key)


def _J(u0, A, b, c, T, rule):
    u = gradient_flow(_loss, u0, (A, b), T, method=rule)
    return 0.5 * jnp.sum((u - c) ** 2)


def _rk4_amplification(z):
    """RK4's stability function R(z): one step on u' = lambda u multiplies u by R(h lambda)."""
    return 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24


def test_rk4_solver_is_fourth_order():
    errors = [abs(float(ode.solve(lambda t, y, a: -y, jnp.array(1.0), 1.0, steps=K, solver="rk4",
                                  sensitivity=ode.Backprop())) - np.exp(-1.0)) for K in (10, 20, 40)]
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all((orders > 3.8) & (orders < 4.2)), orders


def test_backprop_through_rk4_steps_is_the_discrete_maps_closed_form():
    A, b, u0, c, q = _quadratic()
    T, K = 1.0, 20
    h = T / K
    g = jax.grad(lambda u: 0.5 * jnp.sum((ode.solve(GradientField(_loss), u, T, (A, b), steps=K, solver="rk4",
                                                    sensitivity=ode.Backprop()) - c) ** 2))(u0)
    # u_{n+1} - u* = R(-hA)(u_n - u*), so u_K = u* + R(-hA)^K (u0 - u*) and dJ/du0 = R(-hA)^K (u_K - c).
    M = q @ jnp.diag(_rk4_amplification(-h * EIGS) ** K) @ q.T
    ustar = jnp.linalg.solve(A, b)
    uK = ustar + M @ (u0 - ustar)
    np.testing.assert_allclose(g, M @ (uK - c), rtol=1e-12, atol=1e-14)


def test_rk4_forward_adjoint_converges_to_the_flows_closed_form_at_fourth_order():
    A, b, u0, c, q = _quadratic()
    T = 1.0
    E = q @ jnp.diag(jnp.exp(-EIGS * T)) @ q.T
    ustar = jnp.linalg.solve(A, b)
    uT = ustar + E @ (u0 - ustar)
    exact_u0, exact_T = E @ (uT - c), -(uT - c) @ (A @ uT - b)
    errors_u0, errors_T = [], []
    for K in (20, 40, 80):
        rule = Adjoint(steps=K, solver="rk4", scheme="rk4")
        g_u0, g_T = jax.grad(_J, argnums=(0, 4))(u0, A, b, c, T, rule)
        errors_u0.append(float(jnp.linalg.norm(g_u0 - exact_u0) / jnp.linalg.norm(exact_u0)))
        errors_T.append(abs(float(g_T - exact_T)) / abs(float(exact_T)))
    orders = np.log2(np.array(errors_u0[:-1]) / np.array(errors_u0[1:]))
    assert np.all(orders > 3.5), (errors_u0, orders)
    assert errors_u0[-1] < 1e-6 and errors_T[-1] < 1e-6, (errors_u0, errors_T)


def test_rk4_forward_gradients_in_the_task_data_match_finite_differences():
    A, b, u0, c, _ = _quadratic()
    rule = Adjoint(steps=40, solver="rk4", scheme="rk4")
    g_b = jax.grad(_J, argnums=2)(u0, A, b, c, 1.0, rule)
    eps = 1e-6
    fd = np.array([(_J(u0, A, b + eps * e, c, 1.0, rule) - _J(u0, A, b - eps * e, c, 1.0, rule)) / (2 * eps)
                   for e in np.eye(4)])
    # Finite differences see the discrete map, the adjoint the flow: equal to O(h^4).
    np.testing.assert_allclose(g_b, fd, rtol=1e-5)


def test_an_unstable_rk4_step_is_a_per_task_status_under_vmap():
    A, b, u0, _, _ = _quadratic()
    stiff, _, _, _, _ = _quadratic(jnp.array([1.0, 3.0, 10.0, 400.0]))
    rule = Adjoint(steps=20, solver="rk4", scheme="rk4")  # h * 400 = 20 > 2.785: the forward diverges too

    def per_task(A):
        def J(u):
            u, status = rule.adapt_with_status(_loss, u, (A, b), 1.0)
            return jnp.sum(u**2), status

        (value, status), g = jax.value_and_grad(J, has_aux=True)(u0)
        return value, status, g

    value, status, g = jax.vmap(per_task)(jnp.stack([A, stiff]))
    assert int(status[0]) == SolveStatus.SUCCESS and np.all(np.isfinite(g[0]))
    assert int(status[1]) != SolveStatus.SUCCESS and np.all(np.isnan(g[1]))


def test_rk4_solver_needs_steps_and_known_solvers_only():
    with pytest.raises(InputError, match="give steps=K"):
        Adjoint(solver="rk4")
    with pytest.raises(InputError, match="solver='tsit5'"):
        Adjoint(steps=10, solver="tsit5")
    with pytest.raises(InputError, match="unknown solver"):
        ode.solve(lambda t, y, a: -y, jnp.array(1.0), 1.0, solver="rk5")


def test_image_amaml_report_round_trips_and_plots(tmp_path):
    import csv

    from ctmeta.experiments import image_amaml

    rows = [{"network": "conv4-smooth", "rule": label, "compile_s": 1.0, "time_s": t, "rel_error": e, "loss": 1.2,
             "note": ""} for (label, t, e) in (("rk4 K=15, rk4 sweep", 2.9, 7e-4), ("reference", 17.0, 0.0))]
    rows.append({"network": "conv4", "rule": "rk4 K=15, rk4 sweep", "compile_s": None, "time_s": None,
                 "rel_error": None, "loss": None, "note": "unstable backward adjoint sweep"})
    with open(tmp_path / "r.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    back = image_amaml.read_csv(tmp_path / "r.csv")
    assert back[0]["time_s"] == 2.9 and back[2]["time_s"] is None
    md = image_amaml.markdown(back, 5)
    assert "| conv4-smooth | rk4 K=15, rk4 sweep | 2.90 | 7.0e-04 |" in md and "0 (reference)" in md
    assert "| conv4 | rk4 K=15, rk4 sweep | failed | unstable backward adjoint sweep |" in md
    image_amaml.plot(back, tmp_path / "r.png", 5)
    assert (tmp_path / "r.png").stat().st_size > 1000
