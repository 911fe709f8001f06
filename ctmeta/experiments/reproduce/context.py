"""Where and how an experiment runs (`Context`), and what one run gave (`RunResult`)."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np


SCALES = ("quick", "cpu", "paper", "test")  # "test": seconds, a smoke check (the tests use it)


@dataclasses.dataclass
class Context:
    """Where and how an experiment runs."""

    name: str
    scale: str
    out: pathlib.Path
    data_root: pathlib.Path | None
    quiet: bool
    argv: list[str]
    reporter: Any = None
    methods: frozenset[str] | None = None  # run only these (the label's last part); None: all
    #: Time this many meta-iterations of every run (finished or not) and
    #: project its wall time instead of running it (nothing is written); 0: run.
    estimate: int = 0
    #: Print the traceback of a run that fails (the others still go on).
    debug: bool = False
    #: Attempt again the runs that failed numerically before (their `failed.json`).
    retry_failed: bool = False
    estimates: list[dict] = dataclasses.field(default_factory=list)
    deviations: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def log(self, msg: str) -> None:
        self.reporter.log(msg)

    def deviate(self, msg: str) -> None:
        if msg not in self.deviations:
            self.deviations.append(msg)

    def note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)
        self.log(msg)


@dataclasses.dataclass
class RunResult:
    label: str
    status: str  # "ok" | "skipped" | "failed" | "not run" (left out by --methods)
    message: str = ""
    results: dict | None = None
    metrics: list | None = None
    train_seconds: float = float("nan")  # the run's meta-training, every session of it (metrics.csv)
    eval_seconds: float | None = None  # its meta-test evaluation (results.json); None: not recorded
    run_dir: str = ""

    @property
    def seconds(self) -> float:
        """Meta-training plus evaluation (training alone where the evaluation's time was not recorded)."""
        return self.train_seconds + (self.eval_seconds or 0.0)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def nearest_step(self, step: int) -> int:
        """The evaluated step closest to `step` (a tie goes to the longer adaptation)."""
        return min(self.results["curve_steps"], key=lambda s: (abs(s - step), -s))

    def value(self, step: int, which: str = "learned") -> tuple[float, float]:
        """Mean and 95% CI half-width after `step` GD steps (the nearest evaluated step)."""
        r = self.results
        i = r["curve_steps"].index(self.nearest_step(step))
        return float(r[which]["mean"][i]), float(r[which]["ci95"][i])

    def curve(self, which: str = "learned"):
        return self.results["curve_steps"], self.results[which]["mean"], self.results[which]["ci95"]

    def nearest_table_step(self, step: int) -> int:
        """The table step (one with per-task errors kept) closest to `step`."""
        return min((int(k) for k in self.results["learned"]["per_task"]), key=lambda s: (abs(s - step), -s))

    def per_task(self, step: int, which: str = "learned") -> np.ndarray:
        """Each meta-test task's error after `step` steps (a table step), in task order."""
        return np.asarray(self.results[which]["per_task"][str(step)], dtype=float)
