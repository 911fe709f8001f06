"""Conv-4 gradients and Hessian-vector products inside an XLA loop against
separate jitted calls, for each convolution of `ctmeta.models.conv2d`
(docs/bench.md, Finding 1).

XLA:CPU rewrites a convolution into the layout its fast (Eigen) kernel needs
only in the entry computation, not inside loop bodies; the convolutions of a
gradient are not in that layout, so in a loop they run as a naive loop nest.
`impl="im2col"` (the CPU default) computes them as matrix products instead.

Run: python scripts/conv_in_loop.py  (prints the wall time of 10 gradient
steps and of 10 Hessian-vector products, in a fori_loop and as separately
jitted calls, for impl "xla" and "im2col").
"""
import time

import jax
import jax.numpy as jnp
from jax import lax

from ctmeta.models import conv2d

key = jax.random.PRNGKey(0)
x = jax.random.normal(key, (25, 1, 28, 28))
ws = [jax.random.normal(jax.random.fold_in(key, i), (64, 1 if i == 0 else 64, 3, 3)) * 0.1 for i in range(4)]


def net(ws, x, impl):
    for w in ws:
        x = jax.nn.relu(conv2d(x, w, 1, impl))
        k, c, h, wd = x.shape
        x = x[:, :, : h // 2 * 2, : wd // 2 * 2].reshape(k, c, h // 2, 2, wd // 2, 2).max(axis=(3, 5))
    return jnp.mean(x**2)


def seconds(f, *args, n=1):
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(f(*args))
    return time.perf_counter() - t


for impl in ("xla", "im2col"):
    g = jax.grad(lambda ws: net(ws, x, impl))
    hvp = lambda ws, v: jax.jvp(g, (ws,), (v,))[1]
    step = lambda w, d: jax.tree.map(lambda a, b: a - 0.01 * b, w, d)
    grads_in_loop = jax.jit(lambda ws: lax.fori_loop(0, 10, lambda i, w: step(w, g(w)), ws))
    hvps_in_loop = jax.jit(lambda ws: lax.fori_loop(0, 10, lambda i, w: step(w, hvp(ws, w)), ws))
    print(f"{impl:6s}: 10 gradients in a fori_loop {seconds(grads_in_loop, ws):.3f}s, "
          f"10 jitted calls {seconds(jax.jit(g), ws, n=10):.3f}s; "
          f"10 HVPs in a fori_loop {seconds(hvps_in_loop, ws):.3f}s, "
          f"10 jitted calls {seconds(jax.jit(hvp), ws, ws, n=10):.3f}s", flush=True)
