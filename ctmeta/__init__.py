"""ctmeta: meta-learning with continuous-time inner loops.

Exact, memory-efficient meta-gradients through long adaptation: A-MAML's
stored-state adjoint for whole networks, COMLN's forward sensitivity for a
linear head, and the discrete baselines (MAML, FOMAML, Reptile, iMAML, ANIL).
"""

__version__ = "0.1.0"  # before the imports: modules read it while the package loads

from . import ode
from ._errors import CheckpointError, CtmetaError, DataError, InputError, NumericalError
from .adaptation import LossAlongFlow, gradient_flow, loss_along_flow
from .flows import AbstractFlow, Gradient, HeavyBall, Preconditioned
from .linear_flow import linear_flow, linear_flow_adapt
from .losses import accuracy, cross_entropy, mse, nrmse_metric
from .meta import MetaLearner
from .methods import (
    AbstractMethod,
    Adjoint,
    FirstOrder,
    GradientField,
    Implicit,
    LinearFlow,
    Reptile,
    Unrolled,
    reptile_direction,
)

__all__ = [
    "ode",
    "gradient_flow",
    "loss_along_flow",
    "LossAlongFlow",
    "AbstractFlow",
    "Gradient",
    "Preconditioned",
    "HeavyBall",
    "linear_flow",
    "linear_flow_adapt",
    "AbstractMethod",
    "Adjoint",
    "Unrolled",
    "FirstOrder",
    "Implicit",
    "Reptile",
    "LinearFlow",
    "GradientField",
    "reptile_direction",
    "MetaLearner",
    "mse",
    "cross_entropy",
    "accuracy",
    "nrmse_metric",
    "CtmetaError",
    "InputError",
    "DataError",
    "CheckpointError",
    "NumericalError",
]
