"""``zoo score --dicom-sr OUTDIR``: a DICOM Structured Report (:mod:`zoo.dicom_sr`) per scored DICOM file.

Written from the journal when the run assembles its output, so a resumed run writes them as an
uninterrupted one does: ``OUTDIR/<source SOP Instance UID>.sr.dcm``, each atomically, with the answer
of the output row (class, probability, prediction set, out-of-distribution flag and score, the
ensemble's agreement). Files that are not DICOM get none; a DICOM file without
the UIDs a report references gets none either (logged). One SR series per source study and run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zoo.card import ConformalInfo
from zoo.io import atomic_write_bytes
from zoo.postprocess import prediction_sets, set_labels
from zoo.score.journal import Run

log = logging.getLogger(__name__)


@dataclass
class ReportCount:
    """What ``--dicom-sr`` wrote."""

    out: Path
    written: int = 0
    not_dicom: int = 0  # scored files that are not DICOM
    unreferenced: int = 0  # DICOM files without the UIDs an SR references (or unreadable by now)

    def describe(self) -> str:
        line = f"{self.written} DICOM structured reports -> {self.out}"
        if self.not_dicom:
            line += f"; {self.not_dicom} scored files are not DICOM (no report)"
        if self.unreferenced:
            line += f"; {self.unreferenced} DICOM files lack the UIDs a report references (no report)"
        return line


def _answer(row: list[Any], run: Run, conformal: ConformalInfo | None, models: list[Any]) -> Any:
    """The :class:`zoo.dicom_sr.SRAnswer` of a journal row ``[path, top, probs, agreement, ood, flag]``."""
    from zoo.dicom_sr import SRAnswer

    _, top, probs, agreement, ood_score, flag = row
    meta = run.models[0].meta
    plausible = alpha = None
    if conformal is not None:
        p = np.asarray(probs, np.float32)
        plausible = set_labels(prediction_sets(p[None], conformal, run.alpha)[0], p, meta.labels)
        alpha = run.alpha if run.alpha is not None else conformal.alpha
    return SRAnswer(dataset=meta.dataset or meta.id, labels=meta.labels, predicted=top, probability=probs[top],
                    prediction_set=plausible, alpha=alpha, ood_score=ood_score, in_distribution=flag,
                    agreement=agreement, models=models)


def write_reports(run: Run, out: Path, conformal: ConformalInfo | None) -> ReportCount:
    """One SR per scored DICOM file of ``run`` into the folder ``out`` (module docstring)."""
    from zoo import dicom_sr  # highdicom: imported when reports are asked for

    out.mkdir(parents=True, exist_ok=True)
    models = [dicom_sr.ModelIdentity(id=m.id, weights_sha256=m.meta.weights_sha256) for m in run.models]
    count, series = ReportCount(out), dicom_sr.SeriesUIDs()
    for i in range(run.n_chunks):
        for row in run.done[i]["rows"]:
            path = run.folder / row[0]
            try:
                if not dicom_sr.is_dicom_file(path):
                    count.not_dicom += 1
                    continue
                source = dicom_sr.source_header(path)
            except (OSError, dicom_sr.DicomSRError) as e:
                log.warning("no DICOM structured report for %s: %s", row[0], e)
                count.unreferenced += 1
                continue
            sr = dicom_sr.build_sr(source, _answer(row, run, conformal, models), *series.next(source))
            atomic_write_bytes(out / f"{source.SOPInstanceUID}{dicom_sr.SR_SUFFIX}", dicom_sr.sr_bytes(sr))
            count.written += 1
    return count
