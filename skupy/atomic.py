"""Atomic writes of files and folders, so a crash never leaves a half-written checkpoint.

A file is written to a temporary file in the same directory, flushed and fsynced, then
moved over the target with os.replace, which is atomic on POSIX and Windows when both
paths are on one file system. A folder is built as a temporary sibling and renamed into
place once every file in it has been fsynced.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def fsync_directory(path: PathLike) -> None:
    """Fsync a directory so that renames inside it survive a power loss.

    Windows cannot open a directory for fsync, so this does nothing there.
    """
    if os.name == "nt":
        return
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write data to path atomically: readers see the old file or the complete new one."""
    path = Path(path)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write text to path atomically (see atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode(encoding))


def fsync_tree(folder: PathLike) -> None:
    """Fsync every regular file and directory under folder, including folder itself."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            file_path = os.path.join(root, name)
            if os.path.islink(file_path):
                continue
            with open(file_path, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(root)


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces path when the block exits without error.

    The temporary folder is a sibling of path, so the final rename stays on one file
    system. On an exception it is deleted and path is left untouched. An existing
    folder at path is replaced only after the new one is complete and fsynced.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"cannot write a folder to {path}: a file with that name exists")

    temp_folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        yield temp_folder
        fsync_tree(temp_folder)
        _replace_folder(temp_folder, path)
    except BaseException:
        shutil.rmtree(temp_folder, ignore_errors=True)
        raise


def _replace_folder(new_folder: Path, path: Path) -> None:
    if not path.exists():
        os.rename(new_folder, path)
        fsync_directory(path.parent)
        return

    # NOTE: POSIX has no portable atomic swap of two directories. The old folder is moved
    # aside first, so between the two renames path does not exist. A crash there leaves
    # the complete old folder next to path, named ".{name}.<random>.old".
    backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.rmdir(backup)
    os.rename(path, backup)
    try:
        os.rename(new_folder, path)
    except BaseException:
        os.rename(backup, path)
        raise
    fsync_directory(path.parent)
    shutil.rmtree(backup, ignore_errors=True)
