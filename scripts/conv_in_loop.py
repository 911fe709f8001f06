"""Conv-4 gradients inside an XLA loop against separate jitted calls, NCHW and NHWC (docs/bench.md, Finding 1).

Run: python scripts/conv_in_loop.py  (prints the wall time of 10 gradient steps
in a fori_loop and of 10 separately jitted gradients, for each layout).
"""
import time, jax, jax.numpy as jnp
from jax import lax
key = jax.random.PRNGKey(0)
x = jax.random.normal(key, (25, 1, 28, 28))
ws = [jax.random.normal(jax.random.fold_in(key, i), (64, 1 if i == 0 else 64, 3, 3)) * 0.1 for i in range(4)]
def conv(x, w, layout):
    if layout == "NCHW":
        return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
    y = lax.conv_general_dilated(jnp.transpose(x, (0, 2, 3, 1)), jnp.transpose(w, (2, 3, 1, 0)), (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.transpose(y, (0, 3, 1, 2))
def net(ws, x, layout):
    for w in ws:
        x = conv(x, w, layout)
        x = jax.nn.relu(x)
        x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    return jnp.mean(x ** 2)
for layout in ("NCHW", "NHWC"):
    g = jax.grad(lambda ws: net(ws, x, layout))
    @jax.jit
    def flow(ws):
        return lax.fori_loop(0, 10, lambda i, w: jax.tree.map(lambda a, b: a - 0.01 * b, w, g(w)), ws)
    @jax.jit
    def one(ws):
        return g(ws)
    jax.block_until_ready(flow(ws)); jax.block_until_ready(one(ws))
    t = time.perf_counter(); jax.block_until_ready(flow(ws)); t1 = time.perf_counter() - t
    t = time.perf_counter(); [jax.block_until_ready(one(ws)) for _ in range(10)]; t2 = time.perf_counter() - t
    print(layout, f"10 grad steps in fori_loop {t1:.3f}s; 10 separate jitted grads {t2:.3f}s", flush=True)
