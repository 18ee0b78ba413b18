"""`python -m dmfs ...` runs the `dmfs` command (the tests use this)."""

import sys

from .cli import main

sys.exit(main())
