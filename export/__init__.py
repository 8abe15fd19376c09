"""Export of bundles to ONNX, TorchScript and ``torch.export`` with a parity check (``zoo export``).

Modules: :mod:`export.exporter` (export, check, "export if missing"), :mod:`export.onnx_export`,
:mod:`export.torchscript_export`, :mod:`export.pt2_export`, :mod:`export.parity`, :mod:`export.cli`. This
package file only re-exports; no submodule imports it back.
"""

from export.exporter import FORMATS, check_bundle, ensure_exported, export_bundle, resolve_formats
from zoo.errors import ExportError, ParityError

__all__ = ["FORMATS", "ExportError", "ParityError", "check_bundle", "ensure_exported", "export_bundle",
           "resolve_formats"]
