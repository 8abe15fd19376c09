"""``zoo tune`` on the command line: an Optuna study over a recipe's ``tune:`` search space."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from zoo.cli.commands import TRAIN_FLAGS, print_json, recipe_from_args, store_of


def cmd_tune(args: argparse.Namespace) -> int:
    """Run this worker's trials (:func:`zoo.tune.tune`) and print the study's summary."""
    import optuna

    from zoo.tune import tune

    # Optuna's own line per trial only with -v; zoo tune prints its own (stderr), or nothing with --json
    optuna.logging.set_verbosity(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    summary = tune(recipe_from_args(args), args.trials, study=args.study, storage=args.storage, store=store_of(args),
                   data_root=args.data_root, device=args.device, download=not args.offline, timeout=args.timeout,
                   max_trials=args.max_trials, seed=args.seed, progress=not args.json)
    if args.json:
        print_json(summary.to_dict())
    else:
        print(summary.describe())
    return 0


def register(sub: Any) -> None:
    """Add ``zoo tune`` to the ``zoo`` command's sub-parsers."""
    t = sub.add_parser(
        "tune", help="tune a recipe's hyper-parameters with Optuna: zoo tune DATASET ARCH --trials N",
        description="Run N trials of an Optuna study over the recipe's tune: search space, keep the best "
                    "trial's bundle (chosen on validation). Start several on one --storage to share the study.")
    t.add_argument("dataset", help="derma/skin, organa/organ, path/pathology, breast, … mnist, or an image folder")
    t.add_argument("arch", help="architecture or recipe variant (zoo recipes); its recipe needs a tune: section")
    t.add_argument("--trials", type=int, default=10, help="trials this worker runs (default 10)")
    t.add_argument("--max-trials", type=int,
                   help="stop once the study holds this many finished (complete or pruned) trials, all workers counted")
    t.add_argument("--timeout", type=float, help="seconds this worker may run (the running trial finishes)")
    t.add_argument("--study", help="study name (default DATASET-ARCH)")
    t.add_argument("--storage",
                   help="an RDB URL (postgresql://…, mysql+pymysql://…, sqlite:///…) or an Optuna journal file "
                        "(default <store>/studies/<study>.journal)")
    t.add_argument("--seed", type=int, help="sampler seed (one worker: a reproducible sequence of trials)")
    t.add_argument("--recipe", help="a recipe YAML file instead of the built-in one")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe field for every trial, e.g. train.seed=1")
    t.add_argument("--data-root", help="folder with the data files (default $MEDZOO_DATA or ~/.medmnist)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    t.add_argument("--offline", action="store_true", help="never download")
    t.add_argument("--track", choices=["mlflow", "tensorboard", "none"],
                   help="log the study as a run and each trial as its child run, to MLflow or TensorBoard "
                        "(default $MEDZOO_TRACK, else none)")
    t.add_argument("--json", action="store_true", help="print the summary as JSON (no per-trial lines)")
    # recipe_from_args reads zoo train's shortcut flags; zoo tune leaves them to the search space
    t.set_defaults(func=cmd_tune, **{flag.replace("-", "_"): None for flag, _ in TRAIN_FLAGS})
