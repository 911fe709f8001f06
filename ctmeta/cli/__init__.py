"""The `ctmeta` command line: `ctmeta train` and `ctmeta evaluate`.

Errors a user can cause (a bad flag value, missing data, an unusable run
directory) print one line to stderr and exit with status 2; anything else is
a bug: one line, status 1, and the traceback with `--debug`.
"""

from __future__ import annotations

import signal
import sys
import traceback

from .._errors import CtmetaError, NumericalError
from ..tasks.download import DownloadError
from ._delegated import run_bench, run_reproduce
from ._evaluate import cmd_evaluate
from ._messages import ENVIRONMENT_ERRNOS, internal_error, numerical_message, user_message
from ._parser import build_parser
from ._train import cmd_download, cmd_train

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ctmeta` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return run_bench(argv[1:])
    if argv and argv[0] == "reproduce":
        return run_reproduce(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    debug = getattr(args, "debug", False)
    try:
        if args.command == "train":
            return cmd_train(args, argv)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "download":
            return cmd_download(args)
        parser.error(f"unknown command {args.command!r}")
    except NumericalError as err:  # a runtime failure, not a usage error: status 1
        if debug:
            traceback.print_exc()
        print(f"ctmeta: error: {numerical_message(err, args)}", file=sys.stderr)
        return 1
    except DownloadError as err:  # the network or the server, not the user's input: status 1
        if debug:
            traceback.print_exc()
        print(f"ctmeta: error: {user_message(err)}; download the file by hand into the data directory, "
              "or run again later", file=sys.stderr)
        return 1
    except CtmetaError as err:
        if debug:
            traceback.print_exc()
        print(f"ctmeta: error: {user_message(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if ENVIRONMENT_ERRNOS.get(err.errno) is None:
            return internal_error(err, debug)
        # The user's environment (permissions, a read-only or full disk), not a bug: status 2.
        if debug:
            traceback.print_exc()
        where = f" {err.filename}" if err.filename else ""
        print(f"ctmeta: error: cannot write{where}: {ENVIRONMENT_ERRNOS[err.errno]}; "
              "choose a location you can write to, or free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", 2)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        where = getattr(args, "run_path", None)
        if where is not None and args.command == "train":
            print(f"ctmeta: interrupted by {name}; checkpoint saved: continue with: ctmeta train --resume {where}",
                  file=sys.stderr)
        else:
            print(f"ctmeta: interrupted by {name}", file=sys.stderr)
        return 128 + signum
    except Exception as err:  # a bug
        return internal_error(err, debug)
    return 0
