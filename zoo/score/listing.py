"""The folder listing of a scoring run: every file to score, in a fixed order."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# What a listed path is: a regular file (scored), or one of the things that go to the errors file.
EntryKind = Literal["file", "unreadable", "unlistable", "special"]
FILE: EntryKind = "file"
UNREADABLE: EntryKind = "unreadable"  # cannot be stat'ed (a broken link, no permission)
UNLISTABLE: EntryKind = "unlistable"  # a folder that cannot be listed
SPECIAL: EntryKind = "special"  # a FIFO, socket or device (never opened)


@dataclass(frozen=True)
class FileEntry:
    """One path to score: relative to the folder (POSIX separators), its kind, size and mtime
    (``size`` and ``mtime_ns`` are 0 unless ``kind`` is ``"file"``)."""

    rel: str
    size: int
    mtime_ns: int
    kind: EntryKind = FILE


def list_folder(folder: Path, exclude: Sequence[Path] = ()) -> list[FileEntry]:
    """Every non-hidden regular file under ``folder``, recursively, sorted by relative path.

    Hidden files and folders (name starting with ``.``) and the paths in ``exclude`` (the
    run's own output, errors file and journal when they sit inside the folder) are skipped.
    Files that cannot be stat'ed (``UNREADABLE``), folders that cannot be listed
    (``UNLISTABLE``) and FIFOs, sockets or devices (``SPECIAL``) are kept, with their ``kind``, so that
    they reach the errors file.
    """
    root = str(folder.resolve())
    excluded = {str(p.resolve()) for p in exclude}
    entries: list[FileEntry] = []

    def rel_of(path: str) -> str:
        rel = path[len(root) + 1 :]
        return rel if os.sep == "/" else rel.replace(os.sep, "/")

    def unreadable(err: OSError) -> None:
        if err.filename and os.path.abspath(err.filename) != root:
            entries.append(FileEntry(rel_of(os.path.abspath(err.filename)), 0, 0, UNLISTABLE))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and os.path.join(dirpath, d) not in excluded]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.startswith(".") or path in excluded:
                continue
            try:
                st = os.stat(path)
            except OSError:
                entries.append(FileEntry(rel_of(path), 0, 0, UNREADABLE))
                continue
            if stat.S_ISREG(st.st_mode):
                entries.append(FileEntry(rel_of(path), st.st_size, st.st_mtime_ns))
            else:  # FIFOs, sockets and devices are never opened
                entries.append(FileEntry(rel_of(path), 0, st.st_mtime_ns, SPECIAL))
    entries.sort(key=lambda e: e.rel)
    return entries


def listing_digest(entries: Sequence[FileEntry]) -> str:
    """sha256 of the listing (paths, kinds or sizes, mtimes): a resume requires the same one."""
    h = hashlib.sha256()
    for e in entries:
        what = e.size if e.kind == FILE else e.kind
        h.update(f"{e.rel}\0{what}\0{e.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
