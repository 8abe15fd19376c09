"""``torch.export`` (PT2) export of ``Sequential(InputAdapter, net)``: PyTorch's own successor of
TorchScript (``torch.jit`` is deprecated as of torch 2.14).

:func:`to_pt2` captures the full model (eval mode; with a detector, the ``ScoredModel`` returning
``(logits, ood_score)``) as an ``ExportedProgram`` with ``torch.export.export`` and a
``torch.export.Dim`` on the batch axis, so it takes uint8 NCHW images at ``image_size`` of any batch
size, as the ONNX and TorchScript files do; :func:`save_pt2` writes it with ``torch.export.save``
and the card subset as the archive's extra file :data:`zoo.runtime.METADATA_KEY`.

Loading (:func:`load_pt2`). ``torch.export.load`` reads the graph from JSON and plain tensors from
raw bytes, but it unpickles what the archive marks as pickled (tensor subclasses: ``torch.load``
with ``weights_only=False``; custom and opaque objects: ``pickle.loads``), retries the example
inputs with ``weights_only=False`` when the safe load fails, and loads AOTInductor shared libraries
when the archive holds some: a crafted ``.pt2`` can run code. So a file inside a bundle has its
sha256 checked against the card first, and every file is inspected before ``torch.export.load``
(:func:`check_archive`): only the entries :func:`save_pt2` writes, no pickled payload, example
inputs that load with ``weights_only=True``. Any failure is a :class:`~zoo.errors.ModelFileError`.
"""

from __future__ import annotations

import io
import json
import pickle  # its UnpicklingError only: nothing is unpickled here
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.onnx_export import OUTPUT_NAME, example_input
from zoo.card import PT2_FILE, ExportMeta
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

# The archive entries torch.export.save writes for one program without custom objects (below the
# archive's root folder); anything else (AOTInductor libraries, legacy pickled weights …) is refused.
_ALLOWED = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/(weight_\d+|model_weights_config\.json)|data/constants/(tensor_\d+|model_constants_config\.json)"
    r"|data/sample_inputs/model\.pt|extra/[^/]+)"
)


def to_pt2(model: nn.Module, prep: Preprocessing) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the full model (eval mode) with a dynamic batch axis."""
    model = model.eval()
    batch = torch.export.Dim("batch")
    try:
        with torch.no_grad():
            # strict=False: traced in Python (the detector's forward hooks run as written), as the ONNX exporter does
            return torch.export.export(model, (example_input(prep),), dynamic_shapes=({0: batch},), strict=False)
    except Exception as e:  # torch.export raises many unrelated exception types
        raise ExportError(f"torch.export.export failed: {type(e).__name__}: {_why(e)}") from e


def save_pt2(program: torch.export.ExportedProgram, meta: ExportMeta, dest: Path) -> None:
    """``torch.export.save`` with the metadata JSON as an extra file; written atomically."""
    buf = io.BytesIO()
    text = json.dumps(meta.model_dump(mode="json"), sort_keys=True)
    torch.export.save(program, buf, extra_files={METADATA_KEY: text})
    atomic_write_bytes(dest, buf.getvalue())


def _configs(zf: zipfile.ZipFile, root: str, path: str) -> dict[str, Any]:
    """A weights / constants payload config of the archive (absent: empty)."""
    name = f"{root}{path}"
    if name not in zf.namelist():
        return {}
    config = json.loads(zf.read(name)).get("config", {})
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a mapping")
    return config


def check_archive(path: Path) -> None:
    """Refuse a ``.pt2`` whose loading could run code (module docstring): entries other than those
    :func:`save_pt2` writes, pickled weights or constants, example inputs that need pickle."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            roots = {n.split("/", 1)[0] for n in names}
            if len(roots) != 1 or any("/" not in n for n in names):
                raise ValueError("not one archive folder")
            root = f"{roots.pop()}/"
            odd = [n for n in names if not _ALLOWED.fullmatch(n[len(root):])]
            if odd:
                raise ValueError(f"unexpected entries {', '.join(odd[:3])}")
            payloads = {**_configs(zf, root, "data/weights/model_weights_config.json"),
                        **_configs(zf, root, "data/constants/model_constants_config.json")}
            pickled = [k for k, v in payloads.items() if not isinstance(v, dict) or v.get("use_pickle") is not False
                       or not str(v.get("path_name", "")).startswith(("weight_", "tensor_"))]
            if pickled:
                raise ValueError(f"pickled payloads {', '.join(pickled[:3])}")
            sample = f"{root}data/sample_inputs/model.pt"
            if sample in names:  # torch.export.load would retry a failed safe load with weights_only=False
                torch.load(io.BytesIO(zf.read(sample)), weights_only=True)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, RuntimeError,
            pickle.UnpicklingError) as e:  # torch.load(weights_only=True) refuses code with UnpicklingError
        raise ModelFileError(f"{path} is not a medzoo torch.export (.pt2) file: {_why(e)}") from None


def _why(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0][:200]


@dataclass
class Pt2Model(ExportedModel):
    """A loaded ``torch.export`` file: uint8 NCHW images at ``image_size`` in, logits (and the
    ``ood_score`` of a model with a detector) out, on ``device``."""

    path: Path
    module: nn.Module
    meta: ExportMeta
    device: torch.device

    @property
    def provider(self) -> str:
        return f"torch.export ({self.device})"

    def outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """``logits`` (N, K) and, for a model with a detector, ``ood_score`` (N,), for uint8 (N, C, H, W)."""
        if images.dtype != np.uint8:
            raise ValueError("Pt2Model takes uint8 images")
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
        values = out if isinstance(out, (tuple, list)) else (out,)
        return {name: v.float().cpu().numpy() for name, v in zip((OUTPUT_NAME, OOD_OUTPUT), values, strict=False)}

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Logits (N, K) float32 for a uint8 batch (N, C, H, W)."""
        return self.outputs(images)[OUTPUT_NAME]


def load_pt2(path: str | Path, device: str | torch.device = "cpu") -> Pt2Model:
    """Load a ``torch.export`` file (a bundle directory or a file) with its metadata, on ``device``.

    Inside a bundle the file's sha256 is checked against the card before anything is read, and its
    metadata must name the bundle's weights; every file passes :func:`check_archive` before
    ``torch.export.load``. Any failure is a :class:`ModelFileError`."""
    p = export_file(path, PT2_FILE)
    card = bundle_card(p)
    if card is not None:
        verify_export(p, card)
    check_archive(p)
    extra: dict[str, Any] = {METADATA_KEY: ""}
    try:
        program = torch.export.load(str(p), extra_files=extra)
    except (RuntimeError, ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ModelFileError(f"{p} is not a readable torch.export (.pt2) file: {_why(e)}") from None
    raw = extra.get(METADATA_KEY)
    meta = parse_metadata(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else (raw or None), p)
    if card is not None:
        check_origin(p, card, meta)
    dev = torch.device(device)
    if dev.type != "cpu":  # exported on the CPU: parameters, buffers and device arguments moved together
        program = torch.export.passes.move_to_device_pass(program, dev)
    return Pt2Model(meta=meta, path=p, module=program.module(), device=dev)


__all__ = ["Pt2Model", "check_archive", "load_pt2", "save_pt2", "to_pt2"]
