"""`ctmeta reproduce amaml-table3 --scale cpu`: A-MAML against MAML at equal
meta-iterations and the meta-training cost, rebuilt from faked run
directories (results.json, RUN/evaluations/, metrics.csv): nothing trains."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from ctmeta.experiments import reproduce
from ctmeta.experiments.reproduce import report, runner
from ctmeta.runs import Reporter

_STEPS = [0, 5, 10, 50, 100]
_TASKS = 40


def _results(iteration: int, per_task: dict[int, np.ndarray], T: float, tasks: int = _TASKS,
             steps: list[int] = _STEPS) -> dict:
    """A results.json of an evaluation with these per-task accuracies at each table step."""
    def block(values):
        mean = [float(np.mean(values[s])) for s in steps]
        ci = [float(1.96 * np.std(values[s], ddof=1) / math.sqrt(len(values[s]))) for s in steps]
        return {"mean": mean, "ci95": ci, "per_task": {str(s): [float(x) for x in values[s]] for s in steps}}

    rng = np.random.default_rng(iteration)
    random = {s: rng.integers(0, 10, tasks) / 100 for s in steps}
    return {"benchmark": "omniglot", "iteration": iteration, "metric": "accuracy", "lower_is_better": False,
            "tasks": tasks, "lr": 0.01, "T": T, "table_steps": steps, "curve_steps": steps,
            "learned": block(per_task), "random": block(random)}


def _accuracies(seed: int, level: float, tasks: int = _TASKS) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s: np.clip(np.round(level * min(1.0, 0.2 + s / 20) + rng.normal(0, 0.08, tasks), 2), 0, 1)
            for s in _STEPS}


def _write_run(path, method: str, T: float, own: dict | None, evaluations: dict[str, dict], metrics: list[str]):
    path.mkdir(parents=True)
    eval_cfg = {"steps": _STEPS, "curve": _STEPS, "lr": 0.01, "tasks": _TASKS, "metric": "accuracy"}
    (path / "config.json").write_text(json.dumps({"benchmark": "omniglot", "method": method, "T": T,
                                                  "meta_iterations": 1000, "eval": eval_cfg}))
    if own is not None:
        (path / "results.json").write_text(json.dumps(own))
    for name, results in evaluations.items():
        (path / "evaluations" / name).mkdir(parents=True)
        (path / "evaluations" / name / "results.json").write_text(json.dumps(results))
    (path / "metrics.csv").write_text("iteration,meta_loss,grad_norm,T,seconds,skipped\n" + "\n".join(metrics) + "\n")


def _metrics(seconds: list[float], T: float) -> list[str]:
    return [f"{i + 1},1.0,1.0,{T},{s:.3f},0" for i, s in enumerate(seconds)]


def _p(p: float) -> str:  # the paired tables' format, written out here
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


@pytest.fixture
def fake_table3(tmp_path):
    """A-MAML (T = 0.5) ended at 150 meta-iterations (its own results), with an
    evaluation of checkpoint 500 made with other test tasks; MAML ended at
    1,000, with evaluations of checkpoints 150 and 500. A-MAML's clock
    restarted at a resume (iteration 16)."""
    out = tmp_path / "amaml-table3"
    amaml = {150: _accuracies(1, 0.7), 500: _accuracies(2, 0.75, tasks=10)}
    maml = {150: _accuracies(3, 0.55), 500: _accuracies(4, 0.6), 1000: _accuracies(5, 0.62)}
    a_seconds = [60.0 + 30 * i for i in range(15)] + [5.0 + 40 * i for i in range(135)]  # restarts at 16
    _write_run(out / "omniglot" / "amaml-T0.5", "amaml", 0.5, _results(150, amaml[150], 0.5),
               {"iteration-500_tasks-10": _results(500, amaml[500], 0.5, tasks=10)}, _metrics(a_seconds, 0.5))
    _write_run(out / "omniglot" / "maml", "maml", 0.05, _results(1000, maml[1000], 0.05),
               {"iteration-150": _results(150, maml[150], 0.05),
                "iteration-500_tasks-40": _results(500, maml[500], 0.05)},
               _metrics([10.0 + 4.0 * i for i in range(1000)], 0.05))
    return out, amaml, maml, a_seconds


def _rebuild(out, monkeypatch):
    import ctmeta.runs

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained or evaluated again")

    monkeypatch.setattr(ctmeta.runs, "train", refuse)
    monkeypatch.setattr(ctmeta.runs, "evaluate_run", refuse)
    monkeypatch.setattr(runner, "_evaluate_again", refuse)
    # A-MAML's run is short of its 1,000 meta-iterations: not selected, it is read as it is.
    ctx = reproduce.Context(name="amaml-table3", scale="cpu", out=out, data_root=None, quiet=True, argv=[],
                            methods=frozenset({"maml"}))
    ctx.reporter = Reporter(quiet=True, silent=True)
    reproduce.EXPERIMENTS["amaml-table3"].runner(ctx)
    return (out / "results.md").read_text()


def _section(md: str, heading: str) -> list[str]:
    lines = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0].splitlines()
    return [line for line in lines if line.startswith("| ")]


def test_equal_iterations_table_pairs_each_checkpoint_on_the_same_tasks(fake_table3, monkeypatch):
    from scipy import stats

    out, amaml, maml, _ = fake_table3
    md = _rebuild(out, monkeypatch)
    rows = {line.split(" | ")[0][2:]: [c.strip() for c in line.strip("| ").split(" | ")]
            for line in _section(md, "At equal meta-iterations (omniglot)")[1:]}
    assert list(rows) == ["150", "500", "1000"]
    # 150: A-MAML's own results (50 steps) against MAML's evaluation of checkpoint 150 (5 steps).
    a, b = amaml[150][50], maml[150][5]
    d = a - b
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert rows["150"] == [
        "150", f"{100 * a.mean():.2f} ± {100 * 1.96 * a.std(ddof=1) / math.sqrt(a.size):.2f}",
        f"{100 * b.mean():.2f} ± {100 * 1.96 * b.std(ddof=1) / math.sqrt(b.size):.2f}",
        f"{100 * d.mean():+.2f} ± {100 * half:.2f}", _p(stats.wilcoxon(a, b).pvalue), _p(stats.ttest_rel(a, b).pvalue),
        f"{int(np.sum(a > b))}/{_TASKS}"]
    # 500: A-MAML's evaluation used other test tasks (10, not its run's 40): not paired, not evaluated.
    assert rows["500"][1] == "not evaluated yet" and rows["500"][2].startswith(f"{100 * maml[500][5].mean():.2f} ± ")
    assert rows["500"][3:] == ["-"] * 4
    assert rows["1000"][1] == "not evaluated yet" and rows["1000"][3:] == ["-"] * 4
    assert "A-MAML (T=0.5) 50 steps, MAML 5 steps" in md and "same 40 meta-test tasks" in md
    assert (out / "table3-omniglot-iterations.png").stat().st_size > 0
    assert "omniglot/amaml-T0.5: its run ended at meta-iteration 150 of the 1000 asked" in md


def test_an_iteration_evaluated_by_neither_reads_not_evaluated_yet(tmp_path, monkeypatch):
    # MAML ended at 1,000 with no other evaluation; A-MAML has no results at all yet (still training).
    out = tmp_path / "amaml-table3"
    _write_run(out / "omniglot" / "maml", "maml", 0.05, _results(1000, _accuracies(5, 0.62), 0.05), {},
               _metrics([10.0 + 4.0 * i for i in range(1000)], 0.05))
    _write_run(out / "omniglot" / "amaml-T0.5", "amaml", 0.5, None, {}, _metrics([60.0, 90.0, 130.0], 0.5))
    md = _rebuild(out, monkeypatch)
    rows = [line.strip("| ").split(" | ") for line in _section(md, "At equal meta-iterations (omniglot)")[1:]]
    assert [r[:3] for r in rows] == [["150", "not evaluated yet", "not evaluated yet"],
                                     ["500", "not evaluated yet", "not evaluated yet"],
                                     ["1000", "not evaluated yet", rows[2][2]]] and rows[2][2][0].isdigit()
    # The unfinished A-MAML run's cost is still read from its metrics.csv.
    cost = _section(md, "Meta-training cost (omniglot)")
    assert any(line.startswith("| A-MAML (T=0.5) | 3 | ") for line in cost)


def test_cost_summary_treats_a_clock_restarted_at_a_resume_as_a_new_segment(fake_table3, monkeypatch):
    out, _, _, a_seconds = fake_table3
    # Independently: per-iteration seconds are the differences, the first against 0, without the negative one.
    s = np.asarray(a_seconds)
    per = np.diff(np.concatenate([[0.0], s]))
    assert (per < 0).sum() == 1 and per[15] < 0
    per = per[per >= 0]
    its = np.delete(np.arange(1, 151), 15)
    got_its, got = report.iteration_seconds([{"iteration": i + 1, "seconds": x} for i, x in enumerate(a_seconds)])
    np.testing.assert_array_equal(got_its, its)
    np.testing.assert_allclose(got, per)
    c = report.cost_summary([{"iteration": i + 1, "seconds": x} for i, x in enumerate(a_seconds)])
    assert c["wall"] == pytest.approx(per.sum()) and c["wall"] > s[-1]  # not the restarted clock's last value
    assert c["start"] == pytest.approx(np.median(per[:10])) and c["end"] == pytest.approx(np.median(per[-10:]))
    assert c["last"] == 150 and c["iterations"] == 149
    # A process paused for 5,000 s within the last ten meta-iterations: its one long meta-iteration
    # counts in the wall time, not in the rate at the end.
    paused = list(a_seconds[:145]) + [x + 5000.0 for x in a_seconds[145:]]
    c2 = report.cost_summary([{"iteration": i + 1, "seconds": x} for i, x in enumerate(paused)])
    assert c2["end"] == pytest.approx(40.0) and c2["wall"] == pytest.approx(per.sum() + 5000.0)
    # A gap (missing rows) is spread over the iterations it spans.
    gap_its, gap = report.iteration_seconds([{"iteration": 1, "seconds": 10.0}, {"iteration": 4, "seconds": 40.0}])
    assert list(gap_its) == [1, 4] and list(gap) == [10.0, 10.0]

    md = _rebuild(out, monkeypatch)
    cost = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ") for line in _section(md, "Meta-training cost")[1:]}
    assert cost["A-MAML (T=0.5)"][1] == "150" and cost["A-MAML (T=0.5)"][2] == report.format_long_duration(per.sum())
    assert cost["A-MAML (T=0.5)"][3] == f"{np.median(per[:10]):.3g}" and cost["A-MAML (T=0.5)"][5] == "40"
    assert cost["MAML"][1] == "1000" and cost["MAML"][5] == "4"  # 4 s a meta-iteration at the end
    projected = re.search(r"60,000 meta-iterations \(`--scale paper`\) would take A-MAML \(T=0\.5\) ([\d.]+ d); "
                          r"MAML ([\d.]+ d)", md)
    assert projected and projected.groups() == (report.format_long_duration(40 * 60000),
                                                report.format_long_duration(4 * 60000))
    assert (out / "table3-omniglot-cost.png").stat().st_size > 0


def test_an_evaluation_at_the_horizon_alone_pairs_and_one_without_it_is_left_out(tmp_path, monkeypatch):
    # MAML's checkpoint 150 evaluated with --steps 0,5 (its horizon: paired) and its checkpoint 500 with
    # --steps 0,10 (no 5-step column: left out, never read at another horizon).
    out = tmp_path / "amaml-table3"
    amaml, maml150, maml500 = _accuracies(1, 0.7), _accuracies(3, 0.55), _accuracies(4, 0.6)
    _write_run(out / "omniglot" / "amaml-T0.5", "amaml", 0.5, _results(150, amaml, 0.5), {},
               _metrics([60.0, 90.0], 0.5))
    _write_run(out / "omniglot" / "maml", "maml", 0.05, _results(1000, _accuracies(5, 0.62), 0.05),
               {"iteration-150_steps-0,5": _results(150, maml150, 0.05, steps=[0, 5]),
                "iteration-500_steps-0,10": _results(500, maml500, 0.05, steps=[0, 10])},
               _metrics([10.0 + 4.0 * i for i in range(1000)], 0.05))
    # A-MAML is being continued elsewhere: trained past its evaluation (the name is all that is read).
    (out / "omniglot" / "amaml-T0.5" / "checkpoints").mkdir()
    (out / "omniglot" / "amaml-T0.5" / "checkpoints" / "ckpt-160.eqx").write_bytes(b"")
    md = _rebuild(out, monkeypatch)
    assert "omniglot/amaml-T0.5: its run is evaluated at meta-iteration 150 and trained to 160 of the 1000 asked" in md
    rows = {r[0]: r for r in (line.strip("| ").split(" | ")
                              for line in _section(md, "At equal meta-iterations (omniglot)")[1:])}
    a, b = amaml[50], maml150[5]
    assert rows["150"][2] == f"{100 * b.mean():.2f} ± {100 * 1.96 * b.std(ddof=1) / math.sqrt(b.size):.2f}"
    assert rows["150"][3] == f"{100 * (a - b).mean():+.2f} ± {100 * 1.96 * (a - b).std(ddof=1) / math.sqrt(a.size):.2f}"
    assert rows["500"][1:3] == ["not evaluated yet", "not evaluated yet"]


def test_a_solver_change_on_resume_is_said_and_marked_in_the_cost_section(fake_table3, monkeypatch):
    """`ctmeta train --resume --solver rkc2` records the solver before (`resumes[i].changed.solver`): the
    cost section says when the run changed solver, in order, and the cost figure is still drawn."""
    out, *_ = fake_table3
    path = out / "omniglot" / "amaml-T0.5" / "config.json"
    config = json.loads(path.read_text())
    config["method_options"] = {"rtol": 1e-5, "atol": 1e-6, "dense_steps": 256, "solver": "rkc2"}
    config["resumes"] = [{"from_iteration": 50, "argv": []},  # a resume that changed nothing
                         {"from_iteration": 100, "changed": {"solver": "dopri5"}},
                         {"from_iteration": 120, "changed": {"solver": "rkc2"}},
                         {"from_iteration": 140, "changed": {"solver": "dopri5"}}]
    path.write_text(json.dumps(config))
    assert report.solver_changes(config) == [(100, "dopri5", "rkc2"), (120, "rkc2", "dopri5"),
                                             (140, "dopri5", "rkc2")]
    assert report.solver_changes({"method_options": {"rtol": 1e-5}}) == []
    md = _rebuild(out, monkeypatch)
    cost = md.split("## Meta-training cost (omniglot)", 1)[1]
    said = re.findall(r"A-MAML \(T=0\.5\) changed its forward solver from (\w+) to (\w+) after meta-iteration (\d+)",
                      cost)
    assert said == [("dopri5", "rkc2", "100"), ("rkc2", "dopri5", "120"), ("dopri5", "rkc2", "140")]
    assert (out / "table3-omniglot-cost.png").stat().st_size > 0
