"""The experiments by name: what each reproduces, its cost, and the function that runs it."""

from __future__ import annotations

import dataclasses
from typing import Callable


from .context import Context
from .gradients import amaml_table4, amaml_table5, bench_experiment, comln_fig2, comln_fig3
from .images import comln_fig5, comln_table2, comln_table4, amaml_table3
from .flows import inner_flows
from .regression import amaml_fig2, amaml_table12


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    name: str
    reproduces: str
    quick_cost: str
    runner: Callable[[Context], None]
    #: Whether `--scale cpu` differs from `--scale paper` (the image experiments).
    cpu_differs: bool = False
    #: Whether it meta-trains runs (which `estimate` can time).
    meta_trains: bool = True


EXPERIMENTS: dict[str, ExperimentSpec] = {
    s.name: s
    for s in [
        ExperimentSpec("amaml-fig2-cosmixture", "A-MAML Fig. 2b,c: CosMixture, 6 methods, 50shot-50val and 100shot-100val",
                       "~10-15 min (12 runs of 150-300 meta-iterations)", lambda c: amaml_fig2(c, "cosmixture")),
        ExperimentSpec("amaml-fig2-alpine", "A-MAML Fig. 2e,f: Alpine, 6 methods, 50shot-50val and 100shot-100val",
                       "~10-15 min (12 runs)", lambda c: amaml_fig2(c, "alpine")),
        ExperimentSpec("amaml-fig2", "A-MAML Fig. 2: both of the above", "~20-30 min",
                       lambda c: (amaml_fig2(_sub(c, "cosmixture"), "cosmixture"), amaml_fig2(_sub(c, "alpine"), "alpine"))),
        ExperimentSpec("amaml-table1-2", "A-MAML Tables 1-2: MovieLens-100K/1M, Jester-1, 50 and 100 inner steps",
                       "~10 min (10shot-15val only; MovieLens-1M skipped without its data)", amaml_table12),
        ExperimentSpec("amaml-table3", "A-MAML Table 3: Omniglot 20-way 1-shot, miniImageNet 5-way 1-shot",
                       "~15-25 min (Omniglot only, 12 meta-iterations of whole-network Conv-4)", amaml_table3, cpu_differs=True),
        ExperimentSpec("amaml-table4", "A-MAML Table 4: adjoint gradient error vs closed form", "~1-2 min",
                       amaml_table4, meta_trains=False),
        ExperimentSpec("amaml-table5", "A-MAML Table 5: CosMixture meta-gradient error vs 1000-state reference",
                       "~2-5 min (5 initialisations)", amaml_table5, meta_trains=False),
        ExperimentSpec("amaml-fig3-4", "A-MAML Figs. 3-4: memory and time vs inner steps (CosMixture)",
                       "~2-5 min (ctmeta bench --quick)", lambda c: bench_experiment(c, ["cosmixture"]), meta_trains=False),
        ExperimentSpec("comln-fig2", "COMLN Fig. 2: adjoint backward instability on a quadratic", "< 1 min",
                       comln_fig2, meta_trains=False),
        ExperimentSpec("comln-fig3", "COMLN Figs. 3-4: memory and time vs inner steps (Conv-4 and ResNet-12, 5-way 5-shot)",
                       "~8-13 min (ctmeta bench --quick; ResNet-12 compiles ~5 min)", comln_fig3, meta_trains=False),
        ExperimentSpec("comln-table2", "COMLN Table 2: COMLN vs ANIL vs MAML, Conv-4 (+ ResNet-12 at --scale paper) "
                       "(miniImageNet train64, Omniglot)",
                       "~15-25 min (1-shot only)", comln_table2, cpu_differs=True),
        ExperimentSpec("comln-table4", "COMLN Table 4: Dopri5 vs Euler, accuracy and time", "~5 min", comln_table4, cpu_differs=True),
        ExperimentSpec("inner-flows", "ctmeta's own: learned preconditioner and heavy-ball inner flows against the "
                       "gradient flow (A-MAML, MAML; CosMixture and Alpine 100shot-100val)",
                       "~25 min (10 runs of 300 meta-iterations; 23 min here)", inner_flows),
        ExperimentSpec("comln-fig5", "COMLN Fig. 5: learned T during meta-training; learned vs fixed T",
                       "~5 min (Omniglot 5-way 5-shot; cpu: 1-shot)", comln_fig5, cpu_differs=True),
    ]
}


def _sub(ctx: Context, suffix: str) -> Context:
    out = ctx.out / suffix
    out.mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(ctx, name=f"{ctx.name}-{suffix}", out=out, deviations=[], notes=[])


def list_text() -> str:
    w = max(len(n) for n in EXPERIMENTS)
    lines = ["experiments (ctmeta reproduce NAME [--scale quick|cpu|paper|test]; cpu = paper unless marked):", ""]
    for s in EXPERIMENTS.values():
        lines.append(f"  {s.name:<{w}}  {s.reproduces}")
        lines.append(f"  {'':<{w}}  quick scale: {s.quick_cost}"
                     + ("; cpu scale: Omniglot only, 1,000-2,000 meta-iterations" if s.cpu_differs else ""))
    return "\n".join(lines)
