"""Reading and decoding the files of a chunk, in worker processes ahead of inference."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zoo.io import pid_alive
from zoo.preprocess import ImageError, Preprocessing, load_image
from zoo.score.listing import SPECIAL, UNLISTABLE, FileEntry

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 30  # files above this are refused before being read into memory
CRASH_REASON = "the image decoder crashed on this file"


@dataclass
class DecodedChunk:
    """Decoded images of one chunk: ``images[k]`` is entry ``ok[k]``; refused ones in ``errors``."""

    images: np.ndarray  # uint8 (n_ok, C, H, W)
    ok: list[int]
    errors: list[tuple[int, str]]


def decode_entries(folder: str, entries: Sequence[FileEntry], prep: Preprocessing) -> DecodedChunk:
    """Read and decode the listed files with :func:`load_image`; failures become reasons."""
    arrays: list[np.ndarray] = []
    ok: list[int] = []
    errors: list[tuple[int, str]] = []
    for i, entry in enumerate(entries):
        rel, kind = entry.rel, entry.kind
        try:
            if kind == UNLISTABLE:
                os.listdir(Path(folder, rel))  # raises the reason it could not be listed
                raise OSError(0, "it could not be listed")
            if kind == SPECIAL:
                raise ImageError("not a regular file (a FIFO, socket or device)")
            if entry.size > MAX_FILE_BYTES:
                raise ImageError(f"file of {entry.size} bytes is above the {MAX_FILE_BYTES} byte limit")
            data = Path(folder, rel).read_bytes()
            arrays.append(load_image(data, prep))
            ok.append(i)
        except ImageError as e:
            errors.append((i, str(e)))
        except OSError as e:
            what = "cannot list this folder" if kind == UNLISTABLE else "cannot read the file"
            errors.append((i, f"{what}: {e.strerror or e}"))
        except Exception as e:  # a Pillow plugin failing oddly on a malformed file must not stop the run
            errors.append((i, f"the decoder failed: {type(e).__name__}: {e}"))
    c, s = prep.in_channels, prep.image_size
    images = np.stack(arrays) if arrays else np.zeros((0, c, s, s), dtype=np.uint8)
    return DecodedChunk(images, ok, errors)


_WORKER: dict[str, Any] = {}


def _alive(pid: int, forked: bool) -> bool:
    """Whether the scoring process still runs: a forked child sees its parent change when it dies;
    a forkserver's child (whose parent is the server) asks the kernel about the pid."""
    return os.getppid() == pid if forked else pid_alive(pid)


def _watch_parent(parent: int, forked: bool) -> None:
    """Exit when the scoring process is gone (killed), instead of lingering as an orphan."""
    while _alive(parent, forked):
        time.sleep(0.5)
    os._exit(1)


def _init_worker(folder: str, prep: Preprocessing, parent: int, forked: bool = True) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the scoring process's to handle
    _WORKER["folder"], _WORKER["prep"] = folder, prep
    threading.Thread(target=_watch_parent, args=(parent, forked), daemon=True).start()


def _decode_task(entries: list[FileEntry]) -> DecodedChunk:
    return decode_entries(_WORKER["folder"], entries, _WORKER["prep"])


def _merge(parts: Sequence[tuple[int, DecodedChunk]], prep: Preprocessing) -> DecodedChunk:
    """One chunk from decoded slices ``(offset, part)`` in order."""
    arrays = [p.images for _, p in parts if len(p.ok)]
    c, s = prep.in_channels, prep.image_size
    images = np.concatenate(arrays) if arrays else np.zeros((0, c, s, s), dtype=np.uint8)
    ok = [off + i for off, p in parts for i in p.ok]
    errors = [(off + i, reason) for off, p in parts for i, reason in p.errors]
    return DecodedChunk(images, ok, errors)


class Decoder:
    """Decodes chunks ahead of inference: in a process pool (``workers > 0``) or in-process.

    Each chunk is split into one task per worker, and up to ``depth`` chunks are in flight, so
    the workers decode the next chunks while the engine runs the current one. A worker killed
    by a file (a decoder crash) is survived: the pool is restarted and that chunk is decoded
    one file per task, the guilty file getting :data:`CRASH_REASON`.
    """

    def __init__(self, folder: Path, prep: Preprocessing, workers: int, depth: int,
                 start_method: str | None = None) -> None:
        self.folder, self.prep, self.workers, self.depth = str(folder), prep, workers, depth
        methods = multiprocessing.get_all_start_methods()
        # fork (default): workers start in milliseconds and do not re-import torch; they only run
        # Pillow. "forkserver" where the process holds threads that fork would leave in a broken
        # state in the child (a Ray worker's gRPC and abseil locks).
        self.start_method = start_method or ("fork" if "fork" in methods else None)
        self.pool: ProcessPoolExecutor | None = None
        self.pending: deque[tuple[list[FileEntry], list[tuple[int, Future[DecodedChunk]]]]] = deque()
        if workers > 0:
            self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            ctx.set_forkserver_preload(["zoo.score.decode"])  # not the parent's __main__
        self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                        initargs=(self.folder, self.prep, os.getpid(), self.start_method == "fork"))

    def _restart(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self._start()

    def _submit(self, entries: list[FileEntry], parts: int) -> list[tuple[int, Future[DecodedChunk]]]:
        if self.pool is None:
            return []
        step = max(1, math.ceil(len(entries) / parts))
        return [(off, self.pool.submit(_decode_task, entries[off : off + step]))
                for off in range(0, len(entries), step)]

    def feed(self, chunks: Iterator[list[FileEntry]]) -> None:
        """Keep ``depth`` chunks in flight, taking new ones from ``chunks``."""
        while len(self.pending) < self.depth:
            entries = next(chunks, None)
            if entries is None:
                return
            self.pending.append((entries, self._submit(entries, self.workers)))

    def next(self) -> DecodedChunk:
        """The oldest chunk in flight, decoded."""
        entries, futures = self.pending.popleft()
        if self.pool is None:
            return decode_entries(self.folder, entries, self.prep)
        try:
            return _merge([(off, fut.result()) for off, fut in futures], self.prep)
        except BrokenProcessPool:
            log.warning("a decoder worker died; isolating the file that killed it")
            self._restart()
            result = self._isolate(entries)
            self.pending = deque((e, self._submit(e, self.workers)) for e, _ in self.pending)
            return result

    def _isolate(self, entries: list[FileEntry]) -> DecodedChunk:
        parts: list[tuple[int, DecodedChunk]] = []
        c, s = self.prep.in_channels, self.prep.image_size
        for i, entry in enumerate(entries):
            ((_, fut),) = self._submit([entry], 1)
            try:
                parts.append((i, fut.result()))
            except BrokenProcessPool:
                self._restart()
                parts.append((i, DecodedChunk(np.zeros((0, c, s, s), np.uint8), [], [(0, CRASH_REASON)])))
        return _merge(parts, self.prep)

    def close(self, wait: bool = True) -> None:
        """Stop the workers (``wait=False``: without waiting for the running tasks, on an error)."""
        if self.pool is not None:
            self.pool.shutdown(wait=wait, cancel_futures=True)
            self.pool = None


def default_workers() -> int:
    """Decode workers: one per available core, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))
