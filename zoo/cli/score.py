"""``zoo score`` on the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from zoo.errors import UsageError
from zoo.score.run import DEFAULT_BATCH, DEFAULT_CHUNK
from zoo.settings import runtime_options


def cmd_score(args: argparse.Namespace) -> int:
    """``zoo score``: run :func:`score_folder` (``--ray``: :func:`score_folder_ray`) and print its
    summary (``--json``: as JSON)."""
    common: dict[str, Any] = dict(
        ensemble=args.ensemble, ensemble_size=args.ensemble_size, errors_out=args.errors,
        batch_size=args.batch_size, chunk_size=args.chunk_size, options=runtime_options(threads=args.threads),
        overwrite=args.overwrite, alpha=args.alpha, dicom_sr=args.dicom_sr,
        progress=not (args.no_progress or args.json), store=Path(args.store) if getattr(args, "store", None) else None,
    )
    if args.ray is not None:
        if args.workers is not None:
            raise UsageError("--workers sets local decode processes; with --ray, Ray sizes its decode tasks")
        from zoo.score.ray_run import score_folder_ray

        summary = score_folder_ray(args.folder, args.model, args.out, address=args.ray, num_cpus=args.ray_cpus,
                                   actors=args.actors, verbose=bool(getattr(args, "verbose", False)), **common)
    else:
        if args.actors is not None or args.ray_cpus is not None:
            raise UsageError("--actors and --ray-cpus go with --ray")
        from zoo.score.run import score_folder

        summary = score_folder(args.folder, args.model, args.out, workers=args.workers, **common)
    if args.json:
        print(json.dumps(summary.to_dict()))
    else:
        print(summary.describe())
    return 0


def register(sub: Any) -> None:
    """Add ``zoo score`` to the ``zoo`` command's sub-parsers."""
    s = sub.add_parser("score", help="score a folder of images offline into CSV, JSON Lines or Parquet",
                       description="Score every image under FOLDER (recursively). Killed and run again, "
                                   "it resumes where it stopped.")
    s.add_argument("folder", help="folder of images (searched recursively; hidden files skipped)")
    s.add_argument("--model", "-m", action="append", required=True,
                   help="bundle path, bundle id, task/dataset name (its best bundle) or .onnx file; "
                        "repeat with --ensemble")
    s.add_argument("--ensemble", action="store_true",
                   help="average the logits of several --model, or of a task's best bundles of one architecture")
    s.add_argument("--ensemble-size", type=int, default=2, help="members taken for a task name (default 2)")
    s.add_argument("--out", "-o", required=True, help="output file: .csv, .jsonl or .parquet")
    s.add_argument("--errors", help="errors file (default <out>.errors.csv)")
    s.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"inference batch (default {DEFAULT_BATCH})")
    s.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                   help=f"files per journalled chunk (default {DEFAULT_CHUNK})")
    s.add_argument("--workers", type=int, help="decode processes (default: one per core, at most 8; 0: in-process)")
    s.add_argument("--threads", type=int,
                   help="ONNX Runtime intra-op threads (default: its own; with --ray: per actor, 1 on CPUs)")
    s.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="score on Ray (pip install 'medzoo[ray]'): alone, a local Ray; 'auto', the cluster "
                        "`ray start` runs here; or a cluster address (host:6379, ray://host:10001). "
                        "Put it after FOLDER, or write --ray=ADDRESS")
    s.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray (default: this machine's cores)")
    s.add_argument("--actors", type=int,
                   help="ONNX Runtime actors with --ray (default: one per GPU, else one per two CPUs)")
    s.add_argument("--alpha", type=float, help="prediction sets at level 1 - ALPHA (default: the card's, 0.1)")
    s.add_argument("--dicom-sr", metavar="OUTDIR",
                   help="also write a DICOM structured report per scored DICOM file: OUTDIR/<SOP Instance UID>.sr.dcm "
                        "(Comprehensive SR, TID 1500: class, probability, prediction set, OOD flag and score, model)")
    s.add_argument("--overwrite", action="store_true", help="score again even if the output exists")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bar)")
    s.set_defaults(func=cmd_score)
