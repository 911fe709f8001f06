"""The run record: what a run directory's config.json says about where, when and how a run was made.

These keys describe the run, not what it computes: two configurations that
differ only in them are the same run.
"""

from __future__ import annotations

import datetime

__all__ = ["RUN_RECORD_KEYS", "run_record"]

#: Keys of a config.json that record where and when a run ran, not what it computes.
RUN_RECORD_KEYS = ("dtype", "task_family", "versions", "created", "argv", "resumes", "devices", "processes")


def run_record(family, argv) -> dict:
    """The record a new run's config.json gets: JAX's float `dtype`, the task
    family's repr, the package versions, the creation time and the command's `argv`."""
    from .runs import dtype_name, package_versions

    return {"dtype": dtype_name(), "task_family": repr(family), "versions": package_versions(),
            "created": datetime.datetime.now().isoformat(timespec="seconds"), "argv": list(argv)}
