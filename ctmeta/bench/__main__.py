"""`python -m ctmeta.bench ...`: the same as `ctmeta bench ...`."""

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
