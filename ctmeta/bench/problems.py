r"""The benchmarks' problems: parameters, a meta-batch, and each method's per-task objective.

A problem holds the meta-parameters $\theta$, one meta-batch of tasks
$(x^s, y^s, x^q, y^q)$ with a leading task axis, the inner loss
$L^s(u) = \ell(f_u(x^s), y^s)$ and the query loss $L^q(u) = \ell(f_u(x^q), y^q)$.
A method adapts $u(T)$ from $\theta$ on $L^s$ (the gradient flow
$\dot u = -\nabla L^s(u)$ up to $T = K h$, or $K$ steps of it) and the
benchmark differentiates $L^q(u(T))$ with respect to $\theta$.

The flow cases (`amaml-preconditioned`, `amaml-heavy-ball`,
`maml-preconditioned`) adapt by another inner flow (`ctmeta.flows`: a learned
diagonal preconditioner $\dot u = -P \nabla L^s(u)$, $P = e^\rho$, or the
heavy ball $\dot u = v$, $\dot v = -\gamma v - \nabla L^s(u)$) and
differentiate with respect to $(\theta, \text{flow})$: $\rho$ or $\log\gamma$
beside the initialisation, as `ctmeta train --flow` learns them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import ode
from .._errors import InputError
from ..ode._adaptive import recorded_forward
from ..ode import SolveOptions
from .._paths import data_root
from ..adaptation import gradient_flow
from ..linear_flow import linear_flow, linear_flow_adapt
from ..losses import cross_entropy, mse
from ..methods import Adjoint, GradientField
from ..presets import build_method

__all__ = ["H", "BENCHMARKS", "OPTIONAL_METHODS", "FLOW_CASES", "Problem", "make_problem", "checkpoints_for", "rule", "head_loss"]

PyTree = Any

#: The inner learning rate `h`: `T = steps * h` (A-MAML and COMLN both use 0.01).
H = 0.01

#: benchmark -> its methods, in plotting order.
BENCHMARKS: dict[str, tuple[str, ...]] = {
    "cosmixture": ("maml", "fomaml", "reptile", "imaml", "amaml", "amaml-ckpt", "amaml-adaptive",
                   "amaml-preconditioned", "amaml-heavy-ball", "maml-preconditioned"),
    "omniglot": ("comln", "comln-euler", "anil", "maml", "amaml", "amaml-ckpt", "amaml-adaptive"),
    "miniimagenet": ("comln", "comln-euler", "anil", "maml", "amaml", "amaml-ckpt", "amaml-adaptive"),
    # COMLN's own embedding (Fig. 4, Appendix E.2): ResNet-12 without global
    # pooling, d = 640 * 5 * 5 = 16,000 features on 84x84 images, where the
    # head's unrolled graph (ANIL) is no longer small beside the embedding's.
    "miniimagenet-resnet12": ("comln", "comln-euler", "anil"),
}

#: benchmark -> methods measured only when named in `--cases` (e.g. `cosmixture/amaml-rkc2`), so the
#: committed default sweeps stay what they measured: `amaml-rkc2` is A-MAML's adaptive rule with the
#: RKC2 solver forward and backward (`Adjoint(solver="rkc2")`), its rows with its stiffness
#: (`rho_max`, `max_stages`) and steps.
OPTIONAL_METHODS: dict[str, tuple[str, ...]] = {
    "cosmixture": ("amaml-rkc2",), "omniglot": ("amaml-rkc2",), "miniimagenet": ("amaml-rkc2",)}

#: The adaptive A-MAML rules -> their forward solver.
ADAPTIVE_SOLVER = {"amaml-adaptive": "dopri5", "amaml-rkc2": "rkc2"}


#: A flow case -> (the method name of its rule, its flow's `presets` name): A-MAML's
#: flows take its default rule, the adaptive backward (`Adjoint()`); Meta-SGD is
#: MAML's `Unrolled(K)` through the preconditioned flow's Euler steps.
FLOW_CASES: dict[str, tuple[str, str]] = {
    "amaml-preconditioned": ("amaml-adaptive", "preconditioned"),
    "amaml-heavy-ball": ("amaml-adaptive", "heavy-ball"),
    "maml-preconditioned": ("maml", "preconditioned"),
}


def checkpoints_for(steps: int) -> int:
    """The number of checkpoints of `amaml-ckpt`: the divisor of `steps` nearest `sqrt(steps)`.

    Ties go to the smaller divisor (fewer kept states). `Adjoint` needs a
    divisor; for a prime `steps` this is 1 (one segment re-integrated whole).
    """
    root = math.sqrt(steps)
    divisors = [d for d in range(1, steps + 1) if steps % d == 0]
    return min(divisors, key=lambda d: (abs(d - root), d))


#: A benchmark's method name -> the `presets` method whose rule it measures.
_PRESET_METHOD = {"maml": "maml", "fomaml": "fomaml", "reptile": "reptile", "imaml": "imaml", "anil": "anil",
                  "amaml": "amaml", "amaml-ckpt": "amaml", "amaml-adaptive": "amaml", "amaml-rkc2": "amaml"}


def rule(method: str, steps: int, dense_steps: int | None = None):
    """The `ctmeta.methods` rule of a method name at `steps` inner steps, built by
    `presets.build_method` with the presets' options (the rule `ctmeta train` uses).

    `amaml` is the stored sweep over `steps` states, `amaml-ckpt` the same with
    [`checkpoints_for`][ctmeta.bench.problems.checkpoints_for]`(steps)` checkpoints,
    `amaml-adaptive` the adaptive backward (`Adjoint()`) at the same horizon,
    its dense output holding `dense_steps` accepted steps."""
    if method not in _PRESET_METHOD:
        raise InputError(f"unknown method {method!r}; choose from {sorted(_PRESET_METHOD)}")
    adaptive = method in ADAPTIVE_SOLVER
    options = {"dense_steps": dense_steps or 256, "solver": ADAPTIVE_SOLVER[method]} if adaptive else {}
    config = {"method": _PRESET_METHOD[method], "steps": None if adaptive else steps, "method_options": options}
    built = build_method(config)
    if method == "amaml-ckpt":  # the presets have no checkpointed rule: the same one, checkpointed
        built = dataclasses.replace(built, checkpoints=checkpoints_for(steps))
    return built


def head_loss(W, data):
    r"""The inner loss of a linear head, $\ell(W) = \mathrm{CE}(F W^\top, y)$, `data = (F, y)`."""
    features, labels = data
    return cross_entropy(features @ W.T, labels)


@dataclasses.dataclass
class Problem:
    """One benchmark's data and model.

    `params` are the meta-parameters (array leaves, `None` elsewhere) and
    `batch` a tuple `(support_x, support_y, query_x, query_y)` with a leading
    task axis. `task_objective(method, steps)` returns `(loss, forward,
    adapt)`: the per-task query loss after adaptation (differentiated for the
    meta-gradient), the per-task function timed as the forward pass, and (for
    whole-model methods, else `None`) the adaptation `adapt(params, task)`.
    """

    name: str
    params: PyTree
    batch: tuple
    meta_batch: int
    dtype: str
    data: str
    whole_loss: Callable  # (params, (x, y)) -> inner loss of the whole model
    whole_outer: Callable  # (adapted params, task) -> query loss
    head: dict | None = None  # for Conv-4: features, W0 handling

    def task_objective(self, method: str, steps: int):
        T = steps * H
        if method in ("comln", "comln-euler", "anil"):
            return self._head_objective(method, steps, T)
        base, flow = self.rule_and_flow(method)
        flow_rule = rule(base, steps, self.dense_steps(T, flow, ADAPTIVE_SOLVER[base]) if base in ADAPTIVE_SOLVER
                         else None)

        def adapt(meta_params, task):
            params, flow_ = meta_params if flow is not None else (meta_params, None)
            return gradient_flow(self.whole_loss, params, (task[0], task[1]), T, method=flow_rule, flow=flow_)

        def loss(meta_params, task):
            return self.whole_outer(adapt(meta_params, task), task)

        return loss, loss, adapt

    def rule_and_flow(self, method: str):
        """`(method name of the rule, inner flow or None)`: the flow of a flow case
        starts where `ctmeta train --flow` starts it (P = I, gamma = 1)."""
        if method not in FLOW_CASES:
            return method, None
        from ..presets import build_flow

        base, name = FLOW_CASES[method]
        flow = build_flow({"method": _PRESET_METHOD[base], "flow": {"name": name}}, self.params)
        return base, flow.astype(jnp.float32)  # the problems are float32, whatever `jax_enable_x64`

    def meta_params(self, method: str):
        """What `method`'s meta-gradient differentiates: the initialisation, and
        for a flow case `(initialisation, flow)`."""
        flow = self.rule_and_flow(method)[1]
        return self.params if flow is None else (self.params, flow)

    def forward_steps(self, T, flow=None, solver: str = "dopri5") -> int:
        """The most accepted steps the adaptive forward (`solver`, `Adjoint()`'s
        tolerances) of the gradient flow (or `flow`) takes over the meta-batch up to `T`."""
        field, y0 = self._field_and_start(flow)
        adjoint = Adjoint()
        opts = SolveOptions(steps=1, rtol=adjoint.rtol, atol=adjoint.atol, max_steps=adjoint.max_steps, solver=solver)

        def one(task):
            stats = recorded_forward(field, y0, jnp.asarray(T, jnp.float32), (task[0], task[1]), opts, None)[3]
            return stats["accepted_steps"] if isinstance(stats, dict) else stats.accepted_steps

        return int(np.max(jax.jit(jax.vmap(one))(self.batch)))

    def adaptive_steps(self, T, flow=None, solver: str = "dopri5") -> dict:
        """Accepted steps of the adaptive rule by `solver` (with `flow`) at `T`, forward and backward, the most
        over the meta-batch; for RKC2 also its stiffness: the largest spectral radius it used (`rho_max`, with
        its safety factor) and stage count."""
        field, y0 = self._field_and_start(flow)
        adjoint = Adjoint()
        sens = ode.AdaptiveAdjoint(self.dense_steps(T, flow, solver), adjoint.adjoint_rtol, adjoint.adjoint_atol)
        opts = SolveOptions(steps=1, rtol=adjoint.rtol, atol=adjoint.atol, max_steps=adjoint.max_steps, solver=solver)
        params_of = flow.params_of if flow is not None else (lambda y: y)

        def one(task):
            data = (task[0], task[1])
            Tj = jnp.asarray(T, jnp.float32)
            y1, dense, _, fstats = recorded_forward(field, y0, Tj, data, opts, sens.dense_steps)
            a_end = jax.grad(lambda y: self.whole_outer(params_of(y), task))(y1)
            _, _, _, bstats = ode.adjoint_backward(field, dense, Tj, data, a_end, sens, opts, (False, False))
            out = {"backward_steps": bstats["num_accepted_steps"]}
            if isinstance(fstats, dict):
                return {**out, "forward_steps": fstats["accepted_steps"]}
            return {**out, "forward_steps": fstats.accepted_steps, "rho_max": fstats.max_rho,
                    "max_stages": fstats.max_stages}

        got = jax.jit(jax.vmap(one))(self.batch)
        return {k: (float(np.max(v)) if k == "rho_max" else int(np.max(v))) for k, v in got.items()}

    def dense_steps(self, T, flow=None, solver: str = "dopri5") -> int:
        """A dense-output size for an adaptive rule: the forward's steps plus a quarter, rounded up to 16."""
        return 16 * math.ceil(1.25 * self.forward_steps(T, flow, solver) / 16)

    def _field_and_start(self, flow):
        if flow is None:
            return GradientField(self.whole_loss), self.params
        return flow.field(self.whole_loss), flow.init_state(self.params)

    def _head_objective(self, method, steps, T):
        features, split = self.head["features"], self.head["split"]
        ways = self.head["ways"]

        def head_parts(params, task):
            emb, W0 = split(params)
            fs, fq = features(emb, task[0]), features(emb, task[2])
            return W0, fs, fq

        def adapted_head(params, task, forward):
            W0, fs, fq = head_parts(params, task)
            sy = task[1]
            if method == "anil":
                W = gradient_flow(head_loss, W0, (fs, sy), T, method=rule("anil", steps))
            else:
                onehot = jax.nn.one_hot(sy, ways, dtype=fs.dtype)
                kw = dict(solver="euler", steps=steps) if method == "comln-euler" else dict(max_steps=16384)
                flow = linear_flow_adapt if forward else linear_flow
                W = flow(W0, fs, onehot, T, **kw)
            return fq @ W.T

        def loss(params, task):
            return cross_entropy(adapted_head(params, task, False), task[3])

        def forward(params, task):
            return cross_entropy(adapted_head(params, task, True), task[3])

        return loss, forward, None


def _f32(batch) -> tuple:
    return tuple(jnp.asarray(x, jnp.float32) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else jnp.asarray(x)
                 for x in batch)


def make_problem(name: str, meta_batch: int, *, data_dir=None, seed: int = 0, head_init: str = "zeros") -> Problem:
    """Build a benchmark's model, meta-batch and losses (float32 whatever `jax_enable_x64`)."""
    key = jax.random.PRNGKey(seed)
    if name == "cosmixture":
        from ..models import MLP, apply_to_set
        from ..tasks.regression import CosMixture

        family = CosMixture(shots=100, queries=100, num_train_tasks=max(100, meta_batch), seed=seed)
        batch = _f32(family.sample(key, meta_batch))
        model = MLP(2, 1, 32, 2, activation=jnp.tanh, dtype=jnp.float32, key=jax.random.fold_in(key, 1))
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def whole_loss(p, data):
            return mse(apply_to_set(eqx.combine(p, static), data[0]), data[1])

        def whole_outer(u, task):
            return mse(apply_to_set(eqx.combine(u, static), task[2]), task[3])

        return Problem(name, params, batch, meta_batch, "float32", "CosMixture 100shot-100val, MLP 2x32 tanh",
                       whole_loss, whole_outer)
    if name in ("omniglot", "miniimagenet"):
        return _image_problem(name, meta_batch, data_dir=data_dir, seed=seed, head_init=head_init)
    if name == "miniimagenet-resnet12":
        return _image_problem(name, meta_batch, data_dir=data_dir, seed=seed, head_init=head_init,
                              backbone="resnet12")
    raise InputError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")


def _image_problem(name, meta_batch, *, data_dir, seed, head_init="zeros", backbone="conv4"):
    """An image benchmark: Conv-4 (64 channels) or, with `backbone="resnet12"`, COMLN's ResNet-12
    without global pooling (head-only methods; the whole network never adapts there)."""
    from ..models import Conv4, ResNet12, apply_to_set

    ways, shots, queries = 5, 5, 15
    channels, size = (1, 28) if name == "omniglot" else (3, 84)
    net = "ResNet-12 without global pooling (d = 16,000)" if backbone == "resnet12" else "Conv-4 (64 ch)"
    key = jax.random.PRNGKey(seed)
    data_dir = data_root(data_dir)
    try:
        if name == "omniglot":
            from ..tasks.omniglot import Omniglot

            family = Omniglot(data_dir / "omniglot", ways=ways, shots=shots, queries=queries, progress=False)
        else:
            from ..tasks.miniimagenet import MiniImageNet

            family = MiniImageNet(data_dir / "miniimagenet", ways=ways, shots=shots, queries=queries,
                                  protocol="train64", progress=False)
        batch = _f32(family.sample(key, meta_batch, "train"))
        data = f"{name} {ways}-way {shots}-shot ({queries} queries/class), {net}, head init {head_init}"
    except Exception as err:  # data absent: same shapes, random pixels (memory and time do not depend on values)
        k1, k2 = jax.random.split(key)
        labels = lambda n: jnp.tile(jnp.repeat(jnp.arange(ways, dtype=jnp.int32), n), (meta_batch, 1))
        batch = (
            jax.random.uniform(k1, (meta_batch, ways * shots, channels, size, size), jnp.float32),
            labels(shots),
            jax.random.uniform(k2, (meta_batch, ways * queries, channels, size, size), jnp.float32),
            labels(queries),
        )
        data = f"synthetic {name}-shaped images ({type(err).__name__}: real data not loaded)"
    # The same parameters under two convolutions (as the presets build them):
    # XLA's for the head-only methods, whose embedding runs outside any loop,
    # and the default (matrix products on a CPU) for whole-network adaptation,
    # whose convolutions run inside the inner loops (`ctmeta.models.conv2d`).
    if backbone == "resnet12":
        make = lambda **kw: ResNet12(channels, global_pool=False, dtype=jnp.float32, key=jax.random.fold_in(key, 1), **kw)
    else:
        make = lambda **kw: Conv4(channels, hidden=64, dtype=jnp.float32, key=jax.random.fold_in(key, 1), **kw)
    embedding = make(conv_impl="xla")
    emb_params, emb_static = eqx.partition(embedding, eqx.is_inexact_array)
    whole_params, whole_static = eqx.partition(make(), eqx.is_inexact_array)
    whole_def = jax.tree.structure(whole_params)  # the convolution is static: the same leaves, another treedef
    d = 640 * 5 * 5 if backbone == "resnet12" else 64 * (size // 16) ** 2
    if head_init == "zeros":
        # A zero head: every method starts from the same uniform prediction.
        # With a random head the whole-network gradient flow forces Dopri5
        # (rtol 1e-6, float32) to steps of ~4e-4, some 20 per h = 0.01: see
        # `dopri5_step_count` and docs/bench.md.
        W0 = jnp.zeros((ways, d), jnp.float32)
    else:
        bound = 1.0 / math.sqrt(d)
        W0 = jax.random.uniform(jax.random.fold_in(key, 2), (ways, d), jnp.float32, -bound, bound)
    params = (emb_params, W0)

    def features(emb, x):
        f = apply_to_set(eqx.combine(emb, emb_static), x)
        return f.reshape(f.shape[0], -1)

    def whole_features(emb, x):
        f = apply_to_set(eqx.combine(jax.tree.unflatten(whole_def, jax.tree.leaves(emb)), whole_static), x)
        return f.reshape(f.shape[0], -1)

    def whole_loss(p, data):
        emb, W = p
        return cross_entropy(whole_features(emb, data[0]) @ W.T, data[1])

    def whole_outer(u, task):
        emb, W = u
        return cross_entropy(whole_features(emb, task[2]) @ W.T, task[3])

    head = dict(features=features, split=lambda p: p, ways=ways)
    return Problem(name, params, batch, meta_batch, "float32", data, whole_loss, whole_outer, head)
