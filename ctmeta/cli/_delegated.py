"""`ctmeta bench` and `ctmeta reproduce`: commands handed to `ctmeta.bench.main` and
`ctmeta.experiments.reproduce.main`, with their errors and messages in the style of the others."""

from __future__ import annotations

import argparse
import os
import sys

from .._errors import InputError, exit_code
from ._messages import report
from ._parser import Parser

__all__ = ["run_bench", "run_reproduce"]

_BENCH_POSITIVE_INTS = ("repeats", "meta_batch")
_BENCH_POSITIVE_FLOATS = ("time_budget", "max_bytes")


class _DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """`(default: X)` after a flag's help, unless the help says its default
    already, the flag takes no value, or it has none (`None`)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _bench_parser(bench):
    """`ctmeta bench`'s flags (from `ctmeta.bench.build_parser`) in the style
    of the other commands: errors on one line as `ctmeta bench: error: ...`,
    INT/FLOAT/DIR metavars, defaults in the help, and `--quiet`."""
    parser = Parser(
        prog="ctmeta bench", formatter_class=_DefaultsOnce,
        description="Memory and time of each meta-gradient rule against the number of inner steps "
                    "(A-MAML Figs. 3-4, COMLN Fig. 3). Writes bench.csv, figures and targets.md.",
    )
    bench.build_parser(parser)
    for action in parser._actions:
        if action.metavar is None and action.nargs != 0 and action.option_strings:
            if action.type is int:
                action.metavar = "INT"
            elif action.type is float:
                action.metavar = "FLOAT"
            elif action.dest in ("out", "data_dir"):
                action.metavar = "DIR"
            else:
                action.metavar = "NAME"
    parser.add_argument("--quiet", action="store_true", help="no progress bars: print log lines only "
                        "(the same as --no-progress)")
    parser.add_argument("--debug", action="store_true", help="print the full traceback on errors")
    return parser


class _RestyledStderr:
    """sys.stderr, with a subcommand's own messages in the style of the others:
    `ctmeta bench: <message>` and `ctmeta reproduce: error: <message>` are
    written as `ctmeta: error: <message>`, `ctmeta reproduce: interrupted` as
    `ctmeta: interrupted`."""

    def __init__(self, stream, command: str):
        self._stream = stream
        self._prefix = f"ctmeta {command}: "

    def write(self, text):
        if isinstance(text, str) and text.startswith(self._prefix):
            rest = text[len(self._prefix):]
            if rest.startswith("error: "):
                rest = rest[len("error: "):]
            text = ("ctmeta: " if rest.startswith("interrupted") else "ctmeta: error: ") + rest
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _check_bench_args(args) -> None:
    import math

    for name in _BENCH_POSITIVE_INTS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    for name in _BENCH_POSITIVE_FLOATS:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(f"--{name.replace('_', '-')} must be a positive, finite number, got {value:g}")
    for value in getattr(args, "steps", None) or []:
        if value < 1:
            raise InputError(f"--steps must be positive integers, got {value}")
    for name, flag in (("out", "--out"), ("data_dir", "--data-dir")):
        value = getattr(args, name, None)
        if isinstance(value, str) and not value.strip():
            raise InputError(f"{flag} is empty ({value!r}); give a path")
    if not getattr(args, "diagnostics_only", False) and getattr(args, "out", None):
        from ..runs import check_writable

        check_writable(args.out, f"--out {args.out}")


def run_bench(argv: list[str]) -> int:
    try:
        from .. import bench
    except ImportError as err:
        print(f"ctmeta: error: ctmeta bench is not available ({err})", file=sys.stderr)
        return exit_code(err)
    debug = "--debug" in argv
    try:
        parser = _bench_parser(bench)
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    argv = [a for a in argv if a not in ("--quiet", "--debug")]
    if args.quiet and "--no-progress" not in argv:
        argv.append("--no-progress")
    if "--no-progress" not in argv and not sys.stderr.isatty():
        argv.append("--no-progress")  # a file or a pipe: log lines, not progress bars
    restore_columns = "COLUMNS" not in os.environ and not sys.stdout.isatty()
    if restore_columns:  # rich would wrap its tables at 80 columns in a file or a pipe
        os.environ["COLUMNS"] = "200"
    old_stderr = sys.stderr
    try:
        _check_bench_args(args)
        sys.stderr = _RestyledStderr(old_stderr, "bench")
        return int(bench.main(argv) or 0)
    except SystemExit as exit_:  # argparse inside bench
        return exit_.code if isinstance(exit_.code, int) else 2
    except (Exception, KeyboardInterrupt) as err:
        sys.stderr = old_stderr
        return report(err, debug)
    finally:
        sys.stderr = old_stderr
        if restore_columns:
            os.environ.pop("COLUMNS", None)


def run_reproduce(argv: list[str]) -> int:
    """`ctmeta reproduce ...` (ctmeta.experiments.reproduce.main), with its usage
    errors on one line, its paths checked first and its messages in the style
    of the other commands."""
    import types

    from ..experiments import reproduce

    debug = "--debug" in argv
    parser = reproduce.build_parser()
    parser.error = types.MethodType(Parser.error, parser)  # one line, "(see: ctmeta reproduce --help)"
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    old_stderr = sys.stderr
    try:
        for name, flag in (("out", "--out"), ("data_dir", "--data-dir")):
            value = getattr(args, name, None)
            if isinstance(value, str) and not value.strip():
                raise InputError(f"{flag} is empty ({value!r}); give a path")
        if args.experiment and not args.list and args.out:
            from ..runs import check_writable

            check_writable(args.out, f"--out {args.out}")
        sys.stderr = _RestyledStderr(old_stderr, "reproduce")
        return int(reproduce.main(argv) or 0)
    except (Exception, KeyboardInterrupt) as err:
        sys.stderr = old_stderr
        return report(err, debug)
    finally:
        sys.stderr = old_stderr
