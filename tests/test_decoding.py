"""The API worker's decode pool (serving.decoding): thread, memory and admission limits that hold at
every moment, also when requests are cancelled (BentoML's 504) — no server needed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serving.decoding import AbandonableBytes, Abandoned, DecodePool
from serving.uploads import Problem
from zoo.preprocess import Preprocessing, load_image
from zoo.preprocess.image import decode_bytes


class Probe:
    """A job that records how many run at once and how much memory they hold."""

    def __init__(self, pool: DecodePool) -> None:
        self.pool = pool
        self.lock = threading.Lock()
        self.running = self.peak_running = self.held = self.peak_held = 0
        self.started: list[str] = []

    def job(self, name: str, memory: int, seconds: float) -> None:
        with self.lock:
            self.started.append(name)
            self.running += 1
            self.held += memory
            self.peak_running = max(self.peak_running, self.running)
            self.peak_held = max(self.peak_held, self.held)
        time.sleep(seconds)
        with self.lock:
            self.running -= 1
            self.held -= memory


def test_threads_and_memory_stay_within_their_limits() -> None:
    """12 jobs of 300 MB on 4 threads with a 512 MB budget: never more than one at once (memory), and
    small ones run beside it up to the thread count."""
    pool = DecodePool(threads=4, memory_bytes=512 << 20, queue_s=60)
    probe = Probe(pool)

    async def run() -> None:
        big = [pool.run(probe.job, f"big{i}", 300 << 20, 0.05, work=300 << 20, abandoned=threading.Event())
               for i in range(6)]
        small = [pool.run(probe.job, f"small{i}", 1 << 20, 0.05, work=1 << 20, abandoned=threading.Event())
                 for i in range(6)]
        await asyncio.gather(*big, *small)

    asyncio.run(run())
    assert len(probe.started) == 12
    assert probe.peak_held <= 512 << 20 and probe.peak_running <= 4, (probe.peak_held, probe.peak_running)
    pool.shutdown()


def test_a_cancelled_request_holds_its_memory_until_its_thread_is_done() -> None:
    """The 504 case: the request is cancelled while its image decodes; the decode memory is given back
    only when the thread finishes, so the next image cannot start beside it, and the cancelled
    request's queued image never runs."""
    pool = DecodePool(threads=2, memory_bytes=100, queue_s=60)
    probe = Probe(pool)

    async def run() -> None:
        abandoned = threading.Event()

        async def request() -> None:
            await pool.run(probe.job, "first", 100, 0.5, work=100, abandoned=abandoned)
            await pool.run(probe.job, "second", 100, 0.5, work=100, abandoned=abandoned)

        task = asyncio.create_task(request())
        await asyncio.sleep(0.1)
        task.cancel()  # what BentoML's TimeoutMiddleware does
        other = asyncio.create_task(pool.run(probe.job, "other", 100, 0.0, work=100, abandoned=threading.Event()))
        await asyncio.sleep(0.1)
        assert probe.started == ["first"] and abandoned.is_set()  # "other" waits for first's memory
        await other
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert probe.started == ["first", "other"] and probe.peak_held <= 100
    pool.shutdown()


def test_admission_refuses_what_cannot_finish_in_time_with_retry_after() -> None:
    pool = DecodePool(threads=2, memory_bytes=1 << 30, queue_s=10)
    pool.rate = 100e6  # work bytes/s per thread: 2 GB in 10 s on two threads
    with pool.admit(1_500_000_000) as first:
        with pytest.raises(Problem) as refused:
            with pool.admit(1_000_000_000):
                pass
        assert refused.value.status == 503 and int(refused.value.headers["Retry-After"]) >= 1
        with pool.admit(400_000_000):  # fits: 1.9 GB due in 9.5 s
            assert pool.pending_work == 1_900_000_000
        first.done(1_000_000_000)
        assert pool.pending_work == 500_000_000
    assert pool.pending_work == 0
    with pool.admit(10**12):  # alone, a request is always admitted (the per-request limit bounds it)
        pass


def test_an_abandoned_upload_stops_its_decoder() -> None:
    """A decoder reading the bytes of an abandoned request fails at its next read."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (512, 512), 7).save(buf, "PNG")
    prep = Preprocessing(28, 28, 1, (0.5,), (0.5,))
    abandoned = threading.Event()
    assert load_image(AbandonableBytes(buf.getvalue(), abandoned), prep).shape == (1, 28, 28)
    abandoned.set()
    with pytest.raises(Abandoned):
        load_image(AbandonableBytes(buf.getvalue(), abandoned), prep)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "F", "1", "LA", "CMYK"])
def test_decode_bytes_bounds_the_measured_peak(mode: str, tmp_path: Path) -> None:
    """The header-derived estimate the memory budget uses is at least what decoding really takes, for
    a 4,000 x 3,000 image of each mode: the peak RSS of a fresh process that decodes the file
    (tracemalloc does not see Pillow's C allocations)."""
    from PIL import Image

    path = tmp_path / ("image.tif" if mode in ("F", "I;16", "CMYK") else "image.png")
    Image.new(mode, (4000, 3000)).save(path)
    Image.new(mode, (64, 48)).save(tmp_path / ("small" + path.suffix))
    code = f"""
from pathlib import Path
from zoo.preprocess import Preprocessing, load_image
prep = Preprocessing(28, 28, 3, (0.5,) * 3, (0.5,) * 3)
load_image({str(tmp_path / ("small" + path.suffix))!r}, prep)  # the decoders' imports, not the image's memory
data = open({str(path)!r}, "rb").read()
status = lambda key: int(next(l.split()[1] for l in Path("/proc/self/status").read_text().splitlines()
                              if l.startswith(key))) * 1024
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
before = status("VmRSS:")
load_image(data, prep)
print(status("VmHWM:") - before)
"""
    grew = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    from zoo.preprocess import probe

    estimate = decode_bytes(probe(path), 28)
    assert 0 < grew <= estimate, (mode, grew, estimate)
