"""`ctmeta bench` on a tiny run: files, columns, and the memory trends (no wall-clock assertions)."""

import csv
import json
import math
import re

import pytest

from ctmeta import bench
from ctmeta._errors import InputError
from ctmeta.losses import cross_entropy

REQUIRED = {"method", "benchmark", "steps", "peak_bytes", "seconds", "forward_seconds",
            "device", "dtype", "meta_batch", "repeats", "temp_bytes", "checkpoints", "status"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # time_budget=0: the first step count of each method is timed on its
    # warm-up call only and the larger one is compiled for memory only, so
    # the test pays for compilation and little else.
    rows = bench.run(
        ["cosmixture/maml+amaml+amaml-ckpt"], [8, 64], out, quick=True, repeats=1,
        meta_batch=1, time_budget=0.0, vmap=False, diagnostics=False, progress=False,
    )
    return out, rows


def _row(rows, method, steps):
    return next(r for r in rows if r["method"] == method and r["steps"] == steps)


@pytest.mark.xdist_group("bench-tiny-run")
def test_files_and_columns(tiny_run):
    out, rows = tiny_run
    with open(out / "bench.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert REQUIRED <= set(reader.fieldnames)
        written = list(reader)
    assert len(written) == len(rows) == 6
    assert {r["method"] for r in written} == {"maml", "amaml", "amaml-ckpt"}
    assert all(r["meta_batch"] == "1" and r["dtype"] == "float32" for r in written)
    png = out / "bench-cosmixture.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "targets.md").is_file() and "met" in (out / "targets.md").read_text()
    # read_csv parses the numbers back
    parsed = bench.read_csv(out / "bench.csv")
    assert parsed[0]["peak_bytes"] == rows[0]["peak_bytes"]


@pytest.mark.xdist_group("bench-tiny-run")
def test_an_interrupted_sweep_resumes_and_ends_as_the_uninterrupted_one(tiny_run, tmp_path, monkeypatch):
    import shutil

    from ctmeta.bench import sweep

    done, rows = tiny_run
    out = tmp_path / "bench"
    shutil.copytree(done, out)
    # Killed after its third case: bench.csv holds maml K=8, 64 and amaml K=8.
    kept = bench.read_csv(out / "bench.csv")[:3]
    bench.write_csv(out / "bench.csv", kept, bench.COLUMNS)
    measured = []
    measure = sweep._measure_case
    monkeypatch.setattr(sweep, "_measure_case",
                        lambda problem, method, steps, *a: measured.append((method, steps)) or measure(problem, method, steps, *a))
    again = bench.run(["cosmixture/maml+amaml+amaml-ckpt"], [8, 64], out, quick=True, repeats=1, meta_batch=1,
                      time_budget=0.0, vmap=False, diagnostics=False, progress=False, resume=True)
    assert measured == [("amaml", 64), ("amaml-ckpt", 8), ("amaml-ckpt", 64)]
    assert [r["seconds"] for r in again[:3]] == [r["seconds"] for r in kept]
    for first, resumed in zip(rows, again):
        assert (resumed["method"], resumed["steps"], resumed["peak_bytes"]) == (first["method"], first["steps"], first["peak_bytes"])
        # (A case measured again has a time of its own, and so its own estimates.)
        assert re.sub(r"est\. [\d.,]+ m?s", "est.", resumed["status"]) == re.sub(r"est\. [\d.,]+ m?s", "est.", first["status"])
    # amaml K=64 is memory only in both, its time extrapolated from the kept K=8 row: the same estimate.
    assert again[3]["status"] == rows[3]["status"] and "est." in rows[3]["status"]
    assert bench.read_csv(out / "bench.csv")[:3] == kept and len(bench.read_csv(out / "bench.csv")) == 6
    assert "3 of 6 cases kept" in (out / "bench.md").read_text()
    # The measuring time adds up over the sessions: the first one's, plus the three cases measured now.
    before, after = (json.loads((d / "sweep.json").read_text()) for d in (done, out))
    assert after["seconds"] > before["seconds"] > 0 and after["date"] == before["date"]


@pytest.mark.xdist_group("bench-tiny-run")
def test_resume_refuses_a_sweep_of_other_settings(tiny_run, tmp_path):
    import shutil

    out = tmp_path / "bench"
    shutil.copytree(tiny_run[0], out)
    with pytest.raises(InputError, match=r"other settings: repeats 1 \(now 2\)"):
        bench.run(["cosmixture/maml"], [8], out, quick=True, repeats=2, meta_batch=1, time_budget=0.0,
                  vmap=False, diagnostics=False, progress=False, resume=True)
    (out / "sweep.json").unlink()
    with pytest.raises(InputError, match="no sweep.json"):
        bench.run(["cosmixture/maml"], [8], out, quick=True, repeats=1, meta_batch=1, time_budget=0.0,
                  vmap=False, diagnostics=False, progress=False, resume=True)


@pytest.mark.xdist_group("bench-tiny-run")
def test_values_positive_finite(tiny_run):
    _, rows = tiny_run
    for r in rows:
        assert r["status"].startswith(("ok", "memory only")), r["status"]
        for key in ("peak_bytes", "temp_bytes", "argument_bytes", "output_bytes"):
            assert r[key] > 0 and math.isfinite(r[key])
        assert r["peak_bytes"] == r["temp_bytes"] + r["argument_bytes"] + r["output_bytes"]
    for method in ("maml", "amaml", "amaml-ckpt"):
        r = _row(rows, method, 8)  # the first step count is always timed
        assert r["seconds"] > 0 and math.isfinite(r["seconds"])
        assert r["forward_seconds"] > 0 and math.isfinite(r["forward_seconds"])
    assert _row(rows, "amaml-ckpt", 64)["checkpoints"] == 8


@pytest.mark.xdist_group("bench-tiny-run")
def test_memory_trends(tiny_run):
    _, rows = tiny_run
    growth = {m: _row(rows, m, 64)["peak_bytes"] - _row(rows, m, 8)["peak_bytes"] for m in ("maml", "amaml", "amaml-ckpt")}
    assert growth["maml"] > 0  # the unrolled graph grows with the steps
    assert growth["amaml"] > 0  # the stored states do too, more slowly
    assert growth["amaml-ckpt"] < growth["amaml"]  # sqrt(K) checkpoints grow slower still
    assert _row(rows, "amaml", 64)["peak_bytes"] < _row(rows, "maml", 64)["peak_bytes"]


@pytest.mark.xdist_group("bench-tiny-run")
def test_targets_from_rows(tiny_run):
    _, rows = tiny_run
    targets = bench.evaluate_targets(rows)
    by_name = {t["name"][:2]: t for t in targets}
    assert by_name["3."]["met"] is None  # no Conv-4 rows in this run
    ckpt = [t for t in targets if t["name"].startswith("6.")]
    assert ckpt and ckpt[0]["met"] is True


def test_checkpoints_for():
    assert bench.checkpoints_for(100) == 10
    assert bench.checkpoints_for(1000) == 25
    assert bench.checkpoints_for(64) == 8
    assert bench.checkpoints_for(13) == 1
    for k in (10, 50, 200, 500, 2000, 10000):
        assert k % bench.checkpoints_for(k) == 0


def test_rules_are_the_presets_rules():
    """Each method name measures the rule `ctmeta train` builds for it (`presets.build_method`)."""
    from ctmeta.methods import Adjoint, FirstOrder, Implicit, Reptile, Unrolled

    assert bench.problems.rule("maml", 20) == Unrolled(20) == bench.problems.rule("anil", 20)
    assert bench.problems.rule("fomaml", 20) == FirstOrder(20)
    assert bench.problems.rule("reptile", 20) == Reptile(20)
    assert bench.problems.rule("imaml", 20) == Implicit(20, lam=1.0, cg_steps=5)
    assert bench.problems.rule("amaml", 20) == Adjoint(20)
    assert bench.problems.rule("amaml-ckpt", 100) == Adjoint(100, checkpoints=10)
    assert bench.problems.rule("amaml-adaptive", 20, 64) == Adjoint(dense_steps=64)
    assert bench.problems.rule("amaml-adaptive", 20) == Adjoint(dense_steps=256)  # as the committed sweeps measured
    assert bench.problems.rule("amaml-rkc2", 20, 64) == Adjoint(dense_steps=64, solver="rkc2")
    assert {m: bench.FLOW_CASES[m][0] for m in bench.FLOW_CASES} == {
        "amaml-preconditioned": "amaml-adaptive", "amaml-heavy-ball": "amaml-adaptive", "maml-preconditioned": "maml"}
    with pytest.raises(InputError):
        bench.problems.rule("comln", 20)


def test_bad_arguments():
    with pytest.raises(InputError):
        bench.sweep._parse_cases(["nosuchbench"])
    with pytest.raises(InputError):
        bench.sweep._parse_cases(["cosmixture/comln"])
    assert bench.sweep._parse_cases(["omniglot/comln+anil", "cosmixture/maml"]) == [
        ("omniglot", "comln"), ("omniglot", "anil"), ("cosmixture", "maml")]
    assert bench.main(["--cases", "nosuchbench", "--out", "unused"]) == 2


def test_conv4_problem_whole_network_and_head_paths_compute_the_same_network(tmp_path):
    """The Conv-4 problem holds one set of parameters under two convolutions
    (XLA's for the head-only methods, matrix products for whole-network
    adaptation on a CPU): both paths are the same function of them."""
    import jax
    import numpy as np

    p = bench.make_problem("omniglot", 1, data_dir=tmp_path, head_init="random")  # no data: synthetic images
    task = jax.tree.map(lambda a: a[0], p.batch)
    emb, W = p.params
    whole = float(p.whole_loss(p.params, (task[0], task[1])))
    via_features = float(cross_entropy(p.head["features"](emb, task[0]) @ W.T, task[1]))
    np.testing.assert_allclose(whole, via_features, rtol=1e-5)
    grads = jax.grad(p.whole_loss)(p.params, (task[0], task[1]))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_resnet12_problem_has_comln_s_16000_features_and_head_only_methods(tmp_path):
    import jax

    p = bench.make_problem("miniimagenet-resnet12", 1, data_dir=tmp_path)  # no data: synthetic 84x84 images
    emb, W0 = p.params
    task = jax.tree.map(lambda a: a[0], p.batch)
    shape = jax.eval_shape(p.head["features"], emb, task[0]).shape  # no ResNet-12 forward is run
    assert shape == (25, 16000) and W0.shape == (5, 16000)
    assert set(bench.BENCHMARKS["miniimagenet-resnet12"]) == {"comln", "comln-euler", "anil"}


def test_head_memory_grows_with_steps_for_anil_and_not_for_comln(tmp_path):
    """The head's meta-gradient alone: ANIL's unrolled graph keeps a (ways, d) state per step,
    COMLN's forward sensitivity does not depend on the steps."""
    p = bench.make_problem("omniglot", 1, data_dir=tmp_path)  # synthetic Omniglot, Conv-4, d = 64
    small, large = bench.head_memory(p, 10), bench.head_memory(p, 1000)
    assert large["comln_head_bytes"] == small["comln_head_bytes"]
    # At least one (5, 64) float32 state a step: 1,280 bytes x 990 more steps.
    assert large["anil_head_bytes"] - small["anil_head_bytes"] >= 990 * 5 * 64 * 4
    assert large["comln_over_anil"] < small["comln_over_anil"]


def test_flow_cases_differentiate_the_flow_and_keep_a_flat_memory(tmp_path):
    """The flow cases measure the meta-gradient of (initialisation, flow): A-MAML's
    adaptive adjoint keeps its memory flat in the steps, Meta-SGD's unrolled graph does not."""
    import jax
    import numpy as np

    rows = bench.run(["cosmixture/amaml-heavy-ball+maml-preconditioned"], [8, 64], tmp_path, quick=True, repeats=1,
                     meta_batch=1, time_budget=0.0, vmap=False, diagnostics=False, progress=False)
    assert all(r["peak_bytes"] > 0 for r in rows)
    hb = [_row(rows, "amaml-heavy-ball", k) for k in (8, 64)]
    sgd = [_row(rows, "maml-preconditioned", k) for k in (8, 64)]
    assert hb[0]["status"].startswith("ok") and hb[0]["forward_steps"] >= 1 and hb[0]["backward_steps"] >= 1
    assert sgd[1]["peak_bytes"] > 4 * sgd[0]["peak_bytes"]  # the unrolled graph grows with K
    assert hb[1]["peak_bytes"] < 1.5 * hb[0]["peak_bytes"] < sgd[1]["peak_bytes"]
    problem = bench.make_problem("cosmixture", 1)
    for method, name in (("amaml-heavy-ball", "log_gamma"), ("maml-preconditioned", "rho")):
        grad_fn, _ = bench.meta_gradient_fn(problem, method, 8)
        _, (g_init, g_flow) = jax.jit(grad_fn)(problem.meta_params(method), problem.batch)
        flow_grads = jax.tree.leaves(getattr(g_flow, name))
        assert flow_grads and all(np.isfinite(g).all() for g in flow_grads)
        assert max(float(np.abs(g).max()) for g in flow_grads) > 0
        assert max(float(np.abs(g).max()) for g in jax.tree.leaves(g_init)) > 0


def test_time_extrapolation_is_affine_through_the_last_two_points():
    from ctmeta.bench.sweep import _time_skipped

    # Nothing timed yet: time it.
    assert _time_skipped([], 10, 120.0) is None
    # One point (K = 10, 50 s, timed once): through the origin K = 100 would be 500 s, but the
    # second point is timed so that the affine model has two; not above ten budgets, nor after a
    # point that was over the budget alone (warm-up only).
    assert _time_skipped([(10, 50.0, 1)], 100, 120.0) is None
    assert "est. 5,000.00 s" in _time_skipped([(10, 50.0, 1)], 1000, 120.0)
    assert "est. 500.00 s" in _time_skipped([(10, 50.0, 0)], 100, 120.0)
    # Two points: a fixed 50 s plus 0.01 s a step -> 50.9 + 0.01 * 9900 = 149.9 s at K = 10,000.
    points = [(10, 50.0, 1), (100, 50.9, 1)]
    assert _time_skipped(points, 1000, 120.0) is None  # 59.9 s
    assert "est. 149.90 s per call > budget 120 s" in _time_skipped(points, 10000, 120.0)
    # A noisy decrease is not extrapolated below the last time.
    assert _time_skipped([(10, 50.0, 1), (100, 49.0, 1)], 10**6, 50.0) is None
    assert _time_skipped([(10, 50.0, 1), (100, 49.0, 1)], 10**6, 48.9) is not None


def test_stiff_diagnostic_gives_the_curvature_range_of_a_saddle_against_eigh():
    """The `stiff` diagnostic on quadratic support losses 0.5 u'Au - b'u (two tasks, the Hessian A
    constant along the flow): lambda_max / lambda_min are the largest / smallest eigenvalue over the
    tasks at u0, u(T/2) and u(T), and Dopri5's and RKC2's counts come with them."""
    import jax.numpy as jnp
    import numpy as np

    from ctmeta.bench.diagnostics import amaml_solver_steps
    from ctmeta.bench.problems import Problem

    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    eigs = [np.array([-3.0, 0.5, 1.0, 2.0, 5.0, 40.0]), np.array([-1.0, 0.1, 1.0, 3.0, 8.0, 90.0])]
    A = np.stack([Q @ np.diag(e) @ Q.T for e in eigs])
    loss = lambda u, data: 0.5 * u @ data[0] @ u - data[1] @ u
    problem = Problem(name="quadratic", params=jnp.asarray(rng.normal(size=6)),
                      batch=(jnp.asarray(A), jnp.asarray(rng.normal(size=(2, 6))), None, None), meta_batch=2,
                      dtype="float64", data="synthetic", whole_loss=loss, whole_outer=None)
    d = amaml_solver_steps(problem, 10, lanczos=6)  # T = 0.1
    for at in ("u0", "mid", "uT"):
        assert d[f"lambda_max_{at}"] == pytest.approx(90.0, rel=1e-9)
        assert d[f"lambda_min_{at}"] == pytest.approx(-3.0, rel=1e-9)
    assert d["diagnostic"] == "stiff" and d["dopri5_steps"] >= 3 and d["rkc2_steps"] >= 1
    assert d["dopri5_h_lambda"] == pytest.approx(90.0 * 0.1 / d["dopri5_steps"])
    assert d["rkc2_evals"] >= 2 * d["rkc2_steps"] and d["rkc2_hvps"] > 0
