"""``zoo explain BUNDLE IMAGE... --out DIR``: heat maps and overlays of where the model looked.

Exit codes: 0 every image explained; 2 a bundle, target or setting error, or an image that could
not be read (the others are explained and written all the same).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from zoo.errors import UsageError


def register(sub: Any) -> None:
    """Add ``zoo explain`` to the ``zoo`` command's sub-parsers."""
    p = sub.add_parser(
        "explain", help="heat maps of where a model looked (Grad-CAM; gradient saliency for MLPs)",
        description="For each IMAGE write <name>.heatmap.png and <name>.overlay.png (the heat map on the image, "
                    "224 px or more) into --out, and explanations.json with the classes and probabilities. "
                    "Convolutional networks are explained by Grad-CAM at the layer the model registry names, "
                    "MLPs by gradient saliency. The predicted class is explained unless --target is given.")
    p.add_argument("bundle", help="bundle path, bundle id, or task/dataset name (its best bundle)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, TIFF, BMP …)")
    p.add_argument("--out", "-o", required=True, help="folder for the pictures (created if missing)")
    p.add_argument("--target", help="class to explain, by index or label name (default: the predicted class)")
    p.add_argument("--top-k", type=int, default=3, help="classes listed per image (default 3)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_explain)


def _pct(entry: dict[str, Any] | None) -> str:
    return "-" if entry is None else f"{entry['label']} ({entry['prob']:.1%})"


def cmd_explain(args: argparse.Namespace) -> int:
    from zoo.explain import explain_files

    if args.top_k < 1:
        raise UsageError(f"--top-k must be a positive integer, not {args.top_k}")
    report = explain_files(args.bundle, args.images, args.out, target=args.target, top_k=args.top_k,
                           store=Path(args.store).expanduser() if getattr(args, "store", None) else None,
                           device=args.device)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        where = f" at {report.layer}" if report.layer else ""
        size = f" ({report.feature_size[0]}x{report.feature_size[1]} feature map)" if report.feature_size else ""
        print(f"{report.model['id']} ({report.model['arch']}): {report.method}{where}{size}")
        for im in report.images:
            if im.error:
                continue
            top = ", ".join(f"{t['label']} {t['prob']:.1%}" for t in im.top)
            print(f"{im.source}: predicted {_pct(im.predicted)}; explains {_pct(im.explained)}; top: {top}")
            print(f"  {im.overlay}")
        print(f"wrote {len(report.images) - len(report.failed)} overlay(s) and explanations.json in {report.out}")
    if report.note:
        print(f"zoo: warning: {report.note}", file=sys.stderr)
    for im in report.failed:
        print(f"zoo: error: {im.source}: {im.error}", file=sys.stderr)
    return 2 if report.failed else 0


__all__ = ["cmd_explain", "register"]
