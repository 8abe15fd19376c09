"""Where the API worker decodes uploads: a fixed pool of threads, a memory budget, admission control.

Decoding a large image takes seconds of CPU and hundreds of MB, so three limits hold at every moment:

* **Threads.** ``decode_threads`` threads exist, no more: a pool of our own rather than
  ``anyio.to_thread`` with a limiter, because a request that BentoML cancels (504) leaves its thread
  running while the limiter's token goes back, so new work started beside it. Here a cancelled request
  marks its work abandoned: a job not yet started is dropped, a running decoder stops at its next read
  of the bytes (:class:`AbandonableBytes`), and no further image of that request is submitted.
* **Memory.** Each image reserves what decoding it may take (:func:`~zoo.preprocess.image.decode_bytes`,
  from its header) out of ``decode_memory_mb``, and gets it back when its thread is done (not when its
  request is cancelled). One image alone may take the whole budget.
* **Admission.** A request is admitted only if the decoding already admitted plus its own is due to
  finish within ``decode_queue_s`` at the decode rate measured in this process; otherwise it is refused
  at once with 503 and ``Retry-After``, so that what is admitted finishes within its time limit instead
  of every request timing out together. Decoding work is counted in the bytes :func:`decode_bytes`
  estimates, a pixel budget weighted by what each pixel costs (its mode; a JPEG's reduced decode):
  time follows that much more closely than plain pixels (measured 120-190 MB/s per thread here for
  64-megapixel grey, RGB, RGBA PNG and 16-bit DICOM alike, against 20-120 megapixels/s).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from serving.config import Limits
from serving.uploads import Problem, Upload
from zoo.preprocess import ImageError, Preprocessing, load_image, probe
from zoo.preprocess.image import decode_bytes

# Decode rate per thread assumed before one was measured (work bytes/s, module docstring): below the
# 120-190 MB/s measured on a shared 2-core EPYC, so that a fresh worker errs on the side of refusing.
INITIAL_RATE = 80e6
MEASURED_WORK = 16 << 20  # smaller images are dominated by fixed costs: they do not update the rate
RATE_WEIGHT = 0.2  # exponential moving average of the measured rate
HEADER_WORK = 8 << 20  # what reading a request's headers may take (its files are in memory already)
# zoo.preprocess.ImageError.kind → HTTP status
IMAGE_ERROR_STATUS = {"empty": 400, "too_large": 413, "unsupported": 415, "corrupt": 422}


class Abandoned(Exception):
    """Raised by a read of an abandoned request's bytes (a decoder may turn it into an ImageError)."""


class AbandonableBytes(io.BytesIO):
    """An upload's bytes that stop being readable once its request is abandoned: the decoder reading
    them (Pillow reads 64 KB blocks, pydicom element by element) fails at its next read."""

    def __init__(self, data: bytes, abandoned: threading.Event) -> None:
        super().__init__(data)
        self._abandoned = abandoned

    def read(self, size: int | None = -1) -> bytes:
        if self._abandoned.is_set():
            raise Abandoned("the request was abandoned")
        return super().read(size)


class Admission:
    """The decoding work of one admitted request still to do; :meth:`done` as images finish."""

    def __init__(self, pool: DecodePool, work: int) -> None:
        self.pool, self.left = pool, work

    def done(self, work: int) -> None:
        work = min(work, self.left)
        self.left -= work
        self.pool.pending_work -= work


class DecodePool:
    """Runs decoding jobs under the three limits of the module docstring (one per API worker process)."""

    def __init__(self, threads: int, memory_bytes: int, queue_s: float) -> None:
        self.threads = threads
        self.memory_bytes = memory_bytes
        self.queue_s = queue_s
        self.rate = INITIAL_RATE
        self.pending_work = 0  # admitted, not yet decoded (bytes of decode_bytes)
        self.running = 0  # jobs running in a thread now
        self._free = memory_bytes
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="medzoo-decode")
        self._lock = threading.Lock()

    # admission ---------------------------------------------------------------------------------

    def due_s(self, work: int) -> float:
        """Seconds until ``work`` more would be decoded, after what is already admitted."""
        return (self.pending_work + work) / (self.rate * self.threads)

    @contextmanager
    def admit(self, work: int) -> Iterator[Admission]:
        """Admit a request of ``work`` (from its headers), or 503 with ``Retry-After``. A request
        alone is always admitted: the per-request pixel limit and ``request_timeout_s`` bound it."""
        if self.pending_work and self.due_s(work) > self.queue_s:
            wait = max(1, math.ceil(self.due_s(work) - self.queue_s))
            raise Problem(503, f"the server is busy decoding other images: this request's would not be decoded "
                               f"within {self.queue_s:g} s; retry in {wait} s", headers={"Retry-After": str(wait)})
        ticket = Admission(self, work)
        self.pending_work += work
        try:
            yield ticket
        finally:
            ticket.done(ticket.left)

    # memory ------------------------------------------------------------------------------------

    async def _reserve(self, n: int) -> None:
        if not self._waiters and self._free >= n:
            self._free -= n
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release(n)  # granted just as the request was cancelled
            else:
                self._waiters.remove((n, granted))
            raise

    def _release(self, n: int) -> None:
        self._free += n
        while self._waiters and self._free >= self._waiters[0][0]:
            need, granted = self._waiters.popleft()
            if not granted.done():
                self._free -= need
                granted.set_result(None)

    # jobs --------------------------------------------------------------------------------------

    def _job(self, fn: Callable[..., None], args: tuple[Any, ...], work: int, abandoned: threading.Event) -> None:
        if abandoned.is_set():
            return
        with self._lock:
            self.running += 1
        start = time.perf_counter()
        try:
            fn(*args)
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.running -= 1
                if work >= MEASURED_WORK and elapsed > 0 and not abandoned.is_set():
                    self.rate += RATE_WEIGHT * (work / elapsed - self.rate)

    async def run(self, fn: Callable[..., None], *args: Any, work: int, abandoned: threading.Event) -> None:
        """``fn(*args)`` in a decode thread with ``work`` bytes of memory reserved until that thread is
        done; a cancelled caller sets ``abandoned`` (its job is dropped, or stops at its next read)."""
        memory = min(work, self.memory_bytes)
        await self._reserve(memory)
        loop = asyncio.get_running_loop()
        try:
            job: Future[None] = self._executor.submit(self._job, fn, args, work, abandoned)
        except BaseException:
            self._release(memory)
            raise
        job.add_done_callback(lambda _: _call_in_loop(loop, self._release, memory))
        try:
            await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            abandoned.set()
            job.cancel()
            raise

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """``fn(*args)`` on ``loop``'s thread (a job ends in a decode thread); nothing once the loop is closed."""
    if not loop.is_closed():
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed between the check and the call (shutdown)
            pass


# ---------------------------------------------------------------------------------------------
# the decode step of a request


def image_error_status(err: ImageError) -> int:
    """HTTP status for a refusal of :mod:`zoo.preprocess`."""
    return IMAGE_ERROR_STATUS.get(err.kind, 422)


def check_headers(uploads: list[Upload], limits: Limits, abandoned: threading.Event,
                  keep_dicom: bool = False) -> None:
    """Format, size and frames of each file from its header (:func:`zoo.preprocess.probe`, bounded
    time each; nothing decoded); refusals are recorded on the uploads. ``keep_dicom`` (``output=dicom-sr``):
    also each DICOM header, without pixel data (:func:`keep_dicom_header`)."""
    for up in uploads:
        if abandoned.is_set():
            return
        if up.data is None:
            continue
        up.sha256 = hashlib.sha256(up.data).hexdigest()  # the audit trail's name for the file (serving.events)
        if len(up.data) == 0:
            up.refuse(400, "empty file", "empty")
            continue
        try:
            up.header = probe(up.data, max_pixels=limits.max_image_pixels)
        except ImageError as e:
            up.refuse(image_error_status(e), str(e), e.kind)
            continue
        if keep_dicom:
            keep_dicom_header(up)


def keep_dicom_header(up: Upload) -> None:
    """The DICOM header a structured report copies and references (read once, here; no pixel data),
    or 406 for this image (then not decoded): it is not DICOM, or lacks the UIDs a report references."""
    from zoo.dicom_sr import DicomSRError, source_header  # highdicom: imported when a report is asked for

    assert up.header is not None and up.data is not None
    if up.header.format != "DICOM":
        up.refuse(406, f"a {up.header.format} image has no DICOM header to report on: DICOM structured reports "
                       "answer DICOM images only (ask without output=dicom-sr or Accept: application/dicom for "
                       "a JSON answer)", "not_dicom")
    else:
        try:
            up.dicom = source_header(up.data)
        except DicomSRError as e:
            up.refuse(406, f"no DICOM structured report: {e}", "not_dicom")
    if up.status != 200:
        up.header = None  # nothing to decode


def decode_upload(up: Upload, prep: Preprocessing, max_pixels: int, abandoned: threading.Event) -> None:
    """Decode one image whose header passed; its bytes are dropped afterwards."""
    if up.header is None or up.data is None:
        return
    try:
        up.array = load_image(AbandonableBytes(up.data, abandoned), prep, max_pixels=max_pixels)
    except ImageError as e:
        up.refuse(image_error_status(e), str(e), e.kind)
    except Abandoned:  # nobody waits for this answer any more
        up.refuse(503, "abandoned: the request was cancelled", "abandoned")
    up.data = None


def request_pixels(uploads: list[Upload], limits: Limits) -> int:
    """The request's pixels from the headers; 413 for the whole request above its budget."""
    sized = [up.header for up in uploads if up.header is not None]
    total = sum(h.pixels for h in sized)
    if total > limits.max_request_pixels:
        raise Problem(413, f"the {len(sized)} images of this request hold {total:,} pixels in all, more than the "
                           f"{limits.max_request_pixels:,} pixel limit per request: send fewer or smaller images")
    return total


async def decode(pool: DecodePool, uploads: list[Upload], prep: Preprocessing, limits: Limits,
                 keep_dicom: bool = False) -> None:
    """A request's decode step: headers first (limits, the request's pixel budget, admission; with
    ``keep_dicom`` the DICOM headers), then its images, concurrently under the pool's limits. A cancelled
    request abandons its work."""
    abandoned = threading.Event()
    await pool.run(check_headers, uploads, limits, abandoned, keep_dicom, work=HEADER_WORK, abandoned=abandoned)
    request_pixels(uploads, limits)
    todo = [(up, decode_bytes(up.header, prep.image_size)) for up in uploads if up.header is not None]
    with pool.admit(sum(work for _, work in todo)) as admitted:

        async def one(up: Upload, work: int) -> None:
            await pool.run(decode_upload, up, prep, limits.max_image_pixels, abandoned, work=work, abandoned=abandoned)
            admitted.done(work)

        await asyncio.gather(*(one(up, work) for up, work in todo))
