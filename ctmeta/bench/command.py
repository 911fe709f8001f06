"""The `ctmeta bench` command line: its flags, and `main(argv)` returning the exit status."""

from __future__ import annotations

import argparse
import sys

from .._errors import CtmetaError, exit_code
from .sweep import DEFAULT_CASES, DEFAULT_STEPS, QUICK_STEPS, SLOW_STEPS, rerun_diagnostics, run

__all__ = ["build_parser", "main"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="ctmeta bench",
        description="Memory and time of each meta-gradient rule against the number of inner steps "
                    "(A-MAML Figs. 3-4, COMLN Fig. 3). Writes bench.csv, figures and targets.md.",
    )
    p.add_argument("--quick", action="store_true", help="two step counts (10, 100), 2 repeats, 40 s per point")
    p.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    p.add_argument("--cases", nargs="+", default=None,
                   help="benchmarks or benchmark/method items, e.g. cosmixture omniglot/comln+anil "
                        f"(default: {' '.join(DEFAULT_CASES)}; also miniimagenet, miniimagenet-resnet12)")
    p.add_argument("--steps", nargs="+", type=int, default=None,
                   help=f"inner step counts (default {' '.join(map(str, DEFAULT_STEPS))}, ResNet-12 "
                        f"{' '.join(map(str, SLOW_STEPS))}; quick {' '.join(map(str, QUICK_STEPS))})")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per point (default 5, quick 2)")
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-batch (default 5 cosmixture, 1 Conv-4)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds one point may take (default 120, quick 40)")
    p.add_argument("--max-bytes", type=float, default=8e9, help="compiled memory in bytes above which a case is not run (default: 8e9)")
    p.add_argument("--data-dir", default=None, help="data root holding omniglot/ and miniimagenet/ (default: $CTMETA_DATA, else ./data; without the data, random images of the same shapes)")
    p.add_argument("--no-vmap", action="store_true", help="skip the vmap-vs-loop measurement")
    p.add_argument("--no-diagnostics", action="store_true", help="skip the time breakdowns")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an interrupted sweep in OUT (same settings and machine) and "
                        "measure only the missing cases")
    p.add_argument("--diagnostics-only", action="store_true",
                   help="read OUT/bench.csv (and vmap.csv) of an earlier run, measure the diagnostics again, "
                        "rewrite diagnostics.csv, targets.md and the figures")
    return p


def main(argv: list[str] | None = None) -> int:
    """`ctmeta bench [--quick] --out DIR ...`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.diagnostics_only:
            rerun_diagnostics(args.out, repeats=args.repeats or 3, data_dir=args.data_dir)
            return 0
        run(
            args.cases, args.steps, args.out, args.quick, args.repeats,
            meta_batch=args.meta_batch, time_budget=args.time_budget, max_bytes=args.max_bytes,
            vmap=not args.no_vmap, diagnostics=not args.no_diagnostics, data_dir=args.data_dir,
            progress=not args.no_progress, resume=args.resume,
        )
    except CtmetaError as err:
        print(f"ctmeta bench: {err}", file=sys.stderr)
        return exit_code(err)
    return 0
