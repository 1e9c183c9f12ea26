"""`python -m bayesalign`: the same as the ``bayesalign`` command."""

import sys

from .cli import main

sys.exit(main())
