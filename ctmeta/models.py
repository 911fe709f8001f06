r"""The networks of the benchmarks: MLP, Conv-4 and ResNet-12 (equinox modules).

**How a model is applied.** Every model here maps a *set* of inputs to a set
of outputs through [`apply_to_set`][]:

    apply_to_set(model, x)      # x (K, *input_shape) -> (K, out)

- [`MLP`][] is an ordinary per-example equinox module: `MLP(...)(x)` takes
  one example `(in_size,)` and `apply_to_set` vmaps it over the set.
- [`Conv4`][] and [`ResNet12`][] are *set models* (subclasses of
  [`SetModule`][]): their `__call__` takes the whole set `(K, C, H, W)` at
  once, because their batch norm normalises with that set's statistics (see
  below). `apply_to_set` calls them directly.
- A user's own per-example equinox module works with `apply_to_set` unchanged;
  a user's model that needs the whole set subclasses [`SetModule`][].

**Batch norm, transductive.** As in MAML and COMLN, batch norm here uses the
statistics of the set it is applied to (a task's support set, or its query
set), per channel over the set and spatial axes,
$y = (x - \mu) / \sqrt{\sigma^2 + \epsilon}\,\gamma + \beta$ with learnable $\gamma, \beta$
and the biased variance. There are no running statistics and no state, so a
model is a plain pytree and the same code runs at meta-train and meta-test
time. The consequence: an example's output depends on the other examples of
its set (and a set of one image is normalised by that image alone).

**Parameters.** A model's parameters are exactly its inexact-array leaves,
`params, static = eqx.partition(model, eqx.is_inexact_array)`. The modules
hold no other arrays (sizes, paddings, slopes and activations are static
fields), so nothing but parameters is differentiated or updated.

**dtype.** Parameters are created in `dtype`, by default JAX's default float
(float32, or float64 under `jax_enable_x64`). Layers compute in the promoted
dtype of their input and parameters, so float32 images work with float64
parameters (gradient checks) and give float64 outputs.

**Cost of building.** Initialisation draws each weight array eagerly, and JAX
compiles a random-number kernel per distinct weight shape (a second or so
each on a small CPU): build a model once and reuse it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from ._errors import InputError, check_int

__all__ = [
    "MLP",
    "Conv2d",
    "Conv4",
    "ConvBlock",
    "EmbeddingHead",
    "InputScale",
    "ResNet12",
    "ResidualBlock",
    "SetBatchNorm",
    "SetModule",
    "CONV_IMPLS",
    "apply_to_set",
    "conv2d",
    "feature_size",
    "max_pool2x2",
]


def _float_dtype(dtype):
    # `None` means JAX's default float: float32, or float64 under x64.
    return jnp.zeros((), dtype if dtype is not None else float).dtype


class SetModule(eqx.Module):
    """Base class of models whose `__call__` takes a whole set `(K, ...)`.

    Subclasses map `(K, *input_shape) -> (K, out)` and may mix information
    across the set (here: batch-norm statistics). [`apply_to_set`][] calls
    them directly instead of vmapping them over examples.
    """


def apply_to_set(model: Callable, x: jax.Array) -> jax.Array:
    """Apply `model` to a set of inputs `x (K, *input_shape)`, giving `(K, out)`.

    A [`SetModule`][] is called on the whole set; any other callable is
    taken to act on one example and is vmapped over the leading axis.
    """
    if isinstance(model, SetModule):
        return model(x)
    return jax.vmap(model)(x)


def feature_size(model: Callable, input_shape: Sequence[int]) -> int:
    """The width of `model`'s output for one example of shape `input_shape`.

    Computed abstractly (`jax.eval_shape`, no FLOPs), on a set of two examples
    so that batch norm is well defined. For example
    `feature_size(Conv4(3, key=key), (3, 84, 84)) == 1600`; pass
    `eqx.filter_eval_shape(lambda: Conv4(3, key=key))` to avoid building it.
    """
    x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    out = eqx.filter_eval_shape(apply_to_set, model, x)
    return math.prod(out.shape[1:])


# ------------------------------------------------------------------- wrappers


class EmbeddingHead(SetModule):
    """An embedding network followed by a bias-free linear head `W (ways, d)`.

    Applied to a set `x (K, ...)`: `logits = apply_to_set(embedding, x) @ W.T`.
    In a [`MetaLearner`][] with `adapt="head"` only `head` adapts in the inner
    loop (ANIL, COMLN); with `adapt="all"` the whole module does (MAML on this
    network).
    """

    embedding: Callable
    head: jax.Array

    def __call__(self, x):
        return self.features(x) @ self.head.T

    def features(self, x):
        """The embedded set, `(K, d)`."""
        feats = apply_to_set(self.embedding, x)
        return feats.reshape(feats.shape[0], -1)


class InputScale(eqx.Module):
    """`model(x * scale)`: a fixed (not learned) rescaling of one example's input.

    Keeps the inputs of a per-example model of order one (Alpine's
    $[-10, 10]^2$ becomes $[-1, 1]^2$), which keeps the Hessian of the task
    loss, hence the stiffness of the gradient flow, moderate.
    """

    model: Callable
    scale: float = eqx.field(static=True)

    def __call__(self, x):
        return self.model(x * self.scale)


# --------------------------------------------------------------------------- MLP


class MLP(eqx.Module):
    r"""A fully connected network, applied to **one example** `(in_size,)`.

    `depth` hidden layers of `width` units, each followed by `activation`, then
    a linear output layer: `in_size -> width -> ... -> width -> out_size`
    (`depth + 1` linear layers). A-MAML uses `MLP(2, 1, 32, 2)` for the 2-D
    regressions and `MLP(d, 1, 40, 2)` for collaborative filtering, with tanh.
    Weights and biases use equinox's default initialisation,
    $U(-1/\sqrt{\text{fan\_in}}, 1/\sqrt{\text{fan\_in}})$.

    Use [`apply_to_set`][] (a vmap) to apply it to a set `(K, in_size)`.
    """

    layers: tuple[eqx.nn.Linear, ...]
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        width: int,
        depth: int,
        activation: Callable = jnp.tanh,
        *,
        dtype=None,
        key: jax.Array,
    ):
        in_size = check_int("in_size", in_size)
        out_size = check_int("out_size", out_size)
        width = check_int("width", width)
        depth = check_int("depth", depth, minimum=0)
        sizes = [in_size] + [width] * depth + [out_size]
        keys = jax.random.split(key, depth + 1)
        dtype = _float_dtype(dtype)
        self.layers = tuple(
            eqx.nn.Linear(a, b, dtype=dtype, key=k)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys)
        )
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x (in_size,)` -> `(out_size,)`."""
        if x.ndim != 1:
            raise InputError(
                f"MLP takes one example of shape (in_size,), got shape {x.shape}; "
                "use ctmeta.models.apply_to_set(model, x) for a set (K, in_size)"
            )
        x = x.astype(jnp.result_type(x, self.layers[0].weight))
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


# ----------------------------------------------------------------- conv layers


CONV_IMPLS = ("auto", "xla", "im2col")


def _check_conv_impl(impl: str) -> str:
    if impl not in CONV_IMPLS:
        raise InputError(f"conv_impl must be one of {', '.join(CONV_IMPLS)}; got {impl!r}")
    return impl


def _conv_im2col(x: jax.Array, weight: jax.Array, padding: int) -> jax.Array:
    """The same convolution as one matrix product over image patches (NHWC inside)."""
    n, c, h, w = x.shape
    out, _, k, _ = weight.shape
    xt = jnp.transpose(x, (0, 2, 3, 1))
    if padding:
        xt = jnp.pad(xt, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    if k == 1:
        cols = xt
    else:  # (n, ho, wo, k*k*c): patch entry (i, j, channel) in that order
        cols = jnp.concatenate([xt[:, i:i + ho, j:j + wo, :] for i in range(k) for j in range(k)], axis=-1)
    kernel = jnp.transpose(weight, (2, 3, 1, 0)).reshape(k * k * c, out)
    y = cols.reshape(n * ho * wo, k * k * c) @ kernel
    return jnp.transpose(y.reshape(n, ho, wo, out), (0, 3, 1, 2))


def conv2d(x: jax.Array, weight: jax.Array, padding: int, impl: str = "auto") -> jax.Array:
    """Stride-1 2-D convolution, `x (K, C_in, H, W)`, `weight (C_out, C_in, k, k)`.

    `impl`:

    - `"xla"`: `lax.conv_general_dilated` (cuDNN on a GPU).
    - `"im2col"`: the same sum as a matrix product over the `k x k` patches
      of the input (memory: `k^2` times the input's activations). Its
      derivatives of every order are matrix products too.
    - `"auto"` (default): `"im2col"` on the CPU backend, `"xla"` elsewhere.

    Why: XLA:CPU runs a convolution fast (Eigen) only in its canonical layout
    (NHWC input, HWIO kernel), and its pass that rewrites other convolutions
    into that layout visits the entry computation only, not the bodies of
    loops. The convolutions of a gradient (and of a Hessian-vector product)
    are not canonical, so inside the inner loops of the adaptation (Dopri5's
    `while`, the adjoint sweep's `scan`, MAML's unrolled steps) they fall
    back to a naive loop nest: measured on Conv-4, Omniglot 20-way 1-shot,
    0.32 s per gradient in a loop against 0.025 s alone. Matrix products
    have no such limit: a Conv-4 gradient in a loop is then as fast as alone
    (scripts/conv_in_loop.py).
    """
    _check_conv_impl(impl)
    if impl == "auto":
        impl = "im2col" if jax.default_backend() == "cpu" else "xla"
    if impl == "im2col":
        return _conv_im2col(x, weight, padding)
    return lax.conv_general_dilated(
        x,
        weight,
        window_strides=(1, 1),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )


class Conv2d(eqx.Module):
    """A 2-D convolution applied to a set `(K, C_in, H, W) -> (K, C_out, H', W')`.

    Stride 1, zero padding `padding` on each side. The weight
    `(C_out, C_in, k, k)` is He (Kaiming) normal, `N(0, 2 / (C_in k^2))`,
    which keeps activations of unit scale through ReLU layers; the bias, if
    any, starts at zero. Convolutions that feed a batch norm have no bias: the
    norm's mean subtraction would cancel it (and its gradient would be zero).
    `impl` chooses how the convolution is computed (see [`conv2d`][]).
    """

    weight: jax.Array
    bias: jax.Array | None
    padding: int = eqx.field(static=True)
    impl: str = eqx.field(static=True, default="auto")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        padding: int = 1,
        use_bias: bool = False,
        *,
        impl: str = "auto",
        dtype=None,
        key: jax.Array,
    ):
        in_channels = check_int("in_channels", in_channels)
        out_channels = check_int("out_channels", out_channels)
        kernel_size = check_int("kernel_size", kernel_size)
        self.impl = _check_conv_impl(impl)
        dtype = _float_dtype(dtype)
        fan_in = in_channels * kernel_size * kernel_size
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_in)
        self.bias = jnp.zeros((out_channels,), dtype) if use_bias else None
        self.padding = check_int("padding", padding, minimum=0)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = jnp.result_type(x, self.weight)
        y = conv2d(x.astype(dtype), self.weight.astype(dtype), self.padding, self.impl)
        if self.bias is not None:
            y = y + self.bias[None, :, None, None]
        return y


class SetBatchNorm(eqx.Module):
    r"""Batch norm with the statistics of the set it is applied to (no state).

    For `x (K, C, ...)`, per channel `c`, over the set axis and the trailing
    (spatial) axes: $y = (x - \mu_c) / \sqrt{\sigma_c^2 + \epsilon}\, w_c + b_c$,
    with the biased variance. `weight` starts at 1 and `bias` at 0.
    """

    weight: jax.Array
    bias: jax.Array
    eps: float = eqx.field(static=True)

    def __init__(self, channels: int, eps: float = 1e-5, *, dtype=None):
        channels = check_int("channels", channels)
        dtype = _float_dtype(dtype)
        self.weight = jnp.ones((channels,), dtype)
        self.bias = jnp.zeros((channels,), dtype)
        self.eps = float(eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        axes = (0, *range(2, x.ndim))
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        xhat = (x - mean) * lax.rsqrt(var + self.eps)
        return xhat * self.weight.reshape(shape) + self.bias.reshape(shape)


def max_pool2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 over the last two axes of `(K, C, H, W)`.

    An odd row or column at the end is dropped (floor), so 21 -> 10.
    """
    k, c, h, w = x.shape
    h, w = h // 2, w // 2
    # A reshape, rather than lax.reduce_window, so that reverse mode works
    # under every transform and dtype.
    return x[:, :, : 2 * h, : 2 * w].reshape(k, c, h, 2, w, 2).max(axis=(3, 5))


def avg_pool2x2(x: jax.Array) -> jax.Array:
    """2x2 average pool with stride 2, as `max_pool2x2` (floor on odd sizes).

    Linear, so a network with it and a smooth activation has a smooth loss:
    its gradient flow has no switches (a max-pool's gradient jumps where the
    largest of four inputs changes)."""
    k, c, h, w = x.shape
    h, w = h // 2, w // 2
    return x[:, :, : 2 * h, : 2 * w].reshape(k, c, h, 2, w, 2).mean(axis=(3, 5))


POOLS = {"max": max_pool2x2, "avg": avg_pool2x2}


def _check_set_input(name: str, x: jax.Array, channels: int) -> None:
    # Shapes are static under jit, so this check costs nothing at run time.
    if x.ndim != 4 or x.shape[1] != channels:
        raise InputError(
            f"{name} takes a set of images (K, {channels}, H, W), got shape "
            f"{x.shape}; a single image needs a leading set axis, x[None]"
        )


# ------------------------------------------------------------------------ Conv-4


class ConvBlock(eqx.Module):
    """conv3x3 (padding 1, no bias) -> set batch norm -> activation (ReLU) -> 2x2 pool (max)."""

    conv: Conv2d
    norm: SetBatchNorm
    activation: Callable = eqx.field(static=True)
    pool: str = eqx.field(static=True)

    def __init__(self, in_channels: int, out_channels: int, *, activation: Callable = jax.nn.relu,
                 pool: str = "max", conv_impl: str = "auto", dtype=None, key):
        if pool not in POOLS:
            raise InputError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.conv = Conv2d(in_channels, out_channels, 3, 1, impl=conv_impl, dtype=dtype, key=key)
        self.norm = SetBatchNorm(out_channels, dtype=dtype)
        self.activation = activation
        self.pool = pool

    def __call__(self, x: jax.Array) -> jax.Array:
        return POOLS[self.pool](self.activation(self.norm(self.conv(x))))


class Conv4(SetModule):
    """The four-block convolutional network of the few-shot benchmarks.

    Applied to a **set** of images `x (K, C, H, W)` (batch norm uses the set's
    statistics). Four [`ConvBlock`][]s of `hidden` channels halve the
    spatial size each (floor): 28 -> 14 -> 7 -> 3 -> 1 and
    84 -> 42 -> 21 -> 10 -> 5. The output is flattened in `(C, H, W)` order:

    - `out_size=None`: an embedding network, `(K, hidden * h * w)`, i.e. 64
      features for Omniglot 28x28 and 64*5*5 = 1600 for miniImageNet 84x84
      (COMLN, ANIL: a separate head adapts on top).
    - `out_size=n`: a linear head follows, `(K, n)` logits, for MAML-style
      whole-network adaptation. The head's input width depends on the image
      size, so `image_size` (28 or 84, say) is then required.

    `activation` (ReLU) and `pool` (`"max"`) are the benchmarks' network by
    default. Their derivatives jump, so the gradient flow of a whole-network
    adaptation (A-MAML) has a discontinuous vector field, on which every
    solver is first order. A smooth activation (`jax.nn.softplus`,
    `jax.nn.gelu`) with `pool="avg"` makes it smooth (docs/bench.md).
    """

    blocks: tuple[ConvBlock, ...]
    head: eqx.nn.Linear | None
    in_channels: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_size: int | None = None,
        *,
        hidden: int = 64,
        image_size: int | tuple[int, int] | None = None,
        activation: Callable = jax.nn.relu,
        pool: str = "max",
        conv_impl: str = "auto",
        dtype=None,
        key: jax.Array,
    ):
        self.in_channels = check_int("in_channels", in_channels)
        if not callable(activation):
            raise InputError(f"Conv4's activation must be a function (jax.nn.relu, say), got {activation!r}")
        hidden = check_int("hidden", hidden)
        _check_conv_impl(conv_impl)
        # Size the head first, so that a bad argument fails before any work.
        if out_size is not None:
            out_size = check_int("out_size", out_size)
            if image_size is None:
                raise InputError(
                    "Conv4 with a linear head (out_size given) needs image_size, "
                    "e.g. 28 for Omniglot or 84 for miniImageNet, to size the head"
                )
            h, w = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
            h, w = check_int("image_size", h) // 16, check_int("image_size", w) // 16
            if h * w == 0:
                raise InputError(f"image_size {image_size} is too small for 4 pools (min 16)")
        keys = jax.random.split(key, 5)
        widths = [self.in_channels] + [hidden] * 4
        self.blocks = tuple(
            ConvBlock(a, b, activation=activation, pool=pool, conv_impl=conv_impl, dtype=dtype, key=k)
            for a, b, k in zip(widths[:-1], widths[1:], keys[:4])
        )
        if out_size is None:
            self.head = None
        else:
            self.head = eqx.nn.Linear(
                hidden * h * w, out_size, dtype=_float_dtype(dtype), key=keys[4]
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x (K, C, H, W)` -> `(K, features)` or `(K, out_size)`."""
        _check_set_input("Conv4", x, self.in_channels)
        if self.head is not None:
            # Check before computing: the features are hidden * (H/16) * (W/16).
            h, w = x.shape[2] // 16, x.shape[3] // 16
            features = self.blocks[-1].conv.weight.shape[0] * h * w
            if features != self.head.in_features:
                raise InputError(
                    f"Conv4's head expects {self.head.in_features} features but "
                    f"{x.shape[2]}x{x.shape[3]} images give {features}: build the model "
                    "with image_size set to the input's size"
                )
        for block in self.blocks:
            x = block(x)
        x = x.reshape(x.shape[0], -1)
        if self.head is not None:
            x = jax.vmap(self.head)(x)
        return x


# --------------------------------------------------------------------- ResNet-12


class ResidualBlock(eqx.Module):
    """One ResNet-12 block, on a set `(K, C_in, H, W) -> (K, C_out, H/2, W/2)`.

    Main path: three conv3x3 -> set batch norm, with leaky ReLU (slope 0.1)
    after the first two; shortcut: conv1x1 -> set batch norm. The sum goes
    through leaky ReLU and a 2x2 max-pool (MetaOptNet's block, without
    DropBlock).
    """

    convs: tuple[Conv2d, Conv2d, Conv2d]
    norms: tuple[SetBatchNorm, SetBatchNorm, SetBatchNorm]
    shortcut_conv: Conv2d
    shortcut_norm: SetBatchNorm
    slope: float = eqx.field(static=True)

    def __init__(self, in_channels: int, out_channels: int, *, slope=0.1, conv_impl: str = "auto", dtype=None, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.convs = (
            Conv2d(in_channels, out_channels, 3, 1, impl=conv_impl, dtype=dtype, key=k1),
            Conv2d(out_channels, out_channels, 3, 1, impl=conv_impl, dtype=dtype, key=k2),
            Conv2d(out_channels, out_channels, 3, 1, impl=conv_impl, dtype=dtype, key=k3),
        )
        self.norms = tuple(SetBatchNorm(out_channels, dtype=dtype) for _ in range(3))
        self.shortcut_conv = Conv2d(in_channels, out_channels, 1, 0, impl=conv_impl, dtype=dtype, key=k4)
        self.shortcut_norm = SetBatchNorm(out_channels, dtype=dtype)
        self.slope = float(slope)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            y = norm(conv(y))
            if i < 2:
                y = jax.nn.leaky_relu(y, self.slope)
        y = y + self.shortcut_norm(self.shortcut_conv(x))
        return max_pool2x2(jax.nn.leaky_relu(y, self.slope))


class ResNet12(SetModule):
    """ResNet-12: four [`ResidualBlock`][]s, applied to a **set** `(K, C, H, W)`.

    Widths `channels` (default 64, 160, 320, 640, as in MetaOptNet and
    COMLN); each block halves the spatial size, 84 -> 42 -> 21 -> 10 -> 5.

    - `global_pool=True`: average over the final spatial map, `(K, 640)`.
    - `global_pool=False`: flatten it in `(C, H, W)` order,
      `(K, 640 * 5 * 5) = (K, 16000)` on 84x84 inputs (COMLN's setting).

    It is an embedding network: a linear head adapts on top (COMLN, ANIL).
    `conv_impl`: see [`conv2d`][] (an embedding outside any loop does best
    with `"xla"`).
    """

    blocks: tuple[ResidualBlock, ...]
    in_channels: int = eqx.field(static=True)
    global_pool: bool = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        *,
        channels: Sequence[int] = (64, 160, 320, 640),
        global_pool: bool = True,
        conv_impl: str = "auto",
        dtype=None,
        key: jax.Array,
    ):
        self.in_channels = check_int("in_channels", in_channels)
        _check_conv_impl(conv_impl)
        channels = [check_int("channels", c) for c in channels]
        if not channels:
            raise InputError("channels must name at least one block width")
        keys = jax.random.split(key, len(channels))
        widths = [self.in_channels] + channels
        self.blocks = tuple(
            ResidualBlock(a, b, conv_impl=conv_impl, dtype=dtype, key=k)
            for a, b, k in zip(widths[:-1], widths[1:], keys)
        )
        self.global_pool = bool(global_pool)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x (K, C, H, W)` -> `(K, channels[-1])` pooled, or `(K, c * h * w)`."""
        _check_set_input("ResNet12", x, self.in_channels)
        for block in self.blocks:
            x = block(x)
        if self.global_pool:
            return jnp.mean(x, axis=(2, 3))
        return x.reshape(x.shape[0], -1)
