"""`ctmeta reproduce`: the papers' experiments, one command each.

    ctmeta reproduce --list
    ctmeta reproduce EXPERIMENT [--scale quick|cpu|paper|test] [--out DIR] [--data-dir DIR] [--quiet]

Every experiment writes into `OUT/<experiment>/`: one run directory per
(setting, method) made by the ordinary `ctmeta train` machinery
(`runs.train` + `runs.evaluate_run`: config.json, metrics.csv, checkpoints,
figures, results.md), plus the experiment's own `results.md` (our table, the
paper's numbers beside it with the table reference, and every deviation from
the paper's protocol) and its PNG figures.

Scales: `paper` follows the papers' protocols (and lists what still differs);
`cpu` is `paper` for every experiment but the image ones, whose paper budget
(60,000 meta-iterations of a Conv-4 or ResNet-12) needs a GPU: there it runs
Omniglot only, with 1,000-2,000 meta-iterations, a few hours on 2 CPU cores
(but A-MAML's 1,000 in amaml-table3: days, over many sessions); `quick` cuts meta-iterations, evaluation
tasks and settings so that each experiment finishes in minutes on 2 CPU cores
(each cut is listed in results.md); `test` is a seconds-long smoke check
(2 meta-iterations, a few tasks: it shows the pipeline runs, its numbers
mean nothing; the tests use it). Every run prints its measured time per meta-iteration
and its projected wall time once it has run a few iterations.

A finished run directory (one with results.json) is reused when the command is
run again with the same `--out`, so an interrupted reproduction resumes at
the first unfinished run; one that finished short of a since-raised budget is
continued from its last checkpoint (`run_method`). A run that fails (missing data, a numerical error)
is reported in results.md and the others go on.

**Modules:** `paper` (the papers' numbers), `context` (`Context`,
`RunResult`), `runner` (one run: train, evaluate, reuse, resume, estimate),
`report` (markdown, paired tests, figures), the experiments by kind
(`regression`: A-MAML Fig. 2 and Tables 1-2; `images`: A-MAML Table 3, COMLN
Tables 2 and 4 and Fig. 5; `gradients`: A-MAML Tables 4-5, COMLN Fig. 2 and
the memory/time benchmarks), `registry` (the experiments by name) and
`command` (the flags, `run_experiment`, `main`).
"""


from ..._errors import InputError
from .command import build_parser, main, run_experiment
from .context import SCALES, Context, RunResult
from .paper import (
    PAPER_AMAML_TABLE3,
    PAPER_AMAML_TABLE5,
    PAPER_AMAML_TABLE12,
    PAPER_COMLN_TABLE2,
    PAPER_COMLN_TABLE4,
)
from .registry import EXPERIMENTS, ExperimentSpec, list_text
from .report import md_table, paired_table, paired_test, plot_curves, write_results
from .runner import estimate_table, presets_kind, run_method

__all__ = [
    "EXPERIMENTS",
    "SCALES",
    "Context",
    "ExperimentSpec",
    "InputError",
    "PAPER_AMAML_TABLE12",
    "PAPER_AMAML_TABLE3",
    "PAPER_AMAML_TABLE5",
    "PAPER_COMLN_TABLE2",
    "PAPER_COMLN_TABLE4",
    "RunResult",
    "build_parser",
    "estimate_table",
    "list_text",
    "main",
    "md_table",
    "paired_table",
    "paired_test",
    "plot_curves",
    "presets_kind",
    "run_experiment",
    "run_method",
    "write_results",
]
