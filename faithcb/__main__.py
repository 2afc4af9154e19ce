"""`python -m faithcb`: the same as the `faithcb` command (see `faithcb.cli`)."""

import sys

from .cli import main

sys.exit(main())
