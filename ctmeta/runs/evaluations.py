"""Where an evaluation of a run goes: the run's own results, or a folder of its own.

A run's own results (RUN/results.md, results.json, figures/) are those of its
final evaluation, written by `ctmeta train`. `ctmeta evaluate` replaces them
only by the same evaluation redone: the same checkpoint iteration, table
steps, number of tasks, learning rate and inner-loss tasks (the values of
[`resolve_evaluation`][ctmeta.runs.results.resolve_evaluation]). Any other
evaluation (another checkpoint, fewer tasks, another `--lr`...) goes to
`RUN/evaluations/<name>/` (results.md, results.json, figures/), named by
`--name` or after the options that differ from the run's
(`iteration-150_tasks-200`), so that several are kept side by side and the
same evaluation redone replaces its own folder. `RUN/evaluations/index.md`
lists them all, with the run's own, one line each.

A finished run continued to more meta-iterations (`ctmeta reproduce` after a
raised budget) first moves its own results there
([`keep_own_evaluation`][]), under the name `ctmeta evaluate RUN --checkpoint
N` would give them, since the continuation's final evaluation replaces them.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

from .._errors import InputError
from .._io import atomic_write_bytes, atomic_write_text
from .rundir import RunDir

__all__ = ["EVALUATIONS", "check_name", "destination", "evaluation_name", "keep_own_evaluation", "own_options",
           "write_index"]

EVALUATIONS = "evaluations"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")
#: The options that name an evaluation (those of `resolve_evaluation` but the curve, which follows the steps).
_KEYS = ("iteration", "table_steps", "tasks", "lr", "inner_loss_tasks")


def check_name(name: str) -> str:
    """`name` if it can be a folder under RUN/evaluations/, else `InputError`."""
    if not _NAME.match(name or ""):
        raise InputError(f"`name` {name!r} is not a usable evaluation name: use up to 100 letters, digits, '.', "
                         "'_', '+' and '-', starting with a letter or digit (it names a folder under "
                         "RUN_DIR/evaluations/)")
    return name


def _key(options: dict) -> dict:
    return {k: options.get(k) for k in _KEYS}


def evaluation_name(options: dict, defaults: dict) -> str:
    """A folder name for `options`: the checkpoint's iteration, then each
    option that differs from `defaults` (the run's), e.g.
    `iteration-150_tasks-200_lr-0.005_steps-0-10-100`."""
    parts = [f"iteration-{options['iteration']}"]
    if options["tasks"] != defaults["tasks"]:
        parts.append(f"tasks-{options['tasks']}")
    if options["lr"] != defaults["lr"]:
        parts.append(f"lr-{options['lr']:g}")
    if options["table_steps"] != defaults["table_steps"]:
        parts.append("steps-" + "-".join(str(s) for s in options["table_steps"]))
    if options["inner_loss_tasks"] != min(defaults["inner_loss_tasks"], options["tasks"]):  # fewer tasks: fewer
        parts.append(f"inner-loss-tasks-{options['inner_loss_tasks']}")
    return "_".join(parts)


def _read_results(path: pathlib.Path) -> dict | None:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def _options_of(results: dict) -> dict | None:
    """The options of a written evaluation (results.json), also of one written before they were recorded."""
    recorded = (results.get("evaluation") or {}).get("options")
    if isinstance(recorded, dict):
        return _key(recorded)
    try:
        inner = results["inner_loss"]["tasks"] if "inner_loss" in results else 0
        return {"iteration": int(results["iteration"]), "table_steps": [int(s) for s in results["table_steps"]],
                "tasks": int(results["tasks"]), "lr": float(results["lr"]), "inner_loss_tasks": int(inner)}
    except (KeyError, TypeError, ValueError):
        return None


def own_options(run: RunDir, config: dict, defaults: dict) -> dict | None:
    """The options of the run's own evaluation: those its results.json
    records, else (not evaluated yet) the defaults at its last meta-iteration;
    `None` if its results.json cannot be read."""
    path = run.path / "results.json"
    if path.exists():
        results = _read_results(path)
        return None if results is None else _options_of(results)
    return {**_key(defaults), "iteration": int(config.get("meta_iterations") or -1)}


def destination(run: RunDir, config: dict, options: dict, defaults: dict,
                name: str | None = None) -> tuple[pathlib.Path, str | None]:
    """`(folder, name)` where an evaluation of `options` goes: the run
    directory itself (name `None`) for the run's own evaluation redone, else
    `RUN/evaluations/<name>` (`name` given, or [`evaluation_name`][]).

    A given `name` whose folder holds an evaluation of other options is
    refused (`InputError`): nothing is replaced but by the same evaluation."""
    if name is None and _key(options) == own_options(run, config, defaults):
        return run.path, None
    name = check_name(name) if name is not None else evaluation_name(options, defaults)
    folder = run.path / EVALUATIONS / name
    earlier = _read_results(folder / "results.json") if (folder / "results.json").exists() else None
    if earlier is not None and _options_of(earlier) not in (None, _key(options)):
        had = _options_of(earlier)
        raise InputError(f"{folder} holds an evaluation of other options ({_describe(had)}); choose another "
                         "`name`, or delete that folder")
    return folder, name


def keep_own_evaluation(run: RunDir, defaults: dict) -> pathlib.Path | None:
    """Move the run's own results (results.json, results.md, the figures of
    its evaluation) to `RUN/evaluations/<name>/`, `name` the one `ctmeta
    evaluate RUN --checkpoint N` gives that evaluation against `defaults`
    (`resolve_evaluation(exp, state)` of the run's configuration), before the
    run is trained past the meta-iteration they evaluated: its next final
    evaluation replaces the run's own. The copies are written before the
    originals go, so an interruption loses nothing (a second call writes the
    same folder again). Returns the folder; `None` (nothing moved) when the
    run has no readable results.json."""
    own = run.path / "results.json"
    results = _read_results(own) if own.exists() else None
    options = None if results is None else _options_of(results)
    if options is None:
        return None
    name = evaluation_name(options, defaults)
    folder = run.path / EVALUATIONS / name
    earlier = _read_results(folder / "results.json") if (folder / "results.json").exists() else None
    if earlier is not None and _options_of(earlier) not in (None, options):
        name, folder = f"{name}_own", run.path / EVALUATIONS / f"{name}_own"
    folder.mkdir(parents=True, exist_ok=True)
    record = dict(results.get("evaluation") or {})
    record.update(options=options, name=name, checkpoint=record.get("checkpoint", f"ckpt-{options['iteration']}.eqx"),
                  kept="the run's own results, kept when the run was continued past this iteration")
    figures = run.path / "figures"
    if figures.is_dir():
        (folder / "figures").mkdir(exist_ok=True)
        for fig in figures.iterdir():
            if fig.is_file() and fig.name != "meta_loss.png":  # the meta-loss curve goes on with the run
                shutil.copyfile(fig, folder / "figures" / fig.name)
    if (run.path / "results.md").is_file():
        atomic_write_bytes(folder / "results.md", (run.path / "results.md").read_bytes())
    atomic_write_text(folder / "results.json", json.dumps({**results, "evaluation": record}, indent=2) + "\n")
    own.unlink()
    (run.path / "results.md").unlink(missing_ok=True)
    write_index(run)
    return folder


def _describe(options: dict) -> str:
    return (f"iteration {options['iteration']}, {options['tasks']} tasks, lr {options['lr']:g}, steps "
            + ",".join(str(s) for s in options["table_steps"]))


def _cells(results: dict, init: str) -> str:
    curve, table = results.get("curve_steps") or [], results.get("table_steps") or []
    values = results.get(init) or {}
    out = []
    for step in table:
        if step in curve:
            i = curve.index(step)
            out.append(f"{step}: {values['mean'][i]:.4g} ± {values['ci95'][i]:.2g}")
    return "; ".join(out)


def write_index(run: RunDir) -> pathlib.Path | None:
    """RUN/evaluations/index.md: one line per evaluation (the run's own first),
    its checkpoint and options and the learned and random errors at its table
    steps, so that evaluations of several checkpoints read side by side."""
    root = run.path / EVALUATIONS
    if not root.is_dir():
        return None
    entries = []
    own = _read_results(run.path / "results.json") if (run.path / "results.json").exists() else None
    if own is not None:
        entries.append(("(the run's own: ../results.md)", own))
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        results = _read_results(folder / "results.json")
        if results is not None:
            entries.append((f"[{folder.name}]({folder.name}/results.md)", results))
    entries.sort(key=lambda e: (e[0].startswith("["), int(e[1].get("iteration", 0))))
    metric = next((r.get("metric") for _, r in entries if r.get("metric")), "error")
    lines = [f"# Evaluations of {run.path.name}", "",
             f"Meta-test {metric} (mean ± 95% CI over tasks) at each evaluation's table steps; rewritten by "
             "every `ctmeta evaluate` of this run.", "",
             "| evaluation | iteration | tasks | lr | learned | random |", "|---|---|---|---|---|---|"]
    for label, r in entries:
        lines.append(f"| {label} | {r.get('iteration', '?')} | {r.get('tasks', '?')} | {r.get('lr', '?')} | "
                     f"{_cells(r, 'learned')} | {_cells(r, 'random')} |")
    path = root / "index.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
