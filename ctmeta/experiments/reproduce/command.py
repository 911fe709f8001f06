"""`ctmeta reproduce`: its flags, `run_experiment` and `main(argv)` returning the exit status."""

from __future__ import annotations

import pathlib
import time
import traceback


from ..._errors import CtmetaError, DataError, InputError, exit_code

import argparse
import sys
from .context import SCALES, Context
from .registry import EXPERIMENTS, list_text
from .runner import estimate_table


def run_experiment(name: str, *, scale: str = "quick", out: str = "reproduce-out", data_dir: str | None = None,
                   quiet: bool = False, argv: list[str] | None = None,
                   methods: tuple[str, ...] | None = None, estimate: int = 0,
                   debug: bool = False, retry_failed: bool = False) -> pathlib.Path | list[dict]:
    """Run one experiment; returns its output directory.

    `methods` (e.g. `("maml", "reptile")`) runs only the runs whose label ends
    in one of them; the others are listed as not run, unless already finished.

    `estimate > 0` runs nothing: it times `estimate` meta-iterations of every
    run (finished or not, after one that compiles), writes nothing, and
    returns one dict a run (`label`, `meta_iterations`, `compile_s`,
    `s_per_iteration`, `projected_s`).

    `debug` prints the traceback of a run that fails (the others go on).

    A run that failed numerically (`NumericalError`: a diverged inner solve is
    deterministic) leaves `failed.json` in its directory and is not attempted
    again; `retry_failed` attempts it again (from its last checkpoint)."""
    import tempfile

    if name not in EXPERIMENTS:
        raise InputError(f"unknown experiment {name!r}; see `ctmeta reproduce --list` ({', '.join(EXPERIMENTS)})")
    if scale not in SCALES:
        raise InputError(f"scale must be one of {', '.join(SCALES)}; got {scale!r}")
    estimate = int(estimate)
    if estimate < 0:
        raise InputError(f"estimate must be a number of meta-iterations >= 0, got {estimate}")
    if estimate and not EXPERIMENTS[name].meta_trains:
        raise InputError(f"{name} does not meta-train: there is nothing to estimate (it runs in minutes)")
    if estimate:
        with tempfile.TemporaryDirectory(prefix="ctmeta-estimate-") as tmp:
            ctx = _run(name, scale, pathlib.Path(tmp), data_dir, quiet, argv, methods, estimate, debug, retry_failed)
        return ctx.estimates
    return _run(name, scale, pathlib.Path(out).expanduser(), data_dir, quiet, argv, methods, 0, debug,
                retry_failed).out


def _run(name, scale, out, data_dir, quiet, argv, methods, estimate, debug, retry_failed) -> Context:
    from ...runs import Reporter

    root = None
    if data_dir is not None:
        root = pathlib.Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"--data-dir {root} does not exist")
        root = root.resolve()
    path = out / name
    path.mkdir(parents=True, exist_ok=True)
    ctx = Context(name=name, scale=scale, out=path, data_root=root, quiet=quiet,
                  argv=list(argv) if argv is not None else [name, "--scale", scale],
                  reporter=Reporter(quiet=quiet), methods=frozenset(methods) if methods else None,
                  estimate=estimate, debug=debug, retry_failed=retry_failed)
    if scale == "cpu" and not EXPERIMENTS[name].cpu_differs:
        ctx.log(f"{name}: its cpu scale is its paper scale (it fits this machine)")
        ctx.scale = "paper"
    t0 = time.perf_counter()
    EXPERIMENTS[name].runner(ctx)
    if estimate:
        ctx.log(f"\n{name} ({scale}): projected meta-training wall time on this machine\n\n"
                + estimate_table(ctx.estimates))
    else:
        ctx.log(f"{name} ({scale}) finished in {time.perf_counter() - t0:.0f} s; results in {path}")
    return ctx


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctmeta reproduce",
        description="Reproduce one of the papers' experiments (A-MAML, COMLN) into OUT/EXPERIMENT/: run "
        "directories per method, results.md with our table beside the paper's, and PNG figures.",
        epilog=list_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("experiment", nargs="?", metavar="EXPERIMENT", help="see --list")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--scale", choices=SCALES, default="quick", metavar="{" + ",".join(SCALES) + "}",
                   help="quick: minutes on a CPU, with the cuts listed in results.md; paper: the papers' protocols; "
                   "cpu: paper, except the image experiments' budgets, cut to a few hours on 2 CPU cores (days for "
                   "amaml-table3's A-MAML, continued across sessions); "
                   "test: seconds, a smoke check that the pipeline runs (its numbers mean nothing) (default: quick)")
    p.add_argument("--out", default="reproduce-out", metavar="DIR", help="output root (default: reproduce-out)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="root holding movielens/, jester/, omniglot/, miniimagenet/ (default: $CTMETA_DATA, "
                   "else ./data)")
    p.add_argument("--methods", default=None, metavar="M,M,...",
                   help="run only these methods (e.g. maml,maml-1,reptile); finished runs of the others are "
                   "still read back into the tables")
    p.add_argument("--estimate", type=int, nargs="?", const=3, default=0, metavar="N",
                   help="run nothing: time N (default 3) meta-iterations of each run after one that compiles, and "
                   "print each run's and the experiment's projected meta-training wall time")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--retry-failed", action="store_true",
                   help="attempt again the runs that failed numerically before (their failed.json; by default "
                   "they are listed as failed and not run again)")
    p.add_argument("--debug", action="store_true", help="print tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    """`ctmeta reproduce ...`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.list:
        print(list_text())
        return 0
    if not args.experiment:
        print("ctmeta reproduce: error: name an EXPERIMENT (see ctmeta reproduce --list)", file=sys.stderr)
        return 2
    if args.experiment not in EXPERIMENTS:
        print(f"ctmeta reproduce: error: unknown experiment {args.experiment!r}; choose from "
              f"{', '.join(EXPERIMENTS)} (see --list)", file=sys.stderr)
        return 2
    try:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
        run_experiment(args.experiment, scale=args.scale, out=args.out, data_dir=args.data_dir, quiet=args.quiet,
                       argv=argv, methods=methods, estimate=args.estimate, debug=args.debug,
                       retry_failed=args.retry_failed)
    except CtmetaError as err:
        if args.debug:
            traceback.print_exc()
        print(f"ctmeta reproduce: error: {err}", file=sys.stderr)
        return exit_code(err)
    except KeyboardInterrupt as err:
        print("ctmeta reproduce: interrupted; run the same command again to resume (finished runs are reused)",
              file=sys.stderr)
        return exit_code(err)
    return 0

