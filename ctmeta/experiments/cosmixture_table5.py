"""A-MAML Table 5: how close the A-MAML meta-gradient with K stored states is
to the one with 1000 states, on CosMixture (A-MAML Appendix A).

For each horizon T and each of `num_inits` random MLP initialisations, the
meta-gradient of one meta-batch of CosMixture 50shot-50val tasks (the query
loss after the gradient flow, w.r.t. every parameter) is computed with the
stored-state adjoint (`methods.Adjoint(steps=K)`), and its relative L2 error
against the `reference`-state gradient is averaged over the initialisations.
With `adaptive=True` the same error of the adaptive backward (`Adjoint()`,
no stored grid, the presets' tolerances) is added under the key
`("adaptive", T)`: the rule ctmeta trains with, beside the paper's.
"""

from __future__ import annotations

import numpy as np

STATES = (10, 20, 50, 100, 200, 500)
REFERENCE = 1000
HORIZONS = (0.1, 0.3, 0.5)


def table5(states=STATES, reference: int = REFERENCE, horizons=HORIZONS, num_inits: int = 20, meta_batch: int = 5,
           seed: int = 0, adaptive: bool = False) -> dict:
    """`{T: [(mean, std) of the relative error for each K in states]}` (and
    `{("adaptive", T): (mean, std)}` with `adaptive`)."""
    import jax
    import optax

    from .. import methods, presets
    from ..meta import MetaLearner
    from ..losses import mse

    config = presets.resolve_config("cosmixture", "amaml")
    family = presets.build_family(config, progress=False)
    batch = family.sample(jax.random.PRNGKey(seed), meta_batch, "train")
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), num_inits)
    models = [presets.build_model(config, family, k) for k in keys]
    opts = config["method_options"]

    def grads(K, T):
        if K is None:  # the adaptive backward
            method = methods.Adjoint(rtol=opts["rtol"], atol=opts["atol"], dense_steps=presets.BENCHMARKS["cosmixture"].dense_steps)
        else:
            scheme = opts.get("scheme", "heun")  # the presets' A-MAML is adaptive: the paper's Heun sweep
            method = methods.Adjoint(steps=K, rtol=opts["rtol"], atol=opts["atol"], scheme=scheme)
        learner = MetaLearner(models[0], method, optax.adam(1e-3), mse, T=T)
        out = []
        for i, model in enumerate(models):
            state = learner.init(keys[i], model=model)
            _, g = learner.meta_gradient(state, batch)
            out.append(np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(g)]))
        return out

    def error(g, ref):
        err = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(g, ref)]
        return float(np.mean(err)), float(np.std(err))

    result = {}
    for T in horizons:
        ref = grads(reference, T)
        result[T] = [error(grads(K, T), ref) for K in states]
        if adaptive:
            result[("adaptive", T)] = error(grads(None, T), ref)
    return result


if __name__ == "__main__":
    for T, rows in table5(num_inits=5).items():
        print(T, ["%.2e" % m for m, _ in rows])
