"""The `ctmeta` command line: help, flag errors, run directories, resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

import ctmeta.presets as presets
from ctmeta.cli import main
from cli_helpers import shorten_evaluation, train_tiny

# One xdist group (pyproject: --dist loadgroup): its tests train the same tiny
# runs, so on one worker the module's fixtures and that worker's compilation
# cache (conftest.py) serve them all; spread over two, both would compile them.
pytestmark = pytest.mark.xdist_group("test_cli")

TINY = ["--method", "fomaml", "--steps", "3", "--meta-batch", "3", "--quiet"]


@pytest.fixture(autouse=True)
def short_evaluation(monkeypatch, tmp_path):
    """A short error-vs-steps curve keeps the tests quick; runs land in tmp_path."""
    shorten_evaluation(monkeypatch)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """4 meta-iterations in one go, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("runs") / "full"
    assert train_tiny(out, TINY) == 0
    return out


def _rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------- help


def test_help_lists_commands_and_flags(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "evaluate" in out
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--benchmark", "--method", "--T", "--steps", "--meta-iterations", "--meta-batch", "--ways",
                 "--shots", "--data-dir", "--seed", "--out", "--checkpoint-every", "--keep-checkpoints", "--resume", "--quiet",
                 "--debug", "cosmixture", "miniimagenet", "amaml", "comln", "--optimizer", "--meta-lr",
                 "--lr-schedule", "--backbone", "resnet12", "conv4-smooth", "--solver", "rk4", "Nesterov", "--init-from"):
        assert flag in out, flag
    assert main(["bench", "--help"]) == 0  # handed to ctmeta.bench
    assert "ctmeta bench" in capsys.readouterr().out


# -------------------------------------------------------------- bad flags


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--T", "-1"], "--T"),
        (["train", "--T", "0"], "--T"),
        (["train", "--T", "nan"], "--T"),
        (["train", "--steps", "0"], "--steps"),
        (["train", "--meta-batch", "0"], "--meta-batch"),
        (["train", "--meta-batch", "101"], "--meta-batch"),
        (["train", "--meta-iterations", "-3"], "--meta-iterations"),
        (["train", "--checkpoint-every", "0"], "--checkpoint-every"),
        (["train", "--keep-checkpoints", "0,150"], "--keep-checkpoints"),
        (["train", "--keep-checkpoints", "last"], "--keep-checkpoints"),
        (["train", "--ways", "5"], "--ways"),
        (["train", "--method", "comln"], "comln"),
        (["train", "--meta-lr", "0"], "--meta-lr"),
        (["train", "--meta-lr", "-0.1"], "--meta-lr"),
        (["train", "--meta-lr", "nan"], "--meta-lr"),
        (["train", "--meta-lr", "1e5"], "--meta-lr"),
        (["train", "--backbone", "resnet12"], "--backbone"),
        (["train", "--method", "maml", "--solver", "rk4"], "--solver"),
        (["train", "--benchmark", "movielens", "--data-dir", "/nonexistent/ml"], "does not exist"),
        (["train", "--data-dir", "/tmp"], "--data-dir"),
        (["train", "--resume", "/nonexistent/run"], "does not exist"),
        (["evaluate", "/nonexistent/run"], "does not exist"),
    ],
)
def test_bad_flag_values_exit_2_with_one_line(argv, message, capsys, tmp_path):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ctmeta: error:") and message in err[0], err
    assert not (tmp_path / "runs").exists()  # checked before any run directory or JAX work


@pytest.mark.parametrize(
    "argv", [["train", "--benchmark", "nope"], ["train", "--method", "nope"], ["train", "--steps", "abc"], [],
             ["train", "--optimizer", "rmsprop"], ["train", "--lr-schedule", "exp"], ["train", "--backbone", "vgg"],
             ["train", "--meta-lr", "fast"], ["train", "--solver", "euler"]]
)
def test_argparse_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_console_script_exit_code_and_message():
    exe = os.path.join(os.path.dirname(sys.executable), "ctmeta")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "ctmeta.cli"]
    proc = subprocess.run([*cmd, "train", "--T", "-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--T" in proc.stderr


def test_other_exceptions_exit_1_traceback_only_with_debug(monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(presets, "build", boom)
    assert main(["train", *TINY, "--meta-iterations", "1", "--out", "r1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RuntimeError: boom" in err[0] and "--debug" in err[0]
    assert main(["train", *TINY, "--meta-iterations", "1", "--out", "r2", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err


# ------------------------------------------------------------- run directory


def test_train_writes_the_run_directory(finished_run):
    config = json.loads((finished_run / "config.json").read_text())
    for key, value in {"benchmark": "cosmixture", "method": "fomaml", "steps": 3, "meta_iterations": 4,
                       "meta_batch": 3, "seed": 0, "checkpoint_every": 2}.items():
        assert config[key] == value
    assert config["T"] == pytest.approx(0.03) and config["ctmeta_version"]
    assert config["optimizer"] == {"name": "adam", "learning_rate": 1e-3, "schedule": None}
    rows = _rows(finished_run)
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"iteration", "meta_loss", "grad_norm", "T", "seconds", "skipped"}
    ckpts = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    assert ckpts == ["ckpt-2.eqx", "ckpt-2.json", "ckpt-4.eqx", "ckpt-4.json"]
    for fig in ("meta_loss.png", "error_vs_steps.png"):
        assert (finished_run / "figures" / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (finished_run / "results.md").read_text()
    assert "| learned (fomaml) |" in md and "| random |" in md and "20 steps" in md
    results = json.loads((finished_run / "results.json").read_text())
    assert results["iteration"] == 4 and len(results["learned"]["mean"]) == len(results["curve_steps"])


def test_out_holding_a_run_is_refused(finished_run, capsys):
    assert main(["train", *TINY, "--out", str(finished_run)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_ends_exactly_as_an_uninterrupted_run(finished_run, tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["train", *TINY, "--meta-iterations", "2", "--checkpoint-every", "2", "--out", str(out)]) == 0
    # A torn extra row after the checkpoint (a crash mid-iteration) is dropped on resume.
    with open(out / "metrics.csv", "a") as f:
        f.write("3,0.5,0.5,0.03,1.0\n")
    # Changing the configuration on resume is refused.
    assert main(["train", "--resume", str(out), "--steps", "5", "--quiet"]) == 2
    for flags in (["--optimizer", "sgd"], ["--meta-lr", "0.01"], ["--lr-schedule", "cosine"], ["--backbone", "conv4"],
                  ["--solver", "rk4"]):
        capsys.readouterr()
        assert main(["train", "--resume", str(out), *flags, "--quiet"]) == 2
        assert f"{flags[0]} {flags[1]} differs from the resumed run's" in capsys.readouterr().err
    # --keep-checkpoints may change on resume: iteration 3 is saved and outlives the pruning.
    assert main(["train", "--resume", str(out), "--optimizer", "adam", "--meta-lr", "1e-3", "--lr-schedule", "none",
                 "--meta-iterations", "4", "--keep-checkpoints", "3", "--quiet"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (out / "checkpoints").glob("*.eqx")) == ["ckpt-3.eqx", "ckpt-4.eqx"]
    full, split = _rows(finished_run), _rows(out)
    assert len(full) == len(split) == 4
    for a, b in zip(full, split):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    # Same parameters, optimiser state, key and iteration, bit for bit.
    assert (finished_run / "checkpoints" / "ckpt-4.eqx").read_bytes() == (out / "checkpoints" / "ckpt-4.eqx").read_bytes()
    ra = json.loads((finished_run / "results.json").read_text())
    rb = json.loads((out / "results.json").read_text())
    assert ra["learned"] == rb["learned"] and ra["random"] == rb["random"]
    config = json.loads((out / "config.json").read_text())
    assert config["meta_iterations"] == 4 and config["resumes"][0]["from_iteration"] == 2
    assert config["keep_checkpoints"] == [3]


def _cut_metrics(run, keep: int, torn: str | None = None):
    """metrics.csv with its header and first `keep` rows only, then `torn` (a row cut short)."""
    lines = (run / "metrics.csv").read_text().splitlines()
    (run / "metrics.csv").write_text("\n".join(lines[: 1 + keep] + ([torn] if torn else [])))


def test_resume_over_a_cut_metrics_csv_writes_the_lost_rows_again(finished_run, tmp_path, capsys):
    """Issue 30, item 2: rows missing before the checkpoint (the file cut, a row torn) are detected
    by evaluate and train --resume, and rebuilt from a kept checkpoint that precedes them: the same
    rows as the uninterrupted run, no gap."""
    run = tmp_path / "cut"
    shutil.copytree(finished_run, run)
    _cut_metrics(run, 2, torn="3,0.6")  # rows 3 and 4 gone, row 3 torn; checkpoints 2 and 4 kept
    capsys.readouterr()
    assert main(["evaluate", str(run), "--tasks", "2", "--quiet"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "metrics.csv" in line]
    assert warning == [f"ctmeta: warning: metrics.csv lacks the rows of iterations 3..4 (2 of the 4 up to the "
                       f"checkpoint; the row of iteration 3 is torn); ctmeta train --resume {run} writes them "
                       "again from ckpt-2.eqx"], warning
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert ("lacks the rows of iterations 3..4 (2 of the 4 up to the checkpoint; the row of iteration 3 is torn); "
            "resuming from ckpt-2.eqx instead of ckpt-4.eqx to write them again") in captured.err
    full, rebuilt = _rows(finished_run), _rows(run)
    assert [r["iteration"] for r in rebuilt] == ["1", "2", "3", "4"]
    for a, b in zip(full, rebuilt):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert (finished_run / "checkpoints" / "ckpt-4.eqx").read_bytes() == (run / "checkpoints" / "ckpt-4.eqx").read_bytes()
    from ctmeta.runs import RunDir, metrics_warning

    assert metrics_warning(RunDir(run)) is None  # whole again: evaluate has nothing to say


def test_resume_over_rows_no_checkpoint_can_rebuild_says_what_is_lost_and_records_it(finished_run, tmp_path, capsys):
    run = tmp_path / "gap"
    shutil.copytree(finished_run, run)
    _cut_metrics(run, 1)  # rows 2..4 gone; the oldest checkpoint kept is 2: row 2 needs the state of iteration 1
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--meta-iterations", "5", "--checkpoint-every", "5", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert ("warning: metrics.csv lacks the rows of iterations 2..4 (3 of the 4 up to the checkpoint); no kept "
            "checkpoint precedes them (ckpt-2.eqx, ckpt-4.eqx), so they cannot be rebuilt: resuming from ckpt-4.eqx "
            "continues at iteration 5 and metrics.csv keeps the gap") in err, err
    assert [r["iteration"] for r in _rows(run)] == ["1", "5"]
    config = json.loads((run / "config.json").read_text())
    assert config["resumes"][-1]["metrics_gap"] == [[2, 4]]
    # The meta-loss curve breaks at the gap and shades it, named in its legend.
    import ctmeta.runs as runs
    import ctmeta.runs.results as run_results

    figures = {}
    mp = pytest.MonkeyPatch()
    mp.setattr(run_results, "save_figure", lambda fig, path: figures.__setitem__(path.name, fig))
    try:
        runs.write_figures(runs.RunDir(run), None)
    finally:
        mp.undo()
    ax = figures["meta_loss.png"].axes[0]
    assert "no rows in metrics.csv: 2..4" in [t.get_text() for t in ax.get_legend().get_texts()]
    x = ax.get_lines()[0].get_xdata()
    assert len(x) == 3 and x[0] == 1 and x[2] == 5 and x[1] != x[1]  # 1, NaN, 5: no line across the gap


def test_evaluate_falls_back_to_the_previous_checkpoint(finished_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    newest = run / "checkpoints" / "ckpt-4.eqx"
    newest.write_bytes(newest.read_bytes()[:-10])  # truncated
    assert main(["evaluate", str(run), "--quiet"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "skipping ckpt-4.eqx" in captured.err and "ckpt-2.eqx (iteration 2)" in out
    assert "learned (fomaml)" in out
    # Not the run's final evaluation (iteration 4): beside it, in a folder of its own.
    assert json.loads((run / "evaluations" / "iteration-2" / "results.json").read_text())["iteration"] == 2
    assert json.loads((run / "results.json").read_text())["iteration"] == 4


def test_movielens_end_to_end_with_masked_test_queries(data_dir, monkeypatch, tmp_path, capsys):
    p = presets.BENCHMARKS["movielens"]
    monkeypatch.setitem(presets.BENCHMARKS, "movielens", dataclasses.replace(p, eval_steps=(0, 5), eval_every=5))
    out = tmp_path / "ml"
    argv = ["train", "--benchmark", "movielens", "--data-dir", str(data_dir / "movielens"), "--method", "maml",
            "--steps", "2", "--meta-iterations", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "nRMSE" and results["tasks"] == 100
    assert all(0 < m < 10 for m in results["learned"]["mean"])


@pytest.mark.parametrize("flag", ["--shots", "--T", "--method", "--benchmark", "--out", "--resume", "--data-dir",
                                  "--meta-lr", "--optimizer", "--backbone", "--solver"])
def test_a_bare_double_dash_as_a_flag_value_is_a_usage_error(flag, capsys, tmp_path):
    # argparse hands `--flag=--` over as [] without type or choice checks.
    code = main(["train", f"{flag}=--", "--meta-iterations", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"{flag} needs a value" in err


def test_a_long_enough_run_logs_its_measured_rate_and_projected_wall_time(tmp_path, capsys):
    assert main(["train", *TINY, "--meta-iterations", "25", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("measured "))
    assert "over iterations 2..11 (compilation excluded)" in line
    assert "for the remaining 14 of 25 meta-iterations" in line
    # Too short a run (fewer iterations left than measured) prints no projection.
    assert main(["train", *TINY, "--meta-iterations", "15", "--out", str(tmp_path / "s")]) == 0
    assert "projected" not in capsys.readouterr().out


def test_init_from_starts_a_new_run_from_another_runs_model(finished_run, tmp_path, capsys):
    import numpy as np

    from ctmeta._errors import InputError
    from ctmeta.runs import init_from_run

    out = tmp_path / "warm"
    # MAML from FOMAML's meta-learned initialisation, with a meta-learning rate too small to move it.
    assert main(["train", "--method", "maml", "--steps", "3", "--meta-batch", "3", "--meta-lr", "1e-30",
                 "--meta-iterations", "2", "--init-from", str(finished_run), "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["init_from"] == {"run": str(finished_run), "checkpoint": "ckpt-4.eqx", "iteration": 4,
                                   "method": "fomaml"}
    # So its error before adaptation is the source's learned one, on the same test tasks, and not
    # that of a fresh initialisation.
    source, warm = (json.loads((d / "results.json").read_text()) for d in (finished_run, out))
    assert source["curve_steps"][0] == warm["curve_steps"][0] == 0
    np.testing.assert_allclose(warm["learned"]["per_task"]["0"], source["learned"]["per_task"]["0"], rtol=1e-9)
    assert len(source["learned"]["per_task"]["0"]) == 100
    assert abs(warm["learned"]["mean"][0] - warm["random"]["mean"][0]) > 1e-3
    # Not with --resume; not from a run of another model.
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--init-from", str(finished_run), "--quiet"]) == 2
    assert "--init-from starts a new run" in capsys.readouterr().err
    assert main(["train", *TINY, "--init-from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    wide = presets.resolve_config("cosmixture", "fomaml", steps=3, meta_batch=3)
    wide["model"] = dict(wide["model"], width=16)
    with pytest.raises(InputError, match=r"its model \(mlp on cosmixture\) differs from this run's"):
        init_from_run(presets.build(wide, progress=False, log=lambda *_: None), finished_run)
