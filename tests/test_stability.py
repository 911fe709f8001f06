"""The Section 3.2 / Figure 2 stability demonstration: the backward
recomputation of the gradient flow diverges; stored states and forward
sensitivities stay exact."""

import math

import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
import pytest

from ctmeta._errors import InputError
from ctmeta.experiments.stability import make_quadratic, stability_demo


def test_closed_form_matches_matrix_exponential():
    quadratic = make_quadratic((0.3, 2.0, 7.0))
    T = 0.8
    flow = np.asarray(jax.scipy.linalg.expm(-jnp.asarray(quadratic.A) * T))
    w_star = np.linalg.solve(quadratic.A, quadratic.b)
    w_T, grad = quadratic.closed_form(T)
    np.testing.assert_allclose(w_T, w_star + flow @ (quadratic.w0 - w_star), rtol=1e-12)
    np.testing.assert_allclose(grad, flow.T @ (w_T - quadratic.target), rtol=1e-12)


def test_backsolve_diverges_while_stored_states_and_forward_sensitivity_do_not(tmp_path):
    short, medium, long = 1.0, 10.0, 200.0
    result = stability_demo(tmp_path / "figures", horizons=(short, medium, long))
    errors, gaps = result["errors"], result["trajectory_gap"]

    # The stable methods are accurate at every horizon, the longest included.
    # ctmeta's own adaptive adjoint (through gradient_flow) reads w(t) from the forward's
    # dense output, so it is among them, at T = 200 too.
    for method in ("stored_state", "forward_sensitivity", "adaptive_adjoint"):
        assert all(math.isfinite(e) and e < 1e-4 for e in errors[method]), (method, errors)

    # The recomputed backward trajectory tracks the forward one at first, then
    # leaves it: errors grow like exp(lam_max T) (lam_max = 5 here).
    assert gaps[0] < 1e-6
    assert gaps[1] > 1e3
    # At the long horizon the recomputation overflows: the backsolve fails.
    assert result["backsolve_failed"] == [False, False, True]
    assert not math.isfinite(errors["backsolve"][2]) or errors["backsolve"][2] > 1e-2
    # (The quadratic's adjoint does not read w, so until the overflow the
    # backsolve gradient itself stays accurate: see ctmeta.stability.)
    assert errors["backsolve"][0] < 1e-6

    figure = tmp_path / "figures" / "stability.png"
    assert result["figure"] == str(figure)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000


@pytest.mark.parametrize(
    "arguments, match",
    [
        (dict(horizons=(1.0, -2.0)), "horizons"),
        (dict(horizons=()), "horizons"),
        (dict(horizons=(float("nan"),)), "horizons"),
        (dict(dtype="float16"), "dtype"),
        (dict(heun_step=0.0), "heun_step"),
    ],
)
def test_bad_arguments_raise_input_error(tmp_path, arguments, match):
    with pytest.raises(InputError, match=match):
        stability_demo(tmp_path, **arguments)


def test_make_quadratic_rejects_bad_spectrum():
    with pytest.raises(InputError, match="positive"):
        make_quadratic((1.0, -1.0))
    with pytest.raises(InputError, match="two"):
        make_quadratic((1.0,))
