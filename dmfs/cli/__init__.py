"""The `dmfs` command line: one module per command, each with `run(args)`.

`main` parses the arguments and imports the command's module only when
it runs (see main.py).
"""

from .main import main as main
