"""The `ctmeta` command line: `ctmeta train` and `ctmeta evaluate`.

Errors a user can cause (a bad flag value, missing data, an unusable run
directory) print one line to stderr and exit with status 2; anything else is
a bug: one line, status 1, and the traceback with `--debug`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import signal
import sys
import traceback

from ._errors import CtmetaError, InputError, NumericalError
from .runs import one_line
from .presets import BACKBONES, BENCHMARKS, LR_SCHEDULES, METHODS, OPTIMIZERS
from .tasks.download import DownloadError

__all__ = ["main", "build_parser"]

_DESCRIPTION = """\
ctmeta: meta-learning with continuous-time inner loops (A-MAML, COMLN) and the
discrete baselines (MAML, FOMAML, Reptile, iMAML, ANIL), in JAX.

  ctmeta train                       CosMixture 50shot-50val with A-MAML (a few minutes on a CPU)
  ctmeta train --method maml         the same benchmark with MAML (20 unrolled steps)
  ctmeta train --resume RUN_DIR      continue an interrupted run from its last checkpoint
  ctmeta evaluate RUN_DIR            re-evaluate a run's latest checkpoint
  ctmeta download omniglot           fetch a benchmark's official files (or: ctmeta train --download)
  ctmeta bench --quick               memory and time of the meta-gradients against inner steps
"""

_TRAIN_EPILOG = """\
benchmarks:
""" + "\n".join(f"  {k:<13} {v.description}" for k, v in BENCHMARKS.items()) + """

methods:
""" + "\n".join(f"  {k:<13} {v}" for k, v in METHODS.items()) + """

horizon and steps: gradient descent with learning rate h is the Euler
discretisation of the gradient flow, so T = steps * h. For amaml, --T is the
horizon and --steps the number of stored states of the adjoint (default T=2,
steps=200 on the regressions). For the discrete methods, --steps is the number
of inner GD steps and, without --T, T = steps * 0.01 (learning rate 0.01).
For comln, --T is the initial horizon, learned as exp(log T); the head's flow
uses Dopri5, or Euler with --steps fixed steps if given.

outer optimisers (--optimizer), each with its paper's defaults; A-MAML
meta-trains every method with adam, COMLN every method of its Table 2 with
sgd, so comln and anil default to sgd:
""" + "\n".join(f"  {k:<13} {v}" for k, v in OPTIMIZERS.items()) + """
--meta-lr and --lr-schedule override the rate and the schedule; a schedule
spans the run's --meta-iterations (fixed when the run is created):
""" + "\n".join(f"  {k:<13} {v}" for k, v in LR_SCHEDULES.items()) + """

backbones (--backbone, omniglot and miniimagenet):
""" + "\n".join(f"  {k:<13} {v}" for k, v in BACKBONES.items()) + """

The run directory (--out, default runs/<benchmark>-<method>-<timestamp>) gets
config.json, metrics.csv, checkpoints/, figures/ and results.md. Data sets are
read from --data-dir, else $CTMETA_DATA/<name>, else ./data/<name>; nothing is
downloaded unless --download is given (it fetches the official files there).
"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars: print log lines only")
    p.add_argument("--debug", action="store_true", help="print the full traceback on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ctmeta", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ctmeta {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="meta-train on a benchmark and evaluate on its meta-test tasks",
        description="Meta-train an initialisation on a benchmark, then report the meta-test error\n"
        "after 0..K adaptation steps, for the learned and for a random initialisation.\n"
        "With no flags: CosMixture 50shot-50val, A-MAML (T=2, adaptive adjoint), an MLP 2x32 tanh,\n"
        "Adam 1e-3, 5 tasks per meta-batch, 1000 meta-iterations (about 2-3 minutes on 2 CPU cores).",
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--benchmark", choices=list(BENCHMARKS), default=None,
                   help="task family (default: cosmixture)")
    t.add_argument("--method", choices=list(METHODS), default=None,
                   help="meta-gradient rule (default: amaml)")
    t.add_argument("--T", type=float, default=None, metavar="FLOAT",
                   help="inner horizon T, > 0 (default: per benchmark and method, see below)")
    t.add_argument("--steps", type=int, default=None, metavar="INT",
                   help="inner steps K, > 0: stored states (amaml; RK4 steps with --solver rk4) or GD steps "
                   "(discrete methods)")
    t.add_argument("--solver", choices=["dopri5", "rk4"], default=None,
                   help="amaml's forward solver: dopri5 (adaptive; without --steps the backward is adaptive "
                   "too) or rk4 (K = --steps fixed steps of T/K; without --steps K = T/0.01) (default: dopri5)")
    t.add_argument("--meta-iterations", type=int, default=None, metavar="INT",
                   help="outer iterations, > 0 (default: per benchmark, 1000)")
    t.add_argument("--meta-batch", type=int, default=None, metavar="INT",
                   help="tasks per outer iteration, > 0 (default: 5; 4 for images)")
    t.add_argument("--ways", type=int, default=None, metavar="INT",
                   help="classes per task, classification only (default: 20 omniglot, 5 miniimagenet)")
    t.add_argument("--shots", type=int, default=None, metavar="INT",
                   help="support examples per task (per class for images); regression uses as many queries")
    t.add_argument("--data-dir", default=None, metavar="DIR",
                   help="data set location (movielens, movielens-1m, jester, omniglot, miniimagenet)")
    t.add_argument("--download", action="store_true",
                   help="fetch the benchmark's official files into the data directory first, if absent "
                   "(movielens, movielens-1m, jester, omniglot)")
    t.add_argument("--backbone", choices=list(BACKBONES), default=None,
                   help="embedding network of omniglot and miniimagenet (default: conv4-smooth for amaml, "
                   "conv4 for the others)")
    t.add_argument("--optimizer", choices=list(OPTIMIZERS), default=None,
                   help="outer optimiser, with its paper's defaults (default: sgd for comln and anil, "
                   "adam for the others; see below)")
    t.add_argument("--meta-lr", type=float, default=None, metavar="FLOAT",
                   help="outer (meta) learning rate, > 0 (default: 1e-3 with adam, 0.1 with sgd)")
    t.add_argument("--lr-schedule", choices=list(LR_SCHEDULES), default=None,
                   help="decay of the outer learning rate over the meta-iterations "
                   "(default: none with adam, step with sgd; see below)")
    t.add_argument("--seed", type=int, default=None, metavar="INT",
                   help="seed of the initialisation and of the task order (default: 0); "
                   "the benchmark's task sets are fixed")
    t.add_argument("--out", default=None, metavar="DIR",
                   help="run directory (default: runs/<benchmark>-<method>-<timestamp>)")
    t.add_argument("--checkpoint-every", type=int, default=None, metavar="INT",
                   help="save a checkpoint every INT meta-iterations (default: meta-iterations/5)")
    t.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its last checkpoint with its saved configuration "
                   "(only --meta-iterations, --checkpoint-every and --on-nonfinite may change)")
    t.add_argument("--log-y", action="store_true",
                   help="draw figures/error_vs_steps.png with a logarithmic error axis")
    t.add_argument("--on-nonfinite", choices=["error", "skip-task"], default=None,
                   help="a task whose loss or meta-gradient is not finite (or whose ODE solve runs out "
                   "of steps): 'error' stops the run naming the iteration and task (default); "
                   "'skip-task' leaves such tasks out and counts them in metrics.csv (column skipped)")
    d = t.add_argument_group(
        "several devices and hosts",
        "The tasks of each meta-batch are split over all visible devices (--meta-batch must be a\n"
        "multiple of their number). On several hosts, start one process per host with the same\n"
        "--coordinator-address, --num-processes and --out (or --resume), and its own --process-id;\n"
        "process 0 writes the run directory.",
    )
    d.add_argument("--devices", type=int, default=None, metavar="INT",
                   help="devices of each process to split the meta-batch over, > 0 (default: all visible)")
    d.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="multi-process run: process 0's host and a free port, where it coordinates the others")
    d.add_argument("--num-processes", type=int, default=None, metavar="INT",
                   help="multi-process run: the number of processes, > 0")
    d.add_argument("--process-id", type=int, default=None, metavar="INT",
                   help="multi-process run: this process's index, 0..num-processes-1 (0 writes the files)")
    _add_common(t)

    e = sub.add_parser(
        "evaluate",
        help="evaluate a run's latest checkpoint on the meta-test tasks",
        description="Load RUN_DIR's configuration and latest checkpoint (or --checkpoint), evaluate the learned "
        "and a random initialisation on the meta-test tasks, print the table, and rewrite results.md, "
        "results.json and the figures. The run directory must be writable and not in use by ctmeta train.",
    )
    e.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by ctmeta train")
    e.add_argument("--checkpoint", default=None, metavar="ITER|FILE",
                   help="the checkpoint to evaluate: an iteration with a checkpoint in RUN_DIR/checkpoints, or "
                   "a .eqx file (default: the newest that loads)")
    e.add_argument("--steps", default=None, metavar="INT,INT,...",
                   help="adaptation steps of the table, comma-separated, e.g. 0,10,50 (default: the run's)")
    e.add_argument("--tasks", type=int, default=None, metavar="INT",
                   help="evaluate on the first INT meta-test tasks, > 0 (default: all of them)")
    e.add_argument("--lr", type=float, default=None, metavar="FLOAT",
                   help="learning rate of the adaptation's gradient descent, > 0 (default: the run's)")
    e.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where the benchmark's data are now (default: the run's data directory)")
    e.add_argument("--log-y", action="store_true",
                   help="draw figures/error_vs_steps.png with a logarithmic error axis")
    _add_common(e)

    dl = sub.add_parser(
        "download",
        help="fetch a benchmark's official data files (the network is used only here and by --download)",
        description="Fetch a benchmark's official files into DIR (default $CTMETA_DATA/<name>, else "
        "./data/<name>); files already there are kept. miniImageNet cannot be downloaded (ImageNet terms).",
    )
    dl.add_argument("benchmark", metavar="BENCHMARK", choices=[b for b, p in BENCHMARKS.items() if p.data_subdir],
                    help="one of: " + ", ".join(b for b, p in BENCHMARKS.items() if p.data_subdir))
    dl.add_argument("--data-dir", default=None, metavar="DIR", help="where to put the files")
    _add_common(dl)

    # `ctmeta bench ...` is handed to ctmeta.bench.main (its own flags and --help).
    sub.add_parser(
        "bench",
        help="memory and time of each meta-gradient rule against the number of inner steps "
        "(see: ctmeta bench --help)",
        add_help=False,
    )
    # `ctmeta reproduce ...` is handed to ctmeta.experiments.reproduce.main.
    sub.add_parser(
        "reproduce",
        help="reproduce a paper's figure or table (see: ctmeta reproduce --list)",
        add_help=False,
    )
    return parser


# --------------------------------------------------------------------------- #


_RESUMABLE = ("meta_iterations", "checkpoint_every", "on_nonfinite")
_FIXED_ON_RESUME = ("benchmark", "method", "T", "steps", "meta_batch", "ways", "shots", "seed")
# Upper bounds on numeric flags: beyond them a value is a typo, not a run.
_LIMITS = {"T": 1e6, "steps": 10**6, "meta_iterations": 10**9, "meta_batch": 10**5, "ways": 10**4,
           "shots": 10**5, "checkpoint_every": 10**9, "seed": 2**32 - 1,
           "devices": 10**5, "num_processes": 10**5, "meta_lr": 1e2}


def _check_limits(args) -> None:
    for name, value in vars(args).items():
        if isinstance(value, list):  # argparse turns `--flag=--` into [] without checking it
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} needs a value; got {' '.join(map(str, value)) or '--'!r}")
    for name, limit in _LIMITS.items():
        value = getattr(args, name, None)
        flag = "--" + name.replace("_", "-")
        if value is not None and value > limit:
            raise InputError(f"{flag} {value} is too large (at most {limit:g}); choose a smaller value")


def _resolve_train(args) -> dict:
    _check_limits(args)
    config = _resolve_train_config(args)
    config["on_nonfinite"] = args.on_nonfinite or "error"
    return config


def _resolve_train_config(args) -> dict:
    from .presets import resolve_config

    return resolve_config(
        args.benchmark,
        args.method,
        T=args.T,
        steps=args.steps,
        meta_iterations=args.meta_iterations,
        meta_batch=args.meta_batch,
        ways=args.ways,
        shots=args.shots,
        data_dir=args.data_dir,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        optimizer=args.optimizer,
        meta_lr=args.meta_lr,
        lr_schedule=args.lr_schedule,
        backbone=args.backbone,
        solver=args.solver,
    )


def _saved_choices(config: dict) -> dict:
    """The values of --optimizer, --meta-lr, --lr-schedule and --backbone that
    a saved configuration holds (runs written before `backbone` was recorded
    name it through their model)."""
    opt = config.get("optimizer") or {}
    model = str((config.get("model") or {}).get("name", ""))
    backbone = config.get("backbone") or next((b for b in BACKBONES if model.startswith(b)), None)
    solver = (config.get("method_options") or {}).get("solver", "dopri5") if config.get("method") == "amaml" else None
    return {"optimizer": opt.get("name"), "meta_lr": opt.get("learning_rate"),
            "lr_schedule": opt.get("schedule") or "none", "backbone": backbone, "solver": solver}


def _check_resume_flags(args, config: dict) -> dict:
    if args.out is not None:
        raise InputError("--resume continues a run in its own directory; do not give --out with it")
    for name in _FIXED_ON_RESUME:
        value = getattr(args, name)
        if value is not None and value != config.get(name):
            flag = "--" + name.replace("_", "-")
            raise InputError(
                f"{flag} {value} differs from the resumed run's {config.get(name)!r}; a resumed run keeps "
                "its configuration (only --meta-iterations and --checkpoint-every may change)"
            )
    for name, saved in _saved_choices(config).items():
        value = getattr(args, name)
        if value is not None and value != saved:
            flag = "--" + name.replace("_", "-")
            raise InputError(
                f"{flag} {value} differs from the resumed run's {saved!r}; a resumed run keeps "
                "its configuration (only --meta-iterations and --checkpoint-every may change)"
            )
    _check_limits(args)
    config = dict(config)
    if args.on_nonfinite is not None:
        config["on_nonfinite"] = args.on_nonfinite
    if args.meta_iterations is not None:
        if args.meta_iterations < 1:
            raise InputError(f"--meta-iterations must be a positive integer, got {args.meta_iterations}")
        config["meta_iterations"] = args.meta_iterations
        opt = config.get("optimizer") or {}
        if opt.get("schedule") and args.meta_iterations > int(opt.get("decay_steps") or 0):
            raise InputError(
                f"--meta-iterations {args.meta_iterations} goes past the end of the run's {opt['schedule']} "
                f"learning-rate schedule ({opt.get('decay_steps')} meta-iterations, fixed when the run was "
                "created); a resumed run keeps its schedule: train a new run with the longer --meta-iterations"
            )
    if args.checkpoint_every is not None:
        if args.checkpoint_every < 1:
            raise InputError(f"--checkpoint-every must be a positive integer, got {args.checkpoint_every}")
        config["checkpoint_every"] = args.checkpoint_every
    if args.data_dir is not None:
        config["data_dir"] = _existing_data_dir(args.data_dir, config.get("benchmark"))
    return config


def _existing_data_dir(data_dir: str, benchmark: str | None = None) -> str:
    import pathlib

    from ._errors import DataError

    preset = BENCHMARKS.get(benchmark) if benchmark else None
    if preset is not None and preset.data_subdir is None:
        raise InputError(f"--data-dir is not used by {benchmark} (its tasks are synthetic)")
    path = pathlib.Path(data_dir).expanduser()
    if not path.exists():
        raise DataError(f"--data-dir {path} does not exist")
    return str(path.resolve())


_PATH_FLAGS = (("out", "--out"), ("data_dir", "--data-dir"), ("resume", "--resume"), ("run_dir", "RUN_DIR"),
               ("checkpoint", "--checkpoint"))


def _check_paths(args) -> None:
    """An empty path (`--out ''`) would mean the current directory: refuse it."""
    for name, flag in _PATH_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and not value.strip():
            raise InputError(f"{flag} is empty ({value!r}); give a path"
                             + (", or leave --out out for runs/<benchmark>-<method>-<timestamp>" if name == "out" else ""))


#: The keys ctmeta writes into config.json (besides those of presets.resolve_config).
_CONFIG_EXTRA_KEYS = {"on_nonfinite", "dtype", "task_family", "versions", "created", "argv", "devices", "processes",
                      "resumes", "data_options", "reproduce"}


def _check_config_origin(config: dict, warn) -> None:
    """Warn about a config.json written by another ctmeta version or holding keys this version does not know."""
    from . import __version__
    from .presets import resolve_config

    saved = config.get("ctmeta_version")
    if saved != __version__:
        warn(f"warning: the run was written by ctmeta {saved or '(unknown version)'}, this is ctmeta {__version__}; "
             "its configuration is read as this version understands it")
    known = set(resolve_config()) | _CONFIG_EXTRA_KEYS
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        warn(f"warning: config.json holds key{'s' if len(unknown) > 1 else ''} this version does not know, ignored: "
             + ", ".join(unknown))


def _cluster(args) -> tuple[str, int, int] | None:
    """`(coordinator address, number of processes, process id)` of a
    multi-process run, checked; `None` for one process."""
    flags = {"--coordinator-address": args.coordinator_address, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    given = [flag for flag, value in flags.items() if value is not None]
    if not given:
        return None
    if len(given) < len(flags):
        missing = [flag for flag in flags if flag not in given]
        raise InputError(
            f"{' and '.join(given)} without {' and '.join(missing)}: a multi-process run needs "
            "--coordinator-address, --num-processes and --process-id together (none for one process)"
        )
    from .sharding import check_cluster

    cluster = (args.coordinator_address, args.num_processes, args.process_id)
    check_cluster(*cluster)
    return cluster


def _task_mesh(cluster, devices: int | None, meta_batch: int):
    """Join the multi-process job, if any, and return the mesh the meta-batch
    is split over (`None` with one device: no sharding)."""
    from .sharding import initialize, task_mesh, tasks_per_device

    if devices is not None and devices < 1:
        raise InputError(f"--devices must be a positive integer, got {devices}")
    if cluster is not None:
        initialize(*cluster)
    mesh = task_mesh(per_process=devices)
    if mesh.size == 1:
        return None
    tasks_per_device(meta_batch, mesh)
    return mesh


def _cmd_train(args, argv) -> int:
    from .runs import (Reporter, RunDir, check_writable, default_run_dir, dtype_name, evaluate_run, package_versions,
                       train)

    _check_paths(args)
    _check_limits(args)  # before the run directory is touched
    cluster = _cluster(args)
    # Several processes: all compute, process 0 alone writes (and prints).
    writes = cluster is None or cluster[2] == 0
    reporter = Reporter(quiet=args.quiet, silent=not writes)
    if args.resume is not None:
        run = RunDir.open(args.resume)
        saved = run.read_config()
        config = _check_resume_flags(args, saved)
        if writes:
            _check_run_writable(run, f"--resume {run.path}", check_writable)
            _check_config_origin(saved, _warn)
            run.lock()
            run.remove_temporaries()
    else:
        if args.download:
            _download(args.benchmark or "cosmixture", args.data_dir, reporter)
        config = _resolve_train(args)  # every flag checked before any JAX work
        if cluster is not None and cluster[1] > 1 and args.out is None:
            raise InputError("a multi-process run needs --out DIR, the same on every process (process 0 writes it)")
        out = args.out if args.out is not None else str(default_run_dir(config["benchmark"], config["method"]))
        if writes and RunDir(out).config_path.exists():
            raise InputError(f"--out {out} already holds a run; continue it with --resume {out} or choose another --out")
        if writes:
            check_writable(out, f"--out {out}" if args.out is not None else f"the run directory {out} (the default "
                           "--out, under the current directory)")

    args.policy = config.get("on_nonfinite") or "error"
    mesh = _task_mesh(cluster, args.devices, int(config["meta_batch"]))
    import jax

    from .presets import build

    exp = build(config, progress=not reporter.quiet, log=reporter.log)
    learner = exp.learner
    if mesh is not None:
        learner.mesh = mesh
    placement = {"devices": 1 if mesh is None else int(mesh.size), "processes": jax.process_count()}
    if args.resume is not None:
        if config.get("dtype") and config["dtype"] != dtype_name():
            raise InputError(f"the run was trained in {config['dtype']} but this process uses {dtype_name()}")
        state, meta, path = run.load_latest(learner.init(exp.run_key), warn=_warn, config=config)
        it = int(state.iteration)
        rows = run.truncate_metrics(it) if writes else []
        seconds = float(meta.get("seconds", rows[-1]["seconds"] if rows else 0.0))
        resumes = list(config.get("resumes", []))
        resumes.append({"from_iteration": it, "at": _dt.datetime.now().isoformat(timespec="seconds"),
                        "argv": list(argv), **placement})
        config["resumes"] = resumes
        if writes:
            run.write_config(config)
        args.run_path = str(run.path)
        reporter.log(f"resuming {run.path} from {path.name} (iteration {it})")
    else:
        config["dtype"] = dtype_name()
        config["task_family"] = repr(exp.family)
        config["versions"] = package_versions()
        config["created"] = _dt.datetime.now().isoformat(timespec="seconds")
        config["argv"] = list(argv)
        config.update(placement)  # the devices the meta-batch was split over, and the processes
        if writes:
            run = RunDir.create(out, config)
            run.lock()
        else:
            run = RunDir(out)
        state, seconds = None, 0.0
        reporter.log(f"run directory: {run.path}")
    args.run_path = str(run.path)
    state = train(exp, run, state=state, seconds_offset=seconds, reporter=reporter)
    evaluate_run(exp, run, state, reporter=reporter, log_y=args.log_y)
    return 0


def _check_run_writable(run, what: str, check_writable) -> None:
    """The run directory and the folders ctmeta writes in it accept new files."""
    for folder in (run.path, run.checkpoint_dir, run.figure_dir):
        if folder.exists() or folder == run.path:
            check_writable(folder, what if folder == run.path else f"{what} ({folder.name}/)")


def _download(benchmark: str, data_dir: str | None, reporter) -> None:
    """Fetch `benchmark`'s files into its data directory (`--download`), with a
    byte-count progress bar. Every process of a multi-process run does it:
    each writes through its own temporary file and an atomic rename."""
    from .presets import default_data_dir
    from .tasks.download import download

    preset = BENCHMARKS[benchmark]
    if preset.data_subdir is None:
        raise InputError(f"--download: {benchmark} has no data to download (its tasks are synthetic)")
    target = data_dir if data_dir else default_data_dir(preset)
    if reporter.quiet:
        download(benchmark, target, log=reporter.log)
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, object] = {}

        def progress(name, done, total):
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done, total=total)

        download(benchmark, target, log=reporter.log, progress=progress)


def _cmd_download(args) -> int:
    import pathlib

    from .runs import Reporter

    _check_paths(args)
    if args.data_dir is not None and pathlib.Path(args.data_dir).expanduser().is_file():
        raise InputError(f"--data-dir {args.data_dir} is a file, not a directory; give the folder to put the files in")
    _download(args.benchmark, args.data_dir, Reporter(quiet=args.quiet))
    return 0


def _warn(message: str) -> None:
    print(f"ctmeta: {message}", file=sys.stderr, flush=True)


def _parse_steps(text: str) -> list[int]:
    parts = [x.strip() for x in str(text).split(",")]
    try:
        steps = [int(x) for x in parts]
    except ValueError:
        raise InputError(f"--steps {text!r}: expected non-negative integers separated by commas, e.g. 0,10,50") from None
    if not steps or any(x < 0 for x in steps):
        raise InputError(f"--steps {text!r}: expected non-negative integers separated by commas, e.g. 0,10,50")
    if max(steps) > _LIMITS["steps"]:
        raise InputError(f"--steps {max(steps)} is too large (at most {_LIMITS['steps']:g}); choose a smaller value")
    return sorted(set(steps))


def _cmd_evaluate(args) -> int:
    from ._errors import check_positive
    from .presets import build
    from .runs import Reporter, RunDir, check_writable, evaluate_run

    _check_paths(args)
    steps = None if args.steps is None else _parse_steps(args.steps)
    if args.tasks is not None and args.tasks < 1:
        raise InputError(f"--tasks must be a positive integer, got {args.tasks}")
    if args.lr is not None:
        check_positive("--lr", args.lr)
    reporter = Reporter(quiet=args.quiet)
    run = RunDir.open(args.run_dir)
    config = run.read_config()
    _check_config_origin(config, _warn)
    if args.data_dir is not None:
        config["data_dir"] = _existing_data_dir(args.data_dir, config.get("benchmark"))
    # Before any work: results are written into the run, which a training run must not be writing.
    _check_run_writable(run, f"run directory {run.path}", check_writable)
    with run.locked():
        exp = build(config, progress=not reporter.quiet, log=reporter.log)
        like = exp.learner.init(exp.run_key)
        if args.checkpoint is not None:
            state, _, path = run.load_checkpoint(args.checkpoint, like, config=config)
        else:
            state, _, path = run.load_latest(like, warn=_warn, config=config)
        reporter.log(f"evaluating {run.path} at {path.name} (iteration {int(state.iteration)})")
        evaluate_run(exp, run, state, reporter=reporter, steps=steps, tasks=args.tasks, lr=args.lr,
                     log_y=args.log_y)
    return 0


_BENCH_POSITIVE_INTS = ("repeats", "meta_batch")
_BENCH_POSITIVE_FLOATS = ("time_budget", "max_bytes")


def _bench_parser(bench):
    """`ctmeta bench`'s flags (from `ctmeta.bench.build_parser`) in the style
    of the other commands: errors on one line as `ctmeta bench: error: ...`,
    INT/FLOAT/DIR metavars, defaults in the help, and `--quiet`."""
    parser = _Parser(
        prog="ctmeta bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
        from .runs import check_writable

        check_writable(args.out, f"--out {args.out}")


def _run_bench(argv: list[str]) -> int:
    try:
        from . import bench
    except ImportError as err:
        print(f"ctmeta: error: ctmeta bench is not available ({err})", file=sys.stderr)
        return 2
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
    except CtmetaError as err:
        if debug:
            traceback.print_exc()
        print(f"ctmeta: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctmeta: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        return _internal_error(err, debug)
    finally:
        sys.stderr = old_stderr
        if restore_columns:
            os.environ.pop("COLUMNS", None)


def _run_reproduce(argv: list[str]) -> int:
    """`ctmeta reproduce ...` (ctmeta.experiments.reproduce.main), with its usage
    errors on one line, its paths checked first and its messages in the style
    of the other commands."""
    import types

    from .experiments import reproduce

    debug = "--debug" in argv
    parser = reproduce.build_parser()
    parser.error = types.MethodType(_Parser.error, parser)  # one line, "(see: ctmeta reproduce --help)"
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
            from .runs import check_writable

            check_writable(args.out, f"--out {args.out}")
        sys.stderr = _RestyledStderr(old_stderr, "reproduce")
        return int(reproduce.main(argv) or 0)
    except CtmetaError as err:
        if debug:
            traceback.print_exc()
        print(f"ctmeta: error: {one_line(err)}", file=old_stderr)
        return 2
    except OSError as err:
        sys.stderr = old_stderr
        if _ENVIRONMENT_ERRNOS.get(err.errno) is None:
            return _internal_error(err, debug)
        where = f" {err.filename}" if err.filename else ""
        print(f"ctmeta: error: cannot write{where}: {_ENVIRONMENT_ERRNOS[err.errno]}", file=old_stderr)
        return 2
    except Exception as err:
        sys.stderr = old_stderr
        return _internal_error(err, debug)
    finally:
        sys.stderr = old_stderr


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ctmeta` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _run_bench(argv[1:])
    if argv and argv[0] == "reproduce":
        return _run_reproduce(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    debug = getattr(args, "debug", False)
    try:
        if args.command == "train":
            return _cmd_train(args, argv)
        if args.command == "evaluate":
            return _cmd_evaluate(args)
        if args.command == "download":
            return _cmd_download(args)
        parser.error(f"unknown command {args.command!r}")
    except NumericalError as err:  # a runtime failure, not a usage error: status 1
        if debug:
            traceback.print_exc()
        print(f"ctmeta: error: {_numerical_message(err, args)}", file=sys.stderr)
        return 1
    except DownloadError as err:  # the network or the server, not the user's input: status 1
        if debug:
            traceback.print_exc()
        print(f"ctmeta: error: {one_line(err)}; download the file by hand into the data directory, "
              "or run again later", file=sys.stderr)
        return 1
    except CtmetaError as err:
        if debug:
            traceback.print_exc()
        print(f"ctmeta: error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if _ENVIRONMENT_ERRNOS.get(err.errno) is None:
            return _internal_error(err, debug)
        # The user's environment (permissions, a read-only or full disk), not a bug: status 2.
        if debug:
            traceback.print_exc()
        where = f" {err.filename}" if err.filename else ""
        print(f"ctmeta: error: cannot write{where}: {_ENVIRONMENT_ERRNOS[err.errno]}; "
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
        return _internal_error(err, debug)
    return 0


def _internal_error(err: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exception(type(err), err, err.__traceback__)
    msg = str(err).strip().splitlines()
    msg = msg[0] if msg else ""
    hint = "" if debug else " (run again with --debug for the traceback)"
    print(f"ctmeta: internal error: {type(err).__name__}: {msg}{hint}", file=sys.stderr)
    return 1


def _errno_names() -> dict[int, str]:
    import errno

    return {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "disk quota exceeded"}


_ENVIRONMENT_ERRNOS = _errno_names()


def _numerical_message(err: NumericalError, args) -> str:
    """The error, and advice that fits the command line: resuming repeats a
    deterministic failure, so it is offered only with --on-nonfinite
    skip-task and only when some task of the meta-batch succeeded."""
    import re

    where = getattr(args, "run_path", None)
    what = one_line(getattr(err, "what", None) or str(err)).rstrip(".")
    if not where or args.command != "train":
        return what
    iteration = getattr(err, "iteration", None)
    if iteration is None:
        m = re.search(r"meta-iteration (\d+)", what)
        iteration = int(m.group(1)) if m else None
    all_tasks = getattr(err, "all_tasks", None)
    if all_tasks is None:
        all_tasks = "every task" in what
    policy = getattr(args, "policy", None) or getattr(args, "on_nonfinite", None) or "error"
    new_run = "a smaller --T or more --steps" + ("" if iteration == 1 else ", or a smaller --meta-lr")
    if not all_tasks and policy != "skip-task":
        return (f"{what}; the last good iteration is checkpointed: continue with ctmeta train --resume {where} "
                f"--on-nonfinite skip-task (leaves such tasks out), or start a new run with {new_run}")
    if iteration == 1:
        return (f"{what}; this is the first meta-iteration, from the initialisation, so resuming would fail the "
                f"same way: start a new run with {new_run}")
    return (f"{what}; the last good iteration is checkpointed in {where}, but the run is deterministic, so "
            f"resuming would fail the same way: start a new run with {new_run}")


def _console_main() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
