"""The library's private pieces that its own tools use, re-exported in one place.

`ctmeta.bench` measures the solvers from the inside (step counts of the
forward, the augmented COMLN system on its own), which needs names that are
not part of the public API. They are imported here and only here, so that a
change to those internals is fixed in one file.

`from ctmeta import linear_flow` gives the *function* (the package exports
it under the module's name); `from ctmeta.linear_flow import ...` still reads
the module, which is what this file does.
"""

from .linear_flow import _augmented_field as augmented_field
from .linear_flow import _problem as linear_flow_problem
from .linear_flow import _zeros_augmented as zeros_augmented
from .ode._adaptive import dense_forward
from .ode._status import all_finite

__all__ = ["all_finite", "augmented_field", "dense_forward", "linear_flow_problem", "zeros_augmented"]
