"""The audit trail (issue 21, item 3): the writer (:mod:`serving.audit`), ``zoo audit`` (:mod:`zoo.audit`),
and a real ``zoo serve`` killed with SIGKILL under load (the acceptance test).

Unit tests drive :class:`serving.audit.AuditTrail` with :mod:`serving.events` events as the API worker's
pipeline publishes them; the acceptance test serves the session's real BreastMNIST bundle with two API
workers, sends real BreastMNIST test images as PNGs from three client threads, SIGKILLs every process of
the server and checks the trail against what the clients were answered.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import start_zoo_serve

from serving.audit import AuditTrail
from serving.events import ImageEvent, RequestEvent, RequestMeta, ServedModel
from zoo.audit import AuditLine, BadLine, read_file, trail_files
from zoo.cli import main
from zoo.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
MODEL = ServedModel("breastmnist-simplecnn-test", "ab" * 32)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _answered(i: int, ood: bool | None = True) -> ImageEvent:
    return ImageEvent(index=0, filename=f"scan-{i}.png", sha256=_sha(b"%d" % i), status=200,
                      top=(("malignant", 0.8), ("normal", 0.2)), prediction_set=("malignant",), alpha=0.1,
                      ood_score=1.5, in_distribution=ood)


def _event(i: int, *images: ImageEvent, route: str = "breast", status: int = 200, error: str = "") -> RequestEvent:
    return RequestEvent(meta=RequestMeta(request_id=f"req-{i}", client="127.0.0.1"), route=route, status=status,
                        images=images, models=(MODEL,) if images else (), error=error)


def _lines(folder: Path) -> list[AuditLine]:
    out: list[AuditLine] = []
    for path in trail_files(folder):
        for item in read_file(path):
            assert not isinstance(item, BadLine), item
            out.append(item)
    return out


def _wait_for(check: Callable[[], bool], limit_s: float) -> float:
    """Seconds until ``check()`` holds (fails past ``limit_s``)."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < limit_s, f"not within {limit_s} s"
        time.sleep(0.005)
    return time.monotonic() - t0


# --------------------------------------------------------------------------- the writer


def test_files_rotate_by_size_and_a_file_in_use_is_never_renamed(tmp_path: Path) -> None:
    max_bytes = 2000
    trail = AuditTrail(tmp_path / "trail", max_mb=max_bytes / 2**20, flush_s=0.05)
    trail.observe(_event(0, _answered(0)))
    _wait_for(lambda: trail.written == 1, 10)
    first = trail_files(tmp_path / "trail")[0]
    inode = first.stat().st_ino
    for i in range(1, 40):
        trail.observe(_event(i, _answered(i)))
    trail.close()
    files = trail_files(tmp_path / "trail")
    assert len(files) > 3 and files[0] == first and first.stat().st_ino == inode
    assert all(p.stat().st_size <= max_bytes for p in files), [p.stat().st_size for p in files]
    lines = _lines(tmp_path / "trail")  # name order is writing order
    assert [ln.request_id for ln in lines] == [f"req-{i}" for i in range(40)]
    assert [ln.sha256 for ln in lines] == [_sha(b"%d" % i) for i in range(40)]
    assert trail.written == 40 and trail.lost == 0


WRITER = textwrap.dedent("""
    import sys
    from serving.audit import AuditTrail
    from serving.events import ImageEvent, RequestEvent, RequestMeta
    folder, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    trail = AuditTrail(folder, max_mb=1, flush_s=0.05)
    for i in range(n):
        img = ImageEvent(index=0, filename=f"{tag}-{i}.png", sha256=None, status=200, top=(("a", 1.0),))
        trail.observe(RequestEvent(meta=RequestMeta(request_id=f"{tag}-{i}"), route="skin", status=200, images=(img,)))
    trail.close()
""")


def test_two_worker_processes_write_one_folder_without_mixing_lines(tmp_path: Path) -> None:
    folder, n = tmp_path / "trail", 2000
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), tag, str(n)], cwd=REPO)
             for tag in ("w1", "w2")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    files = trail_files(folder)
    assert len(files) == 2, files  # one per process, named with its pid
    for path in files:
        tags = {item.request_id.split("-")[0] for item in read_file(path) if isinstance(item, AuditLine)}
        assert len(tags) == 1, (path.name, tags)
    ids = sorted(ln.request_id for ln in _lines(folder))
    assert ids == sorted(f"{tag}-{i}" for tag in ("w1", "w2") for i in range(n))


def test_each_line_is_written_at_once_and_the_file_fsynced_each_interval(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    flush_s = 0.4
    synced: list[tuple[int, float]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((fd, time.monotonic()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    trail = AuditTrail(tmp_path / "trail", flush_s=flush_s)
    try:
        t0 = time.monotonic()
        trail.observe(_event(0, _answered(0)))
        # in the page cache (what a killed process leaves) long before the interval ends
        seen = _wait_for(lambda: bool(trail_files(tmp_path / "trail"))
                         and trail_files(tmp_path / "trail")[0].read_bytes().endswith(b"\n"), flush_s)
        fd = trail.file.fd
        _wait_for(lambda: any(f == fd for f, _ in synced), 2 * flush_s + 1)
        first_sync = min(t for f, t in synced if f == fd) - t0
        time.sleep(3 * flush_s)  # idle: nothing written, nothing to fsync
        after_idle = [t for f, t in synced if f == fd]
        print(f"line visible after {seen * 1000:.1f} ms, fsynced after {first_sync:.2f} s (interval {flush_s} s)")
        assert first_sync <= 2 * flush_s + 1 and len(after_idle) == 1
    finally:
        trail.close()
    assert len([t for f, t in synced if f == fd]) == 1  # closing a file with nothing new syncs nothing more


@pytest.mark.parametrize("umask,mode", [(0o027, 0o640), (0o002, 0o664)])
def test_files_take_the_permissions_the_umask_gives(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        trail = AuditTrail(tmp_path / "trail", flush_s=0.05)
        trail.observe(_event(0, _answered(0)))
        trail.close()
    finally:
        os.umask(old)
    (path,) = trail_files(tmp_path / "trail")
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "trail").stat().st_mode) == 0o777 & ~umask


def test_close_writes_every_queued_line(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "trail", flush_s=5)
    for i in range(300):
        trail.observe(_event(i, _answered(i)))
    trail.close()
    trail.close()  # twice is harmless
    assert len(_lines(tmp_path / "trail")) == 300 == trail.written


def test_a_folder_that_cannot_be_written_stops_the_start_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="audit_log .*a_file/trail: cannot create an audit file there"):
        AuditTrail(tmp_path / "a_file" / "trail")  # the API worker
    monkeypatch.delenv("MEDZOO_SERVE_CONFIG", raising=False)
    monkeypatch.setenv("MEDZOO_SERVE_SOURCE", "store")
    monkeypatch.setenv("MEDZOO_AUDIT_LOG", str(tmp_path / "a_file" / "trail"))
    assert main(["serve", "--no-build"]) == 2  # zoo serve says so before starting anything
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a_file/trail: cannot create the folder (Not a directory)" in err[0]


def test_a_relative_audit_folder_is_beside_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.config import load_config

    monkeypatch.delenv("MEDZOO_AUDIT_LOG", raising=False)
    monkeypatch.chdir(REPO)  # where zoo serve runs the server: not the config's folder
    config = tmp_path / "serve.yaml"
    config.write_text("audit_log: trail\naudit_flush_s: 0.5\n")
    cfg = load_config(config)
    assert (cfg.audit_log, cfg.audit_flush_s, cfg.audit_max_mb) == (tmp_path / "trail", 0.5, 100)
    monkeypatch.delenv("MEDZOO_SERVE_CONFIG", raising=False)
    assert load_config().audit_log is None  # off by default


# --------------------------------------------------------------------------- zoo audit


@pytest.fixture()
def mixed_trail(tmp_path: Path) -> tuple[Path, float, float]:
    """Six requests: answered (in distribution, out, no detector), one image refused beside an answered one,
    a request refused whole, an explanation."""
    folder = tmp_path / "trail"
    start = time.time()
    trail = AuditTrail(folder, flush_s=0.05)
    trail.observe(_event(1, _answered(1, True)))
    trail.observe(_event(2, _answered(2, False)))
    trail.observe(_event(3, _answered(3, None)))
    bad = ImageEvent(index=1, filename="notes.txt", sha256=_sha(b"x"), status=415, kind="unsupported", error="no")
    trail.observe(_event(4, _answered(4, True), bad))
    trail.observe(_event(5, route="breast", status=413, error="request body over 100 MB"))
    trail.observe(_event(6, _answered(6, True), route="breast/explain"))
    trail.close()
    return folder, start, time.time()


def test_zoo_audit_summarises_a_trail(mixed_trail: tuple[Path, float, float],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder, start, end = mixed_trail
    assert main(["audit", str(folder), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["files"], s["lines"], s["images"], s["refused_whole"], s["requests"]) == (1, 7, 6, 1, 6)
    assert s["by_task"] == {"breast": 7}
    assert s["by_status"] == {"200": 5, "413": 1, "415": 1}
    assert s["by_ood"] == {"in": 3, "out": 1, "unknown": 2}  # unknown: no detector, and the refused image
    assert s["refusals"] == {"too_large": 1, "unsupported": 1}
    first, last = (datetime.fromisoformat(s[k]).timestamp() for k in ("first", "last"))
    assert start <= first <= last <= end and s["bad"] == [] and s["torn"] == []
    assert main(["audit", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "1 files, 7 lines" in text and "every line parses" in text and "too_large 1" in text


def test_a_torn_last_line_is_reported_and_fails_only_with_strict(mixed_trail: tuple[Path, float, float],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    folder, _, _ = mixed_trail
    (path,) = trail_files(folder)
    whole = path.read_bytes().splitlines(keepends=True)
    with open(path, "ab") as f:  # what a machine crash leaves: the start of a line, no newline
        f.write(whole[0][:57])
    assert main(["audit", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "1 torn last lines" in out and f"{path.name}:8:" in out and "Traceback" not in out
    assert main(["audit", str(folder), "--strict"]) == 1
    capsys.readouterr()
    with open(path, "ab") as f:  # zeros where the file system had not written the data yet
        f.write(b"\n" + b"\0" * 300)
    assert main(["audit", str(folder), "--json"]) == 1  # line 8 is no longer the last: a bad line
    s = json.loads(capsys.readouterr().out)
    assert s["lines"] == 7 and len(s["bad"]) == 1 and s["bad"][0].startswith(f"{path.name}:8:")
    assert len(s["torn"]) == 1 and "zeros" in s["torn"][0]


def test_a_bad_line_fails_the_check_and_is_named(mixed_trail: tuple[Path, float, float],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder, _, _ = mixed_trail
    (path,) = trail_files(folder)
    lines = path.read_bytes().splitlines(keepends=True)
    altered = json.loads(lines[1])
    altered["sha"] = altered.pop("sha256")  # a renamed field
    newer = {**json.loads(lines[2]), "schema_version": 2}
    path.write_bytes(lines[0] + json.dumps(altered).encode() + b"\n" + json.dumps(newer).encode() + b"\n"
                     + b"not json\n" + b"".join(lines[3:]))
    assert main(["audit", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "3 lines do not parse" in out
    assert f"{path.name}:2: sha: unknown field; did you mean 'sha256'?" in out
    assert f"{path.name}:3: schema_version" in out and f"{path.name}:4:" in out


def test_zoo_audit_of_a_missing_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0]


# --------------------------------------------------------------------------- a real server, killed


FLUSH_S = 1.0
LOAD_S = 5.0
CLIENTS = 3


def _pngs(breast_root: Path, n: int) -> list[bytes]:
    images = np.load(breast_root / "breastmnist.npz")["test_images"][:n]
    out = []
    for arr in images:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _kill_everything(pid: int) -> None:
    """SIGKILL every process group of the server this test started (zoo serve and bentoml's tree, which
    runs in a group of its own), the server tree first."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    groups = []
    for p in reversed(procs):
        try:
            g = os.getpgid(p.pid)
        except ProcessLookupError:
            continue
        if g != os.getpgrp() and g not in groups:
            groups.append(g)
    for g in groups:
        os.killpg(g, signal.SIGKILL)
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, alive


class Load:
    """Client threads posting one or two real PNGs per request (every fifth request also a text file,
    refused 415 beside the answered image); each answer's time, request id and the images' sha256."""

    def __init__(self, url: str, pngs: list[bytes]) -> None:
        self.url, self.pngs = url, pngs
        self.stop = threading.Event()
        self.answered: list[tuple[float, str, list[tuple[str, str, int]]]] = []  # time, id, (name, sha, status)
        self.failures: list[str] = []

    def client(self, c: int) -> None:
        n = 0
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set():
                n += 1
                rid = f"c{c}-{n}"
                files = [(f"c{c}-{n}-{k}.png", self.pngs[(c * 997 + n * 7 + k) % len(self.pngs)])
                         for k in range(1 + n % 2)]
                if n % 5 == 0:
                    files.append((f"c{c}-{n}-notes.txt", b"not an image %d" % n))
                try:
                    r = http.post("/breast", headers={"x-request-id": rid},
                                  files=[("images", (name, data, "application/octet-stream")) for name, data in files])
                except httpx.HTTPError:
                    return  # the server was killed
                when = time.time()
                if r.status_code != 200 or r.headers.get("x-request-id") != rid:
                    self.failures.append(f"{rid}: {r.status_code} {r.headers.get('x-request-id')} {r.text[:200]}")
                    continue
                statuses = [res["status"] for res in r.json()["results"]]
                self.answered.append((when, rid, [(name, _sha(data), s) for (name, data), s in zip(files, statuses)]))


@pytest.mark.slow
def test_sigkill_under_load_leaves_a_whole_trail_with_every_answered_image(
        breast_store: Path, breast_bundle: Path, breast_root: Path, tmp_path: Path) -> None:
    """Acceptance (issue 21, item 3): every line parses, every image answered before kill − audit_flush_s
    is in the trail with its sha256, and ``zoo audit`` says so."""
    bundle = breast_store / "bundles" / breast_bundle.name  # exported to ONNX
    trail = tmp_path / "audit"
    config = {"tasks": {"breast": bundle.name}, "audit_log": "audit", "api_workers": 2, "audit_flush_s": FLUSH_S,
              "access_log": False}
    t_start = time.monotonic()
    # the log is not checked: SIGKILL, not SIGTERM, ends this server
    with start_zoo_serve(tmp_path, breast_store, config, check_log=False) as server:
        try:
            started_s = time.monotonic() - t_start
            load = Load(server.url, _pngs(breast_root, 64))
            threads = [threading.Thread(target=load.client, args=(c,)) for c in range(CLIENTS)]
            for t in threads:
                t.start()
            time.sleep(LOAD_S)
            killed_at = time.time()
            _kill_everything(server.proc.pid)
            load.stop.set()
            for t in threads:
                t.join(timeout=60)
        finally:
            if server.proc.poll() is None:
                _kill_everything(server.proc.pid)
    assert not load.failures, load.failures[:5]
    before = [a for a in load.answered if a[0] < killed_at - FLUSH_S]
    lines = {(ln.request_id, ln.filename): ln for ln in _lines(trail)}  # every line parses (else _lines fails)
    missing = [(rid, name) for _, rid, images in before for name, _, _ in images if (rid, name) not in lines]
    lost = [(rid, name) for _, rid, images in load.answered for name, _, _ in images if (rid, name) not in lines]
    per_file = [sum(1 for _ in read_file(p)) for p in trail_files(trail)]
    print(f"server ready in {started_s:.1f} s; {len(load.answered)} requests answered in {LOAD_S:g} s, "
          f"{len(before)} before kill - {FLUSH_S:g} s; lines per file {per_file}; answered images not in the "
          f"trail: {len(lost)} (all answered before the kill itself)")
    assert len(before) >= 10 and not missing, missing[:5]
    for _, rid, images in before:
        for name, sha, status in images:
            line = lines[(rid, name)]
            assert (line.sha256, line.status, line.task, line.request_status) == (sha, status, "breast", 200)
            assert line.models[0].id == bundle.name and (line.top is not None) == (status == 200)
    r = subprocess.run([sys.executable, "-m", "zoo.cli", "audit", str(trail), "--json"], cwd=REPO, env=server.env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(r.stdout)
    assert s["lines"] == len(lines) and s["bad"] == [] and len(s["torn"]) <= s["files"]
    answered_images = sum(st == 200 for _, _, images in before for _, _, st in images)
    assert s["by_status"]["200"] >= answered_images and s["by_task"] == {"breast": s["lines"]}
    assert s["refusals"].get("unsupported", 0) >= sum(st == 415 for _, _, images in before for _, _, st in images)
