"""The checks every command makes of its flags and of a run directory before any work."""

from __future__ import annotations

import math

from .._errors import InputError
from ..presets import BENCHMARKS

__all__ = ["CONFIG_EXTRA_KEYS", "LIMITS", "PATH_FLAGS", "RESUME_MAY_CHANGE", "check_config_origin", "check_limits",
           "check_paths", "check_run_writable", "existing_data_dir", "number_text", "resume_may_change", "too_large"]

#: The flags a resumed run (`ctmeta train --resume`) may change: the one list
#: that the check, its message, `--help` and docs/reliability.md give. Besides
#: them, `--data-dir` says where the data are now, and `--devices`, `--quiet`,
#: `--debug` and `--log-y` change nothing the run computes. `--solver` only
#: between A-MAML's two adaptive solvers (`runs.rundir.RESUME_SOLVERS`): the
#: same flow to the same tolerances, solved by another method (meta-training
#: makes the flow stiff, and RKC2 is the one for a stiff flow); the change is recorded.
RESUME_MAY_CHANGE = ("--meta-iterations", "--checkpoint-every", "--keep-checkpoints", "--on-nonfinite", "--solver")


def resume_may_change(quote: str = "") -> str:
    """`RESUME_MAY_CHANGE` in words: "--meta-iterations, --checkpoint-every, ... and --on-nonfinite"
    (each between `quote`s: "`" for markdown)."""
    flags = [f"{quote}{f}{quote}" for f in RESUME_MAY_CHANGE]
    return ", ".join(flags[:-1]) + " and " + flags[-1]


# Upper bounds on numeric flags: beyond them a value is a typo, not a run.
LIMITS = {"T": 1e6, "steps": 10**6, "meta_iterations": 10**9, "meta_batch": 10**5, "ways": 10**4,
           "shots": 10**5, "checkpoint_every": 10**9, "seed": 2**32 - 1,
           "devices": 10**5, "num_processes": 10**5, "meta_lr": 1e2}


def number_text(value) -> str:
    """A number as a user would type it: an integer as an integer (`4294967295`,
    `1000000`, `3` for 3.0), any other float by `repr` (`0.03`, `inf`)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


def too_large(flag: str, value, limit) -> InputError:
    """The error of a flag's value beyond its limit in `LIMITS`."""
    return InputError(f"{flag} {number_text(value)} is too large (at most {number_text(limit)}); choose a smaller value")


def check_limits(args) -> None:
    for name, value in vars(args).items():
        if isinstance(value, list):  # argparse turns `--flag=--` into [] without checking it
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} needs a value; got {' '.join(map(str, value)) or '--'!r}")
    for name, limit in LIMITS.items():
        value = getattr(args, name, None)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{flag} must be a finite number, got {value}")
        if value is not None and value > limit:
            raise too_large(flag, value, limit)


def existing_data_dir(data_dir: str, benchmark: str | None = None) -> str:
    import pathlib

    from .._errors import DataError

    preset = BENCHMARKS.get(benchmark) if benchmark else None
    if preset is not None and preset.data_subdir is None:
        raise InputError(f"--data-dir is not used by {benchmark} (its tasks are synthetic)")
    from .._paths import dataset_dir

    path = pathlib.Path(data_dir).expanduser()
    if not path.exists():
        raise DataError(f"--data-dir {path} does not exist")
    if preset is not None:
        path = dataset_dir(preset.data_subdir, data_dir)
    return str(path.resolve())


PATH_FLAGS = (("out", "--out"), ("data_dir", "--data-dir"), ("resume", "--resume"), ("run_dir", "RUN_DIR"),
               ("checkpoint", "--checkpoint"), ("init_from", "--init-from"))


def check_paths(args) -> None:
    """An empty path (`--out ''`) would mean the current directory: refuse it."""
    for name, flag in PATH_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and not value.strip():
            raise InputError(f"{flag} is empty ({value!r}); give a path"
                             + (", or leave --out out for runs/<benchmark>-<method>-<timestamp>" if name == "out" else ""))


#: The keys ctmeta writes into config.json (besides those of presets.resolve_config).
CONFIG_EXTRA_KEYS = {"on_nonfinite", "dtype", "task_family", "versions", "created", "argv", "devices", "processes",
                      "resumes", "data_options", "reproduce", "init_from", "keep_checkpoints"}


def check_config_origin(config: dict, warn) -> None:
    """Warn about a config.json written by another ctmeta version or holding keys this version does not know."""
    from .. import __version__
    from ..presets import resolve_config

    saved = config.get("ctmeta_version")
    if saved != __version__:
        warn(f"warning: the run was written by ctmeta {saved or '(unknown version)'}, this is ctmeta {__version__}; "
             "its configuration is read as this version understands it")
    known = set(resolve_config()) | CONFIG_EXTRA_KEYS
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        warn(f"warning: config.json holds key{'s' if len(unknown) > 1 else ''} this version does not know, ignored: "
             + ", ".join(unknown))


def check_run_writable(run, what: str, check_writable) -> None:
    """The run directory and the folders ctmeta writes in it accept new files."""
    for folder in (run.path, run.checkpoint_dir, run.figure_dir):
        if folder.exists() or folder == run.path:
            check_writable(folder, what if folder == run.path else f"{what} ({folder.name}/)")
