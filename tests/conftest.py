"""Gradient checks run in float64 (see DESIGN.md, Conventions)."""

import pathlib

import jax
import pytest

jax.config.update("jax_enable_x64", True)

DATA_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """`../shared/data`: the real datasets. Tests that need them skip if absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real datasets not found at {DATA_DIR}")
    return DATA_DIR
