"""Export of a bundle to ONNX (fp32 and fp16), TorchScript and ``torch.export`` (``pt2``, on
request), with the parity check.

The exported model is :func:`zoo.preprocess.adapter.full_model` — ``Sequential(InputAdapter, net)``
— so the files take **uint8 NCHW images at ``image_size``** and return logits; the preprocessing
travels inside them. Each file carries :meth:`zoo.card.Card.export_meta` (ONNX ``metadata_props``
under :data:`zoo.runtime.METADATA_KEY`, TorchScript ``_extra_files`` under the same name), so a
lone file is enough to serve it.

:func:`export_bundle` writes every file under a temporary directory inside the bundle, runs the
parity check (:mod:`export.parity`) on each, and only when all pass moves them to their final
names and records them in the card (``exports``: file, sha256, size, opset, provider, parity).
A failed export or check raises and leaves nothing behind. :func:`check_bundle` re-runs the
check on the files already exported (``zoo export BUNDLE --check``). :func:`ensure_exported` is the
one "export if missing" used by scoring, serving, the Python API and the default models.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from export import onnx_export, parity, pt2_export, torchscript_export
from zoo.bundle import load_bundle
from zoo.card import EXPORT_FILES, ONNX_FILE, read_card, update_card
from zoo.errors import ExportError, ModelFileError, ParityError, UsageError
from zoo.io import sha256_of
from zoo.runtime import RuntimeOptions
from zoo.settings import runtime_options

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")  # what `zoo export` writes by default; --fp16 adds "onnx_fp16"; "pt2" on request


def resolve_formats(formats: Sequence[str] | None, fp16: bool) -> list[str]:
    """The card keys to export: ``formats`` (default onnx + torchscript) plus ``onnx_fp16``."""
    chosen = list(formats) if formats else list(FORMATS)
    if fp16 and "onnx_fp16" not in chosen:
        chosen.append("onnx_fp16")
    unknown = [f for f in chosen if f not in EXPORT_FILES]
    if unknown:
        raise UsageError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(EXPORT_FILES)}")
    return list(dict.fromkeys(chosen))


def _record(path: Path, fmt: str, report: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "file": EXPORT_FILES[fmt],
        "sha256": sha256_of(path),
        "size": path.stat().st_size,
        **extra,
        "provider": report["provider"],
        "parity": report["parity"],
        "torch": torch.__version__,
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def export_bundle(
    path: str | Path,
    formats: Sequence[str] | None = None,
    fp16: bool = False,
    data_root: str | Path | None = None,
    options: RuntimeOptions | None = None,
    opset: int | None = None,
    batch_sizes: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Export a bundle, check parity, then move the files in and record them in the card.

    ``options``: the ONNX Runtime settings of the parity check (default :func:`zoo.settings.runtime_options`).
    Returns the card's new ``exports`` entries (one per format). Raises
    :class:`export.parity.ParityError` when a check fails, :class:`ExportError` when a format cannot
    be exported; in both cases no new file is left in the bundle and the card is unchanged.
    """
    fmts = resolve_formats(formats, fp16)
    options = runtime_options() if options is None else options
    opset = opset or onnx_export.DEFAULT_OPSET
    bundle = load_bundle(path, "cpu")
    prep = bundle.preprocessing
    inputs = parity.parity_inputs(bundle, data_root, batch_sizes or parity.BATCH_SIZES)
    reference = parity.Reference.of(bundle, inputs)
    outputs = onnx_export.output_names(bundle)
    tmp = Path(tempfile.mkdtemp(dir=bundle.path, prefix=".export-"))
    try:
        records: dict[str, dict[str, Any]] = {}
        reports: dict[str, dict[str, Any]] = {}
        proto = None
        if "onnx" in fmts or "onnx_fp16" in fmts:
            proto = onnx_export.to_onnx(bundle.exported_model, prep, opset, outputs)
        for fmt in fmts:
            dest = tmp / EXPORT_FILES[fmt]
            meta = bundle.card.export_meta(fmt)
            if fmt == "torchscript":
                traced = torchscript_export.to_torchscript(bundle.exported_model, prep)
                torchscript_export.save_torchscript(traced, meta, dest)
                extra: dict[str, Any] = {"opset": None, "precision": "fp32"}
            elif fmt == "pt2":
                pt2_export.save_pt2(pt2_export.to_pt2(bundle.exported_model, prep), meta, dest)
                extra = {"opset": None, "precision": "fp32"}
            else:
                assert proto is not None
                variant = onnx_export.to_fp16(proto) if fmt == "onnx_fp16" else proto
                onnx_export.write_onnx(variant, meta, dest)
                extra = {"opset": onnx_export.opset_of(variant),
                         "precision": "fp16" if fmt == "onnx_fp16" else "fp32"}
            reports[fmt] = parity.check_file(fmt, dest, bundle.card, inputs, reference, options)
            records[fmt] = _record(dest, fmt, reports[fmt], extra)
        parity.raise_on_failure(bundle.id, reports, "nothing was written")
        for fmt in fmts:
            os.replace(tmp / EXPORT_FILES[fmt], bundle.path / EXPORT_FILES[fmt])
        exports = {**read_card(bundle.path).exports, **records}
        card = update_card(bundle.path, exports=exports)
        return {fmt: card.exports[fmt].model_dump() for fmt in fmts}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_bundle(
    path: str | Path,
    formats: Sequence[str] | None = None,
    data_root: str | Path | None = None,
    options: RuntimeOptions | None = None,
    batch_sizes: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Re-run the parity check on a bundle's exported files (all present ones by default), on ONNX
    Runtime with ``options`` (default :func:`zoo.settings.runtime_options`).

    Each file is first verified against the card (sha256, metadata). On success the card's
    ``exports`` entries get the new parity numbers; on failure :class:`export.parity.ParityError`
    is raised and neither the files nor the card are touched.
    """
    bundle = load_bundle(path, "cpu")
    if formats:
        fmts = resolve_formats(formats, False)
        missing = [EXPORT_FILES[f] for f in fmts if not (bundle.path / EXPORT_FILES[f]).is_file()]
        if missing:
            raise ModelFileError(f"{bundle.path} has no {', '.join(missing)}; run `zoo export {bundle.path}` first")
    else:
        fmts = [f for f, name in EXPORT_FILES.items() if (bundle.path / name).is_file()]
        if not fmts:
            raise ModelFileError(f"{bundle.path} has no exported model; run `zoo export {bundle.path}` first")
    inputs = parity.parity_inputs(bundle, data_root, batch_sizes or parity.BATCH_SIZES)
    reference = parity.Reference.of(bundle, inputs)
    options = runtime_options() if options is None else options
    reports = {
        fmt: parity.check_file(fmt, bundle.path / EXPORT_FILES[fmt], bundle.card, inputs, reference, options)
        for fmt in fmts
    }
    parity.raise_on_failure(bundle.id, reports, "the card was not changed")
    exports = {k: v.model_dump() for k, v in read_card(bundle.path).exports.items()}
    checked = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for fmt in fmts:
        exports[fmt] = {**exports[fmt], "provider": reports[fmt]["provider"],
                        "parity": reports[fmt]["parity"], "checked": checked}
    card = update_card(bundle.path, exports=exports)
    return {fmt: card.exports[fmt].model_dump() for fmt in fmts}


def ensure_exported(
    path: str | Path, formats: Sequence[str] = ("onnx",), data_root: str | Path | None = None,
    options: RuntimeOptions | None = None,
) -> dict[str, Path]:
    """The one "export if missing": export the formats a bundle lacks (parity-checked, recorded
    in the card), leave the others; returns format → file. A failure is a
    :class:`~zoo.errors.ModelFileError` naming the bundle and the cause."""
    p = Path(path)
    missing = [f for f in resolve_formats(formats, False) if not (p / EXPORT_FILES[f]).is_file()]
    if missing:
        log.warning("%s has no %s yet: exporting it first", p.name, ", ".join(EXPORT_FILES[f] for f in missing))
        try:
            export_bundle(p, formats=[f for f in missing if f != "onnx_fp16"] or ["onnx"],
                          fp16="onnx_fp16" in missing, data_root=data_root, options=options)
        except (ExportError, ParityError) as e:
            raise ModelFileError(f"{p} has no {', '.join(EXPORT_FILES[f] for f in missing)} and exporting it "
                                 f"failed: {e}") from e
    return {f: p / EXPORT_FILES[f] for f in formats}


__all__ = ["FORMATS", "ONNX_FILE", "check_bundle", "ensure_exported", "export_bundle", "resolve_formats"]
