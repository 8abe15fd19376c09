"""``zoo score``: offline batch scoring of image folders with the exported ONNX models.

Pipeline::

    FOLDER ─ listing (recursive, sorted relative paths) ─ fixed chunks of ``chunk_size`` files
      ─ worker processes read + decode a chunk (zoo.preprocess.load_image on the raw bytes)
      ─ batched ONNX Runtime inference (zoo.runtime.OnnxModel), while the workers already
        decode the next chunks
      ─ each finished chunk journalled atomically in ``<out>.partial/chunk-NNNNNN.json``
      ─ at the end: errors file and output (CSV, JSON Lines or Parquet) written atomically,
        journal removed.

Nothing is lost and nothing is written twice: a run killed at any point and started again
finds the journal, checks that it belongs to the same models and the same folder listing,
skips the chunks already there and scores the rest; the output is assembled from the journal
in chunk order, so a resumed run writes the same bytes as an uninterrupted one. A finished
run (output present, no journal) is a no-op unless ``overwrite``.

``ensemble``: the logits of the member models are averaged, then turned into probabilities;
the ``agreement`` column is the fraction of members whose own top class is the ensemble's.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from zoo.bundle import (
    BundleError,
    atomic_write,
    atomic_write_bytes,
    read_card,
    sha256_of,
)
from zoo.metrics import to_probs
from zoo.preprocess import ImageError, Preprocessing, load_image
from zoo.runtime import ONNX_FILE, ModelFileError, OnnxModel, bundle_card
from zoo.store import best_bundle, bundles_dir, rank_bundles, resolve_bundle

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1
MANIFEST = "manifest.json"
LOCK = "lock"
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
PROB_PREFIX = "prob_"
MAX_FILE_BYTES = 1 << 30  # files above this are refused before being read into memory
DEFAULT_BATCH = 64
DEFAULT_CHUNK = 512
CRASH_REASON = "the image decoder crashed on this file"
UNLISTABLE = -2  # FileEntry.size of a folder that cannot be listed
SPECIAL = -3  # FileEntry.size of a FIFO, socket or device (never opened)


# --- results -----------------------------------------------------------------------------------


@dataclass
class ScoreSummary:
    """What a scoring run did (returned by :func:`score_folder`, printed by the CLI)."""

    out: Path
    errors_out: Path
    models: list[str]
    files: int  # files listed under the folder
    scored: int  # rows in the output
    errors: int  # rows in the errors file
    resumed: int = 0  # files found already done in the journal when the run started
    already_done: bool = False  # the output existed and there was no journal: nothing was run
    provider: str = ""
    seconds: float = 0.0  # wall time of the decode + inference loop of this run
    processed: int = 0  # files decoded (scored or refused) by this run

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else float("nan")

    def describe(self) -> str:
        """A few lines for the user."""
        if self.already_done:
            return (f"{self.out} is already complete ({self.scored} rows, {self.errors} unreadable files in "
                    f"{self.errors_out}); nothing to do (pass --overwrite to score again)")
        lines = [(f"scored {self.scored} of {self.files} files with {' + '.join(self.models)} "
                 f"on {self.provider or 'no provider'} -> {self.out}")]
        if self.resumed:
            lines.append(f"resumed: {self.resumed} files were already done")
        if self.processed and self.seconds > 0:
            lines.append(f"{self.processed} files in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s)")
        lines.append(f"{self.errors} unreadable files listed in {self.errors_out}")
        return "\n".join(lines)


# --- listing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file to score: its path relative to the folder (POSIX separators), size and mtime."""

    rel: str
    # -1: cannot be stat'ed (broken link); UNLISTABLE: a folder that cannot be listed; SPECIAL: not a regular file
    size: int
    mtime_ns: int


def list_folder(folder: Path, exclude: Sequence[Path] = ()) -> list[FileEntry]:
    """Every non-hidden regular file under ``folder``, recursively, sorted by relative path.

    Hidden files and folders (name starting with ``.``) and the paths in ``exclude`` (the
    run's own output, errors file and journal when they sit inside the folder) are skipped.
    Files that cannot be stat'ed (``size == -1``), folders that cannot be listed
    (``UNLISTABLE``) and FIFOs, sockets or devices (``SPECIAL``) are kept so that they reach the
    errors file.
    """
    root = str(folder.resolve())
    excluded = {str(p.resolve()) for p in exclude}
    entries: list[FileEntry] = []

    def rel_of(path: str) -> str:
        rel = path[len(root) + 1 :]
        return rel if os.sep == "/" else rel.replace(os.sep, "/")

    def unreadable(err: OSError) -> None:
        if err.filename and os.path.abspath(err.filename) != root:
            entries.append(FileEntry(rel_of(os.path.abspath(err.filename)), UNLISTABLE, 0))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and os.path.join(dirpath, d) not in excluded]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.startswith(".") or path in excluded:
                continue
            try:
                st = os.stat(path)
            except OSError:
                entries.append(FileEntry(rel_of(path), -1, 0))
                continue
            regular = stat.S_ISREG(st.st_mode)  # FIFOs, sockets and devices are never opened
            entries.append(FileEntry(rel_of(path), st.st_size if regular else SPECIAL, st.st_mtime_ns))
    entries.sort(key=lambda e: e.rel)
    return entries


def listing_digest(entries: Sequence[FileEntry]) -> str:
    """sha256 of the listing (paths, sizes, mtimes): a resume requires the same one."""
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.rel}\0{e.size}\0{e.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# --- decoding (runs in worker processes) --------------------------------------------------------


@dataclass
class DecodedChunk:
    """Decoded images of one chunk: ``images[k]`` is entry ``ok[k]``; refused ones in ``errors``."""

    images: np.ndarray  # uint8 (n_ok, C, H, W)
    ok: list[int]
    errors: list[tuple[int, str]]


def decode_entries(folder: str, entries: Sequence[tuple[str, int]], prep: Preprocessing) -> DecodedChunk:
    """Read and decode ``(rel, size)`` entries with :func:`load_image`; failures become reasons."""
    arrays: list[np.ndarray] = []
    ok: list[int] = []
    errors: list[tuple[int, str]] = []
    for i, (rel, size) in enumerate(entries):
        try:
            if size == UNLISTABLE:
                os.listdir(Path(folder, rel))  # raises the reason it could not be listed
                raise OSError(0, "it could not be listed")
            if size == SPECIAL:
                raise ImageError("not a regular file (a FIFO, socket or device)")
            if size > MAX_FILE_BYTES:
                raise ImageError(f"file of {size} bytes is above the {MAX_FILE_BYTES} byte limit")
            data = Path(folder, rel).read_bytes()
            arrays.append(load_image(data, prep))
            ok.append(i)
        except ImageError as e:
            errors.append((i, str(e)))
        except OSError as e:
            what = "cannot list this folder" if size == UNLISTABLE else "cannot read the file"
            errors.append((i, f"{what}: {e.strerror or e}"))
        except Exception as e:  # a Pillow plugin failing oddly on a malformed file must not stop the run
            errors.append((i, f"the decoder failed: {type(e).__name__}: {e}"))
    c, s = prep.in_channels, prep.image_size
    images = np.stack(arrays) if arrays else np.zeros((0, c, s, s), dtype=np.uint8)
    return DecodedChunk(images, ok, errors)


_WORKER: dict[str, Any] = {}


def _watch_parent(parent: int) -> None:
    """Exit when the scoring process is gone (killed), instead of lingering as an orphan."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _init_worker(folder: str, prep: Preprocessing, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the scoring process's to handle
    _WORKER["folder"], _WORKER["prep"] = folder, prep
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _decode_task(entries: list[tuple[str, int]]) -> DecodedChunk:
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

    def __init__(self, folder: Path, prep: Preprocessing, workers: int, depth: int) -> None:
        self.folder, self.prep, self.workers, self.depth = str(folder), prep, workers, depth
        self.pool: ProcessPoolExecutor | None = None
        self.pending: deque[tuple[list[tuple[str, int]], list[tuple[int, Future[DecodedChunk]]]]] = deque()
        if workers > 0:
            self._start()

    def _start(self) -> None:
        methods = multiprocessing.get_all_start_methods()
        # fork: workers start in milliseconds and do not re-import torch; they only run Pillow.
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                        initargs=(self.folder, self.prep, os.getpid()))

    def _restart(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self._start()

    def _submit(self, entries: list[tuple[str, int]], parts: int) -> list[tuple[int, Future[DecodedChunk]]]:
        if self.pool is None:
            return []
        step = max(1, math.ceil(len(entries) / parts))
        return [(off, self.pool.submit(_decode_task, entries[off : off + step]))
                for off in range(0, len(entries), step)]

    def feed(self, chunks: Iterator[list[tuple[str, int]]]) -> None:
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

    def _isolate(self, entries: list[tuple[str, int]]) -> DecodedChunk:
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


# --- models ------------------------------------------------------------------------------------


def ensure_onnx(target: Path) -> Path:
    """The ONNX file of a bundle (exported first if the bundle has none), or a lone ``.onnx``."""
    if target.is_file():
        return target
    onnx_path = target / ONNX_FILE
    if not onnx_path.is_file():
        from export import ExportError
        from export.onnx_export import export_onnx
        from export.parity import ParityError

        log.warning("%s has no %s yet: exporting it first", target.name, ONNX_FILE)
        try:
            export_onnx(target)
        except (ExportError, ParityError) as e:
            raise ModelFileError(f"{target} has no {ONNX_FILE} and exporting it failed: {e}") from e
    return onnx_path


def model_identity(model: OnnxModel) -> dict[str, str]:
    """What a journal records of a model: its id and the sha256 of the ONNX file that scores.

    Inside a bundle the sha256 is the one ``zoo export`` recorded in the card (which
    :meth:`OnnxModel.open` has just verified); a lone file is hashed.
    """
    card = bundle_card(model.path)
    records = (card or {}).get("exports") or {}
    digest = next((r.get("sha256") for r in records.values()
                   if isinstance(r, dict) and r.get("file") == model.path.name), None)
    return {"id": model.model_id, "onnx_sha256": str(digest or sha256_of(model.path))}


def ensemble_members(task: str, n: int, store: Path | None = None) -> list[Path]:
    """The best ``n`` bundles of one architecture for a task: the best bundle's arch, ranked by validation."""
    if n < 2:
        raise ValueError("an ensemble needs at least two members (--ensemble-size >= 2)")
    if (Path(task).expanduser() / "card.json").is_file() or (bundles_dir(store) / task / "card.json").is_file():
        raise ValueError("--ensemble with a single --model needs a task or dataset name "
                         "(its best bundles of one architecture are used); or give --model several times")
    best = best_bundle(task, store)
    if best is None:
        raise BundleError(f"no bundle found for {task!r}")
    card = read_card(best)
    flag, arch = card["dataset"]["name"], card["arch"]
    ranked = rank_bundles(flag, store, arch)
    if len(ranked) < 2:
        raise BundleError(f"an ensemble for {task!r} needs at least two {arch} bundles of {flag}; "
                          f"the store has {len(ranked)}")
    if len(ranked) < n:
        log.warning("only %d %s bundles of %s: the ensemble has %d members, not %d",
                    len(ranked), arch, flag, len(ranked), n)
    return [p for p, _ in ranked[:n]]


def resolve_models(refs: Sequence[str | Path], ensemble: bool = False, ensemble_size: int = 2,
                   store: Path | None = None) -> list[Path]:
    """Bundle directories (or lone ``.onnx`` files) for the ``--model`` references."""
    if not refs:
        raise ValueError("give a model: a bundle path, a bundle id or a task name")
    if len(refs) > 1 and not ensemble:
        raise ValueError("several models are only scored together as an ensemble (--ensemble)")
    if ensemble and len(refs) == 1:
        members = ensemble_members(str(refs[0]), ensemble_size, store)
    else:
        members = []
        for ref in refs:
            p = Path(ref).expanduser()
            members.append(p if p.is_file() and p.suffix == ".onnx" else resolve_bundle(str(ref), store))
    if len({m.resolve() for m in members}) != len(members):
        raise ValueError("the same model is given twice in the ensemble")
    return members


def open_models(targets: Sequence[Path], threads: int | None = None,
                providers: Sequence[str] | None = None) -> list[OnnxModel]:
    """ONNX Runtime sessions for the targets; ensemble members must share labels and input format."""
    models = [OnnxModel.open(ensure_onnx(t), providers=providers, threads=threads) for t in targets]
    first = models[0]
    for m in models[1:]:
        if m.labels != first.labels:
            raise ValueError(f"ensemble members disagree on labels: {first.model_id} {first.labels} vs "
                             f"{m.model_id} {m.labels}")
        a, b = first.preprocessing, m.preprocessing
        if (a.image_size, a.in_channels) != (b.image_size, b.in_channels):
            raise ValueError(f"ensemble members take different images: {first.model_id} "
                             f"{a.in_channels}x{a.image_size}px vs {m.model_id} {b.in_channels}x{b.image_size}px")
    return models


@dataclass
class Scores:
    """Per-image results of one chunk (images that decoded)."""

    top: np.ndarray  # (n,) int
    probs: np.ndarray  # (n, K) float32
    agreement: np.ndarray | None  # (n,) float32, ensembles only


def infer(models: Sequence[OnnxModel], images: np.ndarray, batch_size: int) -> Scores:
    """Batched logits of every model; ensembles average the logits, then take probabilities."""
    logits = []
    for m in models:
        parts = [m.predict(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        logits.append(np.concatenate(parts) if parts else np.zeros((0, len(m.labels)), np.float32))
    if len(models) == 1:
        probs = to_probs(logits[0]).astype(np.float32)
        return Scores(probs.argmax(1), probs, None)
    probs = to_probs(np.stack(logits).mean(axis=0)).astype(np.float32)
    top = probs.argmax(1)
    member_top = np.stack([to_probs(lg).argmax(1) for lg in logits])
    return Scores(top, probs, (member_top == top[None]).mean(axis=0).astype(np.float32))


# --- journal -----------------------------------------------------------------------------------


def _num(v: float) -> float:
    """A float32 value as the shortest decimal that reads back to it (stable text in every format)."""
    return float(str(np.float32(v)))


def display_path(rel: str) -> str:
    """A relative path as valid UTF-8 text: bytes of a non-UTF-8 file name appear as ``\\xNN``."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _chunk_name(i: int) -> str:
    return f"chunk-{i:06d}.json"


def _read_chunk(path: Path, index: int, rels: Sequence[str]) -> dict[str, Any] | None:
    """A journalled chunk, or None when it is unreadable or does not match the listing."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        done = [r[0] for r in data["rows"]] + [e[0] for e in data["errors"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        log.warning("journal chunk %s is unreadable (%s): scoring it again", path.name, e)
        return None
    if data.get("chunk") != index or sorted(done) != sorted(rels):
        log.warning("journal chunk %s does not match the folder listing: scoring it again", path.name)
        return None
    return data


class _Lock:
    """An exclusive lock on the journal (POSIX flock), so two runs never write the same output."""

    def __init__(self, journal: Path) -> None:
        self.f: IO[str] | None = open(journal / LOCK, "a")  # noqa: SIM115 - held for the run
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            self.f = None
            raise ValueError(f"another `zoo score` run is writing {journal}") from None

    def release(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def _clear_journal(journal: Path) -> None:
    """Remove the journal: manifest first, so a kill half-way leaves a journal that is ignored."""
    (journal / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(journal, ignore_errors=True)


# --- output ------------------------------------------------------------------------------------


def output_format(out: Path) -> str:
    """``csv``, ``jsonl`` or ``parquet`` from the file's extension."""
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the output format of {out.name}: use .csv, .jsonl or .parquet")
    if fmt == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ValueError("Parquet output needs pyarrow (pip install pyarrow); or write .csv / .jsonl") from None
    return fmt


def output_columns(labels: Sequence[str], ensemble: bool) -> list[str]:
    """Column names of the output, in order."""
    probs = [PROB_PREFIX + lab for lab in labels]
    return ["path", "model_id", "top_class", *probs] + (["agreement"] if ensemble else [])


def _write_output(out: Path, fmt: str, columns: list[str], rows: Iterator[list[Any]]) -> int:
    """Write the rows (``path, model_id, top_class, probs..., [agreement]``); returns their count."""
    count = 0
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols: list[list[Any]] = [[] for _ in columns]
        for row in rows:
            for c, v in zip(cols, row, strict=True):
                c.append(v)
            count += 1
        types = [pa.string()] * 3 + [pa.float32()] * (len(columns) - 3)
        table = pa.table({name: pa.array(c, type=t) for name, c, t in zip(columns, cols, types, strict=True)})
        atomic_write(out, lambda f: pq.write_table(table, f))
        return count

    def write(f: IO[bytes]) -> None:
        nonlocal count
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        if fmt == "csv":
            w = csv.writer(text, lineterminator="\n")
            w.writerow(columns)
            for row in rows:
                w.writerow(row)
                count += 1
        else:
            for row in rows:
                text.write(json.dumps(dict(zip(columns, row, strict=True)), ensure_ascii=False) + "\n")
                count += 1
        text.flush()
        text.detach()

    atomic_write(out, write)
    return count


def _count_rows(path: Path, fmt: str) -> int:
    """Rows in an existing output (for the no-op message)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "csv":
            return max(sum(1 for _ in csv.reader(f)) - 1, 0)
        return sum(1 for line in f if line.strip())


# --- the run -----------------------------------------------------------------------------------


def default_workers() -> int:
    """Decode workers: one per available core, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


@dataclass
class _Run:
    folder: Path
    out: Path
    errors_out: Path
    journal: Path
    fmt: str
    models: list[OnnxModel]
    entries: list[FileEntry]
    manifest: dict[str, Any]
    chunk_size: int
    batch_size: int
    done: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def n_chunks(self) -> int:
        return math.ceil(len(self.entries) / self.chunk_size)

    def chunk_entries(self, i: int) -> list[FileEntry]:
        return self.entries[i * self.chunk_size : (i + 1) * self.chunk_size]


def _manifest(folder: Path, entries: list[FileEntry], models: Sequence[OnnxModel], ensemble: bool,
              chunk_size: int, batch_size: int) -> dict[str, Any]:
    return {
        "journal": JOURNAL_VERSION,
        "folder": str(folder),
        "files": len(entries),
        "listing_sha256": listing_digest(entries),
        "models": [model_identity(m) for m in models],
        "ensemble": ensemble,
        "labels": models[0].labels,
        "chunk_size": chunk_size,
        "batch_size": batch_size,
    }


IDENTITY = ("journal", "folder", "files", "listing_sha256", "models", "ensemble", "labels")


def _open_journal(run: _Run) -> None:
    """Resume a matching journal (loading its valid chunks) or start a new one."""
    path = run.journal / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is unreadable ({e}); pass --overwrite to start again") from None
        diff = [k for k in IDENTITY if old.get(k) != run.manifest.get(k)]
        if diff:
            what = {"listing_sha256": "the folder's files", "files": "the number of files",
                    "models": "the model(s)", "labels": "the labels"}
            raise ValueError(
                f"{run.journal} is an unfinished run with other inputs ({', '.join(what.get(k, k) for k in diff)} "
                f"changed); pass --overwrite to discard it and start again")
        if (old["chunk_size"], old["batch_size"]) != (run.chunk_size, run.batch_size):
            log.info("resuming with the journal's chunk size %s and batch size %s",
                     old["chunk_size"], old["batch_size"])
        run.chunk_size, run.batch_size = int(old["chunk_size"]), int(old["batch_size"])
        run.manifest = old
        for i in range(run.n_chunks):
            chunk = run.journal / _chunk_name(i)
            if chunk.is_file():
                data = _read_chunk(chunk, i, [e.rel for e in run.chunk_entries(i)])
                if data is not None:
                    run.done[i] = data
        return
    for p in run.journal.iterdir():  # leftovers of a journal being removed or created when killed
        if p.name != LOCK:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    atomic_write_bytes(path, (json.dumps(run.manifest, indent=1) + "\n").encode())


def _chunk_record(index: int, entries: Sequence[FileEntry], decoded: DecodedChunk,
                  scores: Scores | None) -> dict[str, Any]:
    """The journal record of a chunk: rows ``[path, top, probs, agreement]`` and errors ``[path, reason]``."""
    rows = []
    for k, i in enumerate(decoded.ok):
        assert scores is not None
        agreement = None if scores.agreement is None else _num(scores.agreement[k])
        rows.append([entries[i].rel, int(scores.top[k]), [_num(p) for p in scores.probs[k]], agreement])
    errors = [[entries[i].rel, reason] for i, reason in sorted(decoded.errors)]
    return {"chunk": index, "rows": rows, "errors": errors}


def _score_chunks(run: _Run, workers: int, progress: bool) -> tuple[int, float]:
    """Decode and score every chunk not in the journal; returns (files processed, seconds)."""
    from tqdm import tqdm

    todo = [i for i in range(run.n_chunks) if i not in run.done]
    if not todo:
        return 0, 0.0
    prep = run.models[0].preprocessing
    already = sum(len(run.chunk_entries(i)) for i in run.done)
    decoder = Decoder(run.folder, prep, workers, depth=3)
    chunks = iter([(e.rel, e.size) for e in run.chunk_entries(i)] for i in todo)
    bar = tqdm(total=len(run.entries), initial=already, unit="img", desc="zoo score", disable=not progress,
               mininterval=0.5, smoothing=0.1, file=sys.stderr)
    processed = 0
    t0 = time.perf_counter()
    try:
        decoder.feed(chunks)
        for i in todo:
            decoded = decoder.next()
            decoder.feed(chunks)  # keep the workers busy while the engine runs
            entries = run.chunk_entries(i)
            scores = infer(run.models, decoded.images, run.batch_size) if decoded.ok else None
            record = _chunk_record(i, entries, decoded, scores)
            atomic_write_bytes(run.journal / _chunk_name(i), json.dumps(record).encode())
            run.done[i] = record
            processed += len(entries)
            bar.update(len(entries))
    except BaseException:
        decoder.close(wait=False)
        raise
    finally:
        bar.close()
    decoder.close()
    return processed, time.perf_counter() - t0


def _assemble(run: _Run, ensemble: bool) -> tuple[int, int]:
    """Write the errors file, then the output, from the journal in chunk order (both atomic)."""
    labels = run.models[0].labels
    model_id = "+".join(m.model_id for m in run.models)

    errors = [[display_path(rel), reason] for i in range(run.n_chunks) for rel, reason in run.done[i]["errors"]]

    def write_errors(f: IO[bytes]) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        w = csv.writer(text, lineterminator="\n")
        w.writerow(["path", "reason"])
        w.writerows(errors)
        text.flush()
        text.detach()

    def rows() -> Iterator[list[Any]]:
        for i in range(run.n_chunks):
            for rel, top, probs, agreement in run.done[i]["rows"]:
                yield [display_path(rel), model_id, labels[top], *probs] + ([agreement] if ensemble else [])

    atomic_write(run.errors_out, write_errors)
    n = _write_output(run.out, run.fmt, output_columns(labels, ensemble), rows())
    return n, len(errors)


def score_folder(
    folder: str | Path,
    models: Sequence[str | Path],
    out: str | Path,
    *,
    ensemble: bool = False,
    ensemble_size: int = 2,
    errors_out: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH,
    chunk_size: int = DEFAULT_CHUNK,
    workers: int | None = None,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    store: Path | None = None,
) -> ScoreSummary:
    """Score every image under ``folder`` with a model (or an ensemble) into ``out``.

    ``models``: bundle paths, bundle ids, task names or ``.onnx`` files; several (or one task
    name) with ``ensemble``. ``out``: ``.csv``, ``.jsonl`` or ``.parquet``; unreadable files go
    to ``errors_out`` (default ``<out>.errors.csv``). ``workers=0`` decodes in this process.
    Killed and started again, it resumes from ``<out>.partial/``.
    """
    folder_p = Path(folder).expanduser()
    if not folder_p.is_dir():
        raise FileNotFoundError(f"{folder_p} is not a folder")
    folder_p = folder_p.resolve()
    out_p = Path(out).expanduser().resolve()
    fmt = output_format(out_p)
    errors_p = Path(errors_out).expanduser().resolve() if errors_out else out_p.with_name(out_p.name + ".errors.csv")
    journal = out_p.with_name(out_p.name + ".partial")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch size and chunk size must be at least 1")
    workers = default_workers() if workers is None else max(0, workers)

    if (not overwrite and out_p.is_file() and not (journal / MANIFEST).is_file()):
        return ScoreSummary(out_p, errors_p, [], files=0, scored=_count_rows(out_p, fmt),
                            errors=_count_rows(errors_p, "csv") if errors_p.is_file() else 0, already_done=True)

    onnx_models = open_models(resolve_models(models, ensemble, ensemble_size, store), threads, providers)
    ensemble = len(onnx_models) > 1
    entries = list_folder(folder_p, exclude=[out_p, errors_p, journal])
    manifest = _manifest(folder_p, entries, onnx_models, ensemble, chunk_size, batch_size)
    journal.mkdir(parents=True, exist_ok=True)
    lock = _Lock(journal)
    try:
        if overwrite:
            (journal / MANIFEST).unlink(missing_ok=True)
        run = _Run(folder_p, out_p, errors_p, journal, fmt, onnx_models, entries, manifest, chunk_size, batch_size)
        _open_journal(run)
        resumed = sum(len(run.chunk_entries(i)) for i in run.done)
        if resumed:
            log.info("resuming %s: %d of %d files already done", journal, resumed, len(entries))
        processed, seconds = _score_chunks(run, workers, progress)
        n_rows, n_errors = _assemble(run, ensemble)
        _clear_journal(journal)
    finally:
        lock.release()
    return ScoreSummary(out_p, errors_p, [m.model_id for m in onnx_models], files=len(entries), scored=n_rows,
                        errors=n_errors, resumed=resumed, provider=onnx_models[0].provider, seconds=seconds,
                        processed=processed)


# --- CLI ---------------------------------------------------------------------------------------


def cmd_score(args: argparse.Namespace) -> int:
    """``zoo score``: run :func:`score_folder` and print its summary; model file problems exit 2."""
    try:
        summary = score_folder(
            args.folder, args.model, args.out, ensemble=args.ensemble, ensemble_size=args.ensemble_size,
            errors_out=args.errors, batch_size=args.batch_size, chunk_size=args.chunk_size, workers=args.workers,
            threads=args.threads, overwrite=args.overwrite, progress=not args.no_progress,
            store=Path(args.store) if getattr(args, "store", None) else None,
        )
    except ModelFileError as e:
        print(f"zoo: error: {e}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0


def register(sub: Any) -> None:
    """Add ``zoo score`` to the ``zoo`` command's sub-parsers."""
    s = sub.add_parser("score", help="score a folder of images offline into CSV, JSON Lines or Parquet",
                       description="Score every image under FOLDER (recursively). Killed and run again, "
                                   "it resumes where it stopped.")
    s.add_argument("folder", help="folder of images (searched recursively; hidden files skipped)")
    s.add_argument("--model", "-m", action="append", required=True,
                   help="bundle path, bundle id, task/dataset name (its best bundle) or .onnx file; "
                        "repeat with --ensemble")
    s.add_argument("--ensemble", action="store_true",
                   help="average the logits of several --model, or of a task's best bundles of one architecture")
    s.add_argument("--ensemble-size", type=int, default=2, help="members taken for a task name (default 2)")
    s.add_argument("--out", "-o", required=True, help="output file: .csv, .jsonl or .parquet")
    s.add_argument("--errors", help="errors file (default <out>.errors.csv)")
    s.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"inference batch (default {DEFAULT_BATCH})")
    s.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                   help=f"files per journalled chunk (default {DEFAULT_CHUNK})")
    s.add_argument("--workers", type=int, help="decode processes (default: one per core, at most 8; 0: in-process)")
    s.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own)")
    s.add_argument("--overwrite", action="store_true", help="score again even if the output exists")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_score)


__all__ = ["FileEntry", "ScoreSummary", "decode_entries", "ensemble_members", "infer", "list_folder",
           "open_models", "output_columns", "output_format", "register", "resolve_models", "score_folder"]
