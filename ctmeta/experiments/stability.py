r"""Why COMLN uses forward sensitivities: the stability demonstration of COMLN
Section 3.2 (Figure 2), on a quadratic inner loss.

The inner loop is the gradient flow of `L(w) = 1/2 w^T A w - b^T w` (`A`
symmetric positive definite with a spread of eigenvalues `lam_1 <= ... <=
lam_d`), from `w(0) = w0` to the horizon `T`; the outer loss is `J =
1/2 ||w(T) - target||^2`. In closed form, with `w* = A^{-1} b`,

    w(T)      = w* + expm(-A T) (w0 - w*),
    dw(T)/dw0 = expm(-A T),
    dJ/dw0    = expm(-A T) (w(T) - target).

Four ways to get `dJ/dw0` numerically, all with `f(w) = -(A w - b)` seen
only through Jacobian-vector and vector-Jacobian products (so that nothing
here uses that the problem is linear):

1. **Backsolve adjoint** (Chen et al. 2018; what `diffrax.BacksolveAdjoint`
   does): solve forward without storing anything, then solve the augmented
   system `dw/dt = f(w)`, `da/dt = -(df/dw)^T a` *backward* from
   `(w(T), dJ/dw(T))` to `t = 0`; `dJ/dw0 = a(0)`. Memory is constant, but
   `w` is recomputed by running the gradient flow in reverse: gradient
   *ascent*, whose linearisation `+A` amplifies every error (rounding, local
   truncation) by `exp(lam_d (T - t))`. The recomputed trajectory leaves the
   forward one (Figure 2), and once `lam_d T` exceeds about 700 (float64; about
   90 in float32) it overflows and the backward solve fails.
2. **Stored-state adjoint** (A-MAML): solve forward with an adaptive solver,
   keep its dense output (the stored states), then solve `da/dt = -(df/dw(w(t)))^T
   a` backward by Heun's method on a uniform grid of step `h`, reading `w(t)`
   from the stored states. Stable (the adjoint is contracting backward in
   time), memory grows with `T`.
3. **Forward sensitivity** (COMLN): integrate `dS/dt = (df/dw) S`, `S(0) = I`
   along with `w`; `dJ/dw0 = S(T)^T dJ/dw(T)`. Stable (contracting forward in
   time) and constant memory; COMLN makes `S` small by its decomposition.
4. **Adaptive adjoint** (ctmeta's default rule, `methods.Adjoint()`): as (2),
   but the backward is its own adaptive solve reading `w(t)` from the forward's
   dense output, no grid; computed through `ctmeta.gradient_flow` and `jax.grad`
   (an independent implementation from (1)-(3), which use diffrax directly).

Note what the quadratic does and does not show. Its Hessian is constant, so
the adjoint equation does not read `w` at all: the backsolve `a(t)` stays
accurate while the recomputed `w(t)` drifts arbitrarily far, and the
gradient only fails (non-finite) once the drift overflows. For a loss whose
Hessian depends on `w` (COMLN's softmax head) the drifted `w(t)` enters
`-(df/dw)^T a` directly and corrupts the gradient much earlier. The
trajectory gap reported here is the instability itself.
"""

from __future__ import annotations

import functools
import math
import pathlib
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from .._errors import InputError
from ..adaptation import gradient_flow
from ..methods import Adjoint

__all__ = ["Quadratic", "make_quadratic", "stability_demo"]

_METHODS = ("backsolve", "stored_state", "forward_sensitivity", "adaptive_adjoint")


class Quadratic(NamedTuple):
    """`L(w) = 1/2 w^T A w - b^T w`, started at `w0`, scored by
    `J = 1/2 ||w(T) - target||^2`."""

    A: np.ndarray  # (d, d), symmetric positive definite
    b: np.ndarray  # (d,)
    w0: np.ndarray  # (d,)
    target: np.ndarray  # (d,)

    @property
    def minimiser(self) -> np.ndarray:
        return np.linalg.solve(self.A, self.b)

    def closed_form(self, T: float) -> tuple[np.ndarray, np.ndarray]:
        """`(w(T), dJ/dw0)` exactly, from the eigendecomposition of `A`."""
        eigenvalues, Q = np.linalg.eigh(self.A)
        flow = (Q * np.exp(-eigenvalues * T)) @ Q.T  # expm(-A T)
        w_star = self.minimiser
        w_T = w_star + flow @ (self.w0 - w_star)
        return w_T, flow.T @ (w_T - self.target)


def make_quadratic(eigenvalues=(0.05, 5.0), *, seed: int = 0) -> Quadratic:
    """A quadratic with the given spectrum, rotated off the axes.

    `d = len(eigenvalues)`; the eigenvectors are a fixed random rotation
    (from `seed`); the minimiser, start and outer target are fixed points
    of order one, so that the flow does not start at equilibrium.
    """
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    if eigenvalues.ndim != 1 or eigenvalues.size < 2:
        raise InputError("`eigenvalues` must list at least two eigenvalues (d >= 2).")
    if not np.all(np.isfinite(eigenvalues)) or np.any(eigenvalues <= 0):
        raise InputError("`eigenvalues` must be positive and finite (A positive definite).")
    d = eigenvalues.size
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    A = (Q * eigenvalues) @ Q.T
    A = 0.5 * (A + A.T)
    w_star = np.linspace(1.0, -0.5, d)
    w0 = np.linspace(-2.0, 2.0, d)
    target = np.linspace(0.5, 0.0, d)
    return Quadratic(A=A, b=A @ w_star, w0=w0, target=target)


class _Options(NamedTuple):
    rtol: float
    atol: float
    heun_step: float
    max_steps: int
    trajectory_points: int
    dense_steps: int


def _controller(options: _Options):
    return diffrax.PIDController(rtol=options.rtol, atol=options.atol)


def _vector_field(t, w, args):
    """The gradient flow `f(w) = -grad L(w) = -(A w - b)`."""
    A, b = args
    return -(A @ w - b)


def _vjp_transpose(w, a, args):
    """`(df/dw)^T a` at `w`, by reverse mode (no use of linearity)."""
    _, vjp = jax.vjp(lambda w: _vector_field(0.0, w, args), w)
    return vjp(a)[0]


@functools.partial(jax.jit, static_argnames="options")
def _four_methods(A, b, w0, target, T, options: _Options):
    """Every method's `dJ/dw0` at horizon `T`, and the two trajectories."""
    args = (A, b)
    term = diffrax.ODETerm(_vector_field)
    zero = jnp.zeros((), T.dtype)
    successful = diffrax.RESULTS.successful

    # Forward solve with dense output: the stored states of (2), the forward
    # trajectory to compare (1) with, and w(T) for (1) and (2).
    forward = diffrax.diffeqsolve(
        term, diffrax.Dopri5(), zero, T, None, w0, args,
        saveat=diffrax.SaveAt(t1=True, dense=True),
        stepsize_controller=_controller(options),
        max_steps=options.max_steps, throw=False,
    )  # fmt: skip
    w_T = forward.ys[-1]
    forward_ok = forward.result == successful
    cotangent = w_T - target  # dJ/dw(T)

    # (1) Backsolve: [w, a] backward from T to 0, w recomputed on the way.
    def backward_field(t, state, args):
        w, a = state
        return _vector_field(t, w, args), -_vjp_transpose(w, a, args)

    times = T * jnp.linspace(1.0, 0.0, options.trajectory_points)
    backward = diffrax.diffeqsolve(
        diffrax.ODETerm(backward_field), diffrax.Dopri5(), T, zero, None,
        (w_T, cotangent), args,
        saveat=diffrax.SaveAt(ts=times),
        stepsize_controller=_controller(options),
        max_steps=options.max_steps, throw=False,
    )  # fmt: skip
    recomputed_w, adjoints = backward.ys
    backsolve_ok = backward.result == successful
    backsolve_grad = jnp.where(backsolve_ok & forward_ok, adjoints[-1], jnp.nan)
    forward_w = jax.vmap(forward.evaluate)(times)

    # (2) Stored-state adjoint: Heun backward over a uniform grid, reading the
    # stored states (dense output) at the grid points.
    steps = jnp.ceil(T / options.heun_step).astype(jnp.int32)
    h = T / steps

    def stored(t):
        return forward.evaluate(jnp.clip(t, zero, T))

    def heun_step(k, a):
        t = T - k * h
        slope = _vjp_transpose(stored(t), a, args)  # da/d(-t) at t
        predicted = a + h * slope
        slope_next = _vjp_transpose(stored(t - h), predicted, args)
        return a + 0.5 * h * (slope + slope_next)

    stored_grad = jax.lax.fori_loop(0, steps, heun_step, cotangent)
    stored_grad = jnp.where(forward_ok, stored_grad, jnp.nan)

    # (3) Forward sensitivity: [w, S] forward, S = dw(t)/dw0.
    def sensitivity_field(t, state, args):
        w, S = state
        tangent = lambda column: jax.jvp(lambda w: _vector_field(t, w, args), (w,), (column,))[1]
        return _vector_field(t, w, args), jax.vmap(tangent, in_axes=1, out_axes=1)(S)

    sensitivity = diffrax.diffeqsolve(
        diffrax.ODETerm(sensitivity_field), diffrax.Dopri5(), zero, T, None,
        (w0, jnp.eye(w0.shape[0], dtype=w0.dtype)), args,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=_controller(options),
        max_steps=options.max_steps, throw=False,
    )  # fmt: skip
    w_T_sens, S_T = (leaf[-1] for leaf in sensitivity.ys)
    sensitivity_grad = S_T.T @ (w_T_sens - target)
    sensitivity_grad = jnp.where(sensitivity.result == successful, sensitivity_grad, jnp.nan)

    # (4) ctmeta's own rule, through the library's public entry point.
    def outer(w0):
        inner = lambda w, data: 0.5 * w @ (data[0] @ w) - data[1] @ w
        method = Adjoint(rtol=options.rtol, atol=options.atol, max_steps=options.max_steps,
                         dense_steps=options.dense_steps)
        w_T = gradient_flow(inner, w0, args, T, method=method, throw=False)[0]
        return 0.5 * jnp.sum((w_T - target) ** 2)

    adaptive_grad = jax.grad(outer)(w0)

    return {
        "adaptive_adjoint": adaptive_grad,
        "backsolve": backsolve_grad,
        "stored_state": stored_grad,
        "forward_sensitivity": sensitivity_grad,
        "times": times,
        "forward_w": forward_w,
        "recomputed_w": recomputed_w,
        "backsolve_ok": backsolve_ok,
    }


def _relative_error(estimate: np.ndarray, exact: np.ndarray) -> float:
    if not np.all(np.isfinite(estimate)):
        return math.nan
    return float(np.linalg.norm(estimate - exact) / np.linalg.norm(exact))


def stability_demo(
    out_dir,
    *,
    horizons=(0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0),
    quadratic: Quadratic | None = None,
    trajectory_horizon: float = 6.0,
    dtype: str = "float64",
    heun_step: float = 0.002,
    max_steps: int = 200_000,
) -> dict:
    """Compare backsolve, stored-state, forward-sensitivity and adaptive-adjoint `dJ/dw0` on a
    quadratic as the horizon grows, and save `stability.png` in `out_dir`.

    **Arguments:**

    - `out_dir`: where to write `stability.png` (created if missing).
    - `horizons`: the horizons `T` to compare at.
    - `quadratic`: the problem; default `make_quadratic()` (eigenvalues 0.05
      and 5, d = 2).
    - `trajectory_horizon`: the horizon of the trajectory panel (forward
      vs recomputed backward), like COMLN's Figure 2.
    - `dtype`: `"float64"` (default) or `"float32"` (the backward
      recomputation overflows at much shorter horizons).
    - `heun_step`: the grid step of the stored-state adjoint.
    - `max_steps`: the step budget of each adaptive solve.

    **Returns:** a dict with `horizons`, `errors` (per method, the relative
    error of `dJ/dw0` against the closed form at each horizon; `nan` where
    the method failed, i.e. the backward recomputation overflowed),
    `trajectory_gap` (per horizon, `max_t ||w_back(t) - w(t)||_inf / ||w0 -
    w*||_inf` over 201 times in `[0, T]`, `inf` where it overflowed),
    `backsolve_failed`, `dtype` and `figure` (the PNG's path).
    """
    if dtype not in ("float64", "float32"):
        raise InputError(f"`dtype` must be 'float64' or 'float32', got {dtype!r}.")
    horizons = [float(T) for T in np.atleast_1d(np.asarray(horizons, dtype=np.float64))]
    if not horizons or not all(math.isfinite(T) and T > 0 for T in horizons):
        raise InputError(f"`horizons` must be positive and finite, got {horizons}.")
    if not (math.isfinite(trajectory_horizon) and trajectory_horizon > 0):
        raise InputError(f"`trajectory_horizon` must be positive, got {trajectory_horizon}.")
    if not (heun_step > 0):
        raise InputError(f"`heun_step` must be positive, got {heun_step}.")
    quadratic = make_quadratic() if quadratic is None else quadratic
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    float64 = dtype == "float64"
    options = _Options(
        rtol=1e-10 if float64 else 1e-5,
        atol=1e-12 if float64 else 1e-7,
        heun_step=float(heun_step),
        max_steps=int(max_steps),
        trajectory_points=201,
        dense_steps=4096,
    )
    errors = {method: [] for method in _METHODS}
    gaps, failed = [], []
    scale = float(np.max(np.abs(quadratic.w0 - quadratic.minimiser)))
    with jax.enable_x64(float64):
        np_dtype = np.float64 if float64 else np.float32
        arrays = [jnp.asarray(x, np_dtype) for x in quadratic]

        def run(T):
            return jax.device_get(_four_methods(*arrays, jnp.asarray(T, np_dtype), options))

        for T in horizons:
            result = run(T)
            _, exact = quadratic.closed_form(T)
            for method in _METHODS:
                errors[method].append(_relative_error(np.asarray(result[method]), exact))
            # Max-norms: the drift reaches 1e300 before it overflows, too big to square.
            difference = np.float64(result["recomputed_w"]) - np.float64(result["forward_w"])
            gap = np.max(np.abs(difference))
            gaps.append(float(gap) / scale if np.isfinite(gap) else math.inf)
            failed.append(not bool(result["backsolve_ok"]))
        panel = run(trajectory_horizon)

    figure = out_dir / "stability.png"
    _plot(figure, horizons, errors, gaps, panel, quadratic, trajectory_horizon, dtype)
    return {
        "horizons": horizons,
        "errors": errors,
        "trajectory_gap": gaps,
        "backsolve_failed": failed,
        "dtype": dtype,
        "figure": str(figure),
    }


def _plot(path, horizons, errors, gaps, panel, quadratic, trajectory_horizon, dtype):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "backsolve": "backsolve adjoint (recomputes w backward)",
        "stored_state": "stored-state adjoint, Heun (A-MAML)",
        "forward_sensitivity": "forward sensitivity (COMLN)",
        "adaptive_adjoint": "adaptive adjoint, dense output (ctmeta Adjoint())",
    }
    markers = {"backsolve": "o", "stored_state": "s", "forward_sensitivity": "^", "adaptive_adjoint": "x"}
    fig, (ax_error, ax_gap, ax_path) = plt.subplots(1, 3, figsize=(16, 4.8))

    floor = 1e-17  # exact zeros still show on a log scale
    for method in _METHODS:
        values = np.asarray(errors[method], dtype=float)
        finite = np.isfinite(values)
        ax_error.loglog(
            np.asarray(horizons)[finite], np.maximum(values[finite], floor),
            marker=markers[method], label=labels[method],
        )  # fmt: skip
        if not finite.all():
            ax_error.scatter(
                np.asarray(horizons)[~finite], np.full((~finite).sum(), 1e2),
                marker="x", color="red", zorder=5,
                label=f"{method}: failed (non-finite)",
            )  # fmt: skip
    ax_error.set_xlabel("horizon T")
    ax_error.set_ylabel("relative error of dJ/dw0")
    ax_error.set_title(f"meta-gradient error vs closed form ({dtype})")
    ax_error.legend(fontsize=7)
    ax_error.grid(True, which="both", alpha=0.3)

    gap_values = np.asarray(gaps, dtype=float)
    finite = np.isfinite(gap_values)
    ax_gap.loglog(np.asarray(horizons)[finite], np.maximum(gap_values[finite], floor), "o-")
    if not finite.all():
        top = gap_values[finite].max() if finite.any() else 1.0
        ax_gap.scatter(
            np.asarray(horizons)[~finite], np.full((~finite).sum(), top * 10),
            marker="x", color="red", label="overflowed",
        )  # fmt: skip
        ax_gap.legend(fontsize=7)
    ax_gap.set_xlabel("horizon T")
    ax_gap.set_ylabel("max_t |w_backward(t) - w(t)|_inf / |w0 - w*|_inf")
    ax_gap.set_title("recomputed backward trajectory vs forward")
    ax_gap.grid(True, which="both", alpha=0.3)

    forward_w = np.asarray(panel["forward_w"])
    recomputed = np.asarray(panel["recomputed_w"])
    w_star = quadratic.minimiser
    points = np.vstack([forward_w[:, :2], w_star[None, :2]])
    low, high = points.min(axis=0), points.max(axis=0)
    margin = 0.3 * (high - low).max() + 0.1
    grid_x = np.linspace(low[0] - margin, high[0] + margin, 200)
    grid_y = np.linspace(low[1] - margin, high[1] + margin, 200)
    X, Y = np.meshgrid(grid_x, grid_y)
    # Loss contours in the first two coordinates (the others at w*).
    A2, centre = quadratic.A[:2, :2], w_star[:2]
    dX, dY = X - centre[0], Y - centre[1]
    loss = 0.5 * (A2[0, 0] * dX**2 + 2 * A2[0, 1] * dX * dY + A2[1, 1] * dY**2)
    # Levels evenly spaced in sqrt(loss): evenly spaced ellipses despite the conditioning.
    levels = np.linspace(0.0, np.sqrt(loss.max()), 16)[1:] ** 2
    ax_path.contour(X, Y, loss, levels=levels, colors="0.7", linewidths=0.6)
    ax_path.plot(forward_w[:, 0], forward_w[:, 1], color="green", lw=2, label="forward w(t)")
    shown = np.all(np.isfinite(recomputed), axis=-1)
    ax_path.plot(
        recomputed[shown, 0], recomputed[shown, 1], color="red", lw=1.5, ls="--",
        label="recomputed backward from w(T)",
    )  # fmt: skip
    # `times` run from T down to 0.
    ax_path.plot(*forward_w[-1, :2], "go", label="w(0)")
    ax_path.plot(*forward_w[0, :2], "ks", label="w(T)")
    ax_path.plot(*w_star[:2], "k*", markersize=10, label="w*")
    ax_path.set_xlim(grid_x[0], grid_x[-1])
    ax_path.set_ylim(grid_y[0], grid_y[-1])
    ax_path.set_title(f"trajectories, T = {trajectory_horizon:g} (cf. COMLN Fig. 2)")
    ax_path.legend(fontsize=7, loc="best")

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
