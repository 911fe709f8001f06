"""The `ctmeta` command line's parser: its commands, flags and help texts."""

from __future__ import annotations

import argparse
import textwrap

from ..optimizers import LR_SCHEDULES, OPTIMIZERS
from ..presets import BACKBONES, BENCHMARKS, METHODS, resolve_config
from ._checks import resume_may_change

__all__ = ["Parser", "add_common", "build_parser"]

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

class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help lines wrapped between words only: a flag such as `--on-nonfinite`
    is never split at its hyphens (argparse's default would)."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _by_value(value_of) -> str:
    """"2 on cosmixture, alpine; 0.5 on movielens, ...": the presets grouped by a default."""
    groups: dict = {}
    for name, preset in BENCHMARKS.items():
        groups.setdefault(value_of(preset), []).append(name)
    return "; ".join(f"{value:g} on {', '.join(names)}" for value, names in groups.items())


# The defaults the help states, read off the presets (what resolve_config fills in).
_AMAML_HORIZONS = _by_value(lambda p: p.T)
_DISCRETE_STEPS = ("maml and anil " + _by_value(lambda p: p.maml_steps) + "; fomaml, reptile and imaml "
                   + _by_value(lambda p: p.steps))
_COMLN_HORIZON = _by_value(lambda p: p.comln_T) if len({p.comln_T for p in BENCHMARKS.values()}) > 1 else \
    f"{next(iter(BENCHMARKS.values())).comln_T:g}"

_HORIZON_AND_STEPS = textwrap.fill(
    "horizon and steps: gradient descent with learning rate h is the Euler discretisation of the gradient flow, "
    f"so T = steps * h. For amaml, --T is the horizon (default: {_AMAML_HORIZONS}) and, without --steps, the "
    "meta-gradient is the adaptive adjoint: Dopri5 forward, the adjoint solved backward adaptively over its dense "
    "output (no steps to choose); --steps K selects the paper's sweep over K stored states (h = T/K), and "
    "--solver rk4 K fixed RK4 steps (without --steps, K = T/0.01). For the discrete methods, --steps is the "
    f"number of inner GD steps (default: {_DISCRETE_STEPS}) and, without --T, T = steps * 0.01 (learning rate "
    f"0.01). For comln, --T is the initial horizon (default {_COMLN_HORIZON}), learned as exp(log T); the head's "
    "flow uses Dopri5, or Euler with --steps fixed steps if given.", 78, break_on_hyphens=False)

_TRAIN_EPILOG = """\
benchmarks:
""" + "\n".join(f"  {k:<13} {v.description}" for k, v in BENCHMARKS.items()) + """

methods:
""" + "\n".join(f"  {k:<13} {v}" for k, v in METHODS.items()) + """

""" + _HORIZON_AND_STEPS + """

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
config.json, metrics.csv, checkpoints/, figures/ and results.md. --data-dir
DIR is a data root, holding one folder per data set (DIR/omniglot/,
DIR/movielens/, ...); a data set's own folder (DIR/omniglot) is accepted too.
Without it, data are read from $CTMETA_DATA/<name>, else ./data/<name>;
nothing is downloaded unless --download is given (it fetches the official
files there).
"""


def _default_run() -> str:
    """What `ctmeta train` with no flags runs, read off `resolve_config()`."""
    c = resolve_config()
    m, opt = c["model"], c["optimizer"]
    rule = "adaptive adjoint" if c["steps"] is None else f"{c['steps']} stored states"
    return (f"With no flags: {BENCHMARKS[c['benchmark']].description.split()[0]} {c['shots']}shot-{c['queries']}val, "
            f"A-MAML (T={c['T']:g}, {rule}), an MLP {m['depth']}x{m['width']} {m['activation']}, "
            f"{opt['name'].capitalize()} {opt['learning_rate']:g}, {c['meta_batch']} tasks per meta-batch, "
            f"{c['meta_iterations']} meta-iterations, then the evaluation on {c['eval']['tasks']} meta-test tasks.")


#: How long the default run takes, as measured (with what, when and where).
_DEFAULT_RUN_TIME = (
    "Measured: meta-training took 79 s for these 1000 meta-iterations (the same configuration's first 1000 "
    "of 5000 in docs/results/amaml-fig2-cosmixture/50shot-50val/amaml, one CPU core, 2026-12-01); the whole "
    "command, compilation and evaluation included, took 4.9 minutes on 2 CPU cores under load in a user "
    "trial (issue 30).")


_EVALUATE_EPILOG = """\
checkpoints side by side (the run keeps its last 2 checkpoints, so evaluate
earlier ones while it trains, or copy them):

  ctmeta evaluate RUN --checkpoint 150 --tasks 200    -> RUN/evaluations/iteration-150_tasks-200/
  ctmeta evaluate RUN --checkpoint 300 --tasks 200    -> RUN/evaluations/iteration-300_tasks-200/
  cat RUN/evaluations/index.md                        one line each, with the run's own results

  ctmeta evaluate RUN                                 the run's final evaluation redone (its own results)
  ctmeta evaluate RUN --lr 0.005 --name lr-small      -> RUN/evaluations/lr-small/
"""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars: print log lines only")
    p.add_argument("--debug", action="store_true", help="print the full traceback on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ctmeta", description=_DESCRIPTION, formatter_class=_Formatter
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"ctmeta {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="meta-train on a benchmark and evaluate on its meta-test tasks",
        description="Meta-train an initialisation on a benchmark, then report the meta-test error\n"
        "after 0..K adaptation steps, for the learned and for a random initialisation.\n"
        + textwrap.fill(_default_run() + " " + _DEFAULT_RUN_TIME, 78, break_on_hyphens=False),
        epilog=_TRAIN_EPILOG,
        formatter_class=_Formatter,
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
    t.add_argument("--solver", choices=["dopri5", "rkc2", "rk4"], default=None,
                   help="amaml's forward solver: dopri5 (adaptive; without --steps the backward is adaptive "
                   "too), rkc2 (adaptive Runge-Kutta-Chebyshev, forward and backward: stages grow like "
                   "sqrt(h lambda_max), for stiff inner flows; not with --steps or --flow heavy-ball) or rk4 "
                   "(K = --steps fixed steps of T/K; without --steps K = T/0.01) (default: dopri5)")
    t.add_argument("--flow", choices=["gradient", "preconditioned", "heavy-ball"], default=None,
                   help="the inner flow, its meta-parameters learned with the initialisation (amaml, maml, anil): "
                   "gradient (du/dt = -grad L), preconditioned (du/dt = -P grad L, P = exp(rho) per parameter, "
                   "Meta-SGD in continuous time) or heavy-ball (u'' + gamma u' = -grad L, gamma learned) "
                   "(default: gradient)")
    t.add_argument("--meta-iterations", type=int, default=None, metavar="INT",
                   help="outer iterations, > 0 (default: per benchmark, 1000)")
    t.add_argument("--meta-batch", type=int, default=None, metavar="INT",
                   help="tasks per outer iteration, > 0 (default: 5; 4 for images)")
    t.add_argument("--ways", type=int, default=None, metavar="INT",
                   help="classes per task, classification only (default: 20 omniglot, 5 miniimagenet)")
    t.add_argument("--shots", type=int, default=None, metavar="INT",
                   help="support examples per task (per class for images); regression uses as many queries")
    t.add_argument("--data-dir", default=None, metavar="DIR",
                   help="data root holding one folder per data set (DIR/omniglot/, DIR/movielens/, ...), or "
                   "the data set's own folder (movielens, movielens-1m, jester, omniglot, miniimagenet)")
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
    t.add_argument("--keep-checkpoints", default=None, metavar="I,J,...",
                   help="also save the checkpoints of these meta-iterations and keep them (a run keeps only its "
                   "last 2 otherwise), e.g. 150,500,1000 to evaluate the run at each (ctmeta evaluate --checkpoint)")
    t.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its last checkpoint with its saved configuration "
                   f"(only {resume_may_change()} may change; --data-dir says where the data are now)")
    t.add_argument("--init-from", default=None, metavar="RUN_DIR",
                   help="a new run that starts from the model of another run's last checkpoint (a warm start: "
                   "e.g. Reptile's initialisation meta-trained further by A-MAML); same model, fresh optimiser")
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
    add_common(t)

    e = sub.add_parser(
        "evaluate",
        help="evaluate a run's checkpoint on the meta-test tasks (beside the run's own results)",
        description="""\
Load RUN_DIR's configuration and latest checkpoint (or --checkpoint), evaluate
the learned and a random initialisation on the meta-test tasks, print the table.

Where it is written: the run's own results (RUN_DIR/results.md, results.json,
figures/) are replaced only by the same evaluation redone (the same checkpoint
iteration, --steps, --tasks, --lr and --inner-loss-tasks), which needs the run
not in use by ctmeta train. Any other evaluation goes to RUN_DIR/evaluations/
NAME/ (results.md, results.json, figures/), NAME given by --name or made of
the options that differ from the run's (e.g. iteration-150_tasks-200): several
are kept side by side, the same one redone replaces its folder, and they can
be written while the run trains. RUN_DIR/evaluations/index.md lists them all,
one line each. An adaptation that diverges (a non-finite error on some task,
e.g. --lr too large) is said in one line, exits 1 and writes nothing.""",
        epilog=_EVALUATE_EPILOG,
        formatter_class=_Formatter,
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
                   help="where the benchmark's data are now: the data root holding its folder, or that folder "
                   "(default: the run's data directory)")
    e.add_argument("--log-y", action="store_true",
                   help="draw error_vs_steps.png with a logarithmic error axis (a drawing option: it does not "
                   "name the evaluation)")
    e.add_argument("--name", default=None, metavar="NAME",
                   help="write into RUN_DIR/evaluations/NAME/ (default: the run's own results for its evaluation "
                   "redone, else a name from the options, e.g. iteration-150_tasks-200); a NAME that holds an "
                   "evaluation of other options is refused")
    e.add_argument("--inner-loss-tasks", type=int, default=None, metavar="INT",
                   help="on how many meta-test tasks to follow the support and query loss along the inner flow "
                   "(figures/inner_loss.png), >= 0, 0 for none (default: 4; 0 for images)")
    add_common(e)

    dl = sub.add_parser(
        "download",
        help="fetch a benchmark's official data files (the network is used only here and by --download)",
        description="Fetch a benchmark's official files into DIR (default $CTMETA_DATA/<name>, else "
        "./data/<name>); files already there are kept. miniImageNet cannot be downloaded (ImageNet terms).",
    )
    dl.add_argument("benchmark", metavar="BENCHMARK", choices=[b for b, p in BENCHMARKS.items() if p.data_subdir],
                    help="one of: " + ", ".join(b for b, p in BENCHMARKS.items() if p.data_subdir))
    dl.add_argument("--data-dir", default=None, metavar="DIR",
                    help="the data root to put them in, as DIR/<name>/ (a DIR named <name> is that folder itself)")
    add_common(dl)

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
