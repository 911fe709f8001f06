"""Task families: each samples fixed-shape arrays so a meta-batch vmaps.

| family | data | kind |
| --- | --- | --- |
| `CosMixture`, `Alpine` | synthetic 2-D functions (A-MAML Sec. 5.1) | regression, nRMSE |
| `MovieLens`, `Jester` | official rating files (A-MAML Sec. 5.3) | regression, nRMSE |
| `Omniglot`, `MiniImageNet` | official image archives | N-way k-shot classification |

Nothing here touches the network; `ctmeta.tasks.download.download` fetches the
official files into a data directory when asked (`ctmeta download`,
`ctmeta train --download`).
"""

from .base import Batch, TaskFamily
from .images import FewShotClassification
from .metrics import nrmse
from .miniimagenet import MiniImageNet
from .omniglot import Omniglot
from .ratings import Jester, MaskedBatch, MovieLens, RatingsFamily, load_jester, load_movielens
from .regression import Alpine, CosMixture, FunctionRegression

__all__ = [
    "Batch",
    "MaskedBatch",
    "TaskFamily",
    "FunctionRegression",
    "CosMixture",
    "Alpine",
    "RatingsFamily",
    "MovieLens",
    "Jester",
    "load_movielens",
    "load_jester",
    "FewShotClassification",
    "Omniglot",
    "MiniImageNet",
    "nrmse",
]
