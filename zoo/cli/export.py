"""``zoo export``: export a bundle to ONNX / TorchScript and check parity (or only check).

Exit codes: 0 exported and checked; 1 parity check failed (nothing written, card unchanged);
2 a file, bundle or export error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from zoo.card import EXPORT_FILES
from zoo.errors import ExportError, ModelFileError, ParityError


def register(sub: Any) -> None:
    """Add the ``export`` sub-command to the ``zoo`` parser."""
    p = sub.add_parser(
        "export",
        help="export a bundle to ONNX / TorchScript / torch.export with a parity check",
        description="Write model.onnx, model.torchscript.pt (and model.fp16.onnx with --fp16, model.pt2 with "
        "--format pt2) into a bundle: "
        "uint8 NCHW images in, logits out. Each file is checked against the PyTorch model at batch sizes "
        "1, 7 and 64 (and on the test split when the data are found) before it is moved into the bundle.",
    )
    p.add_argument("bundle", help="bundle path, id, or dataset name (its best bundle)")
    p.add_argument("--format", dest="formats", nargs="+", choices=["onnx", "torchscript", "pt2"],
                   help="formats to write (default: onnx torchscript); pt2: a torch.export ExportedProgram "
                        "(zoo.load(..., backend='torch') runs it)")
    p.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx (float16 weights and compute)")
    p.add_argument("--check", action="store_true",
                   help="only re-run the parity check on the files already exported (and record it)")
    p.add_argument("--data-root", help="folder with the bundle's data: parity on its real test images")
    p.add_argument("--providers", nargs="+", metavar="PROVIDER",
                   help="ONNX Runtime providers to try, best first (default: TensorRT, CUDA, CPU)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18; at least 18)")
    p.add_argument("--json", action="store_true", help="print the card's export records as JSON")
    p.set_defaults(func=cmd_export)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def _line(fmt: str, rec: dict[str, Any]) -> str:
    par = rec["parity"]
    opset = f"opset {rec['opset']}" if rec.get("opset") else ""
    text = (f"  {fmt:12s} {rec['file']:21s} {rec['size'] / 1e6:8.2f} MB  {opset:8s} {rec['provider']:24s}"
            f" max|Δ| {_num(par['max_abs_diff'])}  rel {_num(par['max_rel_diff'])}"
            f"  argmax {par['argmax_agreement']:.2%}")
    split = par.get("split")
    if split:
        text += f"  (test split {split['argmax_agreement']:.2%} of {split['n']})"
    return text + ("  ok" if par["passed"] else "  FAILED")


def cmd_export(args: argparse.Namespace) -> int:
    from export.exporter import check_bundle, export_bundle
    from zoo.settings import runtime_options
    from zoo.store import resolve_bundle

    path = resolve_bundle(args.bundle, Path(args.store) if getattr(args, "store", None) else None)
    formats = list(args.formats or [])
    options = runtime_options(**({"providers": tuple(args.providers)} if args.providers else {}))
    try:
        if args.check:
            if args.fp16:
                formats = (formats or ["onnx", "torchscript"]) + ["onnx_fp16"]
            records = check_bundle(path, formats or None, args.data_root, options)
        else:
            records = export_bundle(path, formats or None, args.fp16, args.data_root, options, args.opset)
    except ParityError as e:
        print(f"zoo: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except (ModelFileError, ExportError) as e:
        print(f"zoo: error: {_one_line(e)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"bundle": str(path), "exports": records}, indent=2))
        return 0
    first = next(iter(records.values()))
    print(f"{'checked' if args.check else 'exported'} {path.name}  (parity inputs: {first['parity']['inputs']})")
    for fmt, rec in records.items():
        print(_line(fmt, rec))
    onnx_providers = sorted({rec["provider"] for fmt, rec in records.items() if fmt not in ("torchscript", "pt2")})
    if onnx_providers:
        print(f"ONNX Runtime provider: {', '.join(onnx_providers)}")
    files = ", ".join(EXPORT_FILES[f] for f in records)
    print(f"{'checked' if args.check else 'wrote'} {files} in {path}")
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


__all__ = ["cmd_export", "register"]
