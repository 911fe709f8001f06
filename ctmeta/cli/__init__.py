"""The `ctmeta` command line: `ctmeta train` and `ctmeta evaluate`.

Errors a user can cause (a bad flag value, missing data, an unusable run
directory) print one line to stderr and exit with status 2; anything else is
a bug: one line, status 1, and the traceback with `--debug`.
"""

from __future__ import annotations

import signal
import sys

from .._errors import DownloadError, NumericalError
from ._delegated import run_bench, run_reproduce
from ._evaluate import cmd_evaluate
from ._messages import ENVIRONMENT_ERRNOS, numerical_message, report
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
    except (Exception, KeyboardInterrupt) as err:
        return report(err, debug, **_words_for(err, args))
    return 0


def _words_for(err: BaseException, args) -> dict:
    """What `train`, `evaluate` and `download` say of `err` beyond the error
    itself: the advice that fits the command line (see [`report`][ctmeta.cli._messages.report])."""
    if isinstance(err, NumericalError):  # a runtime failure, not a usage error: status 1
        return {"message": numerical_message(err, args)}
    if isinstance(err, DownloadError):  # the network or the server, not the user's input: status 1
        return {"advice": "; download the file by hand into the data directory, or run again later"}
    if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:  # permissions, a full disk: status 2
        return {"advice": "; choose a location you can write to, or free space"}
    if isinstance(err, KeyboardInterrupt):
        signum = getattr(err, "signum", 2)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        where = getattr(args, "run_path", None)
        if where is not None and args.command == "train":
            return {"message": f"interrupted by {name}; checkpoint saved: continue with: ctmeta train --resume {where}"}
        return {"message": f"interrupted by {name}"}
    return {}
