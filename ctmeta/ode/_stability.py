"""Stability limits of the fixed-step backward sweeps (used by the check and by its error text)."""

# Real-axis stability limits c of the backward sweeps: a decaying mode a' = -lambda a
# (lambda > 0) stays bounded iff h lambda < c. Euler: |1 - x| < 1; Heun: |1 - x + x^2/2| < 1;
# RK4: the real root of 1 - x + x^2/2 - x^3/6 + x^4/24 = 1, about 2.785.
STABILITY_LIMIT = {"euler": 2.0, "heun": 2.0, "rk4": 2.785293563405282}
STABILITY_MARGIN = 0.95  # flag h lambda_max above 0.95 c: near c the mode barely decays
LANCZOS_STEPS = 10  # Jacobian-vector products per checked state
UNSTABLE_ADVICE = ("Store more states (steps of solve or Adjoint: h = T/steps, and h*lambda_max must fall below "
                   "0.95 of the limit), "
                   "shorten the horizon, use scheme='rk4' (stable up to h*lambda_max = 2.785) if the sweep is "
                   "Heun's or Euler's, or AdaptiveAdjoint (its step follows the curvature); "
                   "stability_check=False turns this check off.")
