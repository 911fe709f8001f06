r"""The outer optimiser of a run: its configuration entry and the optax transformation built from it.

A run's configuration holds its outer optimiser as a JSON-able dict
([`optimizer_spec`][]), so that a resumed run rebuilds exactly the same
optimiser and schedule; [`build_optimizer`][] makes the optax
`GradientTransformation`. Two protocols, one per paper: A-MAML (Sec. 5)
meta-trains with Adam at learning rate $10^{-3}$; COMLN (Appendix E.5) with
SGD, Nesterov momentum 0.9, learning rate 0.1 and Lee et al. (2019)'s step
schedule. Which method takes which by default is the presets' business
(`ctmeta.presets.optimizer_config`).
"""

from __future__ import annotations

from typing import Any

from ._errors import InputError, check_positive, check_positive_int

__all__ = ["LR_SCHEDULES", "OPTIMIZERS", "build_optimizer", "learning_rate_schedule", "optimizer_spec"]

#: Outer optimisers, with each paper's protocol as the defaults of its name.
OPTIMIZERS: dict[str, str] = {
    "adam": "Adam, lr 1e-3, constant (A-MAML Sec. 5)",
    "sgd": "SGD, Nesterov momentum 0.9, lr 0.1, step schedule (COMLN App. E.5)",
}
#: Learning-rate schedules over the run's meta-iterations (`none` is constant).
LR_SCHEDULES: dict[str, str] = {
    "none": "constant learning rate",
    "step": "Lee et al. 2019: lr x0.06 from 1/3 of the run, x0.012 from 2/3, x0.0024 from 5/6",
    "cosine": "cosine decay to 0 over the run",
}
_SGD_MOMENTUM = 0.9
_SGD_LEARNING_RATE = 0.1
# Lee et al. (2019), MetaOptNet's train.py: 60 epochs, the initial learning
# rate times 1 before epoch 20, 0.06 before 40, 0.012 before 50, then 0.0024.
# As fractions of the run: (numerator, denominator, factor from there on).
_STEP_SCHEDULE = ((1, 3, 0.06), (2, 3, 0.012), (5, 6, 0.0024))



def optimizer_spec(
    name: str,
    learning_rate: float | None = None,
    schedule: str | None = None,
    meta_iterations: int = 1000,
    *,
    adam_lr: float = 1e-3,
) -> dict[str, Any]:
    """A configuration's `optimizer` entry: the outer optimiser `name` with its paper's defaults.

    `learning_rate` and `schedule` override the defaults:

    - `"adam"`: `{"name": "adam", "learning_rate": 1e-3, "schedule": None}`
      (`adam_lr` sets that default).
    - `"sgd"`: `{"name": "sgd", "learning_rate": 0.1, "momentum": 0.9,
      "nesterov": True, "schedule": "step"}`.

    With a schedule (`"step"`: Lee et al.'s; `"cosine"`), `decay_steps` is
    its length, the run's `meta_iterations`, fixed when the run is created
    (so a resumed run follows the same schedule). Pure Python.
    """
    if name not in OPTIMIZERS:
        raise InputError(f"unknown `optimizer` {name!r}; choose from {', '.join(OPTIMIZERS)}")
    if learning_rate is not None:
        learning_rate = check_positive("`meta_lr`", learning_rate)
    if schedule is not None and schedule not in LR_SCHEDULES:
        raise InputError(f"unknown `lr_schedule` {schedule!r}; choose from {', '.join(LR_SCHEDULES)}")
    meta_iterations = check_positive_int("`meta_iterations`", meta_iterations)
    if name == "adam":
        spec: dict[str, Any] = {"name": "adam", "learning_rate": adam_lr, "schedule": None}
    else:
        spec = {"name": "sgd", "learning_rate": _SGD_LEARNING_RATE, "momentum": _SGD_MOMENTUM, "nesterov": True,
                "schedule": "step"}
    if learning_rate is not None:
        spec["learning_rate"] = learning_rate
    if schedule is not None:
        spec["schedule"] = None if schedule == "none" else schedule
    if spec["schedule"] is not None:
        spec["decay_steps"] = meta_iterations
    return spec


def _check_optimizer_spec(spec) -> None:
    """Refuse a malformed `optimizer` entry (a hand-edited config.json, say)."""
    where = "the configuration's optimizer"
    if not isinstance(spec, dict) or spec.get("name") not in OPTIMIZERS:
        name = spec.get("name") if isinstance(spec, dict) else spec
        raise InputError(f"unknown optimizer {name!r} in the configuration; choose from {', '.join(OPTIMIZERS)}")
    check_positive(f"{where}'s learning_rate", spec.get("learning_rate"))
    schedule = spec.get("schedule")
    if schedule is not None and (schedule == "none" or schedule not in LR_SCHEDULES):
        raise InputError(f"{where}'s schedule must be null, 'step' or 'cosine', got {schedule!r}")
    if schedule is not None:
        check_positive_int(f"{where}'s decay_steps", spec.get("decay_steps"))
    if spec["name"] == "sgd":
        momentum = spec.get("momentum", _SGD_MOMENTUM)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise InputError(f"{where}'s momentum must be a number in [0, 1), got {momentum!r}")
        if not isinstance(spec.get("nesterov", True), bool):
            raise InputError(f"{where}'s nesterov must be true or false, got {spec.get('nesterov')!r}")


def learning_rate_schedule(spec: dict):
    """The learning rate of an `optimizer` entry: a float, or an optax
    schedule (a function of the number of updates) when it has one."""
    import jax.numpy as jnp
    import optax

    _check_optimizer_spec(spec)
    lr = float(spec["learning_rate"])
    schedule = spec.get("schedule")
    if schedule is None:
        return lr
    n = int(spec["decay_steps"])
    if schedule == "cosine":
        return optax.cosine_decay_schedule(lr, n)

    def step_schedule(count):
        # Update `count` (0-based) is in the piece from `num / den` of the run
        # on when `count * den >= num * n`: integers, so no rounding at the
        # boundaries (a 6-iteration run gets 2, 2, 1, 1 updates per piece).
        factor = jnp.asarray(1.0)
        for num, den, f in _STEP_SCHEDULE:
            factor = jnp.where(count * den >= num * n, f, factor)
        return lr * factor

    return step_schedule


def build_optimizer(spec: dict):
    """The optax `GradientTransformation` of a configuration's `optimizer` entry."""
    import optax

    lr = learning_rate_schedule(spec)
    if spec["name"] == "adam":
        return optax.adam(lr)
    return optax.sgd(lr, momentum=float(spec.get("momentum", _SGD_MOMENTUM)), nesterov=bool(spec.get("nesterov", True)))
