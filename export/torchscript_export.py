"""TorchScript export of ``Sequential(InputAdapter, net)``: traced on a uint8 batch, saved with
the card subset in ``_extra_files`` (key :data:`zoo.runtime.METADATA_KEY`), loaded with checks.

Tracing fixes the input contract (uint8 at ``image_size``, as the ONNX file) and works for every
architecture of the registry; the batch axis stays free, which the parity check verifies at batch
sizes 1, 7 and 64. ``torch.jit`` is deprecated in torch 2.x (it still works); its
``FutureWarning`` is silenced here so that ``zoo export`` output stays readable.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.onnx_export import OUTPUT_NAME, example_input
from zoo.card import TORCHSCRIPT_FILE, ExportMeta
from zoo.errors import ExportError, ModelFileError
from zoo.io import atomic_write_bytes
from zoo.preprocess import Preprocessing
from zoo.runtime import (
    METADATA_KEY,
    OOD_OUTPUT,
    ExportedModel,
    bundle_card,
    check_origin,
    export_file,
    parse_metadata,
    verify_export,
)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide torch.jit's deprecation and tracer warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def to_torchscript(model: nn.Module, prep: Preprocessing) -> torch.jit.ScriptModule:
    """Trace the full model (eval mode) on a uint8 example batch."""
    model = model.eval()
    try:
        with _quiet(), torch.no_grad():
            return torch.jit.trace(model, example_input(prep), check_trace=False)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ExportError(f"torch.jit.trace failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e


def save_torchscript(module: torch.jit.ScriptModule, meta: ExportMeta, dest: Path) -> None:
    """Save with the metadata JSON as an extra file; written atomically."""
    buf = io.BytesIO()
    with _quiet():
        text = json.dumps(meta.model_dump(mode="json"), sort_keys=True)
        torch.jit.save(module, buf, _extra_files={METADATA_KEY: text})
    atomic_write_bytes(dest, buf.getvalue())


@dataclass
class TorchScriptModel(ExportedModel):
    """A loaded TorchScript export: uint8 NCHW images at ``image_size`` in, logits out (CPU)."""

    path: Path
    module: torch.jit.ScriptModule
    meta: ExportMeta

    @property
    def provider(self) -> str:
        return "TorchScript (cpu)"

    def outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """``logits`` (N, K) and, for a model with a detector, ``ood_score`` (N,), for uint8 (N, C, H, W)."""
        if images.dtype != np.uint8:
            raise ValueError("TorchScriptModel takes uint8 images")
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(images)))
        values = out if isinstance(out, tuple) else (out,)
        return {name: v.float().numpy() for name, v in zip((OUTPUT_NAME, OOD_OUTPUT), values, strict=False)}

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Logits (N, K) float32 for a uint8 batch (N, C, H, W)."""
        return self.outputs(images)[OUTPUT_NAME]


def load_torchscript(path: str | Path) -> TorchScriptModel:
    """Load a TorchScript export (a bundle directory or a file) with its metadata.

    Inside a bundle the file's sha256 is checked against the card before it is deserialised, and
    its metadata must name the bundle's weights. Any failure is a :class:`ModelFileError`.
    """
    p = export_file(path, TORCHSCRIPT_FILE)
    card = bundle_card(p)
    if card is not None:
        verify_export(p, card)
    extra: dict[str, Any] = {METADATA_KEY: ""}
    try:
        with _quiet():
            module = torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError, EOFError) as e:
        raise ModelFileError(f"{p} is not a readable TorchScript file: {str(e).splitlines()[0][:200]}") from None
    raw = extra.get(METADATA_KEY)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFileError(f"{p} has corrupt medzoo metadata (not UTF-8)") from None
    meta = parse_metadata(raw or None, p)
    if card is not None:
        check_origin(p, card, meta)
    return TorchScriptModel(path=p, module=module.eval(), meta=meta)


__all__ = ["TorchScriptModel", "load_torchscript", "save_torchscript", "to_torchscript"]
