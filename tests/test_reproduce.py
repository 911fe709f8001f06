"""`ctmeta reproduce`: the experiment list, errors, and a tiny end-to-end run."""

from __future__ import annotations

import math
import pathlib
import re

import numpy as np
import pytest

from ctmeta.cli import main
from ctmeta.experiments import reproduce
from ctmeta.runs import Reporter


def test_list_names_every_experiment(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for name, spec in reproduce.EXPERIMENTS.items():
        assert name in out
        assert spec.reproduces in out
    for required in ("amaml-fig2", "amaml-table1-2", "amaml-table3", "amaml-table4", "amaml-table5",
                     "amaml-fig3-4", "comln-fig3", "comln-table2", "comln-table4", "comln-fig5", "comln-fig2", "inner-flows"):
        assert required in reproduce.EXPERIMENTS
    assert "quick scale" in out


def test_unknown_experiment_exits_2(capsys):
    assert main(["reproduce", "no-such-experiment"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'no-such-experiment'" in err and "--list" in err


def test_missing_experiment_and_bad_scale_exit_2(capsys):
    assert main(["reproduce"]) == 2
    assert main(["reproduce", "amaml-table4", "--scale", "huge"]) == 2
    assert main(["reproduce", "amaml-table4", "--data-dir", "/nonexistent/ctmeta-data"]) == 2


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![\w.])[-+]?\d+\.\d+(?:e[-+]?\d+)?", text)]


def test_table4_at_test_scale_writes_results_and_png(tmp_path):
    assert main(["reproduce", "amaml-table4", "--scale", "test", "--out", str(tmp_path), "--quiet"]) == 0
    d = tmp_path / "amaml-table4"
    md = (d / "results.md").read_text()
    assert (d / "table4.png").stat().st_size > 1000
    rows = [line for line in md.splitlines() if re.match(r"^\| (10|50) \|", line)]
    assert len(rows) == 4  # 2 horizons x 2 state counts
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        ours = float(cells[2])
        assert math.isfinite(ours) and 0 <= ours < 1
    assert "paper (Adjoint)" in md


@pytest.mark.filterwarnings("ignore")
def test_fig2_at_test_scale_trains_and_tables(tmp_path):
    code = main(["reproduce", "amaml-fig2-cosmixture", "--scale", "test", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    d = tmp_path / "amaml-fig2-cosmixture"
    md = (d / "results.md").read_text()
    assert (d / "fig2-cosmixture.png").stat().st_size > 1000
    for method in ("A-MAML", "MAML"):
        line = next(l for l in md.splitlines() if l.startswith(f"| {method} |"))
        values = _numbers(line)
        assert len(values) == 6 and all(math.isfinite(v) for v in values)
    assert (d / "50shot-50val" / "amaml" / "results.json").is_file()
    # A second call reuses the finished runs.
    assert main(["reproduce", "amaml-fig2-cosmixture", "--scale", "test", "--out", str(tmp_path), "--quiet"]) == 0


def _record_runs(monkeypatch) -> list[dict]:
    """Replace `run_method` by a recorder: the experiment's plan, without training."""
    calls = []

    def record(ctx, label, benchmark, method, **kwargs):
        calls.append(dict(label=label, benchmark=benchmark, method=method, **kwargs))
        return reproduce.RunResult(label, "skipped", "recorded, not run")

    monkeypatch.setattr(reproduce.runner, "run_method", record)  # where the experiments look it up
    return calls


def test_comln_table2_runs_resnet12_rows_with_comlns_optimizer_at_paper_scale(monkeypatch, tmp_path):
    calls = _record_runs(monkeypatch)
    reproduce.run_experiment("comln-table2", scale="paper", out=str(tmp_path), quiet=True)
    resnet = [c for c in calls if c["backbone"] == "resnet12"]
    assert {(c["benchmark"], c["method"], c["shots"]) for c in resnet} == {
        ("miniimagenet", m, k) for m in ("comln", "anil", "maml") for k in (1, 5)}
    assert all(c["label"].startswith("miniimagenet-5w") and "-resnet12/" in c["label"] for c in resnet)
    assert {c["backbone"] for c in calls if c["benchmark"] == "omniglot"} == {"conv4"}
    assert {c["optimizer"] for c in calls} == {"sgd"}  # COMLN's protocol for every method of its table
    md = (tmp_path / "comln-table2" / "results.md").read_text()
    assert "miniimagenet 5-way 1-shot, ResNet-12" in md and "59.26 ± 0.65" in md  # the paper's ResNet-12 COMLN
    assert "Lee et al.'s step schedule" in md and "no ResNet-12 preset" not in md


def test_comln_table2_quick_scale_is_conv4_with_adam(monkeypatch, tmp_path):
    calls = _record_runs(monkeypatch)
    reproduce.run_experiment("comln-table2", scale="quick", out=str(tmp_path), quiet=True)
    assert calls and {c["backbone"] for c in calls} == {"conv4"} and {c["optimizer"] for c in calls} == {"adam"}
    assert {c["shots"] for c in calls} == {1}
    md = (tmp_path / "comln-table2" / "results.md").read_text()
    assert "Conv-4 only (the ResNet-12 rows run at --scale paper)" in md and "Adam 1e-3" in md


def test_reproduce_imports_no_private_names_from_other_modules():
    """The reproduce package uses the public API of ctmeta (presets, runs) only:
    no private name from outside the package (its own modules may share theirs)."""
    import ast
    import inspect
    import pkgutil

    private = []
    for info in pkgutil.iter_modules(reproduce.__path__):
        module = __import__(f"{reproduce.__name__}.{info.name}", fromlist=["_"])
        tree = ast.parse(inspect.getsource(module))
        private += [f"{info.name}: {node.module}.{a.name}" for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.level != 1
                    for a in node.names if a.name.startswith("_")]
    assert private == []
    from ctmeta.runs import dtype_name, package_versions, save_figure

    assert dtype_name() in ("float32", "float64") and "jax" in package_versions() and callable(save_figure)


def test_committed_paper_scale_runs_are_read_back_and_reused(tmp_path):
    # docs/results holds finished paper-scale runs: `reproduce` reuses them, training nothing.
    import json
    import pathlib
    import shutil

    src = pathlib.Path(__file__).resolve().parents[1] / "docs" / "results" / "amaml-fig2-cosmixture"
    if not (src / "50shot-50val" / "maml" / "results.json").is_file():
        pytest.skip("no committed amaml-fig2-cosmixture results")
    out = tmp_path / "amaml-fig2-cosmixture"
    shutil.copytree(src, out)
    ctx = reproduce.Context(name="amaml-fig2-cosmixture", scale="paper", out=out, data_root=None, quiet=True, argv=[])
    ctx.reporter = Reporter(quiet=True, silent=True)
    r = reproduce.run_method(ctx, "50shot-50val/maml", "cosmixture", "maml", meta_iterations=5000, steps=20)
    assert r.ok and r.results == json.loads((src / "50shot-50val" / "maml" / "results.json").read_text())
    assert len(r.metrics) == 5000


def test_committed_inner_flows_runs_are_reused_and_their_table_rebuilt(tmp_path):
    # Every run of the committed quick-scale inner-flows experiment matches the
    # configuration the experiment asks for (its flow included), so nothing trains.
    import json
    import pathlib
    import shutil

    src = pathlib.Path(__file__).resolve().parents[1] / "docs" / "results" / "inner-flows"
    if not (src / "results.md").is_file():
        pytest.skip("no committed inner-flows results")
    out = tmp_path / "inner-flows"
    shutil.copytree(src, out)
    (out / "results.md").unlink()
    ctx = reproduce.Context(name="inner-flows", scale="quick", out=out, data_root=None, quiet=True, argv=[])
    ctx.reporter = Reporter(quiet=True, silent=True)
    reproduce.EXPERIMENTS["inner-flows"].runner(ctx)
    md = (out / "results.md").read_text()
    for name in ("A-MAML, learned P", "A-MAML, heavy ball", "MAML, learned P (Meta-SGD)"):
        assert md.count(f"| {name} |") == 4  # two tables and two paired tables
    for bench in ("cosmixture", "alpine"):
        for run in ("amaml-heavy-ball", "amaml-preconditioned", "maml-preconditioned"):
            res = json.loads((src / bench / run / "results.json").read_text())
            assert res["learned_flow"] and res["flow"] == run.split("-", 1)[1]
            assert json.loads((out / bench / run / "results.json").read_text()) == res
        gamma = json.loads((src / bench / "amaml-heavy-ball" / "results.json").read_text())["learned_flow"]["gamma"]
        assert f"gamma {gamma:.3g}" in md
    assert "against A-MAML: nRMSE" in md and (out / "inner-flows.png").stat().st_size > 0


def test_methods_filter_runs_only_the_named_methods(tmp_path):
    ctx = reproduce.Context(name="x", scale="test", out=tmp_path, data_root=None, quiet=True, argv=[],
                            methods=frozenset({"maml"}))
    ctx.reporter = Reporter(quiet=True, silent=True)
    r = reproduce.run_method(ctx, "50shot-50val/reptile", "cosmixture", "reptile", meta_iterations=2, steps=2)
    assert r.status == "not run" and not (tmp_path / "50shot-50val" / "reptile").exists()


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path):
    from ctmeta.runs import RunDir

    def run(out, iters):
        ctx = reproduce.Context(name="x", scale="test", out=out, data_root=None, quiet=True, argv=[])
        ctx.reporter = Reporter(quiet=True, silent=True)
        return reproduce.run_method(ctx, "s/maml", "cosmixture", "maml", meta_iterations=iters, steps=2,
                                    eval_tasks=4, eval_steps=(0, 2))

    whole = run(tmp_path / "a", 6)
    # The same run as if stopped after its checkpoint at iteration 5: no results.json, no
    # checkpoint 6, but the metrics row of iteration 6 written (it is torn off on resume).
    part = tmp_path / "b"
    assert run(part, 6).ok
    d = RunDir(part / "s" / "maml")
    (d.path / "results.json").unlink()
    last_it, last = d.checkpoints()[-1]
    assert last_it == 6 and d.checkpoints()[-2][0] == 5
    last.unlink()
    last.with_suffix(".json").unlink()
    resumed = run(part, 6)
    assert resumed.ok and whole.ok
    assert [r["iteration"] for r in resumed.metrics] == list(range(1, 7))
    assert [r["meta_loss"] for r in resumed.metrics] == [r["meta_loss"] for r in whole.metrics]
    assert resumed.results["learned"] == whole.results["learned"]


def test_an_unfinished_run_of_another_configuration_is_kept_and_one_from_before_flows_resumes(tmp_path):
    import json

    from ctmeta.runs import RunDir

    def run(iters):
        ctx = reproduce.Context(name="x", scale="test", out=tmp_path, data_root=None, quiet=True, argv=[])
        ctx.reporter = Reporter(quiet=True, silent=True)
        return reproduce.run_method(ctx, "s/maml", "cosmixture", "maml", meta_iterations=iters, steps=2,
                                    eval_tasks=4, eval_steps=(0, 2))

    whole = run(4)
    d = RunDir(tmp_path / "s" / "maml")
    (d.path / "results.json").unlink()
    for it, ck in d.checkpoints():
        if it == 4:
            ck.unlink()
            ck.with_suffix(".json").unlink()
    # Written before inner flows existed: no "flow" entry, which reads as the gradient flow.
    config = json.loads(d.config_path.read_text())
    del config["flow"]
    d.config_path.write_text(json.dumps(config))
    other = run(3)  # a lowered budget: the unfinished run is not deleted (a raised one continues it)
    assert other.status == "failed" and "differs in meta_iterations)" in other.message
    assert d.checkpoints()[-1][0] == 3
    resumed = run(4)
    assert resumed.ok
    assert [r["meta_loss"] for r in resumed.metrics] == [r["meta_loss"] for r in whole.metrics]


def test_a_finished_run_is_continued_to_a_raised_budget_and_keeps_its_evaluation(tmp_path):
    # amaml-table3 --scale cpu raised A-MAML's budget from 150 to 1,000 meta-iterations: its finished
    # run goes on from its last checkpoint (as `ctmeta train --resume --meta-iterations` would), and the
    # evaluation it ended with moves to RUN/evaluations/, read back beside the new one.
    import json

    def run(out, iters, **options):
        ctx = reproduce.Context(name="x", scale="test", out=out, data_root=None, quiet=True, argv=[], **options)
        ctx.reporter = Reporter(quiet=True, silent=True)
        return reproduce.run_method(ctx, "s/maml", "cosmixture", "maml", meta_iterations=iters, steps=2,
                                    eval_tasks=4, eval_steps=(0, 2))

    short = run(tmp_path, 4)
    assert short.results["iteration"] == 4
    # Not selected by --methods: read as it is.
    as_is = run(tmp_path, 6, methods=frozenset({"reptile"}))
    assert as_is.ok and as_is.results["iteration"] == 4
    longer = run(tmp_path, 6)
    assert longer.ok and longer.results["iteration"] == 6
    # Continued, not started again: the first four rows are the short run's (whose seconds go on).
    assert [r["iteration"] for r in longer.metrics] == list(range(1, 7))
    assert longer.metrics[:4] == short.metrics and longer.metrics[4]["seconds"] >= short.metrics[-1]["seconds"]
    path = tmp_path / "s" / "maml"
    found = reproduce.runner.evaluations_of("s/maml", path)
    assert sorted(found) == [4, 6] and found[4].results["learned"] == short.results["learned"]
    assert (pathlib.Path(found[4].run_dir) / "results.md").is_file() and found[4].run_dir != str(path)
    config = json.loads((path / "config.json").read_text())
    assert config["meta_iterations"] == 6 and config["resumes"][-1]["from_iteration"] == 4
    assert config["resumes"][-1]["changed"]["meta_iterations"] == 4
    assert run(tmp_path, 6).results == longer.results  # finished: reused


def test_a_run_that_failed_numerically_is_not_attempted_again_unless_asked(tmp_path, monkeypatch):
    import ctmeta.runs
    from ctmeta._errors import NumericalError

    real_train = ctmeta.runs.train

    def run(**options):
        ctx = reproduce.Context(name="x", scale="test", out=tmp_path, data_root=None, quiet=True, argv=[], **options)
        ctx.reporter = Reporter(quiet=True, silent=True)
        return reproduce.run_method(ctx, "s/maml", "cosmixture", "maml", meta_iterations=3, steps=2,
                                    eval_tasks=4, eval_steps=(0, 2))

    def diverge(*args, **kwargs):
        raise NumericalError("meta-iteration 2: the inner solve produced a non-finite state")

    monkeypatch.setattr(ctmeta.runs, "train", diverge)
    first = run()
    assert first.status == "failed" and "non-finite" in first.message
    marker = tmp_path / "s" / "maml" / "failed.json"
    assert marker.is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("a run that failed numerically was attempted again")

    monkeypatch.setattr(ctmeta.runs, "train", refuse)
    again = run()
    assert again.status == "failed" and again.message == first.message
    # --retry-failed: attempted again; it succeeds this time, and the marker goes.
    monkeypatch.setattr(ctmeta.runs, "train", real_train)
    retried = run(retry_failed=True)
    assert retried.ok and not marker.exists()
    assert [r["iteration"] for r in retried.metrics] == [1, 2, 3]


def test_paired_test_against_the_t_statistic_by_hand():
    from scipy import stats

    rng = np.random.default_rng(0)
    b = rng.uniform(0.1, 1.0, 50)
    a = b - 0.05 + 0.02 * rng.standard_normal(50)
    t = reproduce.paired_test(a, b)
    d = a - b
    stat = d.mean() / (d.std(ddof=1) / np.sqrt(d.size))
    assert t["mean_diff"] == pytest.approx(d.mean(), rel=1e-12)
    assert t["t_p"] == pytest.approx(2 * stats.t.sf(abs(stat), d.size - 1), rel=1e-9)
    assert t["t_p"] < 1e-6 and t["wilcoxon_p"] < 1e-6 and t["a_lower"] == int(np.sum(d < 0)) and t["n"] == 50
    same = reproduce.paired_test(b, b)
    assert same["t_p"] == same["wilcoxon_p"] == 1.0 and same["mean_diff"] == 0.0


@pytest.mark.filterwarnings("ignore")
def test_a_finished_run_without_per_task_errors_is_evaluated_again_to_the_same_numbers(tmp_path):
    import json

    def run():
        ctx = reproduce.Context(name="x", scale="test", out=tmp_path, data_root=None, quiet=True, argv=[])
        ctx.reporter = Reporter(quiet=True, silent=True)
        return reproduce.run_method(ctx, "s/maml", "cosmixture", "maml", meta_iterations=2, steps=2,
                                    eval_tasks=4, eval_steps=(0, 2))

    first = run()
    assert len(first.per_task(2)) == 4
    np.testing.assert_allclose(first.per_task(2).mean(), first.value(2)[0], rtol=1e-6)
    path = tmp_path / "s" / "maml" / "results.json"
    old = json.loads(path.read_text())
    for name in ("learned", "random"):
        del old[name]["per_task"]
    path.write_text(json.dumps(old))
    again = run()
    assert again.results["learned"]["mean"] == first.results["learned"]["mean"]
    np.testing.assert_array_equal(again.per_task(2), first.per_task(2))
    assert "per_task" in json.loads(path.read_text())["learned"]


def test_cpu_scale_of_the_image_experiments_is_omniglot_with_the_cpu_budgets(monkeypatch, tmp_path):
    calls = _record_runs(monkeypatch)
    reproduce.run_experiment("amaml-table3", scale="cpu", out=str(tmp_path), quiet=True)
    assert {c["benchmark"] for c in calls} == {"omniglot"}
    iters = {c["method"]: c["meta_iterations"] for c in calls}
    # No COMLN row at cpu scale: its 20-way augmented system is too costly here (see the deviation).
    assert iters == {m: reproduce.images._CPU_ITERATIONS[m] for m in ("amaml", "maml")}
    assert "cpu: no COMLN row" in (tmp_path / "amaml-table3" / "results.md").read_text()
    assert {c["eval_tasks"] for c in calls} == {200}  # one test batch for every method: paired tests
    calls.clear()
    reproduce.run_experiment("comln-table2", scale="cpu", out=str(tmp_path), quiet=True)
    assert {(c["benchmark"], c["ways"], c["shots"], c["backbone"]) for c in calls} == {("omniglot", 5, 1, "conv4")}
    assert {c["optimizer"] for c in calls} == {"sgd"} and {c["method"] for c in calls} == {"comln", "anil", "maml"}
    md = (tmp_path / "comln-table2" / "results.md").read_text()
    assert "scale `cpu`" in md and "COMLN 2000 meta-iterations, 200 meta-test tasks" in md
    calls.clear()
    reproduce.run_experiment("comln-fig5", scale="cpu", out=str(tmp_path), quiet=True)
    assert {(c["meta_iterations"], c["eval_tasks"], c["optimizer"]) for c in calls} == {(2000, 600, None)}
    assert {(c["ways"], c["shots"]) for c in calls} == {(5, 1)}  # 1-shot: COMLN's 5-shot system is too costly
    calls.clear()
    reproduce.run_experiment("comln-table4", scale="cpu", out=str(tmp_path), quiet=True)
    assert {(c["benchmark"], c["ways"], c["shots"]) for c in calls} == {("omniglot", 5, 1)}
    calls.clear()
    reproduce.run_experiment("comln-fig5", scale="paper", out=str(tmp_path), quiet=True)
    assert {(c["benchmark"], c["meta_iterations"], c["eval_tasks"]) for c in calls} == {("miniimagenet", 60000, 600)}


def test_cpu_scale_of_an_experiment_that_fits_is_its_paper_scale(monkeypatch, tmp_path):
    calls = _record_runs(monkeypatch)
    reproduce.run_experiment("amaml-fig2-alpine", scale="paper", out=str(tmp_path / "p"), quiet=True)
    paper = [dict(c) for c in calls]
    calls.clear()
    reproduce.run_experiment("amaml-fig2-alpine", scale="cpu", out=str(tmp_path / "c"), quiet=True)
    assert calls == paper and len(paper) == 12
    assert "scale `paper`" in (tmp_path / "c" / "amaml-fig2-alpine" / "results.md").read_text()


@pytest.mark.filterwarnings("ignore")
def test_estimate_times_every_run_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    est = reproduce.run_experiment("amaml-fig2-cosmixture", scale="test", out=str(out), quiet=True, estimate=1)
    assert [e["label"] for e in est] == ["50shot-50val/amaml", "50shot-50val/maml"] and not out.exists()
    for e in est:
        assert e["meta_iterations"] == 2 and e["s_per_iteration"] > 0
        assert e["projected_s"] == pytest.approx(e["compile_s"] + e["s_per_iteration"])
    text = capsys.readouterr().out
    assert "projected meta-training wall time" in text and "| total | 4 |" in text
    with pytest.raises(reproduce.InputError, match="does not meta-train"):
        reproduce.run_experiment("amaml-table4", scale="test", out=str(out), estimate=1)
    assert main(["reproduce", "comln-fig2", "--estimate", "--out", str(out)]) == 2
    assert "does not meta-train" in capsys.readouterr().err


def _fake_run(label, per_task: dict, tasks: int = 4):
    return reproduce.RunResult(label, "ok", results={"tasks": tasks, "learned": {"per_task": per_task}})


def test_paired_table_compares_each_run_at_its_own_step_and_direction():
    ref = _fake_run("b/amaml-T0.5", {"5": [0.1, 0.1, 0.1, 0.1], "50": [0.9, 0.8, 0.95, 0.85]})
    maml = _fake_run("b/maml", {"5": [0.5, 0.6, 0.55, 0.5], "50": [0.99, 0.99, 0.99, 0.99]})
    assert ref.nearest_table_step(37) == 50 and maml.nearest_table_step(3) == 5
    steps = {ref.label: 50, maml.label: 5}
    (md,) = reproduce.paired_table(ref, [ref, maml], lambda r: steps[r.label], lower_is_better=False,
                                   name="A-MAML (T=0.5)")
    row = next(l for l in md.splitlines() if l.startswith("| MAML |"))
    d = np.array([0.9, 0.8, 0.95, 0.85]) - np.array([0.5, 0.6, 0.55, 0.5])
    assert f"{d.mean():+.4f}" in row and "| 4/4 |" in row  # higher accuracy on all 4 tasks
    assert "tasks where A-MAML (T=0.5) is higher" in md
    # With 4 tasks the Wilcoxon test cannot reach p < 0.05: no verdict either way.
    assert row.rstrip(" |").endswith("no significant difference")
    assert reproduce.images._same_test_tasks([ref, maml]) and not reproduce.images._same_test_tasks([ref, _fake_run("x", {}, 5)])


def test_table5_compares_stored_sweeps_and_the_adaptive_backward_with_the_reference():
    from ctmeta.experiments import cosmixture_table5 as t5

    # One call (one reference): the stored sweeps at K = 4 and 8 and the adaptive backward.
    res = t5.table5(states=(4, 8), reference=64, horizons=(0.1,), num_inits=1, meta_batch=2, adaptive=True)
    assert set(res) == {0.1, ("adaptive", 0.1)}
    (k4_err, _), (k8_err, _) = res[0.1]
    ada_err, ada_std = res[("adaptive", 0.1)]
    # Both are consistent discretisations of the same meta-gradient: a broken rule is O(1) off, and
    # the stored sweep's error falls as its states double.
    assert 0 < k8_err < k4_err < 0.05 and 0 < ada_err < 0.05 and ada_std == 0.0


# The committed meta-training experiments of docs/results and the scale each was run at.
_COMMITTED = [("amaml-fig2-cosmixture", "paper"), ("amaml-fig2-alpine", "paper"), ("amaml-table1-2", "paper"),
              ("amaml-table3", "cpu"), ("comln-table2", "cpu"), ("comln-table4", "cpu"), ("comln-fig5", "cpu")]


@pytest.mark.parametrize("name,scale", _COMMITTED)
def test_every_committed_experiment_is_rebuilt_from_its_runs_without_training(name, scale, tmp_path, monkeypatch,
                                                                              data_dir):
    # What a later session's `ctmeta reproduce NAME --scale SCALE --out docs/results` does: every
    # finished run is read back (results.json), nothing trains or re-evaluates, and the tables,
    # paired tests and figures are written again from the runs alone.
    import json
    import pathlib
    import shutil

    from ctmeta.experiments.reproduce import runner

    src = pathlib.Path(__file__).resolve().parents[1] / "docs" / "results" / name
    if not (src / "results.md").is_file():
        pytest.skip(f"no committed {name} results")
    committed = (src / "results.md").read_text()
    out = tmp_path / name
    shutil.copytree(src, out)
    (out / "results.md").unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("a committed finished run was trained or evaluated again")

    import ctmeta.runs

    monkeypatch.setattr(ctmeta.runs, "train", refuse)
    monkeypatch.setattr(ctmeta.runs, "evaluate_run", refuse)
    monkeypatch.setattr(runner, "_evaluate_again", refuse)
    methods = None
    amaml = out / "omniglot" / "amaml-T0.5" / "results.json"
    if name == "amaml-table3" and amaml.is_file() and (
            json.loads(amaml.read_text())["iteration"] < reproduce.images._CPU_ITERATIONS["amaml"]):
        # A-MAML's run goes on to 1,000 meta-iterations over many sessions; meanwhile the page is
        # rebuilt with `--methods maml`, which reads A-MAML's shorter run as it is.
        methods = frozenset({"maml"})
    ctx = reproduce.Context(name=name, scale=scale, out=out, data_root=data_dir, quiet=True, argv=[],
                            methods=methods)
    ctx.reporter = Reporter(quiet=True, silent=True)
    reproduce.EXPERIMENTS[name].runner(ctx)
    md = (out / "results.md").read_text()
    assert "trained or evaluated again" not in md

    # The tables are the committed ones, row for row. A run that failed there (comln-table4's
    # Euler diverges) is left out: it is retried (a few seconds) or refused in float64 here. So is
    # a run skipped for want of data: its reason names the data directory of the machine it ran on.
    def rows(text, headings=None):
        heading, out = None, []
        for line in text.splitlines():
            if line.startswith("## "):
                heading = line
            elif (line.startswith("| ") and "failed" not in line and "| skipped: " not in line
                  and (headings is None or heading is None or heading in headings)):
                out.append(line)
        return out

    # A section added to the experiment since its results.md was committed (amaml-table3's "At equal
    # meta-iterations" and "Meta-training cost") is compared once a results.md with it is committed.
    headings = {line for line in committed.splitlines() if line.startswith("## ")}
    assert rows(md) and rows(md, headings) == rows(committed)


def test_a_committed_bench_experiment_is_rebuilt_without_measuring(tmp_path, monkeypatch, data_dir):
    # `ctmeta reproduce amaml-fig3-4 --scale paper --out docs/results` again: the sweep resumes
    # from the committed bench.csv, vmap.csv and diagnostics.csv, so nothing is compiled or timed,
    # and the table is the committed one.
    import json
    import pathlib
    import shutil

    from ctmeta.bench import sweep

    src = pathlib.Path(__file__).resolve().parents[1] / "docs" / "results" / "amaml-fig3-4"
    if not (src / "sweep.json").is_file():
        pytest.skip("no committed amaml-fig3-4 sweep")
    out = tmp_path / "amaml-fig3-4"
    shutil.copytree(src, out)

    def refuse(*args, **kwargs):
        raise AssertionError("a committed bench case was measured again")

    for name in ("_measure_case", "measure_vmap", "run_diagnostics"):
        monkeypatch.setattr(sweep, name, refuse)
    # The committed sweep's machine (a sweep from another device is refused, not mixed).
    monkeypatch.setattr(sweep, "device_description", lambda: json.loads((src / "sweep.json").read_text())["device"])
    ctx = reproduce.Context(name="amaml-fig3-4", scale="paper", out=out, data_root=data_dir, quiet=True, argv=[])
    ctx.reporter = Reporter(quiet=True, silent=True)
    reproduce.EXPERIMENTS["amaml-fig3-4"].runner(ctx)

    def table(text):
        part = text.split("## bench.csv")[1].split("\n## ")[0]
        return [line for line in part.splitlines() if line.startswith("| ")]

    assert len(table((out / "bench.md").read_text())) == 2 + 90
    # Nothing was measured, so the sweep's measuring time is the committed one.
    assert json.loads((out / "sweep.json").read_text()) == json.loads((src / "sweep.json").read_text())
    assert "33.7 min measuring" in (out / "bench.md").read_text()
    assert table((out / "bench.md").read_text()) == table((src / "bench.md").read_text())
