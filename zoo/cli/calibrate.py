"""``zoo calibrate BUNDLE``: fit calibration (chosen by evidence), conformal prediction sets and the
out-of-distribution detector for an existing bundle (on its own validation split), then export
again what was exported before (the files carry them)."""

from __future__ import annotations

import argparse
from typing import Any

from zoo.cli.commands import print_json, store_of


def cmd_calibrate(args: argparse.Namespace) -> int:
    from export.exporter import export_bundle
    from zoo.card import read_card
    from zoo.store import resolve_bundle
    from zoo.trust.fit import fit_bundle

    path = resolve_bundle(args.bundle, store_of(args))
    before = read_card(path).exports
    out = fit_bundle(path, data_root=args.data_root, ood=not args.no_ood)
    formats = [f for f in before if f != "onnx_fp16"]
    if before:
        export_bundle(path, formats=formats or ["onnx"], fp16="onnx_fp16" in before, data_root=args.data_root)
    cal, conf, ood = out["calibration"], out["conformal"], out["ood"]
    if args.json:
        print_json({"bundle": str(path), "calibration": cal.model_dump(), "conformal": conf.model_dump(),
                    "ood": ood and ood.model_dump(), "reexported": sorted(before)})
        return 0
    print(f"{path.name}: {cal.choice or cal.method}")
    for split in ("val", "test"):
        b, a = cal.metrics[split]["before"], cal.metrics[split]["after"]
        print(f"  {split:4s} ECE {b['ece']:.4f} -> {a['ece']:.4f}  Brier {b['brier']:.4f} -> {a['brier']:.4f}  "
              f"NLL {b['nll']:.4f} -> {a['nll']:.4f}")
    test = conf.metrics.get("test", {})
    print(f"  prediction sets: {conf.score.upper()}, {'class-conditional' if conf.mondrian else 'marginal'}; at "
          f"alpha {conf.alpha} test coverage {test.get('coverage', float('nan')):.3f}, mean set size "
          f"{test.get('mean_set_size', float('nan')):.2f}")
    if cal.threshold is not None:
        print(f"  decision threshold on P(class 1) (Youden's J on validation): {cal.threshold:.3f}")
    if ood is not None:
        print(f"  out-of-distribution threshold {ood.threshold:.3f}: flags {ood.rates['val_flagged']:.1%} of "
              f"validation and {ood.rates['test_flagged']:.1%} of test images")
    if before:
        print(f"  exported again: {', '.join(sorted(before))}")
    return 0


def register(sub: Any) -> None:
    """Add ``zoo calibrate`` to the ``zoo`` command."""
    c = sub.add_parser("calibrate", help="fit calibration, prediction sets and the out-of-distribution detector "
                                                 "for a bundle")
    c.add_argument("bundle", help="bundle path, id, or dataset name (its best bundle)")
    c.add_argument("--data-root", help="folder with the bundle's data (default $MEDZOO_DATA or ~/.medmnist)")
    c.add_argument("--no-ood", action="store_true", help="calibration only, no out-of-distribution detector")
    c.add_argument("--json", action="store_true", help="print the card's new sections as JSON")
    c.set_defaults(func=cmd_calibrate)
