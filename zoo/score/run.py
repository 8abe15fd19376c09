"""The scoring run: list the folder, decode and infer chunk by chunk, journal, assemble the output."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from zoo.errors import UsageError
from zoo.io import atomic_write, atomic_write_bytes, display_name
from zoo.postprocess import check_alpha, prediction_sets, set_labels
from zoo.runtime import OnnxModel, RuntimeOptions
from zoo.score.decode import Decoder, default_workers
from zoo.score.dicom_reports import ReportCount, write_reports
from zoo.score.journal import (
    MANIFEST,
    Run,
    chunk_name,
    chunk_record,
    clear_journal,
    journal_manifest,
    lock_journal,
    open_journal,
)
from zoo.score.listing import FileEntry, list_folder
from zoo.score.models import infer, open_models, resolve_models, sets_conformal
from zoo.score.output import SET_SEPARATOR, count_rows, output_columns, output_format, write_output
from zoo.settings import runtime_options

log = logging.getLogger(__name__)

DEFAULT_BATCH = 64
DEFAULT_CHUNK = 512


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
    reports: ReportCount | None = None  # with --dicom-sr: the DICOM structured reports written

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-friendly values (``zoo score --json``)."""
        rate = self.images_per_s
        return {"out": str(self.out), "errors_out": str(self.errors_out), "models": self.models,
                "files": self.files, "scored": self.scored, "errors": self.errors, "resumed": self.resumed,
                "already_done": self.already_done, "provider": self.provider, "seconds": round(self.seconds, 3),
                "processed": self.processed, "images_per_s": None if rate != rate else round(rate, 2),
                **({"dicom_sr": {"out": str(self.reports.out), "written": self.reports.written,
                                 "not_dicom": self.reports.not_dicom, "unreferenced": self.reports.unreferenced}}
                   if self.reports is not None else {})}

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
        if self.reports is not None:
            lines.append(self.reports.describe())
        return "\n".join(lines)


def _score_chunks(run: Run, workers: int, progress: bool) -> tuple[int, float]:
    """Decode and score every chunk not in the journal; returns (files processed, seconds)."""
    from tqdm import tqdm

    todo = [i for i in range(run.n_chunks) if i not in run.done]
    if not todo:
        return 0, 0.0
    prep = run.models[0].preprocessing
    already = sum(len(run.chunk_entries(i)) for i in run.done)
    decoder = Decoder(run.folder, prep, workers, depth=3)
    chunks = iter(run.chunk_entries(i) for i in todo)
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
            record = chunk_record(i, entries, decoded, scores)
            atomic_write_bytes(run.journal / chunk_name(i), json.dumps(record).encode())
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


def _assemble(run: Run, ensemble: bool) -> tuple[int, int]:
    """Write the errors file, then the output, from the journal in chunk order (both atomic)."""
    labels = run.models[0].labels
    model_id = "+".join(m.id for m in run.models)

    errors = [[display_name(rel), reason] for i in range(run.n_chunks) for rel, reason in run.done[i]["errors"]]

    def write_errors(f: IO[bytes]) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        w = csv.writer(text, lineterminator="\n")
        w.writerow(["path", "reason"])
        w.writerows(errors)
        text.flush()
        text.detach()

    calibrated = all(m.meta.calibration is not None for m in run.models)
    ood = all(m.has_ood for m in run.models)
    # the sets from the journal's probabilities (float32 written exactly): the same as HTTP and Python give
    conformal = sets_conformal(run.models)

    def rows() -> Iterator[list[Any]]:
        for i in range(run.n_chunks):
            for rel, top, probs, agreement, ood_score, flag in run.done[i]["rows"]:
                plausible = []
                if conformal is not None:
                    p = np.asarray(probs, np.float32)
                    plausible = [SET_SEPARATOR.join(set_labels(prediction_sets(p[None], conformal, run.alpha)[0], p,
                                                               labels))]
                yield ([display_name(rel), model_id, labels[top], *probs] + ([agreement] if ensemble else [])
                       + [calibrated] + ([ood_score, flag] if ood else []) + plausible)

    atomic_write(run.errors_out, write_errors)
    n = write_output(run.out, run.fmt, output_columns(labels, ensemble, ood, conformal is not None), rows())
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
    options: RuntimeOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
    store: Path | None = None,
    alpha: float | None = None,
    dicom_sr: str | Path | None = None,
) -> ScoreSummary:
    """Score every image under ``folder`` with a model (or an ensemble) into ``out``.

    ``models``: bundle paths, bundle ids, task names or ``.onnx`` files; several (or one task
    name) with ``ensemble``. ``out``: ``.csv``, ``.jsonl`` or ``.parquet``; unreadable files go
    to ``errors_out`` (default ``<out>.errors.csv``). ``workers=0`` decodes in this process.
    ``options``: how ONNX Runtime runs (default :func:`zoo.settings.runtime_options`, the environment's).
    ``alpha``: the prediction sets' level 1 − ``alpha`` (default: the card's). ``dicom_sr``: a folder
    for a DICOM structured report per scored DICOM file (:mod:`zoo.score.dicom_reports`). Killed and
    started again, it resumes from ``<out>.partial/``.
    """
    paths = ScorePaths.of(folder, out, errors_out)
    alpha = check_alpha(alpha)
    if batch_size < 1 or chunk_size < 1:
        raise UsageError("batch size and chunk size must be at least 1")
    workers = default_workers() if workers is None else max(0, workers)
    if not overwrite and paths.finished():
        return paths.already_done()
    options = runtime_options() if options is None else options
    onnx_models = open_models(resolve_models(models, ensemble, ensemble_size, store), options)
    entries = list_folder(paths.folder, exclude=[paths.out, paths.errors, paths.journal])
    return run_journalled(paths, onnx_models, entries, chunk_size, batch_size, overwrite,
                          lambda run: _score_chunks(run, workers, progress), alpha, dicom_sr)


@dataclass(frozen=True)
class ScorePaths:
    """The folder scored and every file a run writes (output, errors file, journal)."""

    folder: Path
    out: Path
    fmt: str
    errors: Path
    journal: Path

    @classmethod
    def of(cls, folder: str | Path, out: str | Path, errors_out: str | Path | None = None) -> ScorePaths:
        folder_p = Path(folder).expanduser()
        if not folder_p.is_dir():
            raise UsageError(f"{folder_p} is not a folder")
        out_p = Path(out).expanduser().resolve()
        errors_p = out_p.with_name(out_p.name + ".errors.csv")
        if errors_out:
            errors_p = Path(errors_out).expanduser().resolve()
        return cls(folder_p.resolve(), out_p, output_format(out_p), errors_p, out_p.with_name(out_p.name + ".partial"))

    def finished(self) -> bool:
        """The output exists and no journal is left: an earlier run completed."""
        return self.out.is_file() and not (self.journal / MANIFEST).is_file()

    def already_done(self) -> ScoreSummary:
        errors = count_rows(self.errors, "csv") if self.errors.is_file() else 0
        return ScoreSummary(self.out, self.errors, [], files=0, scored=count_rows(self.out, self.fmt), errors=errors,
                            already_done=True)


def run_journalled(paths: ScorePaths, models: Sequence[OnnxModel], entries: list[FileEntry], chunk_size: int,
                   batch_size: int, overwrite: bool, score: Callable[[Run], tuple[int, float]],
                   alpha: float | None = None, dicom_sr: str | Path | None = None) -> ScoreSummary:
    """Open (or resume) the journal under its lock, let ``score`` fill the missing chunks, then
    assemble the output (prediction sets at level 1 − ``alpha``; with ``dicom_sr`` the DICOM
    structured reports) and remove the journal. Shared by local and Ray scoring."""
    ensemble = len(models) > 1
    manifest = journal_manifest(paths.folder, entries, models, ensemble, chunk_size, batch_size)
    paths.journal.mkdir(parents=True, exist_ok=True)
    lock = lock_journal(paths.journal)
    try:
        if overwrite:
            (paths.journal / MANIFEST).unlink(missing_ok=True)
        run = Run(paths.folder, paths.out, paths.errors, paths.journal, paths.fmt, list(models), entries, manifest,
                  chunk_size, batch_size, alpha=alpha)
        open_journal(run)
        resumed = sum(len(run.chunk_entries(i)) for i in run.done)
        if resumed:
            log.info("resuming %s: %d of %d files already done", paths.journal, resumed, len(entries))
        processed, seconds = score(run)
        n_rows, n_errors = _assemble(run, ensemble)
        reports = None
        if dicom_sr is not None:
            reports = write_reports(run, Path(dicom_sr).expanduser().resolve(), sets_conformal(run.models))
        clear_journal(paths.journal)
    finally:
        lock.release()
    return ScoreSummary(paths.out, paths.errors, [m.id for m in models], files=len(entries), scored=n_rows,
                        errors=n_errors, resumed=resumed, provider=models[0].provider, seconds=seconds,
                        processed=processed, reports=reports)
