"""`python -m bayesalign`: the same as the ``bayesalign`` command."""

import sys

from .app.cli import main

sys.exit(main())
