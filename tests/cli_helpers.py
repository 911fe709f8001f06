"""Shared by the command-line tests: a short evaluation and a finished tiny run."""

import dataclasses

import pytest

from ctmeta import presets
from ctmeta.cli import main


def shorten_evaluation(mp: pytest.MonkeyPatch) -> None:
    """CosMixture's error-vs-steps curve at 0, 5 and 20 steps: it keeps CLI tests quick."""
    p = presets.BENCHMARKS["cosmixture"]
    mp.setitem(presets.BENCHMARKS, "cosmixture", dataclasses.replace(p, eval_steps=(0, 5, 20), eval_every=5))


def train_tiny(out, flags) -> int:
    """`ctmeta train FLAGS --meta-iterations 4 --checkpoint-every 2 --out OUT` with the short evaluation."""
    mp = pytest.MonkeyPatch()
    shorten_evaluation(mp)
    try:
        return main(["train", *flags, "--meta-iterations", "4", "--checkpoint-every", "2", "--out", str(out)])
    finally:
        mp.undo()
