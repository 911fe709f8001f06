"""`ctmeta train` (a new run, or `--resume`) and `ctmeta download`."""

from __future__ import annotations

import datetime as _dt

from .._errors import InputError
from ..presets import BACKBONES, BENCHMARKS
from ..runs.rundir import RESUME_SOLVERS
from ._checks import (check_config_origin, check_limits, check_paths, check_run_writable, existing_data_dir, number_text,
                      resume_may_change)
from ._messages import print_warning

__all__ = ["cmd_download", "cmd_train", "download_data"]

_FIXED_ON_RESUME = ("benchmark", "method", "T", "steps", "meta_batch", "ways", "shots", "seed")


def resolve_train(args) -> dict:
    check_limits(args)
    config = resolve_train_config(args)
    config["on_nonfinite"] = args.on_nonfinite or "error"
    if args.keep_checkpoints is not None:
        config["keep_checkpoints"] = _iterations("--keep-checkpoints", args.keep_checkpoints)
    return config


def _iterations(flag: str, text: str) -> list[int]:
    """`150,500,1000` -> `[150, 500, 1000]`: positive meta-iterations, sorted."""
    try:
        its = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        its = []
    if not its or its[0] < 1:
        raise InputError(f"{flag} expects positive meta-iterations separated by commas (e.g. 150,500,1000), "
                         f"got {text!r}")
    return its


def resolve_train_config(args) -> dict:
    from ..presets import resolve_config

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
        flow=args.flow,
    )


def saved_choices(config: dict) -> dict:
    """The values of --optimizer, --meta-lr, --lr-schedule and --backbone that
    a saved configuration holds (runs written before `backbone` was recorded
    name it through their model)."""
    opt = config.get("optimizer") or {}
    model = str((config.get("model") or {}).get("name", ""))
    backbone = config.get("backbone") or next((b for b in BACKBONES if model.startswith(b)), None)
    solver = (config.get("method_options") or {}).get("solver", "dopri5") if config.get("method") == "amaml" else None
    flow = (config.get("flow") or {}).get("name", "gradient")  # runs before flows: the gradient flow
    return {"optimizer": opt.get("name"), "meta_lr": opt.get("learning_rate"),
            "lr_schedule": opt.get("schedule") or "none", "backbone": backbone, "solver": solver, "flow": flow}


def _fixed_on_resume(flag: str, value, saved) -> InputError:
    given = number_text(value) if isinstance(value, (int, float)) else value
    kept = number_text(saved) if isinstance(saved, (int, float)) and not isinstance(saved, bool) else repr(saved)
    return InputError(f"{flag} {given} differs from the resumed run's {kept}; a resumed run keeps its configuration "
                      f"(only {resume_may_change()} may change; --data-dir says where the data are now)")


def _resumed_solver(solver: str | None, config: dict) -> dict | None:
    """A-MAML's `method_options` with the forward solver `solver` (`--solver` on resume), or `None` when it
    is not given or unchanged. Only between the adaptive solvers `RESUME_SOLVERS`: the tolerances, the dense
    output and the flow stay; a stored sweep (`--steps`, `--solver rk4`) is another rule, not another solver."""
    saved = saved_choices(config)["solver"]
    if solver is None or solver == saved:
        return None
    if saved is None:  # not an A-MAML run
        raise _fixed_on_resume("--solver", solver, saved)
    options = dict(config.get("method_options") or {})
    if saved not in RESUME_SOLVERS or solver not in RESUME_SOLVERS or config.get("steps") is not None:
        raise InputError(f"--solver {solver} differs from the resumed run's {saved!r}; on resume --solver changes only "
                         f"between the adaptive solvers {' and '.join(RESUME_SOLVERS)} (a run with --steps or "
                         "--solver rk4 keeps its rule)")
    if solver == "rkc2" and (config.get("flow") or {}).get("name") == "heavy-ball":
        raise InputError("--solver rkc2 needs a flow with a symmetric Jacobian (gradient or preconditioned); "
                         "the resumed run's flow is heavy-ball")
    options.pop("solver", None)
    return {**options, **({} if solver == "dopri5" else {"solver": solver})}


def check_resume_flags(args, config: dict) -> dict:
    if args.out is not None:
        raise InputError("--resume continues a run in its own directory; do not give --out with it")
    for name in _FIXED_ON_RESUME:
        value = getattr(args, name)
        if value is not None and value != config.get(name):
            flag = "--" + name.replace("_", "-")
            raise _fixed_on_resume(flag, value, config.get(name))
    for name, saved in saved_choices(config).items():
        value = getattr(args, name)
        if value is not None and value != saved and name != "solver":
            flag = "--" + name.replace("_", "-")
            raise _fixed_on_resume(flag, value, saved)
    check_limits(args)
    config = dict(config)
    changed = _resumed_solver(args.solver, config)
    if changed is not None:
        config["method_options"] = changed
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
    if args.keep_checkpoints is not None:
        more = _iterations("--keep-checkpoints", args.keep_checkpoints)
        config["keep_checkpoints"] = sorted(set(config.get("keep_checkpoints") or ()) | set(more))
    if args.data_dir is not None:
        config["data_dir"] = existing_data_dir(args.data_dir, config.get("benchmark"))
    return config


def cluster_flags(args) -> tuple[str, int, int] | None:
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
    from ..sharding import check_cluster

    cluster = (args.coordinator_address, args.num_processes, args.process_id)
    check_cluster(*cluster)
    return cluster


def mesh_for(cluster, devices: int | None, meta_batch: int):
    """Join the multi-process job, if any, and return the mesh the meta-batch
    is split over (`None` with one device: no sharding)."""
    from ..sharding import initialize, task_mesh, tasks_per_device

    if devices is not None and devices < 1:
        raise InputError(f"--devices must be a positive integer, got {devices}")
    if cluster is not None:
        initialize(*cluster)
    mesh = task_mesh(per_process=devices)
    if mesh.size == 1:
        return None
    tasks_per_device(meta_batch, mesh)
    return mesh


def cmd_train(args, argv) -> int:
    from .._record import run_record
    from ..runs import Reporter, RunDir, check_writable, default_run_dir, dtype_name, evaluate_run, train

    check_paths(args)
    check_limits(args)  # before the run directory is touched
    if args.resume is not None and args.init_from is not None:
        raise InputError("--init-from starts a new run; a resumed run continues from its own checkpoints "
                         "(give one of --resume and --init-from)")
    cluster = cluster_flags(args)
    # Several processes: all compute, process 0 alone writes (and prints).
    writes = cluster is None or cluster[2] == 0
    reporter = Reporter(quiet=args.quiet, silent=not writes)
    if args.resume is not None:
        run = RunDir.open(args.resume)
        saved = run.read_config()
        config = check_resume_flags(args, saved)
        if writes:
            check_run_writable(run, f"--resume {run.path}", check_writable)
            check_config_origin(saved, print_warning)
            run.lock()
            run.remove_temporaries()
    else:
        if args.download:
            download_data(args.benchmark or "cosmixture", args.data_dir, reporter)
        config = resolve_train(args)  # every flag checked before any JAX work
        if cluster is not None and cluster[1] > 1 and args.out is None:
            raise InputError("a multi-process run needs --out DIR, the same on every process (process 0 writes it)")
        out = args.out if args.out is not None else str(default_run_dir(config["benchmark"], config["method"]))
        if writes and RunDir(out).config_path.exists():
            raise InputError(f"--out {out} already holds a run; continue it with --resume {out} or choose another --out")
        if writes:
            check_writable(out, f"--out {out}" if args.out is not None else f"the run directory {out} (the default "
                           "--out, under the current directory)")

    args.policy = config.get("on_nonfinite") or "error"
    mesh = mesh_for(cluster, args.devices, int(config["meta_batch"]))
    import jax

    from ..presets import build

    exp = build(config, progress=not reporter.quiet, log=reporter.log)
    learner = exp.learner
    if mesh is not None:
        learner.mesh = mesh
    placement = {"devices": 1 if mesh is None else int(mesh.size), "processes": jax.process_count()}
    if args.resume is not None:
        if config.get("dtype") and config["dtype"] != dtype_name():
            raise InputError(f"the run was trained in {config['dtype']} but this process uses {dtype_name()}")
        from ..runs import resume_point

        state, meta, path, gap = resume_point(run, learner.init(exp.run_key), config, warn=print_warning)
        it = int(state.iteration)
        rows = run.truncate_metrics(it) if writes else []
        seconds = float(meta.get("seconds", rows[-1]["seconds"] if rows else 0.0))
        resumes = list(config.get("resumes", []))
        before, now = saved_choices(saved)["solver"], saved_choices(config)["solver"]
        changed = {"changed": {"solver": before}} if before != now else {}  # what it was, as reproduce records
        resumes.append({"from_iteration": it, "at": _dt.datetime.now().isoformat(timespec="seconds"),
                        "argv": list(argv), **placement, **changed, **({"metrics_gap": _span(gap)} if gap else {})})
        config["resumes"] = resumes
        if writes:
            run.write_config(config)
        args.run_path = str(run.path)
        reporter.log(f"resuming {run.path} from {path.name} (iteration {it})")
    else:
        state, seconds = None, 0.0
        if args.init_from is not None:
            from ..runs import init_from_run

            state, config["init_from"] = init_from_run(exp, args.init_from, warn=print_warning)
            reporter.log(f"starting from the model of {config['init_from']['run']} "
                         f"({config['init_from']['method']}, {config['init_from']['checkpoint']})")
        config.update(run_record(exp.family, argv))
        config.update(placement)  # the devices the meta-batch was split over, and the processes
        if writes:
            run = RunDir.create(out, config)
            run.lock()
        else:
            run = RunDir(out)
        reporter.log(f"run directory: {run.path}")
    args.run_path = str(run.path)
    state = train(exp, run, state=state, seconds_offset=seconds, reporter=reporter)
    evaluate_run(exp, run, state, reporter=reporter, log_y=args.log_y)
    return 0


def _span(iterations: list[int]) -> list[list[int]]:
    """`[12, 13, 14, 20]` as `[[12, 14], [20, 20]]`: the missing rows, compactly, for config.json."""
    spans: list[list[int]] = []
    for i in iterations:
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return spans


def download_data(benchmark: str, data_dir: str | None, reporter) -> None:
    """Fetch `benchmark`'s files into its data directory (`--download`), with a
    byte-count progress bar. Every process of a multi-process run does it:
    each writes through its own temporary file and an atomic rename."""
    from .._paths import dataset_dir
    from ..presets import default_data_dir
    from ..tasks.download import download

    preset = BENCHMARKS[benchmark]
    if preset.data_subdir is None:
        raise InputError(f"--download: {benchmark} has no data to download (its tasks are synthetic)")
    target = dataset_dir(preset.data_subdir, data_dir, for_writing=True) if data_dir else default_data_dir(preset)
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


def cmd_download(args) -> int:
    import pathlib

    from ..runs import Reporter

    check_paths(args)
    if args.data_dir is not None and pathlib.Path(args.data_dir).expanduser().is_file():
        raise InputError(f"--data-dir {args.data_dir} is a file, not a directory; give the folder to put the files in")
    download_data(args.benchmark, args.data_dir, Reporter(quiet=args.quiet))
    return 0
