"""The audit trail (``audit_log: DIR``): one JSON line per answered or refused image, never the image.

An observer of :mod:`serving.events` in each API worker. The line is :class:`zoo.audit.AuditLine`
(the one definition of the format; ``zoo audit DIR`` reads and checks a trail with it).

Durability, as designed and tested (tests/test_audit.py):

* ``observe`` (on the event loop) only queues the event and the time; a background thread turns it
  into lines and hands **each line to the kernel with one** ``os.write`` on an ``O_APPEND``
  descriptor as soon as it arrives. A written line is in the kernel's page cache: it survives the
  process being killed (``kill -9``), and one ``write`` of a few hundred bytes is never torn by a
  process kill in practice (only a kill inside that very system call could cut it, and only the
  file's last line). A kill loses the lines still queued: those of the moment, well within one
  ``audit_flush_s``.
* Every ``audit_flush_s`` (default 1 s) the thread calls ``fsync`` on the file when lines were written
  since the last call, so a machine crash (power, kernel) also loses at most that interval; a torn last line
  it may leave is reported by ``zoo audit``, not a traceback.
* Several API workers: one file per worker process, named with its start time and pid
  (``audit-20250101T120000Z-p1234-000.jsonl``), created with ``O_EXCL``: no two processes ever write
  one file, so lines never interleave. A file reaching ``audit_max_mb`` is closed (after an
  ``fsync``) and the next lines go to a new file (``-001``, ``-002`` …); no file in use is ever
  renamed or truncated, so tools may read or ship closed files at any time.
* Files are created with the permissions the umask gives (``0666`` less the umask, by the kernel).
* A clean shutdown (SIGTERM: the API worker drains its requests, then BentoML calls the service's
  shutdown hook, :meth:`AuditTrail.close`; ``atexit`` too) writes what is queued and syncs it.

``zoo serve`` checks the folder before it starts the server (:func:`check_folder`, one line, exit 2);
each worker creates its first file when it starts (a :class:`zoo.errors.ConfigError` if it cannot).
A disk failing later is logged with the number of lines lost, and never fails a request.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from serving.events import REFUSAL_KINDS, ImageEvent, RequestEvent, split_route
from zoo.audit import FILE_PREFIX, FILE_SUFFIX, AuditClass, AuditLine, AuditModel
from zoo.errors import ConfigError

log = logging.getLogger("serving")
_STOP = object()
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)


def _image_line(event: RequestEvent, base: dict[str, Any], img: ImageEvent) -> AuditLine:
    # An image the pipeline decoded keeps status 200 when the request failed as a whole afterwards
    # (503: no model, inference unavailable): its line carries the request's status then.
    status = img.status if img.status != 200 else event.status
    refused = status != 200
    return AuditLine(
        **base, status=status, index=img.index, filename=img.filename, sha256=img.sha256,
        kind=(img.kind or REFUSAL_KINDS.get(status, "refused")) if refused else None,
        error=(img.error or event.error or None) if refused else None,
        top=None if refused else tuple(AuditClass(label=lab, prob=p) for lab, p in img.top),
        prediction_set=None if refused else img.prediction_set, alpha=None if refused else img.alpha,
        ood_score=None if refused else img.ood_score, in_distribution=None if refused else img.in_distribution)


def lines_of(event: RequestEvent, when: float) -> list[AuditLine]:
    """The trail's lines for one request answered at ``when`` (Unix time): one per image, or one
    for a request refused as a whole."""
    base: dict[str, Any] = dict(
        time=_utc(when), received=_utc(event.meta.received), request_id=event.meta.request_id,
        client=event.meta.client, route=event.route, task=split_route(event.route)[0], request_status=event.status,
        models=tuple(AuditModel(id=m.id, weights_sha256=m.weights_sha256) for m in event.models))
    if event.images:
        return [_image_line(event, base, img) for img in event.images]
    return [AuditLine(**base, status=event.status, kind=REFUSAL_KINDS.get(event.status, "refused"),
                      error=event.error or None)]


def check_folder(directory: str | Path) -> Path:
    """The trail's folder, created if missing; a :class:`ConfigError` when files cannot be made in it
    (``zoo serve`` checks before starting the server, whose API worker would otherwise fail at start)."""
    d = Path(directory).expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"audit_log {d}: cannot create the folder ({e.strerror})") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"audit_log {d}: this user cannot create files there")
    return d


class AuditFile:
    """The files of one process: the current one, opened ``O_APPEND``; rotated by size."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory, self.max_bytes = directory, max_bytes
        self.stem = f"{FILE_PREFIX}{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-p{os.getpid()}"
        self.seq = -1
        self.fd: int | None = None
        self.size = 0
        self.dirty = False  # written since the last fsync
        self.path: Path | None = None

    def open_next(self) -> None:
        """Create the next file of this process (``O_EXCL``) and make it current."""
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:  # O_EXCL: never a file another process (or an earlier start of this pid) holds
            self.seq += 1
            path = self.directory / f"{self.stem}-{self.seq:03d}{FILE_SUFFIX}"
            try:
                self.fd = os.open(path, _OPEN_FLAGS, 0o666)  # the kernel takes the umask off
                break
            except FileExistsError:
                continue
        self.path, self.size = path, 0
        dfd = os.open(self.directory, os.O_RDONLY)
        try:  # the new name itself survives a machine crash
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def write(self, line: bytes) -> None:
        """One ``os.write`` of one whole line (a new file first when this one would pass the size)."""
        if self.fd is not None and self.size and self.size + len(line) > self.max_bytes:
            self.close()
        if self.fd is None:
            self.open_next()
        assert self.fd is not None
        view = memoryview(line)
        while view:  # a regular file takes the whole line at once; a short write goes on where it stopped
            n = os.write(self.fd, view)
            view = view[n:]
        self.size += len(line)
        self.dirty = True

    def sync(self) -> None:
        if self.fd is not None and self.dirty:
            os.fsync(self.fd)
            self.dirty = False

    def close(self) -> None:
        if self.fd is not None:
            try:
                self.sync()
            finally:
                os.close(self.fd)
                self.fd = None


class AuditTrail:
    """The observer writing the trail of this process (module docstring)."""

    def __init__(self, directory: str | Path, max_mb: float = 100, flush_s: float = 1.0) -> None:
        self.directory = Path(directory).expanduser()
        self.flush_s = flush_s
        self.file = AuditFile(self.directory, max(1, int(max_mb * 2**20)))
        self.written = 0  # lines handed to the kernel
        self.lost = 0  # lines a failing disk did not take
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed = False
        try:  # the first file now: a folder that cannot be written stops the server at start, not later
            self.file.open_next()
        except OSError as e:
            raise ConfigError(f"audit_log {self.directory}: cannot create an audit file there ({e.strerror})") from None
        self._thread = threading.Thread(target=self._run, name="audit-trail", daemon=True)
        self._thread.start()
        atexit.register(self.close)
        log.info("audit trail: %s (fsync every %g s, files of at most %g MB)", self.directory, flush_s, max_mb)

    def observe(self, event: RequestEvent) -> None:
        """Queue the event with the time of its answer (the thread writes it)."""
        if self._closed:  # only after the shutdown hook, when no request should be left
            log.warning("audit trail closed: request %s not written", event.meta.request_id)
            return
        self._queue.put((time.time(), event))

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, ``fsync``, close (the shutdown hook; twice is harmless)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        next_sync = time.monotonic() + self.flush_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_sync - time.monotonic()))
            except queue.Empty:
                item = None
            if item is _STOP:
                self._guarded(self.file.close)
                return
            if item is not None:
                when, event = item  # type: ignore[misc]
                self._write(event, when)
            if time.monotonic() >= next_sync:
                self._guarded(self.file.sync)
                next_sync = time.monotonic() + self.flush_s

    def _write(self, event: RequestEvent, when: float) -> None:
        lines = lines_of(event, when)
        for n, line in enumerate(lines):
            try:
                self.file.write(line.to_line())
            except OSError as e:  # disk full, folder gone: logged, the request is not affected
                self.lost += len(lines) - n
                log.error("audit trail: %d lines of request %s not written (%s); %d lost so far",
                          len(lines) - n, event.meta.request_id, e, self.lost)
                self._guarded(self.file.close)  # the next line tries a new file
                return
            self.written += 1

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except OSError as e:
            log.error("audit trail: %s failed: %s", getattr(step, "__name__", step), e)


__all__ = ["AuditFile", "AuditTrail", "check_folder", "lines_of"]
