"""`ctmeta reproduce`: the experiment list, errors, and a tiny end-to-end run."""

from __future__ import annotations

import math
import re

import pytest

from ctmeta.cli import main
from ctmeta.experiments import reproduce


def test_list_names_every_experiment(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for name, spec in reproduce.EXPERIMENTS.items():
        assert name in out
        assert spec.reproduces in out
    for required in ("amaml-fig2", "amaml-table1-2", "amaml-table3", "amaml-table4", "amaml-table5",
                     "amaml-fig3-4", "comln-fig3", "comln-table2", "comln-table4", "comln-fig5", "comln-fig2"):
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

    monkeypatch.setattr(reproduce, "run_method", record)
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
    """reproduce.py uses the public API of ctmeta (presets, runs) only."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(reproduce))
    private = [f"{node.module}.{a.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               for a in node.names if a.name.startswith("_")]
    assert private == []
    from ctmeta.runs import dtype_name, package_versions, save_figure

    assert dtype_name() in ("float32", "float64") and "jax" in package_versions() and callable(save_figure)
