"""Writing files safely: atomic replacement, permissions from the umask, checksums.

Every file medzoo writes (weights, cards, exports, score outputs, journals) goes through
:func:`atomic_write`: a temporary sibling, fsync, rename. A killed process never leaves a torn
file, and the file gets the permissions an ordinary ``open()`` would give it (``0666`` less the
umask): ``tempfile.mkstemp`` alone would leave it ``0600``, so another user could not serve
from a shared store.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

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


__all__ = ["atomic_file", "atomic_write", "atomic_write_bytes", "current_umask", "file_mode", "sha256_of",
           "write_json"]
