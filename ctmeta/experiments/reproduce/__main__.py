"""`python -m ctmeta.experiments.reproduce ...`: the same as `ctmeta reproduce ...`."""

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
