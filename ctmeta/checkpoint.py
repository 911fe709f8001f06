"""Save and load a learner's state without pickle.

[`save_state`][] writes the state's arrays with `eqx.tree_serialise_leaves`
to `path` and a JSON sidecar `path.json` (format, ctmeta version, iteration,
the arrays' dtypes and shapes, the SHA-256 of the array file, and the
caller's metadata), each atomically and the sidecar last, so a complete
sidecar means a complete state file. [`load_state`][] reads them back into
a like-structured template (for instance `learner.init(key)`), checking the
checksum and every array's dtype and shape first.

The format (`ctmeta-state/1`) is stable: checkpoints written by earlier
versions load.
"""

from __future__ import annotations

import io
import json
import os
import pathlib

import equinox as eqx
import jax
import numpy as np

from ._errors import CheckpointError
from ._io import atomic_write_bytes, sha256_hex
from .state import MetaState

__all__ = ["load_state", "read_sidecar", "save_state", "sidecar_path"]

_FORMAT = "ctmeta-state/1"


def _leaf_specs(tree) -> list[str]:
    """`"float32[32,2]"` for each array leaf, in order."""
    specs = []
    for leaf in jax.tree.leaves(tree):
        arr = np.asarray(leaf)
        specs.append(f"{arr.dtype}[{','.join(str(d) for d in arr.shape)}]")
    return specs


def sidecar_path(path: str | os.PathLike) -> pathlib.Path:
    """The JSON sidecar of a state file: `ckpt-100.eqx` -> `ckpt-100.json`."""
    return pathlib.Path(path).with_suffix(".json")


def save_state(path: str | os.PathLike, state: MetaState, metadata: dict | None = None) -> None:
    """Save a learner state to `path` (arrays, `eqx.tree_serialise_leaves`)
    and `path.json` (iteration, shapes, checksum, `metadata`), atomically.

    No pickle: loading needs a like-structured template ([`load_state`][]).
    The JSON sidecar is written last, so a complete sidecar means a complete
    state file.
    """
    from . import __version__

    path = pathlib.Path(path)
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, state)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    side = {
        "format": _FORMAT,
        "ctmeta_version": __version__,
        "file": path.name,
        "iteration": int(state.iteration),
        "sha256": sha256_hex(data),
        "bytes": len(data),
        "leaves": _leaf_specs(state),
        "metadata": metadata or {},
    }
    atomic_write_bytes(sidecar_path(path), (json.dumps(side, indent=2) + "\n").encode())


def read_sidecar(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a saved state, checked for format."""
    side_path = sidecar_path(path)
    try:
        side = json.loads(side_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: its sidecar {side_path} is missing (an interrupted save?)") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: cannot read {side_path}: {err}") from None
    if not isinstance(side, dict) or side.get("format") != _FORMAT:
        raise CheckpointError(f"checkpoint {path}: {side_path} is not a ctmeta state sidecar ({_FORMAT}).")
    return side


def load_state(path: str | os.PathLike, like: MetaState) -> tuple[MetaState, dict]:
    """Load a state saved by [`save_state`][] into the structure of `like`.

    Checks the checksum and that every array has the template's shape and
    dtype; raises `CheckpointError` saying what does not match.

    **Returns:** the state and the sidecar's `metadata`.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a state file saved by save_state")
    side = read_sidecar(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from None
    if sha256_hex(data) != side.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated (checksum mismatch).")
    expected = _leaf_specs(like)
    if side.get("leaves") != expected:
        got = side.get("leaves") or []
        detail = f"{len(got)} arrays saved, {len(expected)} expected"
        for i, (a, b) in enumerate(zip(got, expected)):
            if a != b:
                detail = f"array {i} is {a} in the checkpoint but {b} here"
                break
        raise CheckpointError(
            f"checkpoint {path} does not match this model/optimiser ({detail}); "
            "was it written with a different configuration or dtype?"
        )
    try:
        state = eqx.tree_deserialise_leaves(io.BytesIO(data), like)
    except Exception as err:  # malformed payload despite the checksum
        raise CheckpointError(f"checkpoint {path} cannot be deserialised: {err}") from None
    return state, side.get("metadata", {})
