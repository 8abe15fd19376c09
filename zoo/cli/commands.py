"""The core sub-commands: ``train``, ``eval``, ``list``, ``models``, ``recipes``, ``card``.

Each imports what it needs when it runs: ``list``, ``models``, ``recipes`` and ``card`` read
cards, the registry's catalogue and recipe files only (no torch).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from zoo.recipe import SHORTCUTS, shortcut_type

# Shortcut flags of `zoo train`, one per zoo.recipe.SHORTCUTS entry (`--batch-size` sets train.batch_size),
# typed as their recipe field; the rest goes through --set. Strings are parsed as YAML scalars
# (`--pretrained w.pth`, `--precision bf16`).
TRAIN_FLAGS = tuple((name.replace("_", "-"), shortcut_type(name)) for name in SHORTCUTS)


TRAIN_HELP = {
    "seeds": "train N runs (seeds SEED, SEED+1, …) and bundle them as one ensemble model (mean of their logits); "
             "prints the ensemble bundle",
    "seed": "random seed (default: the recipe's)",
    "track": "log the run to MLflow ($MLFLOW_TRACKING_URI, default <store>/mlruns) or TensorBoard "
             "(<store>/tensorboard): mlflow, tensorboard or none (default $MEDZOO_TRACK, else none); the card "
             "records the run",
}


def store_of(args: argparse.Namespace) -> Path | None:
    store = getattr(args, "store", None)
    return Path(store).expanduser() if store else None


def print_json(obj: Any) -> None:
    """JSON on stdout; NaN (an undefined AUC) becomes null."""
    print(json.dumps(_finite(obj), indent=None))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v * 100:.1f}" if pct else f"{v:.3f}"


def recipe_from_args(args: argparse.Namespace) -> Any:
    """The recipe ``zoo train`` runs, with the flags applied: the default one for DATASET × ARCH, or
    ``--recipe``: a built-in recipe's name (``medzoo-28``; ``zoo recipes``) or a recipe YAML file."""
    from zoo.errors import RecipeError
    from zoo.recipe import ANY, apply_overrides, find_recipe, for_pair, load_recipe_file

    if args.recipe and (Path(args.recipe).is_file() or args.recipe.endswith((".yaml", ".yml"))):
        recipe = load_recipe_file(args.recipe)
        if recipe.arch == ANY:  # a protocol file: for this dataset × architecture
            recipe = for_pair(recipe, args.dataset, args.arch)
    else:
        recipe = find_recipe(args.dataset, args.arch, recipe=args.recipe)
    overrides: dict[str, Any] = {}
    for flag, _ in TRAIN_FLAGS:
        key = flag.replace("-", "_")
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = value
    if args.recipe:
        overrides.setdefault("dataset", args.dataset)
    return apply_overrides(recipe, overrides)


def _print_members(card: Any) -> None:
    if card.ensemble is None:
        return
    for m in card.ensemble.members:
        val = m.val
        print(f"  member {m.id}  seed {m.seed}  val ACC {val.acc:.4f}  AUC {val.auc:.4f}  (best epoch {m.best_epoch})")


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from zoo.train import train
    from zoo.train.distributed import close, die_with_parent, from_env, launched, torchrun_command

    if args.nproc > 1 and not launched():  # start N processes of this very command under torchrun
        import subprocess

        recipe_from_args(args)  # a wrong recipe field fails here, once, not in N processes
        return subprocess.call(torchrun_command(args.nproc, _without_nproc(args.argv)),
                               preexec_fn=die_with_parent)  # noqa: PLW1509 - torchrun dies with us
    result = train(recipe_from_args(args), data_root=args.data_root, store=store_of(args), device=args.device,
                   resume=args.resume, download=not args.offline, progress=not args.json)
    d = from_env(args.device)
    close(d)
    if d is not None and not d.main:  # rank 0 reports
        return 0
    m = result.card.metrics
    if args.json:
        members = result.card.ensemble.model_dump()["members"] if result.card.ensemble else None
        print_json({"bundle": str(result.bundle), "id": result.card.id, "best_epoch": m.best_epoch,
                    "val": m.val.model_dump(), "test": m.test.model_dump(), "members": members})
        return 0
    print(f"bundle: {result.bundle}")
    _print_members(result.card)
    print(f"val  ACC {m.val.acc:.4f}  AUC {m.val.auc:.4f}  (best epoch {m.best_epoch})")
    print(f"test ACC {m.test.acc:.4f}  macro-F1 {m.test.macro_f1:.4f}  AUC {m.test.auc:.4f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from zoo.evaluate import evaluate_bundle, format_metrics
    from zoo.store import resolve_bundle

    path = resolve_bundle(args.bundle, store_of(args))
    if args.corruptions or args.severities is not None or args.images is not None:
        return _eval_corruptions(args, path)
    out = evaluate_bundle(path, args.split, args.data_root, args.device, alpha=args.alpha)
    if args.json:
        print_json({"bundle": out["bundle"], "split": args.split, **out["metrics"]})
    else:
        print(f"{out['bundle']} on {args.split}\n{format_metrics(out['metrics'])}")
    return 0


def _eval_corruptions(args: argparse.Namespace, path: Path) -> int:
    """``zoo eval --corruptions``: MedMNIST-C on the test split, written into the card."""
    from zoo.errors import UsageError
    from zoo.evaluate import format_robustness, robustness_bundle

    if not args.corruptions:
        raise UsageError("--severities and --images go with --corruptions")
    if args.split != "test":
        raise UsageError("--corruptions evaluates the test split; leave out --split")
    info = robustness_bundle(path, args.severities, args.alpha, args.images, args.data_root,
                             args.device)
    if args.json:
        print_json({"bundle": str(path), "split": "test", "robustness": info.model_dump()})
    else:
        print(f"{path.name} under corruptions (written into its card)\n{format_robustness(info)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from zoo.benchmarks import best_published
    from zoo.store import list_bundles

    rows = []
    for path, card in list_bundles(store_of(args)):
        test, val, rep = card.metrics.test, card.metrics.val, card.reported
        best = best_published(card.dataset.name)
        rows.append({"id": card.id, "path": str(path), "dataset": card.dataset.name, "arch": card.arch,
                     "test_acc": test and test.acc, "test_macro_f1": test and test.macro_f1,
                     "test_auc": test and test.auc, "val_auc": val and val.auc, "reported_metric": rep.metric or None,
                     "reported_value": rep.value, "exports": sorted(card.exports),
                     "published_best": best and {"method": best.method, "auc": best.auc, "acc": best.acc}})
    if args.json:
        print_json(rows)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="medzoo bundles")
    for col in ("id", "dataset", "arch", "test ACC %", "macro-F1", "AUC", "reported", "best published AUC / ACC %"):
        table.add_column(col)
    for r in rows:
        reported = "-" if r["reported_value"] is None else f"{r['reported_metric']} {_fmt(r['reported_value'], True)}"
        pub = r["published_best"]
        best = "-" if pub is None else f"{_fmt(pub['auc'])} / {_fmt(pub['acc'], True)} ({pub['method']})"
        table.add_row(r["id"], r["dataset"], r["arch"], _fmt(r["test_acc"], True), _fmt(r["test_macro_f1"]),
                      _fmt(r["test_auc"]), reported, best)
    Console(width=220).print(table)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from zoo.models import get_spec, list_models

    specs = [get_spec(name) for name in list_models()]
    if args.json:
        print_json([s.describe() for s in specs])
        return 0
    for spec in specs:
        print(f"{spec.name:16s} report {spec.report:4s} sizes {spec.sizes()}  {spec.summary}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from zoo.recipe import all_recipes

    recipes = all_recipes()
    if args.json:
        print_json([{"name": r.name, "dataset": r.dataset, "arch": r.arch, "report": r.report,
                     "reported": r.reported.model_dump(), "citation": r.citation} for r in recipes])
        return 0
    for r in recipes:
        rep = f"{r.reported.metric} {r.reported.value}" if r.reported.value is not None else ""
        print(f"{r.name:28s} report {r.report:12s} {rep}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from zoo.card import read_card
    from zoo.modelcard import render, write_model_card
    from zoo.store import resolve_bundle

    path = resolve_bundle(args.bundle, store_of(args))
    if args.print:
        sys.stdout.write(render(read_card(path)))
        return 0
    print(write_model_card(path))
    return 0


def _train_parser(sub: Any) -> None:
    t = sub.add_parser("train", help="train a recipe: zoo train DATASET ARCH")
    t.add_argument("dataset", help="derma/skin, organa/organ, path/pathology, breast, … mnist, or an image folder")
    t.add_argument("arch", help="architecture or recipe variant (zoo recipes)")
    t.add_argument("--recipe", metavar="NAME|FILE",
                   help="a built-in recipe by name instead of the default, e.g. medzoo-28 or medzoo-224 (medzoo's own "
                        "recipes, for any dataset × architecture; `zoo recipes` lists all), or a recipe YAML file")
    t.add_argument("--data-root", help="folder with the data files (default $MEDZOO_DATA or ~/.medmnist)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    t.add_argument("--resume", action="store_true",
                   help="continue the killed run of the same recipe (a finished one: its bundle; with --seeds: the "
                        "members not yet finished)")
    t.add_argument("--offline", action="store_true", help="never download")
    for flag, typ in TRAIN_FLAGS:
        key = flag.replace("-", "_")
        t.add_argument(f"--{flag}", type=typ, help=TRAIN_HELP.get(key, f"sets {SHORTCUTS[key]}"))
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any recipe field, e.g. train.grad_clip=0.1")
    t.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bar)")
    t.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes (torchrun, DistributedDataParallel: gloo on CPU, NCCL on GPUs); "
                        "the recipe's batch size is per process. Several machines: run torchrun yourself")
    t.set_defaults(func=cmd_train)


def register(sub: Any) -> None:
    """Add the core sub-commands to the ``zoo`` parser."""
    _train_parser(sub)
    e = sub.add_parser("eval", help="metrics of a bundle on a split")
    e.add_argument("bundle", help="bundle path, id, or dataset name (its best bundle)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--data-root")
    e.add_argument("--device")
    e.add_argument("--alpha", type=float, metavar="A",
                   help="level of the prediction sets measured: 1 - A (default: the card's, 0.1 for 90 %% sets)")
    e.add_argument("--corruptions", action="store_true",
                   help="MedMNIST-C's acquisition artefacts for the bundle's dataset (a generic set for others) on "
                        "the test split: metrics per corruption x severity, BE / rBE; written into the card")
    e.add_argument("--severities", metavar="1-5", help="with --corruptions: which severities (1-5, 3, 1,3,5)")
    e.add_argument("--images", type=int, metavar="N",
                   help="with --corruptions: a seeded sample of N test images (default: all; at 224 px a "
                        "corruption takes 1-60 ms an image)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)
    for name, func, helptext in (("list", cmd_list, "the bundles in the store"),
                                 ("models", cmd_models, "registered architectures"),
                                 ("recipes", cmd_recipes, "built-in recipes")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--json", action="store_true", help="print as JSON")
        s.set_defaults(func=func)
    c = sub.add_parser("card", help="write a bundle's Markdown model card (README.md) from its card.json")
    c.add_argument("bundle", help="bundle path, id, or dataset name (its best bundle)")
    c.add_argument("--print", action="store_true", help="print the Markdown instead of writing README.md")
    c.set_defaults(func=cmd_card)


__all__ = ["TRAIN_FLAGS", "print_json", "recipe_from_args", "register", "store_of"]
