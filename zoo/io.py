"""Writing files safely: atomic replacement, permissions from the umask, checksums; file locks
between processes and whether a process is alive.

Every file medzoo writes (weights, cards, exports, score outputs, journals) goes through
:func:`atomic_write`: a temporary sibling, fsync, rename. A killed process never leaves a torn
file, and the file gets the permissions an ordinary ``open()`` would give it (``0666`` less the
umask): ``tempfile.mkstemp`` alone would leave it ``0600``, so another user could not serve
from a shared store.

:func:`file_lock` is the one lock between processes (POSIX ``flock``): tuning workers sharing a
store, a scoring run's journal, a training run's directory. The kernel releases it when its
process dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, overload

try:
    import fcntl
except ImportError:  # not POSIX (Windows): locks are not taken
    fcntl = None  # type: ignore[assignment]

_UMASK_LOCK = threading.Lock()


def display_name(name: str | bytes) -> str:
    """A file name as valid UTF-8 text, the one rule for every answer and output: the bytes of a name
    that are not UTF-8 appear as ``\\xNN``. ``name``: raw bytes, or text from the file system
    (``os.fsdecode``: undecodable bytes held as surrogates)."""
    raw = name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "backslashreplace")


def current_umask() -> int:
    """The process umask (read by setting it and putting it back, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new regular file: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write`` into a temporary sibling, fsync, rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """JSON (indented, NaN allowed as in the cards) written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode())


def atomic_file(path: str | os.PathLike[str], produce: Callable[[Path], None]) -> None:
    """For writers that take a file name (safetensors, torch.save): ``produce(tmp)`` then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        produce(Path(tmp))
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FileLock:
    """An exclusive ``flock`` held on an open file until :meth:`release` (or the end of a ``with``
    block, or of the process). Made by :func:`file_lock`."""

    def __init__(self, path: Path, f: IO[str]) -> None:
        self.path = path
        self._f: IO[str] | None = f

    @property
    def held(self) -> bool:
        return self._f is not None

    def release(self) -> None:
        """Give the lock up (closing the file releases the ``flock``); twice is harmless."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


@overload
def file_lock(path: str | os.PathLike[str], blocking: Literal[True] = ...) -> FileLock: ...


@overload
def file_lock(path: str | os.PathLike[str], blocking: bool) -> FileLock | None: ...


def file_lock(path: str | os.PathLike[str], blocking: bool = True) -> FileLock | None:
    """Take an exclusive lock on the file ``path`` (created with its folder if missing) against other
    processes. ``blocking``: wait for it; otherwise ``None`` when another process holds it. Use the
    answer in a ``with`` block, or keep it and :meth:`FileLock.release` it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")  # noqa: SIM115 - the open file is the lock, closed by FileLock.release
    if fcntl is None:
        return FileLock(path, f)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    except BaseException:
        f.close()
        raise
    return FileLock(path, f)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a process of another user counts)."""
    if pid <= 0:  # os.kill would signal a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        return True
    return True


__all__ = ["FileLock", "atomic_file", "atomic_write", "atomic_write_bytes", "current_umask", "file_lock", "file_mode",
           "pid_alive", "sha256_of", "write_json"]
