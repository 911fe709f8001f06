"""Reading dataset files from a directory or straight from a zip archive.

A [`FileTree`][] names the files under a root by relative POSIX paths
(`"Tifinagh/character50/0959_17.png"`), lists them, reads their bytes, and
gives a *fingerprint* (names, sizes, modification times) that changes when
the files do, for keying caches. [`DirTree`][] reads a folder,
[`ZipTree`][] one folder of a zip archive, without extracting anything.

Archives are untrusted input. Opening one checks every member, and refuses
the whole archive (with a [`DataError`][]) if a member could escape a
target folder on extraction ("zip-slip": an absolute name, a drive letter, a
`..` component) or is a symbolic link. A member larger than `max_member_bytes`
is refused when read. Nothing from an archive is ever executed or unpickled.
"""

from __future__ import annotations

import abc
import os
import pathlib
import re
import stat
import zipfile
import zlib
from collections.abc import Iterator

from .._errors import DataError

__all__ = ["DirTree", "FileTree", "ZipTree", "check_member_name", "is_hidden"]

# No single image or CSV of these datasets comes near this; a larger member is
# a malformed or hostile archive (a "zip bomb"), not data.
MAX_MEMBER_BYTES = 256 * 2**20

_DRIVE = re.compile(r"^[A-Za-z]:")


def check_member_name(name: str, archive: str | os.PathLike) -> None:
    """Raise a [`DataError`][] if the archive member `name` is unsafe.

    Unsafe: empty, absolute (`/x`, `\\x`, `C:x`), containing a NUL or a `..`
    component (with `/` or `\\` as separator), i.e. anything that extraction
    could write outside its target folder.
    """
    if (
        not name
        or "\x00" in name
        or name.startswith(("/", "\\"))
        or _DRIVE.match(name)
        or (".." in name and ".." in re.split(r"[/\\]", name))
    ):
        raise DataError(
            f"refusing archive {archive}: member {name!r} would escape the extraction "
            "folder (absolute path or '..' component, a 'zip-slip' archive); "
            "get a clean copy of the dataset"
        )


def is_hidden(name: str) -> bool:
    """True for OS metadata that archivers add (`__MACOSX/`, `.DS_Store`, `._x`)."""
    return any(p.startswith(".") or p == "__MACOSX" for p in name.split("/"))


class FileTree(abc.ABC):
    """Files under a root, named by relative POSIX paths."""

    #: Where the files are, for messages (`/data/x.zip:images_background/`).
    location: str

    @abc.abstractmethod
    def files(self) -> list[str]:
        """Every regular file under the root, sorted (hidden files included)."""

    @abc.abstractmethod
    def read(self, name: str) -> bytes:
        """The bytes of the file `name` (a DataError if it cannot be read)."""

    @abc.abstractmethod
    def fingerprint(self) -> list:
        """JSON-serialisable; changes when any file is added, removed or modified."""

    def where(self, name: str) -> str:
        """`name`'s full location, for messages."""
        return f"{self.location}{name}"

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DirTree(FileTree):
    """The files under the folder `root`."""

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a directory")
        self.location = f"{self.root}{os.sep}"
        self._files: list[str] | None = None

    def _walk(self) -> Iterator[str]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            rel = pathlib.Path(dirpath).relative_to(self.root).as_posix()
            prefix = "" if rel == "." else rel + "/"
            for f in filenames:
                yield prefix + f

    def files(self) -> list[str]:
        if self._files is None:
            self._files = sorted(self._walk())
        return list(self._files)

    def read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {self.where(name)}: {e}") from None

    def fingerprint(self) -> list:
        out = []
        for name in self.files():
            try:
                st = (self.root / name).stat()
            except OSError as e:
                raise DataError(f"cannot stat {self.where(name)}: {e}") from None
            out.append([name, st.st_size, st.st_mtime_ns])
        return ["dir", out]


class ZipTree(FileTree):
    """The members of the zip archive `path` under the folder `prefix`.

    `prefix` is `""` (the whole archive) or a folder name ending in `/`.
    Every member of the archive is checked on opening (see the module
    docstring); a `DataError` says what is wrong.
    """

    def __init__(self, path: str | os.PathLike, prefix: str = "", *, max_member_bytes=MAX_MEMBER_BYTES):
        self.path = pathlib.Path(path)
        self.max_member_bytes = max_member_bytes
        try:
            self._zip = zipfile.ZipFile(self.path)
        except FileNotFoundError:
            raise DataError(f"{self.path} does not exist") from None
        except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as e:
            # A member name flagged UTF-8 that is not decodes as UnicodeDecodeError.
            raise DataError(f"{self.path} is not a readable zip archive: {e}") from None
        try:
            for info in self._zip.infolist():
                check_member_name(info.filename, self.path)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise DataError(
                        f"refusing archive {self.path}: member {info.filename!r} is a "
                        "symbolic link; dataset archives hold plain files only"
                    )
        except BaseException:
            self._zip.close()
            raise
        self.chroot(prefix)

    def chroot(self, prefix: str) -> None:
        """Make the folder `prefix` of the archive this tree's root."""
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.prefix = prefix
        self.location = f"{self.path}:{prefix}"
        self._members: dict[str, zipfile.ZipInfo] = {
            info.filename[len(prefix) :]: info
            for info in self._zip.infolist()
            if not info.is_dir() and info.filename.startswith(prefix)
        }

    def top_level(self) -> list[str]:
        """The archive's top-level entries (for messages about the layout)."""
        return sorted({n.split("/")[0] for n in self._zip.namelist() if n})

    def files(self) -> list[str]:
        return sorted(self._members)

    def read(self, name: str) -> bytes:
        info = self._members.get(name)
        if info is None:
            raise DataError(f"{self.where(name)} is not in the archive")
        if info.file_size > self.max_member_bytes:
            raise DataError(
                f"refusing {self.where(name)}: {info.file_size} bytes uncompressed, "
                f"more than the {self.max_member_bytes} allowed for one file"
            )
        try:
            return self._zip.read(info)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
            raise DataError(f"cannot read {self.where(name)} (corrupt archive?): {e}") from None

    def fingerprint(self) -> list:
        # The archive's size and mtime stand for its contents: hashing a
        # 100 MB archive on every start would cost more than the cache saves.
        st = self.path.stat()
        return ["zip", self.path.name, self.prefix, st.st_size, st.st_mtime_ns]

    def close(self) -> None:
        self._zip.close()
