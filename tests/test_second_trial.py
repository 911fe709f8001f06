"""Issue 30, the second new-user trial: a run's config.json with a bad or
missing value, a flow built for another model, the one list of what a
resume may change, numbers and paths in messages, `ctmeta bench` off a
terminal, `ctmeta reproduce --scale test`, and the error types below the
modules that raise them."""

from __future__ import annotations

import ast
import pathlib

import ctmeta

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
