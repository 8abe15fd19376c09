"""The ``zoo`` command: a thin layer over the package's functions."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zoo.bundle import BundleError
from zoo.data import DataUnavailableError
from zoo.models.registry import WeightsUnavailableError
from zoo.preprocess import ImageError
from zoo.recipe import RecipeError

# Errors a user can act on: one line on stderr, exit 2, no traceback.
USER_ERRORS = (DataUnavailableError, WeightsUnavailableError, BundleError, RecipeError, ImageError, ValueError, FileNotFoundError)


def _store(args: argparse.Namespace) -> Path | None:
    return Path(args.store) if args.store else None


def cmd_train(args: argparse.Namespace) -> int:
    from zoo.recipe import apply_overrides, find_recipe, load_recipe_file
    from zoo.train import train

    recipe = load_recipe_file(args.recipe) if args.recipe else find_recipe(args.dataset, args.arch)
    overrides: dict[str, Any] = {}
    for flag, _ in TRAIN_FLAGS:
        key = flag.replace("-", "_")
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = value
    if args.recipe:
        overrides.setdefault("dataset", args.dataset)
    recipe = apply_overrides(recipe, overrides)
    result = train(recipe, data_root=args.data_root, store=_store(args), device=args.device,
                   resume=args.resume, download=not args.offline)
    m = result.card["metrics"]
    print(f"bundle: {result.bundle}")
    print(f"val  ACC {m['val']['acc']:.4f}  AUC {m['val']['auc']:.4f}  (best epoch {m['best_epoch']})")
    print(f"test ACC {m['test']['acc']:.4f}  macro-F1 {m['test']['macro_f1']:.4f}  AUC {m['test']['auc']:.4f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from zoo.evaluate import evaluate_bundle, format_metrics
    from zoo.store import resolve_bundle

    out = evaluate_bundle(resolve_bundle(args.bundle, _store(args)), args.split, args.data_root, args.device)
    if args.json:
        print(json.dumps({"bundle": out["bundle"], "split": args.split, **out["metrics"]}))
    else:
        print(f"{out['bundle']} on {args.split}\n{format_metrics(out['metrics'])}")
    return 0


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v * 100:.1f}" if pct else f"{v:.3f}"


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from zoo.store import list_bundles

    table = Table(title="medzoo bundles")
    for col in ("id", "dataset", "arch", "test ACC %", "macro-F1", "AUC", "reported"):
        table.add_column(col)
    for _, card in list_bundles(_store(args)):
        test = card.get("metrics", {}).get("test", {})
        rep = card.get("reported", {})
        reported = f"{rep.get('metric')} {_fmt(rep.get('value'), True)}" if rep.get("value") is not None else "-"
        table.add_row(card["id"], card["dataset"]["name"], card["arch"], _fmt(test.get("acc"), True),
                      _fmt(test.get("macro_f1")), _fmt(test.get("auc")), reported)
    Console(width=200).print(table)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from zoo.models import get_spec, list_models

    for name in list_models():
        spec = get_spec(name)
        print(f"{name:16s} report {spec.report:4s} sizes {spec.sizes()}  {spec.summary}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from zoo.recipe import all_recipes

    for r in all_recipes():
        rep = f"{r.reported.metric} {r.reported.value}" if r.reported.value is not None else ""
        print(f"{r.name:28s} report {r.report:12s} {rep}")
    return 0


# Shortcut flags of `zoo train` (zoo.recipe.SHORTCUTS maps each to its recipe field); the rest
# goes through --set. Strings are parsed as YAML scalars (`--pretrained w.pth`, `--precision bf16`).
TRAIN_FLAGS = (("epochs", int), ("batch-size", int), ("lr", float), ("seed", int), ("optimizer", str),
               ("size", int), ("input-size", int), ("patience", int), ("pretrained", str), ("precision", str))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo", description="medzoo: medical image classification model zoo")
    p.add_argument("--store", help="bundle store (default $MEDZOO_HOME or ~/.medzoo)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe: zoo train DATASET ARCH")
    t.add_argument("dataset", help="derma/skin, organa/organ, path/pathology, breast, … mnist, or an image folder")
    t.add_argument("arch", help="architecture or recipe variant (zoo recipes)")
    t.add_argument("--recipe", help="a recipe YAML file instead of the built-in one")
    t.add_argument("--data-root", help="folder with the data files (default $MEDZOO_DATA or ~/.medmnist)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    t.add_argument("--resume", action="store_true", help="continue the killed run of the same recipe")
    t.add_argument("--offline", action="store_true", help="never download")
    for flag, typ in TRAIN_FLAGS:
        t.add_argument(f"--{flag}", type=typ)
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe field, e.g. train.grad_clip=0.1")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="metrics of a bundle on a split")
    e.add_argument("bundle", help="bundle path, id, or dataset name (its best bundle)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--data-root")
    e.add_argument("--device")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    sub.add_parser("list", help="the bundles in the store").set_defaults(func=cmd_list)
    sub.add_parser("models", help="registered architectures").set_defaults(func=cmd_models)
    sub.add_parser("recipes", help="built-in recipes").set_defaults(func=cmd_recipes)
    for register in _plugins():
        register(sub)
    return p


def _plugins() -> list[Callable[[Any], None]]:
    """Sub-commands defined next to the code they drive (export, score, serve)."""
    from export.cli import register as export_cmd
    from serving.cli import register as serve_cmd
    from zoo.score import register as score_cmd

    return [export_cmd, score_cmd, serve_cmd]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"zoo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
