r"""A-MAML Table 4: accuracy of the adjoint rules on an ODE with a closed form.

The ODE (A-MAML Appendix A, eq. 11 with $x = t$, see DESIGN.md)

$$\frac{dy}{dt} = -2t^3 - 2ty, \qquad y(t) = 1 - t^2 + (y_0 - 1) e^{-t^2},$$

with the loss $L = (y(T) - 3)^6$ has the meta-gradient
$dL/dy_0 = 6 (y(T) - 3)^5 e^{-T^2}$. We report the relative error of
`jax.grad` through `ctmeta.ode.solve` (Dopri5 forward, adjoint backward over
`K` stored states) beside the paper's Adjoint column, and of the adaptive
backward (`ctmeta.ode.AdaptiveAdjoint`, no `K`) at three forward tolerances.

Run: `python -m ctmeta.experiments.gradient_accuracy`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import ode

HORIZONS = (0.1, 0.5, 1.0, 2.0)
STATES = (10, 20, 50, 100, 200, 500, 1000)

# A-MAML Table 4, "Adjoint" columns (mean over 20 random initial states).
PAPER_ADJOINT = {
    0.1: (1.02e-6, 6.34e-7, 6.88e-7, 5.87e-7, 4.49e-7, 3.01e-7, 1.45e-7),
    0.5: (2.67e-4, 6.17e-5, 9.35e-6, 2.17e-6, 6.73e-7, 7.36e-7, 6.94e-7),
    1.0: (2.48e-3, 5.04e-4, 7.17e-5, 1.73e-5, 4.34e-6, 9.91e-7, 9.96e-7),
    2.0: (2.92e-1, 4.77e-2, 6.10e-3, 1.42e-3, 3.44e-4, 5.39e-5, 1.32e-5),
}


def vector_field(t, y, args):
    return -2.0 * t**3 - 2.0 * t * y


def exact_gradient(y0, T):
    yT = 1.0 - T**2 + (y0 - 1.0) * np.exp(-(T**2))
    return 6.0 * (yT - 3.0) ** 5 * np.exp(-(T**2))


def relative_errors(steps: int, scheme: str = "heun", horizons=HORIZONS, num_inits: int = 20, seed: int = 0):
    """Mean relative error of dL/dy0 over `num_inits` random y0, for each horizon."""
    rng = np.random.default_rng(seed)
    y0s = rng.uniform(-1.0, 1.0, size=num_inits)

    def loss(y0, T):
        y = ode.solve(vector_field, y0, T, None, steps=steps, sensitivity=ode.StoredAdjoint(scheme),
                      rtol=1e-11, atol=1e-12)
        return (y - 3.0) ** 6

    grad = jax.jit(jax.vmap(jax.vmap(jax.grad(loss), in_axes=(0, None)), in_axes=(None, 0)))
    g = np.asarray(grad(jnp.asarray(y0s), jnp.asarray(horizons)))
    exact = np.stack([exact_gradient(y0s, T) for T in horizons])
    return np.mean(np.abs(g - exact) / np.abs(exact), axis=1)


#: Forward tolerances `(rtol, atol)` of the adaptive rule's rows (it has no grid `K`).
ADAPTIVE_TOLERANCES = ((1e-6, 1e-8), (1e-8, 1e-10), (1e-11, 1e-12))


def adaptive_errors(rtol: float, atol: float, horizons=HORIZONS, num_inits: int = 20, seed: int = 0):
    """As `relative_errors`, for `ctmeta.ode.AdaptiveAdjoint` (the adaptive backward, `Adjoint()`)."""
    rng = np.random.default_rng(seed)
    y0s = rng.uniform(-1.0, 1.0, size=num_inits)

    def loss(y0, T):
        y = ode.solve(vector_field, y0, T, None, sensitivity=ode.AdaptiveAdjoint(dense_steps=1024),
                      rtol=rtol, atol=atol)
        return (y - 3.0) ** 6

    grad = jax.jit(jax.vmap(jax.vmap(jax.grad(loss), in_axes=(0, None)), in_axes=(None, 0)))
    g = np.asarray(grad(jnp.asarray(y0s), jnp.asarray(horizons)))
    exact = np.stack([exact_gradient(y0s, T) for T in horizons])
    return np.mean(np.abs(g - exact) / np.abs(exact), axis=1)


def table4(schemes=("heun", "rk4"), states=STATES, horizons=HORIZONS, num_inits: int = 20,
           adaptive=ADAPTIVE_TOLERANCES) -> dict:
    """`{scheme: {T: [error for each K]}}`, the paper's column under `"paper"`, and
    `"adaptive"`: `{T: [error for each (rtol, atol) of `adaptive`]}`."""
    out = {"paper": {T: list(PAPER_ADJOINT[T]) for T in horizons}}
    for scheme in schemes:
        per_k = [relative_errors(K, scheme, horizons, num_inits) for K in states]
        out[scheme] = {T: [float(e[i]) for e in per_k] for i, T in enumerate(horizons)}
    if adaptive:
        per_tol = [adaptive_errors(r, a, horizons, num_inits) for r, a in adaptive]
        out["adaptive"] = {T: [float(e[i]) for e in per_tol] for i, T in enumerate(horizons)}
        out["adaptive_tolerances"] = [list(t) for t in adaptive]
    return out


def to_markdown(result: dict, states=STATES) -> str:
    schemes = [s for s in result if s not in ("paper", "adaptive", "adaptive_tolerances")]
    lines = []
    if "adaptive" in result:
        tols = result["adaptive_tolerances"]
        lines.append("\n**Adaptive backward (`Adjoint()`, no stored grid), by forward tolerance**\n")
        lines.append("| T | " + " | ".join(f"rtol {r:g}, atol {a:g}" for r, a in tols) + " |")
        lines.append("|---:|" + "---:|" * len(tols))
        for T, errs in result["adaptive"].items():
            lines.append(f"| {T} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
    for T in result["paper"]:
        lines.append(f"\n**T = {T}**\n")
        lines.append("| states | paper (Adjoint) | " + " | ".join(f"ctmeta {s}" for s in schemes) + " |")
        lines.append("|---:|---:|" + "---:|" * len(schemes))
        for i, K in enumerate(states):
            row = [f"{result['paper'][T][i]:.2e}"] + [f"{result[s][T][i]:.2e}" for s in schemes]
            lines.append(f"| {K} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    print(to_markdown(table4()))
