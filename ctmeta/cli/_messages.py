"""What the command line prints when something goes wrong.

The library's messages name parameters in backticks (`meta_lr`, `T`,
`out`); the command line's name the flags that set them (`--meta-lr`,
`--T`, `--out`): [`user_message`][] translates them through `FLAG_OF`.
"""

from __future__ import annotations

import re
import sys
import traceback

from .._errors import ENVIRONMENT_ERRNOS, CtmetaError, NumericalError, exit_code
from ..runs import one_line

__all__ = ["ENVIRONMENT_ERRNOS", "FLAG_OF", "as_flags", "internal_error", "numerical_message", "print_warning",
           "report", "user_message"]

#: The library's parameters -> the flags that set them.
FLAG_OF = {name: "--" + name.replace("_", "-") for name in (
    "T", "steps", "solver", "flow", "meta_iterations", "meta_batch", "ways", "shots", "data_dir", "backbone", "optimizer",
    "meta_lr", "lr_schedule", "seed", "out", "checkpoint_every", "resume", "on_nonfinite", "method", "benchmark",
    "checkpoint", "tasks", "coordinator_address", "num_processes", "process_id", "lr", "name")}
FLAG_OF["per_process"] = "--devices"  # ctmeta.sharding.task_mesh(per_process=...)


def as_flags(text: str) -> str:
    """`text` with each backticked parameter of `FLAG_OF` replaced by its flag."""
    return re.sub(r"`(\w+)`", lambda m: FLAG_OF.get(m.group(1), m.group(0)), text)


def user_message(err) -> str:
    """A library error on one line, naming flags instead of parameters."""
    return as_flags(one_line(err))


def print_warning(message: str) -> None:
    print(f"ctmeta: {message}", file=sys.stderr, flush=True)


def internal_error(err: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exception(type(err), err, err.__traceback__)
    msg = str(err).strip().splitlines()
    msg = msg[0] if msg else ""
    hint = "" if debug else " (run again with --debug for the traceback)"
    print(f"ctmeta: internal error: {type(err).__name__}: {msg}{hint}", file=sys.stderr)
    return 1




def report(err: BaseException, debug: bool, *, message: str | None = None, advice: str = "") -> int:
    """Tell the user why a command stopped, on one line of stderr, and return
    its exit status ([`exit_code`][ctmeta._errors.exit_code]).

    What the user can act on (a ctmeta error, an `OSError` of the environment,
    an interruption) is `message` (by default the error in flag words), then
    `advice`; anything else is a bug: [`internal_error`][]. With `debug` the
    traceback comes first.
    """
    interrupted = isinstance(err, KeyboardInterrupt)
    environment = isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS
    if not (interrupted or environment or isinstance(err, CtmetaError)):
        return internal_error(err, debug)
    if debug and not interrupted:
        traceback.print_exception(type(err), err, err.__traceback__)
    if message is None:
        if interrupted:
            message = "interrupted"
        elif environment:
            where = f" {err.filename}" if err.filename else ""
            message = f"cannot write{where}: {ENVIRONMENT_ERRNOS[err.errno]}"
        else:
            message = user_message(err)
    print(f"ctmeta: {'' if interrupted else 'error: '}{message}{advice}", file=sys.stderr)
    return exit_code(err)


def numerical_message(err: NumericalError, args) -> str:
    """The error, and advice that fits the command line: resuming repeats a
    deterministic failure, so it is offered only with --on-nonfinite
    skip-task and only when some task of the meta-batch succeeded."""
    import re

    from ..runs import EvaluationDiverged

    where = getattr(args, "run_path", None)
    what = as_flags(one_line(getattr(err, "what", None) or str(err))).rstrip(".")
    if isinstance(err, EvaluationDiverged):  # the evaluation's own advice: not the training's
        if args.command == "train" and where:
            return (f"{what.replace(': choose a smaller --lr', '')}; the trained model is checkpointed: evaluate "
                    f"it with a smaller learning rate: ctmeta evaluate {where} --lr LR")
        return what
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
