"""``zoo reproduce REPORT``: train every recipe of a report (000 … 004, medmnist-v2, all) and write
the comparison with the report's numbers and the published benchmark (:mod:`zoo.reproduce`)."""

from __future__ import annotations

import argparse
from typing import Any

from zoo.cli.commands import print_json, store_of
from zoo.errors import UsageError

REPORT_CHOICES = ("000", "001", "002", "003", "004", "medmnist-v2", "all")


def _folders(items: list[str] | None) -> dict[str, str]:
    from zoo.names import resolve_name

    out = {}
    for item in items or []:
        name, sep, folder = item.partition("=")
        if not sep or not folder:
            raise UsageError(f"--folder expects NAME=PATH (e.g. isic2019=/data/isic), got {item!r}")
        out[resolve_name(name)] = folder
    return out


def _list(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def cmd_reproduce(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from zoo.reproduce import reproduce

    datasets = [d for d in (args.datasets or "").split(",") if d] or None
    if datasets == ["all"]:
        from zoo.reproduce import V2_DATASETS

        datasets = list(V2_DATASETS)
    out = reproduce(args.report, store=store_of(args), data_root=args.data_root, datasets=datasets,
                    epochs=args.epochs, quick=args.quick, download=not args.offline, device=args.device,
                    folders=_folders(args.folder), archs=_list(args.archs), sizes=[int(x) for x in _list(args.sizes)],
                    resume=args.resume, progress=not args.json,
                    say=(lambda _: None) if args.json else print, track=args.track)
    if args.json:
        print_json({rep: [asdict(r) for r in rows] for rep, rows in out.items()})
    failed = sum(r.status != "ok" for rows in out.values() for r in rows)
    return 1 if failed and not any(r.status == "ok" for rows in out.values() for r in rows) else 0


def register(sub: Any) -> None:
    """Add the ``reproduce`` sub-command to the ``zoo`` parser."""
    p = sub.add_parser(
        "reproduce", help="train every recipe of a report and compare with its numbers and the benchmark",
        description="Train every built-in recipe of REPORT (000 … 004: the source reports; medmnist-v2: the "
        "MedMNIST v2 protocol, ResNet-18/50 at 28 and 224 px, on the MedMNIST 2D files found in the data folder "
        "or those of --datasets; all: every report), then write comparison.md and comparison.csv in "
        "<store>/reproduce/REPORT/: ours beside the report's own number and the published MedMNIST v2 rows. "
        "A recipe whose data is missing is a row saying so.")
    p.add_argument("report", choices=REPORT_CHOICES, help="the report to reproduce")
    p.add_argument("--data-root", help="folder with the MedMNIST files (default $MEDZOO_DATA or ~/.medmnist)")
    p.add_argument("--datasets", help="comma-separated datasets to train (default: medmnist-v2 the files found, "
                   "a report its own); 'all' = every single-label MedMNIST 2D set (downloaded when online)")
    p.add_argument("--archs", help="medmnist-v2: the model rows to train, e.g. resnet18 (default resnet18,resnet50)")
    p.add_argument("--sizes", help="medmnist-v2: the input sizes of the rows, e.g. 28 (default 28,224)")
    p.add_argument("--folder", action="append", metavar="NAME=PATH",
                   help="an image-folder dataset's folder (reports 003, 004): isic2019=PATH, binaryskin=PATH")
    p.add_argument("--epochs", type=int, help="train every recipe for N epochs (a shortened reproduction)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 epoch of 2 batches per recipe (not a result)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--offline", action="store_true", help="never download")
    p.add_argument("--resume", action="store_true",
                   help="go on with an interrupted reproduction: killed runs continue, finished recipes are kept")
    p.add_argument("--track", choices=["mlflow", "tensorboard", "none"],
                   help="log one run per recipe to MLflow or TensorBoard (default $MEDZOO_TRACK, else none)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_reproduce)


__all__ = ["cmd_reproduce", "register"]
