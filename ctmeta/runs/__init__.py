"""Run directories: configuration, metrics, checkpoints, figures and results.

A run directory holds

    config.json               everything needed to rerun (resolved defaults, version)
    metrics.csv               one row per meta-iteration: iteration, meta_loss, grad_norm, T, seconds,
                              skipped (tasks left out as non-finite, on_nonfinite="skip-task")
    checkpoints/ckpt-<i>.eqx  the learner state after i meta-iterations (+ ckpt-<i>.json: shapes,
                              sha256, the configuration and the sampler's rule); the last 2 kept
    figures/meta_loss.png     the meta-loss curve
    figures/error_vs_steps.png  meta-test error against adaptation steps, learned vs random init
    results.md, results.json  the final table
    evaluations/<name>/       other evaluations (`ctmeta evaluate` of another checkpoint or options):
                              results.md, results.json, figures/; evaluations/index.md lists them

and is written so that an interrupted run can continue: every file is
replaced atomically, the metrics rows after the last checkpoint are dropped
on resume (rows missing before it, a cut or torn metrics.csv, are written
again from an earlier checkpoint when one is kept, else the gap is said and
recorded: [`resume_point`][]), and the meta-batch of iteration `i` is drawn with
`fold_in(key, i)`, so a resumed run ends exactly as an uninterrupted one.

`train` checkpoints every `checkpoint_every` iterations and when it receives
SIGINT or SIGTERM (then raises [`Interrupted`][], a `KeyboardInterrupt`);
a signal that arrives while a metrics row or a checkpoint is being written
takes effect once it is written. After `kill -9`, `load_latest` skips a
checkpoint that is truncated, corrupted or incompatible and says so, falling
back to the previous one.

In a multi-process run (`ctmeta.sharding`) every process trains and
evaluates, and process 0 alone writes the run directory; a resumed run has
every process read the same checkpoint.

The package's modules: `ctmeta.runs.rundir` (the directory and its files),
`ctmeta.runs.training` ([`train`][]), `ctmeta.runs.results`
([`evaluate_run`][], tables and figures), `ctmeta.runs.evaluations` (where an
evaluation goes) and `ctmeta.runs.console`
([`Reporter`][]); everything public is importable from `ctmeta.runs`.
"""

from .console import Reporter, format_duration, one_line
from .evaluations import write_index
from .results import (EvaluationDiverged, eval_curve, evaluate_run, flow_summary, resolve_evaluation, results_markdown,
                      results_text, save_figure, write_figures)
from .rundir import (CHECKPOINT_CONFIG_FIELDS, KEEP_CHECKPOINTS, METRIC_COLUMNS, NONFINITE_POLICIES, MetricsDamage, RunDir,
                     check_writable, default_run_dir, dtype_name, package_versions)
from .training import Interrupted, init_from_run, metrics_warning, resume_point, train

__all__ = ["EvaluationDiverged", "Interrupted", "MetricsDamage", "metrics_warning", "resume_point", "resolve_evaluation", "write_index", "RunDir", "init_from_run", "default_run_dir", "dtype_name", "evaluate_run", "package_versions", "save_figure",
           "train", "CHECKPOINT_CONFIG_FIELDS", "KEEP_CHECKPOINTS", "METRIC_COLUMNS", "NONFINITE_POLICIES", "Reporter",
           "check_writable", "eval_curve", "flow_summary", "format_duration", "one_line", "results_markdown", "results_text",
           "write_figures"]
