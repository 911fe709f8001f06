"""`ctmeta evaluate RUN_DIR`: evaluate a run's checkpoint, beside its own results or as them."""

from __future__ import annotations

from .._errors import InputError
from ._checks import LIMITS, check_config_origin, check_paths, check_run_writable, existing_data_dir, too_large
from ._messages import print_warning

__all__ = ["cmd_evaluate", "parse_steps"]


def parse_steps(text: str) -> list[int]:
    parts = [x.strip() for x in str(text).split(",")]
    try:
        steps = [int(x) for x in parts]
    except ValueError:
        raise InputError(f"--steps {text!r}: expected non-negative integers separated by commas, e.g. 0,10,50") from None
    if not steps or any(x < 0 for x in steps):
        raise InputError(f"--steps {text!r}: expected non-negative integers separated by commas, e.g. 0,10,50")
    if max(steps) > LIMITS["steps"]:
        raise too_large("--steps", max(steps), LIMITS["steps"])
    return sorted(set(steps))


def cmd_evaluate(args) -> int:
    """Evaluate a checkpoint of a run: into the run's own results when it is
    the run's evaluation redone, else into RUN/evaluations/<name>/ (see
    `ctmeta.runs.evaluations`); a diverged adaptation writes nothing."""
    from .._errors import check_positive
    from ..presets import build
    from ..runs import Reporter, RunDir, check_writable, evaluate_run, metrics_warning
    from ..runs.evaluations import check_name, destination, write_index
    from ..runs.results import resolve_evaluation

    check_paths(args)
    steps = None if args.steps is None else parse_steps(args.steps)
    if args.tasks is not None and args.tasks < 1:
        raise InputError(f"--tasks must be a positive integer, got {args.tasks}")
    if args.lr is not None:
        check_positive("--lr", args.lr)
    if args.inner_loss_tasks is not None and args.inner_loss_tasks < 0:
        raise InputError(f"--inner-loss-tasks must be 0 or a positive integer, got {args.inner_loss_tasks}")
    if args.name is not None:
        check_name(args.name)
    reporter = Reporter(quiet=args.quiet)
    run = RunDir.open(args.run_dir)
    config = run.read_config()
    check_config_origin(config, print_warning)
    if args.data_dir is not None:
        config["data_dir"] = existing_data_dir(args.data_dir, config.get("benchmark"))
    # Before any work: the run directory (or its evaluations/) must accept files.
    check_writable(run.path, f"run directory {run.path}")
    exp = build(config, progress=not reporter.quiet, log=reporter.log)
    like = exp.learner.init(exp.run_key)
    if args.checkpoint is not None:
        state, _, path = run.load_checkpoint(args.checkpoint, like, config=config)
    else:
        state, _, path = run.load_latest(like, warn=print_warning, config=config)
    damaged = metrics_warning(run)  # the meta-loss curve drawn from a cut or torn metrics.csv: said, not hidden
    if damaged:
        print_warning(damaged)
    options = resolve_evaluation(exp, state, steps=steps, tasks=args.tasks, lr=args.lr,
                                 inner_loss_tasks=args.inner_loss_tasks)
    defaults = resolve_evaluation(exp, state)  # the run's configuration's (the meta-test tasks are cached)
    dest, name = destination(run, config, options, defaults, args.name)
    record = {"name": name, "checkpoint": path.name}
    if name is None:  # the run's own results: not while ctmeta train writes the run
        check_run_writable(run, f"run directory {run.path}", check_writable)
        with run.locked():
            reporter.log(f"evaluating {run.path} at {path.name} (iteration {int(state.iteration)}): the run's own "
                         "evaluation, redone")
            evaluate_run(exp, run, state, reporter=reporter, steps=steps, tasks=args.tasks, lr=args.lr,
                         log_y=args.log_y, inner_loss_tasks=args.inner_loss_tasks, record=record)
    else:  # a folder of its own: a training run may go on beside it
        check_writable(dest, f"the evaluation folder {dest}")
        reporter.log(f"evaluating {run.path} at {path.name} (iteration {int(state.iteration)}) into {dest}")
        evaluate_run(exp, run, state, reporter=reporter, steps=steps, tasks=args.tasks, lr=args.lr,
                     log_y=args.log_y, inner_loss_tasks=args.inner_loss_tasks, dest=dest, record=record)
    write_index(run)
    return 0
