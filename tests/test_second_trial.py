"""Issue 30, the second new-user trial: a run's config.json with a bad or
missing value, a flow built for another model, the one list of what a
resume may change, numbers and paths in messages, `ctmeta bench` off a
terminal, `ctmeta reproduce --scale test`, and the error types below the
modules that raise them."""

from __future__ import annotations

import ast
import json
import pathlib
import re

import pytest

import ctmeta
from ctmeta import presets
from ctmeta.cli import main
from ctmeta.runs import RunDir

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_error_types_import_no_other_ctmeta_module():
    """`ctmeta._errors` is below everything that raises its errors (the download included): no cycle."""
    tree = ast.parse((ROOT / "ctmeta" / "_errors.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [n.module if isinstance(n, ast.ImportFrom) else a.name for n in imports
             for a in (n.names if isinstance(n, ast.Import) else [None])]
    assert all(isinstance(n, ast.Import) or n.level == 0 for n in imports)  # no `from . import ...`
    assert names and not [m for m in names if m.split(".")[0] == "ctmeta"], names
    from ctmeta import _errors
    from ctmeta.tasks import download

    assert download.DownloadError is _errors.DownloadError
    assert _errors.exit_code(download.DownloadError("x")) == 1 and _errors.exit_code(ctmeta.DataError("x")) == 2


# ---------------------------------------------------------------- item 5: a run's config.json with a bad value

DAMAGES = {  # what is done to config.json -> what the one line must name
    "T is a word": (lambda c: c.update(T="two"), '"T" is "two"; expected a positive, finite number'),
    "no shots": (lambda c: c.pop("shots"), '"shots" is missing; expected a positive integer'),
    "eval steps a string": (lambda c: c["eval"].update(steps="0,5"), '"eval.steps" is "0,5"; expected a non-empty list'),
    "model width 0": (lambda c: c["model"].update(width=0), '"model.width" is 0; expected a positive integer'),
    "optimizer without rate": (lambda c: c["optimizer"].pop("learning_rate"),
                               '"optimizer.learning_rate" is missing; expected a positive, finite number'),
}


def _damaged_run(path, damage):
    """A run directory as `ctmeta train` creates it (config.json, metrics.csv, a checkpoint file), its config damaged."""
    run = RunDir.create(path, presets.resolve_config("cosmixture", "fomaml", steps=3, meta_iterations=4))
    (run.checkpoint_dir / "ckpt-2.eqx").write_bytes(b"")  # never read: the configuration is checked first
    config = json.loads(run.config_path.read_text())
    DAMAGES[damage][0](config)
    run.config_path.write_text(json.dumps(config))
    return run


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("command", ["evaluate", "resume", "init-from"])
def test_every_command_that_reads_a_runs_config_names_the_bad_entry(command, damage, tmp_path, capsys):
    run = _damaged_run(tmp_path / "run", damage)
    argv = {"evaluate": ["evaluate", str(run.path)], "resume": ["train", "--resume", str(run.path)],
            "init-from": ["train", "--init-from", str(run.path), "--out", str(tmp_path / "new")]}[command]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ctmeta: error: {run.config_path}: {DAMAGES[damage][1]}"), err
    assert not (tmp_path / "new").exists()


def test_reproduce_stops_on_a_damaged_unfinished_run_and_keeps_it(tmp_path):
    from ctmeta import CheckpointError
    from ctmeta.experiments import reproduce

    run = _damaged_run(tmp_path / "s" / "fomaml", "no shots")
    from ctmeta.runs import Reporter

    ctx = reproduce.Context(name="x", scale="test", out=tmp_path, data_root=None, quiet=True, argv=[],
                            reporter=Reporter(quiet=True, silent=True))
    with pytest.raises(CheckpointError, match='"shots" is missing; expected a positive integer.*is kept'):
        reproduce.run_method(ctx, "s/fomaml", "cosmixture", "fomaml", meta_iterations=4, steps=3)
    assert (run.checkpoint_dir / "ckpt-2.eqx").is_file()  # not deleted, not trained over
    # A finished run whose results must be evaluated again (no per-task errors) reads its config too.
    (run.path / "results.json").write_text(json.dumps({"tasks": 4, "learned": {}}))
    with pytest.raises(CheckpointError, match='"shots" is missing'):
        reproduce.run_method(ctx, "s/fomaml", "cosmixture", "fomaml", meta_iterations=4, steps=3)
    assert (run.checkpoint_dir / "ckpt-2.eqx").is_file()


def test_the_configurations_ctmeta_writes_pass_the_check():
    """Every committed run (docs/results) and every preset combination reads back unchanged."""
    configs = list((ROOT / "docs" / "results").glob("**/config.json"))
    assert len(configs) > 50
    for path in configs:
        RunDir(path.parent).read_config()
    for benchmark in ("cosmixture", "alpine"):
        for method in ("amaml", "maml", "fomaml", "reptile", "imaml"):
            config = json.loads(json.dumps(presets.resolve_config(benchmark, method)))
            assert presets.check_config(config) is config
    with pytest.raises(ctmeta.InputError, match='the configuration: "seed" is -1; expected an integer in 0..4294967295'):
        presets.build({**presets.resolve_config(), "seed": -1})


# ---------------------------------------------------------------- item 8: one list of what a resume may change

def _words(text: str) -> str:
    return " ".join(text.split())


def test_what_a_resume_may_change_is_one_list_in_the_check_the_help_and_the_docs(tmp_path, capsys):
    from ctmeta.cli._checks import RESUME_MAY_CHANGE, resume_may_change

    assert resume_may_change() == ("--meta-iterations, --checkpoint-every, --keep-checkpoints, --on-nonfinite and "
                                   "--solver")
    run = RunDir.create(tmp_path / "run", presets.resolve_config("cosmixture", "fomaml", steps=3, meta_iterations=4))
    for flag, value in (("--T", "3"), ("--seed", "5"), ("--flow", "heavy-ball"), ("--meta-lr", "0.5")):
        assert main(["train", "--resume", str(run.path), flag, value, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{flag} {value} differs from the resumed run's" in err[0], err
        assert f"(only {resume_may_change()} may change;" in err[0], err
    # The flags of the list pass the check: what stops this run is that it has no checkpoint yet.
    argv = ["train", "--resume", str(run.path), "--meta-iterations", "6", "--checkpoint-every", "3",
            "--keep-checkpoints", "3", "--on-nonfinite", "skip-task", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint" in err[0] and "differs" not in err[0], err
    assert main(["train", "--help"]) == 0
    assert f"only {resume_may_change()} may change" in _words(capsys.readouterr().out)
    docs = _words((ROOT / "docs" / "reliability.md").read_text())
    assert f"Only {resume_may_change('`')} may change on resume" in docs
    assert len(re.findall(r"may change on resume", docs)) == 1 and len(RESUME_MAY_CHANGE) == 5


def test_a_resumed_amaml_run_may_change_its_adaptive_solver_and_records_it(tmp_path, monkeypatch, capsys):
    """Meta-training makes A-MAML's inner flow stiff (issue 28): a long run may go on with RKC2 from a
    checkpoint; the tolerances and dense output stay, config.json records the change, and a stored
    sweep's rule (`--solver rk4`) is refused in one line."""
    import csv
    import dataclasses

    p = presets.BENCHMARKS["cosmixture"]
    monkeypatch.setitem(presets.BENCHMARKS, "cosmixture", dataclasses.replace(p, eval_steps=(0, 2), eval_every=2))
    out = tmp_path / "run"
    base = ["--method", "amaml", "--T", "0.5", "--meta-batch", "2", "--checkpoint-every", "1", "--quiet"]
    assert main(["train", *base, "--meta-iterations", "1", "--out", str(out)]) == 0
    before = json.loads((out / "config.json").read_text())["method_options"]
    for flags, says in ((["--solver", "rk4"], "changes only between the adaptive solvers dopri5 and rkc2"),
                        (["--solver", "rkc2", "--flow", "heavy-ball"], "--flow heavy-ball differs")):
        capsys.readouterr()
        assert main(["train", "--resume", str(out), *flags, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert main(["train", "--resume", str(out), "--solver", "rkc2", "--meta-iterations", "2", "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method_options"] == {**before, "solver": "rkc2"}
    assert config["resumes"][-1]["changed"] == {"solver": "dopri5"} and config["resumes"][-1]["from_iteration"] == 1
    assert presets.build_method(config) == ctmeta.Adjoint(rtol=before["rtol"], atol=before["atol"],
                                                          dense_steps=before["dense_steps"], solver="rkc2")
    with open(out / "metrics.csv", newline="") as f:
        assert [r["iteration"] for r in csv.DictReader(f)] == ["1", "2"]
    # Back to Dopri5: the key goes (dopri5 is implied); unchanged, nothing to do.
    from ctmeta.cli._train import _resumed_solver

    assert _resumed_solver("dopri5", config) == before and _resumed_solver("rkc2", config) is None


# ---------------------------------------------------------------- item 9: numbers and paths as the user gave them


@pytest.mark.parametrize("argv, line", [
    (["train", "--seed", "4294967296"], "--seed 4294967296 is too large (at most 4294967295); choose a smaller value"),
    (["train", "--steps", "10000000"], "--steps 10000000 is too large (at most 1000000); choose a smaller value"),
    (["train", "--T", "2e6"], "--T 2000000 is too large (at most 1000000); choose a smaller value"),
    (["train", "--T", "inf"], "--T must be a finite number, got inf"),
    (["train", "--T", "nan"], "--T must be a finite number, got nan"),
    (["train", "--meta-lr", "inf"], "--meta-lr must be a finite number, got inf"),
    (["evaluate", "RUN", "--steps", "0,10000000"], "--steps 10000000 is too large (at most 1000000); choose a smaller value"),
    (["train", "--benchmark", "movielens", "--data-dir", "NOWHERE"],
     "--data-dir NOWHERE does not exist (for movielens it is the data root holding movielens/, or that movielens "
     "folder itself)"),
])
def test_numbers_and_paths_are_said_as_given(argv, line, tmp_path, capsys):
    run = RunDir.create(tmp_path / "run", presets.resolve_config("cosmixture", "fomaml", steps=3, meta_iterations=4))
    nowhere = str(tmp_path / "nowhere")
    argv = [{"RUN": str(run.path), "NOWHERE": nowhere}.get(a, a) for a in argv]
    out = ["--out", str(tmp_path / "new")] if argv[0] == "train" else []
    assert main([*argv, *out, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ctmeta: error: " + line.replace("NOWHERE", nowhere)]
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- item 11: the help says what the code runs


def test_train_help_states_the_defaults_resolve_config_fills_in(tmp_path, capsys):
    assert main(["train", "--help"]) == 0
    text = _words(capsys.readouterr().out)
    assert "steps=200" not in text and "2-3 minutes" not in text
    assert "without --steps, the meta-gradient is the adaptive adjoint" in text
    horizons = re.search(r"For amaml, --T is the horizon \(default: ([^)]*)\)", text).group(1)
    named = {name: float(value) for value, names in re.findall(r"([\d.]+) on ([^;]*)", horizons)
             for name in names.split(", ")}
    assert set(named) == set(presets.BENCHMARKS)
    for name, preset in presets.BENCHMARKS.items():
        if preset.data_subdir:
            (tmp_path / preset.data_subdir).mkdir(exist_ok=True)
        config = presets.resolve_config(name, "amaml", data_dir=str(tmp_path) if preset.data_subdir else None)
        assert config["steps"] is None and config["T"] == named[name], name  # the adaptive rule, at the stated T
    c = presets.resolve_config()
    assert (f"With no flags: CosMixture {c['shots']}shot-{c['queries']}val, A-MAML (T={c['T']:g}, adaptive adjoint)"
            in text) and c["steps"] is None and c["meta_iterations"] == 1000
    # The time is a measurement, with its condition and date.
    assert "79 s for these 1000 meta-iterations" in text and "2026-12-01" in text and "4.9 minutes" in text


# ---------------------------------------------------------------- item 7: a flow built for another model


def _mlp(width, depth=2, key=0):
    import jax
    import jax.numpy as jnp

    from ctmeta.models import MLP

    return MLP(2, 1, width, depth, jnp.tanh, key=jax.random.PRNGKey(key))


def _mse(model, data):
    import jax.numpy as jnp

    from ctmeta.models import apply_to_set

    return jnp.mean((apply_to_set(model, data[0]) - data[1]) ** 2)


@pytest.mark.parametrize("other, why", [
    (dict(width=16), r"rho\.layers\[0\]\.weight has shape \(16, 2\) but the adapted parameter "
                     r"\.layers\[0\]\.weight has shape \(32, 2\)"),
    (dict(width=32, depth=1), r"rho has 4 arrays, the parameters 6: the parameters' \.layers\[2\]\.weight has no rho"),
])
def test_a_preconditioner_built_for_another_model_is_named_by_every_entry_point(other, why):
    import jax.numpy as jnp
    import optax

    flow = ctmeta.Preconditioned.like(_mlp(**other))
    model = _mlp(32)
    data = (jnp.ones((4, 2)), jnp.zeros((4, 1)))
    calls = {
        "MetaLearner": lambda: ctmeta.MetaLearner(model, ctmeta.Adjoint(), optax.adam(1e-3), flow=flow),
        "gradient_flow": lambda: ctmeta.gradient_flow(_mse, model, data, 0.1, method=ctmeta.Unrolled(steps=2), flow=flow),
        "gradient_flow, adjoint": lambda: ctmeta.gradient_flow(_mse, model, data, 0.1, flow=flow),
        "loss_along_flow": lambda: ctmeta.loss_along_flow(_mse, model, data, 0.1, jnp.array([0.0, 0.1]), flow=flow),
    }
    for name, call in calls.items():
        with pytest.raises(ctmeta.InputError, match=r"flow=Preconditioned\(per='parameter'\) was built for other "
                                                     r"parameters than the ones it adapts: " + why) as err:
            call()
        assert str(err.value).startswith("MetaLearner: ") == (name == "MetaLearner"), name


def test_a_head_only_learner_refuses_a_preconditioner_of_the_whole_model_and_takes_its_heads():
    import jax
    import jax.numpy as jnp
    import optax

    from ctmeta.models import EmbeddingHead

    model = EmbeddingHead(embedding=_mlp(8), head=jnp.zeros((3, 1)))
    with pytest.raises(ctmeta.InputError, match=r"MetaLearner: flow=Preconditioned.*rho has \d+ arrays, the parameters 1"):
        ctmeta.MetaLearner(model, ctmeta.Unrolled(steps=2), optax.adam(1e-3), ctmeta.cross_entropy, adapt="head",
                           flow=ctmeta.Preconditioned.like(model))
    learner = ctmeta.MetaLearner(model, ctmeta.Unrolled(steps=2), optax.adam(1e-3), ctmeta.cross_entropy,
                                 adapt="head", flow=ctmeta.Preconditioned.like(model.head))
    assert learner.inner_flow(learner.init(jax.random.PRNGKey(0))).mismatch(model.head) is None


# ---------------------------------------------------------------- item 10: `ctmeta bench` help and output off a terminal


@pytest.mark.parametrize("command", [["bench"], ["reproduce"], ["train"], ["evaluate"], ["download"]])
def test_every_help_gives_each_default_once_and_no_empty_one(command, capsys):
    assert main([*command, "--help"]) == 0
    text = _words(capsys.readouterr().out)
    assert not re.search(r"\(default:? [^)]*\)\s*\(default", text), text
    assert "(default: None)" not in text and "(default: False)" not in text
    if command == ["bench"]:
        assert text.count("(default: bench-out)") == 1 and "(default: 8e9)" in text


def test_bench_prints_plain_lines_to_a_file_or_a_pipe(tmp_path, capsys):
    """A finished sweep resumed (nothing measured): its summary, written where a file or pipe would get it."""
    from ctmeta import bench

    out = tmp_path / "bench"
    out.mkdir()
    flags = ["--cases", "cosmixture/maml", "--steps", "4", "--quick", "--repeats", "1", "--meta-batch", "1",
             "--time-budget", "0.5", "--no-vmap", "--no-diagnostics", "--out", str(out)]
    row = {"benchmark": "cosmixture", "method": "maml", "steps": 4, "T": 0.04, "peak_bytes": 705500,
           "temp_bytes": 693560, "argument_bytes": 7140, "output_bytes": 4800, "seconds": 0.245,
           "forward_seconds": 0.0356, "repeats": 1, "forward_repeats": 1, "meta_batch": 1, "checkpoints": "",
           "device": bench.device_description(), "dtype": "float64", "compile_seconds": 11.5, "status": "ok"}
    bench.write_csv(out / "bench.csv", [row], bench.COLUMNS)
    (out / "sweep.json").write_text(json.dumps({"quick": True, "repeats": 1, "time_budget": 0.5, "max_bytes": 8e9,
                                                "device": bench.device_description(), "seconds": 1.0}))
    assert main(["bench", "--resume", *flags]) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert not re.search("[\u2500-\u257f]", text), text  # no box-drawing characters
    assert re.search(r"^target +value +goal +where +result$", text, re.M), text
    assert "kept from the earlier sweep" in text and "ctmeta: error" not in text


# ---------------------------------------------------------------- item 12: every scale `reproduce` takes is listed


def test_every_scale_reproduce_accepts_is_in_its_help_list_and_docs(capsys):
    from ctmeta.experiments.reproduce import SCALES

    assert main(["reproduce", "--help"]) == 0
    text = _words(capsys.readouterr().out)
    assert "--scale {" + ",".join(SCALES) + "}" in text
    assert all(f"{scale}: " in text for scale in SCALES) and "its numbers mean nothing" in text
    assert main(["reproduce", "--list"]) == 0
    assert "--scale " + "|".join(SCALES) in capsys.readouterr().out
    docs = _words((ROOT / "docs" / "reproduce.md").read_text())
    assert "--scale " + "|".join(SCALES) in docs and "`test` (seconds" in docs
    assert main(["reproduce", "amaml-table4", "--scale", "huge"]) == 2
    assert "(choose from " + ", ".join(map(repr, SCALES)) + ")" in capsys.readouterr().err
