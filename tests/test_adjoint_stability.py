"""The stability check of `StoredAdjoint`'s backward sweep (float64).

For a gradient flow on L(u) = u^T A u / 2 the Jacobian is -A, the adjoint
swept backward decays as exp(-lambda s) along each eigenvector of A with
eigenvalue lambda > 0, and the Heun sweep with step h is stable only while
h lambda < 2 (RK4: 2.785). The check flags h lambda_max > 0.95 c.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from ctmeta import ode
from ctmeta._errors import NumericalError
from ctmeta.meta import MetaLearner
from ctmeta.losses import mse
from ctmeta.methods import Adjoint, GradientField
from ctmeta.models import MLP
from ctmeta.ode import SolveStatus
from ctmeta.tasks.regression import CosMixture

_ROTATION = np.linalg.qr(np.random.default_rng(0).normal(size=(2, 2)))[0]
U0 = jnp.array([1.0, -0.5])
T = 1.0


def quadratic(eigenvalues):
    """A symmetric 2x2 matrix with the given eigenvalues, in a rotated basis."""
    return jnp.asarray(_ROTATION @ np.diag(eigenvalues) @ _ROTATION.T)


def loss(u, A):
    return 0.5 * u @ A @ u


def gradient(A, steps, *, sensitivity=None, throw=True, t1=T):
    """`(J, status, dJ/du0)` for J = sum(u(t1)) of the flow u' = -A u from U0."""
    sensitivity = sensitivity if sensitivity is not None else ode.StoredAdjoint()

    def J(u0):
        out = ode.solve(GradientField(loss), u0, t1, A, steps=steps, sensitivity=sensitivity,
                        rtol=1e-12, atol=1e-12, throw=throw)
        y1, status = (out, jnp.asarray(0)) if throw else out
        return jnp.sum(y1), status

    (value, status), g = jax.value_and_grad(J, has_aux=True)(U0)
    return value, int(status), np.asarray(g)


def closed_form(A, t1=T):
    """dJ/du0 = expm(-A t1)^T 1 of the exact flow."""
    return scipy.linalg.expm(-np.asarray(A) * t1).T @ np.ones(2)


def heun_sweep(A, steps, t1=T):
    """What the Heun sweep computes for a constant Jacobian -A: R(-h A)^steps 1, R(z) = 1 + z + z^2/2."""
    hA = np.asarray(A) * t1 / steps
    R = np.eye(2) - hA + hA @ hA / 2
    return np.linalg.matrix_power(R.T, steps) @ np.ones(2)


STIFF = (1.0, 300.0)  # h lambda_max = 3 at 100 stored intervals, 1.5 at 200


# ------------------------------------------------------------- (a) a stiff decaying mode


def test_stable_grid_is_not_flagged_and_matches_the_closed_form():
    _, status, g = gradient(quadratic(STIFF), 200)  # h lambda = 1.5
    assert status == SolveStatus.SUCCESS
    np.testing.assert_allclose(g, closed_form(quadratic(STIFF)), rtol=1e-4)


def test_unstable_grid_raises_naming_the_cause():
    with pytest.raises(Exception, match=r"unstable backward adjoint sweep: h\*lambda_max > 1\.9 where the heun "
                                        r"sweep is stable only below 2 \(h = T/steps with steps=100") as raised:
        gradient(quadratic(STIFF), 100)  # h lambda = 3
    assert "Store more states" in str(raised.value) and "scheme='rk4'" in str(raised.value)


def test_unstable_grid_with_throw_false_gives_nan_derivatives_and_the_status():
    A = quadratic(STIFF)
    value, status, g = gradient(A, 100, throw=False)
    assert status == SolveStatus.UNSTABLE_ADJOINT
    assert np.all(np.isnan(g))
    # The forward solve is fine: its value is kept, and equals the stable grid's.
    np.testing.assert_allclose(value, gradient(A, 200)[0], rtol=1e-12)


def test_the_check_runs_only_when_differentiating():
    # Not differentiated: no check, status SUCCESS, nothing raised.
    y1, status = ode.solve(GradientField(loss), U0, T, quadratic(STIFF), steps=100, throw=False)
    assert int(status) == SolveStatus.SUCCESS and np.all(np.isfinite(y1))
    ode.solve(GradientField(loss), U0, T, quadratic(STIFF), steps=100)
    # With t1 alone differentiated the sweep's products are not needed: no check either.
    dT = jax.grad(lambda t1: jnp.sum(ode.solve(GradientField(loss), U0, t1, quadratic(STIFF), steps=100)))(T)
    assert np.isfinite(dT)


def test_per_element_under_jit_and_vmap():
    """One stiff and one mild quadratic in a vmapped, jitted gradient: only the
    stiff one is flagged; the mild one is as if solved alone."""
    As = jnp.stack([quadratic(STIFF), quadratic((1.0, 5.0))])

    def J(u0, A):
        y1, status = ode.solve(GradientField(loss), u0, T, A, steps=100, rtol=1e-12, atol=1e-12, throw=False)
        return jnp.sum(y1), status

    (values, status), g = jax.jit(jax.vmap(jax.value_and_grad(J, has_aux=True), in_axes=(None, 0)))(U0, As)
    assert status.tolist() == [SolveStatus.UNSTABLE_ADJOINT, SolveStatus.SUCCESS]
    assert np.all(np.isnan(g[0])) and np.all(np.isfinite(values))
    np.testing.assert_allclose(g[1], gradient(As[1], 100)[2], rtol=1e-12)


def test_checkpointed_sweep_is_checked_with_the_fine_step():
    # 10 coarse segments of 10 fine steps: h = T/100 as without checkpoints.
    A = quadratic(STIFF)
    _, status, g = gradient(A, 100, sensitivity=ode.StoredAdjoint(checkpoints=10), throw=False)
    assert status == SolveStatus.UNSTABLE_ADJOINT and np.all(np.isnan(g))
    _, status, g = gradient(A, 200, sensitivity=ode.StoredAdjoint(checkpoints=10), throw=False)
    assert status == SolveStatus.SUCCESS
    np.testing.assert_allclose(g, gradient(A, 200)[2], rtol=1e-10)


@pytest.mark.parametrize("scheme,steps,flagged", [
    ("rk4", 100, True),     # h lambda = 3 > 0.95 * 2.785
    ("rk4", 120, False),    # 2.5: stable for RK4, not for Heun
    ("heun", 120, True),
    ("euler", 150, True),   # 2 > 1.9
    ("euler", 200, False),  # 1.5
])
def test_the_limit_depends_on_the_scheme(scheme, steps, flagged):
    _, status, g = gradient(quadratic(STIFF), steps, sensitivity=ode.StoredAdjoint(scheme), throw=False)
    assert status == (SolveStatus.UNSTABLE_ADJOINT if flagged else SolveStatus.SUCCESS)
    assert np.all(np.isnan(g)) if flagged else np.all(np.isfinite(g))


# ------------------------------------------------------------- (b) negative curvature is growth


def test_negative_curvature_is_not_flagged():
    """Eigenvalues -50 and 1 with h |lambda| = 2.5: the adjoint grows as exp(50 s)
    by right, so nothing is flagged, and the gradient is exactly what the Heun
    sweep computes for it; with a fine grid it converges to the closed form."""
    A = quadratic((-50.0, 1.0))
    _, status, g = gradient(A, 20)  # h |lambda| = 2.5
    assert status == SolveStatus.SUCCESS
    np.testing.assert_allclose(g, heun_sweep(A, 20), rtol=1e-9)
    _, status, g = gradient(A, 4000)  # h |lambda| = 0.0125
    assert status == SolveStatus.SUCCESS
    # Heun's relative error on the growing mode, about 50 T (h 50)^2 / 6 = 1.3e-3.
    np.testing.assert_allclose(g, closed_form(A), rtol=2e-3)


def test_positive_curvature_is_found_under_a_dominant_negative_one():
    """The eigenvalue of largest magnitude is negative (-300): the check must
    still bound the largest positive one. +50 with h = 0.05 (2.5) is flagged;
    +20 (1.0) is not, although h |lambda| = 15 for the negative one. (A short
    horizon, t1 = 0.1, keeps the forward growth exp(300 t) within budget.)"""
    _, status, _ = gradient(quadratic((-300.0, 50.0)), 2, throw=False, t1=0.1)
    assert status == SolveStatus.UNSTABLE_ADJOINT
    A = quadratic((-300.0, 20.0))
    _, status, g = gradient(A, 2, throw=False, t1=0.1)
    assert status == SolveStatus.SUCCESS
    np.testing.assert_allclose(g, heun_sweep(A, 2, t1=0.1), rtol=1e-9)


def test_max_curvature_bounds_the_top_eigenvalue_of_a_spread_spectrum():
    """40 dimensions, eigenvalues spread over [-200, 30] and a top one at 60:
    10 Lanczos steps find 60 to 1% and never exceed it. (Power iteration, which
    converges to the eigenvalue of largest magnitude, finds about -200.)"""
    rng = np.random.default_rng(1)
    Q = np.linalg.qr(rng.normal(size=(40, 40)))[0]
    eigs = np.concatenate([np.linspace(-200.0, 30.0, 39), [60.0]])
    A = jnp.asarray(Q @ np.diag(eigs) @ Q.T)
    est = float(ode.max_curvature(GradientField(loss), 0.0, jnp.asarray(rng.normal(size=40)), A))
    assert 0.99 * 60.0 < est <= 60.0 * (1 + 1e-12)



def test_curvature_range_finds_both_ends_of_an_indefinite_hessian_against_eigh():
    """The saddle that meta-training makes (docs/bench.md, "Stiff flows"): a Hessian with
    eigenvalues from -67 to 99 and a bulk near 0 (30 dimensions). 30 Lanczos steps give both
    ends as numpy's eigh does, and fewer steps never leave the range."""
    rng = np.random.default_rng(2)
    Q = np.linalg.qr(rng.normal(size=(30, 30)))[0]
    eigs = np.concatenate([[-67.0, -20.0], rng.uniform(-1.0, 5.0, 26), [40.0, 99.0]])
    A = Q @ np.diag(eigs) @ Q.T
    want = np.linalg.eigh(A)[0]
    field, u = GradientField(loss), jnp.asarray(rng.normal(size=30))
    lo, hi = ode.curvature_range(field, 0.0, u, jnp.asarray(A), iterations=30)
    np.testing.assert_allclose([float(lo), float(hi)], [want[0], want[-1]], rtol=1e-9)
    lo, hi = ode.curvature_range(field, 0.0, u, jnp.asarray(A), iterations=12)
    assert want[0] * (1 + 1e-12) <= float(lo) <= 0.95 * want[0]
    assert 0.95 * want[-1] <= float(hi) <= want[-1] * (1 + 1e-12)
    assert float(ode.max_curvature(field, 0.0, u, jnp.asarray(A), iterations=12)) == float(hi)

# ------------------------------------------------------------- (c) the check turned off


def test_stability_check_false_gives_the_old_finite_wrong_gradient():
    A = quadratic(STIFF)
    _, status, g = gradient(A, 100, sensitivity=ode.StoredAdjoint(stability_check=False))
    assert status == SolveStatus.SUCCESS and np.all(np.isfinite(g))
    exact = closed_form(A)
    assert np.linalg.norm(g - exact) > 1e3 * np.linalg.norm(exact)  # R(-3) = 2.5 a step, 100 steps
    np.testing.assert_allclose(g, heun_sweep(A, 100), rtol=1e-6)


def test_stability_check_is_static_configuration():
    assert Adjoint(stability_check=False) != Adjoint()
    assert hash(Adjoint(stability_check=False)) == hash(Adjoint(stability_check=False))
    with pytest.raises(Exception, match="stability_check"):
        ode.StoredAdjoint(stability_check="yes")


def test_fields_without_a_symmetric_jacobian_are_not_checked():
    # The same flow as a plain callable: no `symmetric_jacobian`, so no check (old behaviour).
    A = quadratic(STIFF)
    assert not ode.VectorField.symmetric_jacobian and GradientField.symmetric_jacobian

    def J(u0):
        return jnp.sum(ode.solve(lambda t, u, A: -A @ u, u0, T, A, steps=100, rtol=1e-12, atol=1e-12))

    np.testing.assert_allclose(jax.grad(J)(U0), heun_sweep(A, 100), rtol=1e-6)


# ------------------------------------------------------------- (d) a meta-batch with one stiff task


def _one_unstable_task(policy: str):
    """Three CosMixture tasks, A-MAML with 20 stored states over T = 2 (h = 0.1,
    flagged above lambda_max = 19). Tasks 0 and 2 have lambda_max about 5
    along the flow; task 1's inputs and targets are scaled by 5, which raises
    its curvature to about 40 by t = 2: its forward solve succeeds, its sweep
    is unstable."""
    learner = MetaLearner(MLP(2, 1, 8, 1, key=jax.random.PRNGKey(0)), Adjoint(steps=20), optax.sgd(0.1), mse,
                          T=2.0, on_nonfinite=policy)
    batch = CosMixture(shots=5, queries=5).sample(jax.random.PRNGKey(1), 3, "train")
    batch = batch._replace(support_x=batch.support_x.at[1].multiply(5.0),
                           support_y=batch.support_y.at[1].multiply(5.0))
    return learner, batch


def test_skip_task_skips_exactly_the_task_whose_adjoint_sweep_is_unstable(assert_skips_exactly):
    learner, batch = _one_unstable_task("skip-task")
    assert_skips_exactly(learner, batch, 1, SolveStatus.UNSTABLE_ADJOINT)


def test_raise_names_the_task_whose_adjoint_sweep_is_unstable():
    learner, batch = _one_unstable_task("raise")
    state = learner.init(jax.random.PRNGKey(0))
    with pytest.raises(NumericalError, match=r"^meta-iteration 1: the inner solve of task 1 of the meta-batch has "
                                             r"an unstable backward adjoint sweep: .*steps=20") as raised:
        learner.meta_step(state, batch)
    text = str(raised.value)
    assert "task 0" not in text and "task 2" not in text and "max_steps" not in text
    assert "Raise the method's steps" in text
    with pytest.raises(NumericalError, match=r"^meta_gradient: the inner solve of task 1 .*unstable"):
        learner.meta_gradient(state, batch)
