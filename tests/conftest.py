"""Gradient checks run in float64 (see DESIGN.md, Conventions)."""

import atexit
import gc
import os
import pathlib
import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_enable_x64", True)

# Each command-line test builds its learner anew, so the same small programs
# compile again and again: a persistent compilation cache compiles each once
# (a CLI test ~3x faster). One per process (JAX writes an entry without a lock),
# removed at exit; set in the environment too, for the tests' subprocesses.
_JAX_CACHE = tempfile.mkdtemp(prefix=f"ctmeta-tests-jax-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
for _name, _value in (("jax_compilation_cache_dir", _JAX_CACHE), ("jax_persistent_cache_min_compile_time_secs", 0),
                      ("jax_persistent_cache_min_entry_size_bytes", 0)):
    jax.config.update(_name, _value)
    os.environ[_name.upper()] = str(_value)

# The real datasets: $CTMETA_DATA (the folder with movielens/, jester/, omniglot/,
# miniimagenet/, as ctmeta itself reads it), else ../shared/data beside the checkout.
_DEFAULT_DATA_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA_DIR = pathlib.Path(os.environ["CTMETA_DATA"]).expanduser() if os.environ.get("CTMETA_DATA") else _DEFAULT_DATA_DIR


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    XLA on CPU maps each live executable's code and data into memory apart (about
    three memory maps each), and JAX's caches keep every program a process ever
    compiled: a test worker reached 30,000 maps in half the suite, and a process
    that passes the kernel's `vm.max_map_count` (65,530 by default) segfaults
    inside the next compile. A module's programs are rarely reused by the next
    one, and those that are come back from the persistent cache above.
    """
    yield
    jax.clear_caches()
    gc.collect()


def pytest_report_header(config):
    """Say, at the top of every run, where the real data are or why their tests skip."""
    if DATA_DIR.is_dir():
        return f"ctmeta real data: {DATA_DIR}"
    return (f"ctmeta real data: NOT FOUND at {DATA_DIR}; the real-data tests will skip "
            "(set CTMETA_DATA=/path/to/data, the folder with movielens/, jester/, omniglot/, miniimagenet/)")


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """`$CTMETA_DATA`, else `../shared/data`: the real datasets. Tests that need them skip if absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real datasets not found at {DATA_DIR} (set CTMETA_DATA to the folder that holds them)")
    return DATA_DIR


@pytest.fixture
def assert_skips_exactly():
    """The skip-task contract, as a checker `check(learner, batch, bad, status)`.

    One meta-step on `batch` from a fresh state: task `bad` has solve status
    `status` and a non-finite meta-gradient, every other task succeeds, one
    task is counted as skipped, and the update (meta-loss and parameters)
    equals the meta-step on the other tasks alone, which skips nothing.
    Returns `(state, new_state)`.
    """
    import jax.numpy as jnp
    import numpy as np

    from ctmeta.ode import SolveStatus

    def check(learner, batch, bad, status):
        state = learner.init(jax.random.PRNGKey(0))
        new, metrics = learner.meta_step(state, batch)
        n = len(np.asarray(metrics["task_status"]))
        assert np.asarray(metrics["task_status"]).tolist() == [status if i == bad else SolveStatus.SUCCESS
                                                               for i in range(n)]
        assert np.asarray(metrics["task_finite"]).tolist() == [i != bad for i in range(n)]
        assert int(metrics["skipped"]) == 1 and bool(metrics["finite"]) and int(new.iteration) == 1
        others = jnp.asarray([i for i in range(n) if i != bad])
        ref, ref_metrics = learner.meta_step(state, type(batch)(*(a[others] for a in batch)))
        assert int(ref_metrics["skipped"]) == 0
        np.testing.assert_allclose(metrics["meta_loss"], ref_metrics["meta_loss"], rtol=1e-12)
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        return state, new

    return check
