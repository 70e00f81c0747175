"""The run folder's lock, and the errors of writing into a run folder.

Only one run may write a folder at a time: ``lock`` takes an exclusive POSIX record lock
(``lockf``) on ``RUN/.lock`` for the whole run, so a second ``train`` (or ``--resume``) on
the same folder stops at once with a clear error instead of mixing its epochs into the first
one's. The lock belongs to the process alone (forked loader workers do not inherit it) and
the operating system releases it when the process ends, however it ends, so a killed run
never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from deepcluster.config import ConfigError

LOCK_NAME = ".lock"


class RunFolderError(RuntimeError):
    """A file of the run folder cannot be written (full disk, read-only folder, no
    permission); the message names the file and the operating system's reason."""


def _os_reason(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0)
    text = error.strerror or str(error) or type(error).__name__
    return f"{text} ({name})" if name else text


def write_failure(what: str, path: Path, error: OSError, kept: str = "") -> RunFolderError:
    """The error to raise when writing ``path`` failed with ``error``."""
    return RunFolderError(f"cannot write {what} {str(path)!r}: {_os_reason(error)}" + (f"; {kept}" if kept else ""))


def check_out_folder(path: Path) -> None:
    """Raise ``ConfigError`` when ``path`` (an ``--out`` folder) is a file or lies inside one."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is a file" if candidate == path else f"lies inside {str(candidate)!r}, which is a file"
                raise ConfigError(f"--out {str(path)!r} {where}; give a folder")
            return


@contextmanager
def lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's exclusive lock inside the block (creating the folder).

    The lock is a POSIX record lock (``lockf``), which belongs to this process alone: a
    forked child (a DataLoader worker) does not inherit it, so the moment this process dies,
    however it dies, the folder is free again (an ``flock`` would live on in the workers
    until they notice). The descriptor is closed on ``exec``.

    Raises:
        ConfigError: another process holds the lock (names its process id), or the folder
            is a file.
        RunFolderError: the folder or its lock file cannot be created or written (full disk);
            nothing is left behind.
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no locking
        yield
        return
    check_out_folder(run_dir)
    path = run_dir / LOCK_NAME
    created = not run_dir.exists()
    existed = path.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as error:
        _remove_new(run_dir, created, existed)
        raise write_failure("the run file", path, error) from None
    try:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Earlier versions held an ``flock`` instead: a run of one of those is refused too
            # (tried and released at once: an ``flock`` would be inherited by loader workers).
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise write_failure("the run file", path, error) from None
            holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"run folder {str(run_dir)!r} is being written by another deepcluster run "
                              f"(process {holder}); wait for it to end or choose another --out") from None
        try:
            holder = f"{os.getpid()}\n".encode()
            os.pwrite(handle, holder, 0)
            os.ftruncate(handle, len(holder))
        except OSError as error:  # a full disk, before anything else was written
            _remove_new(run_dir, created, existed)
            raise write_failure("the run file", path, error) from None
        try:
            yield
        finally:
            if created and [entry.name for entry in run_dir.iterdir()] == [LOCK_NAME]:
                # Stopped before writing anything (bad settings): leave no folder behind.
                _remove_new(run_dir, created, existed)
    finally:
        os.close(handle)  # releases the lock


def _remove_new(run_dir: Path, created: bool, existed: bool) -> None:
    """Remove the lock file and the folder that ``lock`` created (best effort)."""
    with contextlib.suppress(OSError):
        if not existed:
            (run_dir / LOCK_NAME).unlink(missing_ok=True)
        if created:
            run_dir.rmdir()



__all__ = ["LOCK_NAME", "RunFolderError", "check_out_folder", "lock", "write_failure"]
