"""What the inference worker sends back for a batch: one float32 array per call, so that BentoML's
adaptive batching can split it by rows. A model with an out-of-distribution detector returns its
``ood_score`` as one more column after the logits; :func:`pack` and :func:`unpack` are the two
ends of that layout (``has_ood`` in the model's description says which)."""

from __future__ import annotations

import numpy as np

from zoo.runtime import OOD_OUTPUT


def pack(outputs: dict[str, np.ndarray], with_ood: bool) -> np.ndarray:
    """(N, K') logits, or (N, K' + 1) with the OOD score as the last column."""
    logits = np.asarray(next(iter(outputs.values())), dtype=np.float32)
    if not with_ood:
        return logits
    return np.concatenate([logits, np.asarray(outputs[OOD_OUTPUT], dtype=np.float32).reshape(-1, 1)], axis=1)


def unpack(values: np.ndarray, with_ood: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits and the OOD score (None without a detector) of a packed array (rows on axis 0 or -2)."""
    values = np.asarray(values, dtype=np.float32)
    if not with_ood:
        return values, None
    return values[..., :-1], values[..., -1]


__all__ = ["pack", "unpack"]
