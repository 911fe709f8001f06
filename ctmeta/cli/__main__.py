"""`python -m ctmeta.cli`."""

import sys

from . import main

sys.exit(main())
