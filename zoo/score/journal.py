"""The journal of a scoring run (``<out>.partial/``): what makes a killed run resumable."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zoo.ensemble import EnsemblePredictions
from zoo.errors import UsageError
from zoo.io import FileLock, atomic_write_bytes, file_lock
from zoo.postprocess import Predictions
from zoo.runtime import OnnxModel
from zoo.score.decode import DecodedChunk
from zoo.score.listing import FileEntry, listing_digest
from zoo.score.models import model_identity

log = logging.getLogger(__name__)

JOURNAL_VERSION = 2  # 2: rows carry the out-of-distribution score and flag
MANIFEST = "manifest.json"
LOCK = "lock"


def _num(v: float) -> float:
    """A float32 value as the shortest decimal that reads back to it (stable text in every format)."""
    return float(str(np.float32(v)))


def chunk_name(i: int) -> str:
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


def lock_journal(journal: Path) -> FileLock:
    """The exclusive lock on the journal (:func:`zoo.io.file_lock`), so two runs never write the same
    output; :class:`~zoo.errors.UsageError` when another run holds it."""
    lock = file_lock(journal / LOCK, blocking=False)
    if lock is None:
        raise UsageError(f"another `zoo score` run is writing {journal}")
    return lock


def clear_journal(journal: Path) -> None:
    """Remove the journal: manifest first, so a kill half-way leaves a journal that is ignored."""
    (journal / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(journal, ignore_errors=True)


@dataclass
class Run:
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
    alpha: float | None = None  # the prediction sets' level 1 − alpha (None: the card's)

    @property
    def n_chunks(self) -> int:
        return math.ceil(len(self.entries) / self.chunk_size)

    def chunk_entries(self, i: int) -> list[FileEntry]:
        return self.entries[i * self.chunk_size : (i + 1) * self.chunk_size]


def journal_manifest(folder: Path, entries: list[FileEntry], models: Sequence[OnnxModel], ensemble: bool,
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


def open_journal(run: Run) -> None:
    """Resume a matching journal (loading its valid chunks) or start a new one."""
    path = run.journal / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UsageError(f"{path} is unreadable ({e}); pass --overwrite to start again") from None
        diff = [k for k in IDENTITY if old.get(k) != run.manifest.get(k)]
        if diff:
            what = {"listing_sha256": "the folder's files", "files": "the number of files",
                    "models": "the model(s)", "labels": "the labels"}
            raise UsageError(
                f"{run.journal} is an unfinished run with other inputs ({', '.join(what.get(k, k) for k in diff)} "
                f"changed); pass --overwrite to discard it and start again")
        if (old["chunk_size"], old["batch_size"]) != (run.chunk_size, run.batch_size):
            log.info("resuming with the journal's chunk size %s and batch size %s",
                     old["chunk_size"], old["batch_size"])
        run.chunk_size, run.batch_size = int(old["chunk_size"]), int(old["batch_size"])
        run.manifest = old
        for i in range(run.n_chunks):
            chunk = run.journal / chunk_name(i)
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


def chunk_record(index: int, entries: Sequence[FileEntry], decoded: DecodedChunk,
                 scores: Predictions | None) -> dict[str, Any]:
    """The journal record of a chunk: rows ``[path, top, probs, agreement, ood_score, in_distribution]``
    and errors ``[path, reason]``."""
    rows = []
    for k, i in enumerate(decoded.ok):
        assert scores is not None
        agreement = _num(scores.agreement[k]) if isinstance(scores, EnsemblePredictions) else None
        ood = None if scores.ood_score is None else _num(scores.ood_score[k])
        flag = None if scores.in_distribution is None else bool(scores.in_distribution[k])
        rows.append([entries[i].rel, int(scores.classes[k]), [_num(p) for p in scores.probs[k]], agreement, ood, flag])
    errors = [[entries[i].rel, reason] for i, reason in sorted(decoded.errors)]
    return {"chunk": index, "rows": rows, "errors": errors}
