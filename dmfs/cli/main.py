"""The `dmfs` command: dispatch and error reporting.

Each subcommand lives in its own module of this package (`mount`,
`umount`, `create`, `status`, `merge`, `check`, `import_cow`,
`export_cow`, `snapshot`, `remove`, `rename`, `extend`, `discard`) with a
`run(args) -> int`, and its arguments in args.py; the module is imported
only when its command runs, so `dmfs status` does not pay for pyfuse3 and
trio.

Errors end as one line ``dmfs: <reason>`` on stderr and exit code 1;
tracebacks only with ``--debug``.  Ctrl-C exits 130 without a word.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback

from ..errors import DmError
from .args import build_parser
from .common import QuietError, describe_error, leaf_exception

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dmfs` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if not hasattr(args, "debug"):
        args.debug = False
    # Commands other than mount (which sets up its own) show warnings of
    # the modules they use as "dmfs: WARNING: ..." lines.
    logging.basicConfig(stream=sys.stderr, format="dmfs: %(levelname)s: %(message)s",
                        level=logging.DEBUG if args.debug else logging.WARNING)
    try:
        module = importlib.import_module(f"dmfs.cli.{args.module}")
        return module.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # noqa: B036 -- re-raised unless it is ours to report
        leaf = leaf_exception(e)
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        if isinstance(leaf, SystemExit):
            raise leaf
        if not isinstance(leaf, Exception):
            raise
        if isinstance(leaf, BrokenPipeError):
            # `dmfs status | head`: the reader has all it wanted.
            _silence_stdout()
            return 141
        expected = isinstance(leaf, (QuietError, DmError, OSError))
        if args.debug:
            traceback.print_exception(e)
        msg = describe_error(leaf)
        if not expected and not args.debug:
            # A bug: still one line, but say how to see where it happened.
            msg += " (run with --debug for a traceback)"
        print(f"dmfs: {msg}", file=sys.stderr)
        return getattr(leaf, "exitcode", 1)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit cannot fail again."""
    import os
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
