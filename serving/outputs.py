"""What the inference worker sends back for a batch: one numpy array with named fields per call.

BentoML's adaptive batching splits and joins a batchable method's answers by rows, so the answer is
one array; a structured (record) array keeps it one array while each output keeps its name:
``logits`` (K' floats per image) and, for a model with an out-of-distribution detector,
``ood_score``. :func:`to_record` and :func:`read_record` are the two ends; an ensemble's answer is
the members' records stacked on axis 1 (images × members).
"""

from __future__ import annotations

import numpy as np

from zoo.runtime import OOD_OUTPUT

LOGITS = "logits"


def to_record(outputs: dict[str, np.ndarray], with_ood: bool) -> np.ndarray:
    """A model's outputs for N images as one record array of N rows (``logits``, and ``ood_score``)."""
    logits = np.asarray(outputs[LOGITS] if LOGITS in outputs else next(iter(outputs.values())), dtype=np.float32)
    fields: list[tuple[str, type, tuple[int, ...]]] = [(LOGITS, np.float32, logits.shape[1:])]
    if with_ood:
        fields.append((OOD_OUTPUT, np.float32, ()))
    record = np.empty(len(logits), dtype=np.dtype(fields))
    record[LOGITS] = logits
    if with_ood:
        record[OOD_OUTPUT] = np.asarray(outputs[OOD_OUTPUT], dtype=np.float32).reshape(-1)
    return record


def read_record(record: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits and the OOD score (None without a detector) of a record array (any leading shape)."""
    names = record.dtype.names or ()
    return np.asarray(record[LOGITS], dtype=np.float32), (
        np.asarray(record[OOD_OUTPUT], dtype=np.float32) if OOD_OUTPUT in names else None)


__all__ = ["LOGITS", "read_record", "to_record"]
