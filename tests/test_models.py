"""ctmeta.models: shapes, per-set batch norm, parameters and gradients.

On a small CPU, XLA compilation dominates these tests: building a model
compiles one random-number kernel per distinct weight shape (about a second
each), and each new input shape compiles a forward pass. So the test models
are narrow and share weight shapes (width 4 everywhere), inputs come from
numpy, and full-size models are checked abstractly with `eval_shape`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctmeta._errors import InputError
from ctmeta.models import (
    MLP,
    Conv2d,
    Conv4,
    ResNet12,
    SetBatchNorm,
    SetModule,
    apply_to_set,
    conv2d,
    feature_size,
    max_pool2x2,
)

KEY = jax.random.key(0)
WIDTH = 4
apply = eqx.filter_jit(apply_to_set)


def _images(seed, k, c=1, h=28):
    return jnp.asarray(np.random.default_rng(seed).random((k, c, h, h), dtype=np.float32))


def _abstract(make):
    """Build a model without computing anything (shapes and dtypes only)."""
    return eqx.filter_eval_shape(make)


def _out_shape(model, x_shape):
    return eqx.filter_eval_shape(apply_to_set, model, jax.ShapeDtypeStruct(x_shape, jnp.float32)).shape


@pytest.fixture(scope="module")
def conv4():
    """Conv-4 of width 4 with a 4-way head for 28x28 images."""
    return Conv4(1, WIDTH, hidden=WIDTH, image_size=28, key=KEY)


@pytest.fixture(scope="module")
def resnet():
    """A two-block ResNet-12 of width 4 (the full depth is checked abstractly)."""
    return ResNet12(1, channels=(WIDTH, WIDTH), global_pool=False, key=KEY)


def _check_gradients(model, x):
    """The gradient of a generic loss w.r.t. every parameter leaf is finite and non-zero."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    out_shape = _out_shape(model, x.shape)
    proj = jnp.asarray(np.random.default_rng(7).standard_normal(out_shape))

    @jax.jit
    def loss(p):
        return jnp.sum(jnp.tanh(apply_to_set(eqx.combine(p, static), x)) * proj)

    grads = jax.grad(loss)(params)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == len(jax.tree.leaves(params)) > 0
    for g in leaves:
        assert bool(jnp.all(jnp.isfinite(g)))
        assert float(jnp.max(jnp.abs(g))) > 0


# ------------------------------------------------------------------------ MLP


def test_mlp_structure_for_a_maml():
    model = _abstract(lambda: MLP(2, 1, 32, 2, key=KEY))  # the 2-D regression network
    assert not isinstance(model, SetModule)
    assert [l.weight.shape for l in model.layers] == [(32, 2), (32, 32), (1, 32)]
    # Every inexact-array leaf is a weight or a bias: 2 -> 32 -> 32 -> 1.
    leaves = jax.tree.leaves(model)
    assert all(jnp.issubdtype(l.dtype, jnp.floating) for l in leaves)
    assert sum(np.prod(l.shape) for l in leaves) == (2 * 32 + 32) + (32 * 32 + 32) + (32 + 1)
    assert _out_shape(model, (7, 2)) == (7, 1)
    assert _out_shape(_abstract(lambda: MLP(50, 1, 40, 2, key=KEY)), (3, 50)) == (3, 1)


def test_mlp_forward_and_gradients():
    model = MLP(WIDTH, WIDTH, WIDTH, 2, key=KEY)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((7, WIDTH)))
    ys = apply(model, x)
    assert ys.shape == (7, WIDTH)
    # apply_to_set vmaps the per-example module; compare with a hand-written pass.
    h = np.asarray(x[2])
    for layer in model.layers[:-1]:
        h = np.tanh(np.asarray(layer.weight) @ h + np.asarray(layer.bias))
    last = model.layers[-1]
    np.testing.assert_allclose(ys[2], np.asarray(last.weight) @ h + np.asarray(last.bias), rtol=1e-6)
    _check_gradients(model, x)
    with pytest.raises(InputError, match="apply_to_set"):
        model(x)  # a set passed to the per-example module
    with pytest.raises(InputError, match="width"):
        MLP(2, 1, 0, 2, key=KEY)


# --------------------------------------------------------------------- Conv-4


def test_conv4_full_size_shapes():
    omniglot = _abstract(lambda: Conv4(1, key=KEY))
    assert isinstance(omniglot, SetModule)
    assert _out_shape(omniglot, (3, 1, 28, 28)) == (3, 64)
    assert feature_size(omniglot, (1, 28, 28)) == 64
    mini = _abstract(lambda: Conv4(3, key=KEY))
    assert _out_shape(mini, (3, 3, 84, 84)) == (3, 64 * 5 * 5)
    head = _abstract(lambda: Conv4(3, 5, image_size=84, key=KEY))
    assert head.head.weight.shape == (5, 1600)
    assert _out_shape(head, (4, 3, 84, 84)) == (4, 5)
    assert _out_shape(_abstract(lambda: Conv4(1, 20, image_size=28, key=KEY)), (2, 1, 28, 28)) == (2, 20)


def test_conv4_forward_and_parameters(conv4):
    logits = apply(conv4, _images(1, 6))
    assert logits.shape == (6, WIDTH)
    assert bool(jnp.all(jnp.isfinite(logits)))
    # Without the head: the embedding, 4 channels x 1 x 1 after four pools.
    assert feature_size(eqx.tree_at(lambda m: m.head, conv4, None), (1, 28, 28)) == WIDTH
    # Parameters are exactly the inexact-array leaves; convs before batch
    # norm carry no (useless) bias.
    leaves = jax.tree.leaves(conv4)
    assert all(eqx.is_inexact_array(l) for l in leaves)
    assert all(block.conv.bias is None for block in conv4.blocks)
    convs = WIDTH * 1 * 9 + 3 * (WIDTH * WIDTH * 9)
    norms = 4 * (2 * WIDTH)  # scale and shift per channel, per block
    head = WIDTH * WIDTH + WIDTH
    assert sum(l.size for l in leaves) == convs + norms + head


def test_conv4_errors(conv4):
    with pytest.raises(InputError, match="image_size"):
        Conv4(1, 5, key=KEY)
    with pytest.raises(InputError, match="image_size"):
        conv4(jnp.zeros((2, 1, 84, 84)))  # the head was sized for 28x28
    with pytest.raises(InputError, match=r"x\[None\]"):
        conv4(jnp.zeros((1, 28, 28)))  # a single image without the set axis
    with pytest.raises(InputError, match=r"\(K, 1, H, W\)"):
        conv4(jnp.zeros((2, 3, 28, 28)))  # wrong channel count


def test_conv4_gradients(conv4):
    _check_gradients(conv4, _images(3, 6))


# ------------------------------------------------------------------ ResNet-12


def test_resnet12_full_size_shapes():
    flat = _abstract(lambda: ResNet12(3, global_pool=False, key=KEY))
    assert _out_shape(flat, (2, 3, 84, 84)) == (2, 640 * 5 * 5) == (2, 16000)
    pooled = _abstract(lambda: ResNet12(3, key=KEY))
    assert _out_shape(pooled, (2, 3, 84, 84)) == (2, 640)
    widths = [(64, 3), (160, 64), (320, 160), (640, 320)]
    assert [b.convs[0].weight.shape[:2] for b in pooled.blocks] == widths
    block = pooled.blocks[1]
    assert [c.weight.shape for c in block.convs] == [(160, 64, 3, 3), (160, 160, 3, 3), (160, 160, 3, 3)]
    assert block.shortcut_conv.weight.shape == (160, 64, 1, 1)
    assert block.slope == 0.1


def test_resnet12_forward(resnet):
    y = apply(resnet, _images(4, 6))  # 28 -> 14 -> 7 with two blocks
    assert y.shape == (6, WIDTH * 7 * 7)
    assert bool(jnp.all(jnp.isfinite(y)))
    assert all(eqx.is_inexact_array(l) for l in jax.tree.leaves(resnet))


def test_resnet12_gradients(resnet):
    _check_gradients(resnet, _images(5, 6))


def test_he_initialisation(conv4, resnet):
    # Weights are N(0, 2 / fan_in); pool the 1008 weights with fan_in = 36.
    ws = [b.conv.weight for b in conv4.blocks[1:]]
    ws += [c.weight for b in resnet.blocks for c in b.convs[1:]]
    w = np.concatenate([np.ravel(x) for x in ws])
    assert w.size == 7 * WIDTH * WIDTH * 9
    np.testing.assert_allclose(w.std(), np.sqrt(2 / (WIDTH * 9)), rtol=0.1)
    assert abs(w.mean()) < 0.1


# ----------------------------------------------------------------- batch norm


def test_set_batch_norm_normalises_with_set_statistics():
    x = 3.0 + 2.0 * np.random.default_rng(0).standard_normal((6, 5, 4, 4))
    norm = eqx.filter_jit(lambda m, x: m(x))
    y = np.asarray(norm(SetBatchNorm(5), x))
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0.0, atol=1e-6)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1.0, atol=1e-4)
    # Learnable scale and shift.
    bn = eqx.tree_at(lambda m: (m.weight, m.bias), SetBatchNorm(5), (2 * jnp.ones(5), jnp.arange(5.0)))
    y = np.asarray(norm(bn, x))
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), np.arange(5.0), atol=1e-6)
    np.testing.assert_allclose(y.std(axis=(0, 2, 3)), 2.0, atol=1e-4)


@pytest.mark.parametrize("name", ["conv4", "resnet"])
def test_conv_models_are_transductive(name, request):
    model = request.getfixturevalue(name)
    x = _images(6, 6)
    y = apply(model, x)
    # The first layers (conv without bias, then batch norm) are linear, so
    # scaling the whole set is undone by normalising with the set's own
    # statistics; large scales make batch norm's eps negligible.
    np.testing.assert_allclose(apply(model, 1e3 * x), apply(model, 3e3 * x), rtol=1e-3, atol=1e-4)
    # Permuting the set permutes the outputs.
    perm = jnp.array([3, 0, 5, 1, 2, 4])
    np.testing.assert_allclose(apply(model, x[perm]), y[perm], rtol=1e-6, atol=1e-6)
    # But an example's output depends on the rest of its set: no running stats.
    other = x.at[1:].multiply(0.2)
    assert float(jnp.max(jnp.abs(apply(model, other)[0] - y[0]))) > 1e-3


# ------------------------------------------------------------------- helpers


def test_dtype_argument_and_promotion(conv4):
    assert _abstract(lambda: Conv2d(1, 2, dtype=jnp.float32, key=KEY)).weight.dtype == jnp.float32
    head = _abstract(lambda: Conv4(3, 5, image_size=84, dtype=jnp.float32, key=KEY)).head
    assert head.weight.dtype == jnp.float32
    assert SetBatchNorm(3, dtype=jnp.float32).weight.dtype == jnp.float32
    # Default float (float64 in this test session); float32 images are promoted.
    conv = conv4.blocks[0].conv
    assert conv.weight.dtype == jnp.float64 and conv.bias is None
    y = eqx.filter_jit(lambda m, x: m(x))(conv, jnp.ones((1, 1, 5, 5), jnp.float32))
    assert y.dtype == jnp.float64 and y.shape == (1, WIDTH, 5, 5)  # padding 1 keeps the size
    np.testing.assert_allclose(y[0, :, 2, 2], np.asarray(conv.weight).sum(axis=(1, 2, 3)), rtol=1e-12)


def test_max_pool_floors_odd_sizes():
    x = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)
    y = jax.jit(max_pool2x2)(x)
    assert y.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(y[1, 2], x[1, 2, 1:4:2, 1:4:2])


@pytest.mark.parametrize("k,padding,size", [(3, 1, 7), (1, 0, 5), (3, 0, 6), (5, 2, 6)])
def test_conv2d_im2col_equals_xla_with_first_and_second_derivatives(k, padding, size):
    """The matrix-product convolution is the same function as XLA's: values,
    gradients (w.r.t. input and weight) and Hessian-vector products (the
    jvp of a gradient, as the adjoint sweep takes it), in float64."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(k * 10 + padding)
        x = jnp.asarray(rng.normal(size=(3, 2, size, size)))
        w = jnp.asarray(rng.normal(size=(4, 2, k, k)))
        v = (jnp.asarray(rng.normal(size=x.shape)), jnp.asarray(rng.normal(size=w.shape)))

        def loss(impl):
            # Non-quadratic, so that the Hessian depends on the point.
            return lambda xw: jnp.sum(jnp.tanh(conv2d(xw[0], xw[1], padding, impl)) ** 2)

        outs = {}
        for impl in ("xla", "im2col"):
            y = conv2d(x, w, padding, impl)
            g = jax.grad(loss(impl))((x, w))
            hv = jax.jvp(jax.grad(loss(impl)), ((x, w),), (v,))[1]
            outs[impl] = (y, g, hv)
        assert outs["xla"][0].shape == (3, 4, size + 2 * padding - k + 1, size + 2 * padding - k + 1)
        for a, b in zip(jax.tree.leaves(outs["xla"]), jax.tree.leaves(outs["im2col"])):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_conv_impl_is_checked_and_kept(conv4):
    with pytest.raises(InputError, match="conv_impl"):
        Conv4(1, hidden=WIDTH, conv_impl="fft", key=KEY)
    with pytest.raises(InputError, match="conv_impl"):
        conv2d(jnp.zeros((1, 1, 3, 3)), jnp.zeros((1, 1, 3, 3)), 1, "cudnn")
    xla = Conv4(1, WIDTH, hidden=WIDTH, image_size=28, conv_impl="xla", key=KEY)
    assert {b.conv.impl for b in xla.blocks} == {"xla"} and {b.conv.impl for b in conv4.blocks} == {"auto"}
    x = _images(3, 5)
    # Same parameters (same key), other convolution: same outputs up to float32 rounding.
    np.testing.assert_allclose(apply(xla, x), apply(conv4, x), rtol=1e-4, atol=1e-4)
