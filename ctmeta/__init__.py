"""ctmeta: meta-learning with continuous-time inner loops.

Exact, memory-efficient meta-gradients through long adaptation: A-MAML's
stored-state adjoint for whole networks, COMLN's forward sensitivity for a
linear head, and the discrete baselines (MAML, FOMAML, Reptile, iMAML, ANIL).
"""

from . import ode
from ._errors import CheckpointError, CtmetaError, DataError, InputError, NumericalError
from .adaptation import gradient_flow
from .linear_flow import linear_flow, linear_flow_adapt
from .methods import (
    AbstractMethod,
    Adjoint,
    FirstOrder,
    GradientField,
    Implicit,
    Reptile,
    Unrolled,
    reptile_direction,
)

__version__ = "0.1.0"

__all__ = [
    "ode",
    "gradient_flow",
    "linear_flow",
    "linear_flow_adapt",
    "AbstractMethod",
    "Adjoint",
    "Unrolled",
    "FirstOrder",
    "Implicit",
    "Reptile",
    "GradientField",
    "reptile_direction",
    "CtmetaError",
    "InputError",
    "DataError",
    "CheckpointError",
    "NumericalError",
]
