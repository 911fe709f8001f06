"""Atomic file writes: a temporary file, fsync, rename, fsync of the folder.

Internal: the checkpoints (`ctmeta.checkpoint`), the run directories
(`ctmeta.runs`) and the downloads (`ctmeta.tasks.download`) write through
these, so that an interrupted write leaves the previous file, never a torn
one.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile

__all__ = ["atomic_write_bytes", "atomic_write_text", "fsync_dir", "sha256_hex"]


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory, so that a rename into it survives a crash (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """This process's umask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync and rename.

    The file gets the mode a plain `open(path, "w")` would give it
    (`0o666` less the umask), not the temporary file's private `0o600`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        except (AttributeError, OSError):  # pragma: no cover (not POSIX)
            pass
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """[`atomic_write_bytes`][] of `text` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode())


def sha256_hex(data: bytes) -> str:
    """The SHA-256 digest of `data`, in hexadecimal (a checkpoint's checksum)."""
    return hashlib.sha256(data).hexdigest()
