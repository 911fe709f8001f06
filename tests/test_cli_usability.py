"""Issue 15, the command line as a new user meets it: paths that are empty,
files or unwritable; `ctmeta evaluate`'s options and lock; advice after a
numerical failure; warnings and library errors on one line; file modes;
figures; `ctmeta bench` in the style of the other commands."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys

import jax.numpy as jnp
import pytest

import ctmeta.presets as presets
import ctmeta.runs as runs
import ctmeta.runs.results as run_results
from ctmeta.cli import main
from cli_helpers import shorten_evaluation, train_tiny

# One xdist group (pyproject: --dist loadgroup): its tests train the same tiny
# runs, so on one worker the module's fixtures and that worker's compilation
# cache (conftest.py) serve them all; spread over two, both would compile them.
pytestmark = pytest.mark.xdist_group("test_cli_usability")

TINY = ["--method", "fomaml", "--steps", "3", "--meta-batch", "3", "--meta-iterations", "4", "--quiet"]


@pytest.fixture(autouse=True)
def short_evaluation(monkeypatch, tmp_path):
    """A short error-vs-steps curve keeps the tests quick; the working directory is tmp_path."""
    shorten_evaluation(monkeypatch)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """4 meta-iterations, a checkpoint every 2, written under umask 002."""
    out = tmp_path_factory.mktemp("usability") / "run"
    old = os.umask(0o002)
    try:
        assert train_tiny(out, TINY) == 0
    finally:
        os.umask(old)
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / ".lock").unlink(missing_ok=True)
    return copy


@contextlib.contextmanager
def read_only(path):
    """`path` (a directory) refuses new files, for root too (chattr +i), while the block runs."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: cannot make a directory read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def _one_error_line(capsys, code_expected, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == code_expected, err
    assert len(err) == 1 and err[0].startswith("ctmeta: error:"), err
    return err[0]


def _console(*args, **kw):
    exe = os.path.join(os.path.dirname(sys.executable), "ctmeta")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "ctmeta.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=180, **kw)


# ------------------------------------------------------------- empty, file and unwritable paths


@pytest.mark.parametrize("argv, flag", [
    (["train", "--out", ""], "--out"),
    (["train", "--out", " "], "--out"),
    (["train", "--resume", ""], "--resume"),
    (["train", "--init-from", ""], "--init-from"),
    (["evaluate", ""], "RUN_DIR"),
    (["train", "--benchmark", "movielens", "--data-dir", ""], "--data-dir"),
    (["download", "omniglot", "--data-dir", ""], "--data-dir"),
    (["bench", "--quick", "--out", ""], "--out"),
])
def test_an_empty_path_is_refused_and_nothing_is_written_here(argv, flag, capsys, tmp_path):
    line = _one_error_line(capsys, 2, main([*argv, "--quiet"] if argv[0] != "bench" else argv))
    assert f"{flag} is empty" in line
    assert list(tmp_path.iterdir()) == []  # no config.json, metrics.csv, checkpoints/ or .lock here


def test_unwritable_out_exits_2_through_the_console_script(tmp_path):
    proc = _console("train", "--out", "/sys/ctmeta-test-run", "--meta-iterations", "1", "--quiet", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--out /sys/ctmeta-test-run is not writable" in lines[0], lines
    assert "internal error" not in proc.stderr


def test_out_in_a_read_only_directory_exits_2_before_any_work(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    with read_only(parent):
        line = _one_error_line(capsys, 2, main(["train", *TINY, "--out", str(parent / "run")]))
        assert f"--out {parent / 'run'} is not writable" in line
        line = _one_error_line(capsys, 2, main(["bench", "--quick", "--out", str(parent / "bench")]))
        assert "is not writable" in line
    assert list(parent.iterdir()) == []


def test_resume_and_evaluate_of_a_read_only_run_exit_2_before_any_work(run_copy, capsys):
    before = (run_copy / "results.json").read_text()
    with read_only(run_copy):
        line = _one_error_line(capsys, 2, main(["train", "--resume", str(run_copy), "--meta-iterations", "6",
                                                "--quiet"]))
        assert f"--resume {run_copy} is not writable" in line
        code = main(["evaluate", str(run_copy), "--quiet"])
        captured = capsys.readouterr()
        assert code == 2 and f"run directory {run_copy} is not writable" in captured.err
        assert "evaluating" not in captured.out  # refused before the work
    assert (run_copy / "results.json").read_text() == before


@pytest.mark.parametrize("argv, expected", [
    (["train", "--resume", "{file}"], "is a file, not a directory"),
    (["evaluate", "{file}"], "is a file, not a directory"),
    (["train", "--benchmark", "omniglot", "--data-dir", "{file}"], "is a file, not a directory"),
    (["download", "omniglot", "--data-dir", "{file}"], "is a file, not a directory"),
    (["train", "--out", "{file}"], "is a file, not a directory"),
    (["train", "--out", "{file}/run"], "is a file, not a directory"),
])
def test_a_file_where_a_directory_is_expected_is_named_as_such(argv, expected, tmp_path, capsys):
    path = tmp_path / "afile"
    path.write_text("x")
    argv = [a.replace("{file}", str(path)) for a in argv]
    line = _one_error_line(capsys, 2, main([*argv, "--quiet"]))
    assert expected in line and "does not exist" not in line


def test_a_write_that_fails_midway_is_a_user_error_and_the_table_is_printed_first(run_copy, monkeypatch, capsys):
    import errno

    def refuse(path, text):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(run_results, "atomic_write_text", refuse)
    code = main(["evaluate", str(run_copy), "--quiet"])
    captured = capsys.readouterr()
    assert code == 2
    assert "learned (fomaml)" in captured.out and "random" in captured.out  # the numbers are not lost
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and "results.json" in err[0] and "read-only" in err[0]


# ------------------------------------------------------------- ctmeta evaluate


def test_evaluate_takes_checkpoint_steps_tasks_lr_data_dir_and_log_y(run_copy, capsys):
    code = main(["evaluate", str(run_copy), "--checkpoint", "2", "--steps", "0,3", "--tasks", "7", "--lr", "0.02",
                 "--log-y"])  # no --quiet: captured output is not a terminal, so plain lines
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "━" not in captured.err and "━" not in captured.out  # no progress bars in a file or a pipe
    assert "ckpt-2.eqx (iteration 2)" in captured.out
    folder = run_copy / "evaluations" / "iteration-2_tasks-7_lr-0.02_steps-0-3"  # not the run's own results
    results = json.loads((folder / "results.json").read_text())
    assert results["iteration"] == 2 and results["tasks"] == 7 and results["lr"] == 0.02
    assert results["table_steps"] == [0, 3] and results["curve_steps"][0] == 0 and 3 in results["curve_steps"]
    assert "3 steps" in (folder / "results.md").read_text()
    assert (folder / "figures" / "error_vs_steps.png").stat().st_size > 0
    # A checkpoint given by its file, relative to checkpoints/.
    assert main(["evaluate", str(run_copy), "--checkpoint", "ckpt-4.eqx", "--tasks", "3", "--quiet"]) == 0
    assert json.loads((run_copy / "evaluations" / "iteration-4_tasks-3" / "results.json").read_text())["iteration"] == 4


def _own_results(run):
    """The run's own results: results.md, results.json and its figures, as bytes."""
    files = [run / "results.md", run / "results.json", *sorted((run / "figures").iterdir())]
    return {f.relative_to(run).as_posix(): f.read_bytes() for f in files}


def test_evaluations_of_other_checkpoints_and_options_are_kept_side_by_side(run_copy, capsys):
    """Issue 30, item 1: `ctmeta evaluate` with another checkpoint or options writes
    RUN/evaluations/<name>/, never the run's own results; evaluations/index.md lists them; the run's
    own results are replaced only by its own evaluation redone (naming, redoing and refusing a name:
    `test_an_evaluation_s_destination_follows_its_options`)."""
    own = _own_results(run_copy)
    for it in ("2", "4"):
        assert main(["evaluate", str(run_copy), "--checkpoint", it, "--tasks", "5", "--quiet"]) == 0
        assert f"evaluations/iteration-{it}_tasks-5 (the run's own results.md untouched)" in capsys.readouterr().out
    assert _own_results(run_copy) == own
    folders = run_copy / "evaluations"
    first = json.loads((folders / "iteration-2_tasks-5" / "results.json").read_text())
    assert (first["iteration"], first["tasks"]) == (2, 5)
    assert first["evaluation"]["checkpoint"] == "ckpt-2.eqx" and first["evaluation"]["name"] == "iteration-2_tasks-5"
    assert json.loads((folders / "iteration-4_tasks-5" / "results.json").read_text())["iteration"] == 4
    index = (folders / "index.md").read_text().splitlines()
    rows = [line for line in index if line.startswith("| ") and "evaluation |" not in line]
    assert [r.split(" | ")[1:3] for r in rows] == [["4", "100"], ["2", "5"], ["4", "5"]], index  # own first
    assert "run's own" in rows[0] and "iteration-2_tasks-5" in rows[1]
    line = _one_error_line(capsys, 2, main(["evaluate", str(run_copy), "--name", "../up", "--quiet"]))
    assert "--name '../up' is not a usable evaluation name" in line
    # The run's own evaluation redone (no options): its own results, the same numbers.
    assert main(["evaluate", str(run_copy), "--quiet"]) == 0
    assert "the run's own evaluation, redone" in capsys.readouterr().out
    redone = json.loads((run_copy / "results.json").read_text())
    before = json.loads(own["results.json"])
    assert redone["learned"] == before["learned"] and redone["random"] == before["random"]
    assert sorted(p.name for p in folders.iterdir()) == ["index.md", "iteration-2_tasks-5", "iteration-4_tasks-5"]


def test_an_evaluation_s_destination_follows_its_options(tmp_path):
    """Where `ctmeta evaluate` writes (`ctmeta.runs.evaluations.destination`): the run's own
    results for its evaluation redone only; a folder named after the options that differ, the
    same for the same evaluation; a given name holding other options refused."""
    from ctmeta import InputError
    from ctmeta.runs.evaluations import destination

    run = runs.RunDir(tmp_path)
    config = {"meta_iterations": 4}
    defaults = {"iteration": 2, "table_steps": [0, 5, 20], "tasks": 100, "lr": 0.01, "inner_loss_tasks": 4}
    final = {**defaults, "iteration": 4}
    # Not evaluated yet: the run's own evaluation is the default one at its last iteration.
    assert destination(run, config, final, defaults) == (tmp_path, None)
    assert destination(run, config, defaults, defaults) == (tmp_path / "evaluations" / "iteration-2", "iteration-2")
    (tmp_path / "results.json").write_text(json.dumps({"evaluation": {"options": final}}))
    assert destination(run, config, final, defaults) == (tmp_path, None)
    other = {**final, "tasks": 5, "lr": 0.02, "table_steps": [0, 3], "inner_loss_tasks": 0}
    name = "iteration-4_tasks-5_lr-0.02_steps-0-3_inner-loss-tasks-0"
    assert destination(run, config, other, defaults) == (tmp_path / "evaluations" / name, name)
    fewer = {**final, "tasks": 3, "inner_loss_tasks": 3}  # fewer tasks than 4: the inner loss on all of them
    assert destination(run, config, fewer, defaults)[1] == "iteration-4_tasks-3"
    # A given name: its own folder; redone with the same options it is replaced, with others refused.
    folder, _ = destination(run, config, final, defaults, "mine")
    assert folder == tmp_path / "evaluations" / "mine"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"evaluation": {"options": final}}))
    assert destination(run, config, final, defaults, "mine") == (folder, "mine")
    with pytest.raises(InputError, match=r"mine holds an evaluation of other options \(iteration 4, 100 tasks, lr "
                                         r"0.01, steps 0,5,20\); choose another `name`"):
        destination(run, config, {**final, "lr": 0.03}, defaults, "mine")


def test_an_evaluation_whose_adaptation_diverges_exits_1_in_one_line_and_writes_nothing(run_copy, capsys):
    """Issue 30, item 1: `--lr 1e6` gave an all-NaN table over the good one, exit 0."""
    own = _own_results(run_copy)
    for flags in ([], ["--name", "big"]):
        code = main(["evaluate", str(run_copy), "--lr", "1e6", *flags, "--quiet"])
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert code == 1 and len(err) == 1, captured.err
        assert err[0].startswith("ctmeta: error: adaptation diverged at lr 1e+06 on 100 of 100 tasks"), err
        assert err[0].endswith("nothing was written: choose a smaller --lr"), err
        assert "nan" not in captured.out.lower()  # no table of NaNs either
    assert _own_results(run_copy) == own and not (run_copy / "evaluations").exists()


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0,-1"], "--steps"),
    (["--steps", "a"], "--steps"),
    (["--tasks", "0"], "--tasks"),
    (["--tasks", "1000"], "exceeds the 100 meta-test tasks"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--checkpoint", "3"], "no checkpoint of iteration 3 (it has: 2, 4)"),
    (["--checkpoint", "nowhere.eqx"], "does not exist"),
    (["--data-dir", "/nonexistent/data"], "--data-dir is not used by cosmixture"),
])
def test_evaluate_bad_options_exit_2_with_one_line(run_copy, flags, message, capsys):
    line = _one_error_line(capsys, 2, main(["evaluate", str(run_copy), *flags, "--quiet"]))
    assert message in line


def test_evaluate_refuses_a_run_that_ctmeta_train_is_writing(run_copy, capsys):
    before = (run_copy / "results.md").read_text()
    fd = os.open(run_copy / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a training process holds it
        line = _one_error_line(capsys, 2, main(["evaluate", str(run_copy), "--quiet"]))
        assert "in use by another ctmeta process" in line
    finally:
        os.close(fd)
    assert (run_copy / "results.md").read_text() == before
    assert main(["evaluate", str(run_copy), "--tasks", "2", "--quiet"]) == 0  # free again: fine


# ------------------------------------------------------------- config.json from elsewhere


def test_resume_and_evaluate_warn_about_another_version_and_unknown_keys(run_copy, capsys):
    config = json.loads((run_copy / "config.json").read_text())
    config["ctmeta_version"] = "0.0.1"
    config["mystery_option"] = 3
    (run_copy / "config.json").write_text(json.dumps(config))
    for argv in (["train", "--resume", str(run_copy), "--quiet"], ["evaluate", str(run_copy), "--tasks", "2", "--quiet"]):
        assert main(argv) == 0
        err = capsys.readouterr().err.strip().splitlines()
        assert any("written by ctmeta 0.0.1" in line for line in err), err
        assert any("mystery_option" in line and "does not know" in line for line in err), err


def test_a_run_of_this_version_gives_no_config_warning(run_copy, capsys):
    assert main(["evaluate", str(run_copy), "--tasks", "2", "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err


# ------------------------------------------------------------- numerical failures, warnings


def _poison(monkeypatch, *, every_task, after=0):
    """CosMixture whose training query targets hold a NaN (task 0, or every task) from the
    `after`+1-th meta-batch on."""
    from ctmeta.tasks.regression import CosMixture

    calls = {"n": 0}

    class Poisoned(CosMixture):
        def sample(self, key, meta_batch, split="train"):
            b = super().sample(key, meta_batch, split)
            if split != "train":
                return b
            calls["n"] += 1
            if calls["n"] <= after:
                return b
            rows = slice(None) if every_task else 0
            return b._replace(query_y=b.query_y.at[rows, 0, 0].set(jnp.nan))

    original = presets.build_family

    def build_family(config, **kw):
        fam = original(config, **kw)
        return Poisoned(shots=fam.shots, queries=fam.queries, seed=0)

    monkeypatch.setattr(presets, "build_family", build_family)


@pytest.mark.parametrize("policy", ["error", "skip-task"])
def test_a_failure_at_the_first_iteration_does_not_advise_resuming(policy, monkeypatch, tmp_path, capsys):
    _poison(monkeypatch, every_task=True)
    line = _one_error_line(capsys, 1, main(["train", *TINY, "--on-nonfinite", policy, "--out", str(tmp_path / "r")]))
    assert "meta-iteration 1" in line and "first meta-iteration" in line
    assert "smaller --T or more --steps" in line
    assert "--resume" not in line and "skip-task" not in line
    assert "on_nonfinite=" not in line  # the Python API's advice is not the command line's


def test_a_later_failure_of_every_task_says_resuming_would_repeat_it(monkeypatch, tmp_path, capsys):
    _poison(monkeypatch, every_task=True, after=2)
    line = _one_error_line(capsys, 1, main(["train", *TINY, "--out", str(tmp_path / "r")]))
    assert "meta-iteration 3" in line and "resuming would fail the same way" in line
    assert "--meta-lr" in line and "--on-nonfinite skip-task" not in line


def test_skip_task_warns_once_on_one_line_then_counts(monkeypatch, tmp_path, capsys):
    _poison(monkeypatch, every_task=False)
    assert main(["train", *TINY, "--on-nonfinite", "skip-task", "--out", str(tmp_path / "r")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert err and all(line.startswith("ctmeta: warning: ") for line in err), err
    assert sum("skipped 1 of 3 tasks" in line for line in err) == 1  # 4 iterations, one warning
    assert sum("skipped 4 tasks in 4 of the 4 meta-iterations" in line for line in err) == 1


def test_a_multi_line_library_error_is_printed_on_one_line(tmp_path, capsys):
    bad = tmp_path / "jester.csv"
    bad.write_text("a,b\n1,2,3,4\n")  # pandas: "Error tokenizing data ... saw 4\n"
    line = _one_error_line(capsys, 2, main(["train", "--benchmark", "jester", "--data-dir", str(bad), "--quiet"]))
    assert "ParserError" in line


# ------------------------------------------------------------- files and figures


def test_run_directory_files_follow_the_umask(run_dir):
    files = [run_dir / n for n in ("config.json", "metrics.csv", "results.md", "results.json")]
    files += sorted((run_dir / "checkpoints").iterdir()) + sorted((run_dir / "figures").iterdir())
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o664, (f, oct(f.stat().st_mode))  # umask 002


def test_figures_say_what_run_they_show_and_can_use_a_log_scale(run_dir, monkeypatch):
    figures = {}

    def keep(fig, path):
        figures[path.name] = fig

    monkeypatch.setattr(run_results, "save_figure", keep)
    monkeypatch.setattr("matplotlib.pyplot.close", lambda fig: None)
    results = json.loads((run_dir / "results.json").read_text())
    runs.write_figures(runs.RunDir(run_dir), results, log_y=True)
    loss_ax = figures["meta_loss.png"].axes[0]
    assert "cosmixture" in loss_ax.get_title() and "fomaml" in loss_ax.get_title() and "T = 0.03" in loss_ax.get_title()
    err_ax = figures["error_vs_steps.png"].axes[0]
    assert err_ax.get_yscale() == "log" and "fomaml" in err_ax.get_title()
    bands = err_ax.collections
    assert len(bands) == 2 and all(b.get_alpha() >= 0.3 for b in bands)
    assert any("95% CI" in t.get_text() for t in err_ax.get_legend().get_texts())
    runs.write_figures(runs.RunDir(run_dir), results)
    assert figures["error_vs_steps.png"].axes[0].get_yscale() == "linear"


def test_inner_loss_legend_names_the_per_task_lines_and_error_vs_steps_marks_the_horizon(run_dir, monkeypatch):
    """Issue 30, items 16 and 15: the thin per-task lines of inner_loss.png are in its legend (one
    entry each for learned and random); a continuous-time method's horizon T is marked on
    error_vs_steps.png at the GD step it equals, k = T / lr."""
    figures = {}
    monkeypatch.setattr(run_results, "save_figure", lambda fig, path: figures.__setitem__(path.name, fig))
    monkeypatch.setattr("matplotlib.pyplot.close", lambda fig: None)
    results = json.loads((run_dir / "results.json").read_text())
    runs.write_figures(runs.RunDir(run_dir), results)
    n = results["inner_loss"]["tasks"]
    for ax in figures["inner_loss.png"].axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        for init in ("learned (fomaml)", "random init"):
            assert labels.count(f"{init}: each of the {n} tasks") == 1 and f"{init}: median" in labels, labels
        thin = [line for line in ax.get_lines() if line.get_linewidth() == 0.6]
        assert len(thin) == 2 * n  # every task's line drawn, two of them labelled
    labels = [t.get_text() for t in figures["error_vs_steps.png"].axes[0].get_legend().get_texts()]
    assert not any("horizon" in label for label in labels)  # fomaml: no continuous horizon
    runs.write_figures(runs.RunDir(run_dir), {**results, "method": "amaml", "T": 0.05})  # lr 0.01: k = 5
    ax = figures["error_vs_steps.png"].axes[0]
    assert "amaml's horizon T = 0.05 (k = T/lr = 5)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(list(line.get_xdata()) == [5, 5] for line in ax.get_lines())  # the vertical line at k = 5
    runs.write_figures(runs.RunDir(run_dir), {**results, "method": "amaml", "T": 2.0})  # k = 200: off the curve
    labels = [t.get_text() for t in figures["error_vs_steps.png"].axes[0].get_legend().get_texts()]
    assert "amaml's horizon T = 2 (k = T/lr = 200, beyond the curve)" in labels


# ------------------------------------------------------------- one style for every subcommand


def test_bench_speaks_like_the_other_commands(capsys):
    line = _one_error_line(capsys, 2, main(["bench", "--repeats", "0"]))
    assert line == "ctmeta: error: --repeats must be a positive integer, got 0"
    line = _one_error_line(capsys, 2, main(["bench", "--time-budget", "-1"]))
    assert "--time-budget must be a positive" in line
    assert main(["bench", "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ctmeta bench: error:") and "(see: ctmeta bench --help)" in err[0]
    assert main(["train", "--steps", "abc"]) == 2  # argparse's errors: "ctmeta <command>: error: ..." in both
    assert capsys.readouterr().err.startswith("ctmeta train: error:")
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--quiet" in out and "--repeats INT" in out and "--time-budget FLOAT" in out and "--out DIR" in out


# ------------------------------------------------------------- task sizes before loading


def test_image_task_sizes_are_checked_before_any_image_is_decoded(data_dir, monkeypatch, capsys):
    import ctmeta.tasks.miniimagenet as mini
    import ctmeta.tasks.omniglot as omni

    def no_decoding(*a, **k):
        raise AssertionError("decoded images before checking the task sizes")

    monkeypatch.setattr(mini.MiniImageNet, "_decode", staticmethod(no_decoding))
    monkeypatch.setattr(omni, "cached_array", no_decoding)
    code = main(["train", "--benchmark", "miniimagenet", "--method", "comln", "--ways", "20",
                 "--data-dir", str(data_dir / "miniimagenet"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "ways=20 exceeds the 16 classes of split 'test'" in err, err
    line = _one_error_line(capsys, 2, main(["train", "--benchmark", "omniglot", "--ways", "5000",
                                            "--data-dir", str(data_dir / "omniglot"), "--quiet"]))
    assert "ways=5000 exceeds" in line
    line = _one_error_line(capsys, 2, main(["train", "--benchmark", "omniglot", "--shots", "30",
                                            "--data-dir", str(data_dir / "omniglot"), "--quiet"]))
    assert "shots + queries = 30 + 5 = 35 exceeds the 20 images" in line


def test_reproduce_speaks_like_the_other_commands(tmp_path, capsys):
    from ctmeta.experiments.reproduce import EXPERIMENTS

    line = _one_error_line(capsys, 2, main(["reproduce", "no-such-experiment"]))
    assert "unknown experiment 'no-such-experiment'" in line
    assert main(["reproduce", "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ctmeta reproduce: error:") and "--help" in err[0], err
    name = next(iter(EXPERIMENTS))
    line = _one_error_line(capsys, 2, main(["reproduce", name, "--out", "", "--quiet"]))
    assert "--out is empty" in line
    line = _one_error_line(capsys, 2, main(["reproduce", name, "--out", "/sys/ctmeta-test", "--quiet"]))
    assert "--out /sys/ctmeta-test is not writable" in line
    assert list(tmp_path.iterdir()) == []
