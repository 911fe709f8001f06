r"""`ctmeta bench`: memory and time of the meta-gradient against the number of inner steps.

The benchmark of A-MAML Sec. 5.2 (Figs. 3-4, CosMixture) and COMLN Sec. 5.2
(Fig. 3, Conv-4 on 5-way 5-shot tasks), on the same footing for every rule.

**What is measured, per (benchmark, method, steps):**

- `peak_bytes`: the memory of the compiled meta-gradient of one meta-batch,
  from XLA's buffer assignment: `memory_analysis()` of
  `jax.jit(meta_gradient).lower(params, batch).compile()`, taken as
  `temp_size_in_bytes + argument_size_in_bytes + output_size_in_bytes`. It is
  deterministic (no allocator noise, no other process), available without
  running the function (so cases too large to run still get a number), and it
  is what the program needs at its peak: XLA allocates every temporary of the
  program in one buffer of `temp_size_in_bytes` whose slices are reused by
  liveness, so the temporaries' peak is at most that, and arguments and
  outputs live for the whole call. The parts are kept as their own columns
  (`temp_bytes`, `argument_bytes`, `output_bytes`). Not counted: the
  executable's code and the Python process.
- `seconds`: median wall time of one call of the jitted meta-gradient of a
  meta-batch (`jax.vmap` over tasks of `jax.value_and_grad` of the query loss
  after adaptation, averaged over tasks), after one warm-up call, each call
  ended by `block_until_ready`. Compilation is ahead of time and never timed.
- `forward_seconds`: the same for the adaptation alone, no meta-gradient:
  `vmap` over tasks of adapt-then-query-loss (for COMLN, the meta-test path
  `linear_flow_adapt`, which integrates the state without the sensitivities).
- For Reptile the "meta-gradient" is its update direction `theta - u_K`
  (`reptile_direction`), with no derivative.

**Budgets.** A case whose compiled memory exceeds `max_bytes` (default 8 GB)
is not run (its `peak_bytes` is still reported, `status` says why), and a
case whose time, extrapolated from the method's timed step counts (affinely
through the last two; see `sweep._time_skipped`), would exceed `time_budget`
seconds for one call is not timed either. The number of timed calls is cut so that one point stays
within `time_budget`; `repeats` says how many were made (0: the warm-up call
is the only one, for points that alone exceed the budget).

**Outputs** in `out_dir`: `bench.csv`, `vmap.csv`, `diagnostics.csv`,
`bench-<benchmark>.png` (memory and time against steps, log scales, one line
per method), `targets.md` and `bench.md` (the tables as markdown), and
`sweep.json` (the settings). `bench.csv` is rewritten after every case, so
`resume=True` (`ctmeta bench --resume`) continues an interrupted sweep from
its rows; `ctmeta reproduce` always resumes.

Run it as `ctmeta bench [--quick] --out DIR`, or `python -m ctmeta.bench`.

**Modules:** `problems` (the benchmarks' models, meta-batches and per-task
objectives), `measurement` (compiling, timing, vmap against a loop),
`diagnostics` (where the time goes), `targets` (the ratios and their goals),
`report` (CSV and markdown), `plots` (the figures), `sweep` (the run over
every case) and `command` (the flags and `main`).
"""


from .command import build_parser, main
from .diagnostics import (
    amaml_breakdown,
    amaml_solver_steps,
    comln_head_timing,
    comln_solver_steps,
    dopri5_step_count,
    head_memory,
    run_diagnostics,
)
from .measurement import compile_fn, device_description, measure_vmap, meta_gradient_fn, time_call
from .plots import plot
from .problems import BENCHMARKS, FLOW_CASES, H, Problem, checkpoints_for, make_problem
from .report import read_csv, rows_markdown, table_markdown, write_csv
from .sweep import COLUMNS, DEFAULT_CASES, DEFAULT_STEPS, QUICK_STEPS, SLOW_STEPS, rerun_diagnostics, run
from .targets import evaluate_targets, limit_notes, print_summary, targets_markdown

__all__ = [
    "BENCHMARKS",
    "FLOW_CASES",
    "COLUMNS",
    "DEFAULT_CASES",
    "DEFAULT_STEPS",
    "H",
    "Problem",
    "QUICK_STEPS",
    "SLOW_STEPS",
    "amaml_breakdown",
    "amaml_solver_steps",
    "build_parser",
    "checkpoints_for",
    "comln_head_timing",
    "comln_solver_steps",
    "compile_fn",
    "device_description",
    "dopri5_step_count",
    "evaluate_targets",
    "head_memory",
    "limit_notes",
    "main",
    "make_problem",
    "measure_vmap",
    "meta_gradient_fn",
    "plot",
    "print_summary",
    "read_csv",
    "rerun_diagnostics",
    "rows_markdown",
    "run",
    "run_diagnostics",
    "table_markdown",
    "targets_markdown",
    "time_call",
    "write_csv",
]
