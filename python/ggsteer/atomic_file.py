"""Write a file atomically, never clobbering one that exists unless told to.

The content goes to a temporary file in the target's directory (so the rename never crosses
filesystems), is flushed to disk, and is then published: with `overwrite`, by `os.replace`; without,
by a hard link, which fails if the target appeared since the first check, so a concurrent writer's
file is never clobbered (filesystems without hard links fall back to a last check and a replace).
On any failure the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Callable


def exists_error(path: str | os.PathLike, what: str = "file") -> FileExistsError:
    return FileExistsError(errno.EEXIST, f"{what} exists (pass overwrite=True to replace it)", os.fspath(path))


def check_destination(path: str | os.PathLike, *, overwrite: bool, what: str = "file") -> Path:
    """Fail before any work if `path` cannot be written: it exists (without overwrite), is a
    directory, or its folder is missing."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"{what} path is a directory", str(path))
    if not overwrite and os.path.lexists(path):
        raise exists_error(path, what)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"the folder for the {what} does not exist", str(folder))
    return path


def write_atomically(path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = False,
                     what: str = "file") -> None:
    """Call `write(temp_path)`, then publish the temporary file as `path`."""
    path = check_destination(path, overwrite=overwrite, what=what)
    temp = create_temp_file(path)
    try:
        write(temp)
        os.chmod(temp, _file_mode(path))
        _flush_to_disk(temp)
        _publish(temp, path, overwrite, what)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)


def create_temp_file(path: Path) -> str:
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never clobber another writer's temporary file
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    os.close(descriptor)
    return str(temp)


def _file_mode(path: Path) -> int:
    """Keep an overwritten file's mode; otherwise what open() would give."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)  # the only portable way to read the umask
        os.umask(umask)
        return 0o666 & ~umask


def _flush_to_disk(temp: str) -> None:
    # without fsync a crash right after the rename can leave an empty file under the final name
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())


def _publish(temp: str, path: Path, overwrite: bool, what: str) -> None:
    if overwrite:
        os.replace(temp, path)
        return
    try:
        os.link(temp, path)
    except FileExistsError:
        raise exists_error(path, what) from None
    except OSError:  # a filesystem without hard links
        if os.path.lexists(path):
            raise exists_error(path, what) from None
        os.replace(temp, path)
