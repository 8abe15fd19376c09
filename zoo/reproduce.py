"""``zoo reproduce REPORT``: train every recipe of a report, then compare with what was published.

An orchestration above the applications (it trains, reads the benchmarks and writes tables), like
:mod:`zoo.bootstrap`. ``REPORT`` is one of the source reports ``000`` … ``004`` (every built-in
recipe citing it), ``medmnist-v2`` (the MedMNIST v2 protocol for ResNet-18 and ResNet-50 at 28 px
and at 224 px — the four model rows of the benchmark's Table 3 — on the MedMNIST 2D datasets
found in the data folder, or those named by ``datasets``), or ``all``.

Each recipe is trained with :func:`zoo.train.train` (data downloaded where the machine is online,
unless ``download`` is off); one that fails (its data missing, say) becomes a row saying why, and
the others go on. The comparison — our number on the report's own metric beside the report's
number, and our test AUC / ACC beside the published MedMNIST v2 row of the same model and the best
published one — is written as ``comparison.md`` and ``comparison.csv`` in
``<store>/reproduce/<report>/``, beside the bundles.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zoo.benchmarks import best_published, published_for
from zoo.card import Card
from zoo.errors import UserError, unknown
from zoo.io import atomic_write_bytes
from zoo.names import MEDMNIST_2D, resolve_name
from zoo.recipe import PROTOCOL, Recipe, all_recipes, apply_overrides, find_recipe
from zoo.store import home

log = logging.getLogger(__name__)

REPORTS = ("000", "001", "002", "003", "004", PROTOCOL)
# MedMNIST v2's model rows: (architecture, input size, ResNet stem)
V2_ROWS = (("resnet18", 28, "small"), ("resnet50", 28, "small"), ("resnet18", 224, "imagenet"),
           ("resnet50", 224, "imagenet"))
# Single-label 2D sets (chestmnist is multi-label: medzoo trains single-label classifiers)
V2_DATASETS = tuple(f for f in MEDMNIST_2D if f != "chestmnist")
# --quick: a smoke run of the whole pipeline, not a result
QUICK = {"train.epochs": 1, "train.batch_size": 16, "train.max_batches": 2, "train.seeds": 1}


@dataclass
class Row:
    """One trained (or failed) recipe and how it compares."""

    report: str
    recipe: str
    dataset: str
    arch: str
    input_px: int
    status: str = "ok"
    bundle: str = ""
    epochs: int | None = None
    test_acc: float | None = None
    test_auc: float | None = None
    metric: str = ""  # the report's own metric (test_acc, val_acc, test_auc)
    ours: float | None = None  # our value of that metric
    reported: float | None = None  # the report's number
    published: str = ""  # the published MedMNIST v2 row of this very model (AUC / ACC)
    best_published: str = ""  # the best published row on this dataset
    time_s: float | None = None
    note: str = field(default="", repr=False)


def v2_recipes(datasets: Sequence[str], archs: Sequence[str] | None = None,
               sizes: Sequence[int] | None = None) -> list[Recipe]:
    """The MedMNIST v2 protocol for each dataset × model row of its Table 3 (``archs`` / ``sizes``
    keep some of the rows)."""
    rows = [(a, px, stem) for a, px, stem in V2_ROWS if (not archs or a in archs) and (not sizes or px in sizes)]
    if not rows:
        raise UserError(f"no MedMNIST v2 model row is {'/'.join(archs or [])} at {'/'.join(map(str, sizes or []))} px; "
                        "rows: " + ", ".join(f"{a}@{px}" for a, px, _ in V2_ROWS))
    out = []
    for flag in datasets:
        for arch, px, stem in rows:
            r = find_recipe(flag, arch, recipe=PROTOCOL)
            out.append(apply_overrides(r, {"dataset": flag, "data.input_size": px, "model.stem": stem,
                                           "name": f"{PROTOCOL}:{arch}@{px}"}))
    return out


def found_datasets(data_root: Path | None) -> list[str]:
    """The single-label MedMNIST 2D sets whose 28 px file is in ``data_root``."""
    from zoo.data import default_data_root

    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    return [f for f in V2_DATASETS if (root / f"{f}.npz").is_file()]


def recipes_for(report: str, datasets: Sequence[str] | None = None, data_root: Path | None = None,
                download: bool = True, archs: Sequence[str] | None = None,
                sizes: Sequence[int] | None = None) -> list[Recipe]:
    """Every recipe ``zoo reproduce REPORT`` trains (``datasets`` narrows / chooses them; ``archs``
    and ``sizes`` choose medmnist-v2's model rows)."""
    if report not in REPORTS:
        raise unknown("report", report, [*REPORTS, "all"], hint=f"reports: {', '.join(REPORTS)}, all")
    flags = [resolve_name(d) for d in datasets] if datasets else None
    if report == PROTOCOL:
        if flags is None:
            flags = found_datasets(data_root) or (list(V2_DATASETS) if download else [])
        if not flags:
            raise UserError(f"no MedMNIST file found in {data_root or 'the data folder'} and downloads are off; "
                            "name the datasets (--datasets breast,derma) or allow downloads")
        return v2_recipes(flags, archs, sizes)
    mine = [r for r in all_recipes() if r.report == report]
    return [r for r in mine if flags is None or resolve_name(r.dataset) in flags]


def _metric(card: Card, metric: str) -> float | None:
    split, _, name = metric.partition("_")
    m = getattr(card.metrics, split, None)
    value = getattr(m, name, None) if m is not None else None
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _pub(dataset: str, arch: str, px: int) -> tuple[str, str]:
    same = published_for(dataset, arch, px)
    best = best_published(dataset)
    return ((f"{same.method}: {same.auc:.3f} / {same.acc:.3f}" if same else ""),
            (f"{best.method}: {best.auc:.3f} / {best.acc:.3f}" if best else ""))


def row_of(report: str, recipe: Recipe, card: Card | None, error: str = "", time_s: float | None = None) -> Row:
    """The comparison row of one recipe: its card's figures, or the error that stopped it."""
    flag = resolve_name(recipe.dataset)
    same, best = _pub(flag, recipe.arch, recipe.input_size)
    pub = published_for(flag, recipe.arch, recipe.input_size)
    reported = pub.auc if recipe.reported.value is None and pub is not None and report == PROTOCOL else (
        recipe.reported.value)
    row = Row(report, recipe.name, flag, recipe.arch, recipe.input_size, metric=recipe.reported.metric,
              reported=reported, published=same, best_published=best, time_s=time_s)
    if card is None:
        row.status = f"failed: {error}"
        return row
    row.bundle, row.epochs = card.id, card.training.epochs_run
    row.test_acc, row.test_auc = card.metrics.test.acc, card.metrics.test.auc
    # the card's: for the v2 protocol, the published row of this very model (zoo.train.report.reported)
    row.metric, row.reported = card.reported.metric or row.metric, card.reported.value
    row.ours = _metric(card, row.metric) if row.metric else None
    return row


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_tables(rows: Sequence[Row], folder: Path, title: str) -> tuple[Path, Path]:
    """``comparison.md`` and ``comparison.csv`` in ``folder`` (atomic writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[f for f in asdict(rows[0]) if f != "note"] if rows else ["report"])
    writer.writeheader()
    for r in rows:
        writer.writerow({k: v for k, v in asdict(r).items() if k != "note"})
    csv_path, md_path = folder / "comparison.csv", folder / "comparison.md"
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    head = ["report", "recipe", "dataset", "arch", "px", "status", "epochs", "test ACC", "test AUC",
            "report's metric", "ours", "report's number", "Δ", "published, same model (AUC / ACC)",
            "best published (AUC / ACC)", "bundle"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        delta = r.ours - r.reported if r.ours is not None and r.reported is not None else None
        cells = [r.report, f"`{r.recipe}`", r.dataset, r.arch, str(r.input_px), r.status, _fmt(r.epochs),
                 _fmt(r.test_acc), _fmt(r.test_auc), r.metric or "-", _fmt(r.ours), _fmt(r.reported),
                 _fmt(delta, 3) if delta is None else f"{delta:+.3f}", r.published or "-", r.best_published or "-",
                 f"`{r.bundle}`" if r.bundle else "-"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines += ["", "ours / report's number: the report's own metric (val_acc on the report's own split, or test); "
              "published: MedMNIST v2 (Yang et al., Scientific Data 10, 41, 2023), Table 3, test AUC / ACC."]
    atomic_write_bytes(md_path, ("\n".join(lines) + "\n").encode())
    return md_path, csv_path


def reproduce(
    report: str,
    store: Path | None = None,
    data_root: str | Path | None = None,
    datasets: Sequence[str] | None = None,
    epochs: int | None = None,
    quick: bool = False,
    download: bool = True,
    device: str | None = None,
    folders: dict[str, str] | None = None,
    archs: Sequence[str] | None = None,
    sizes: Sequence[int] | None = None,
    resume: bool = False,
    progress: bool = False,
    say: Callable[[str], None] = print,
    track: str | None = None,
) -> dict[str, list[Row]]:
    """Train every recipe of ``report`` (or of every report: ``all``) and write its comparison
    tables; returns report → rows. ``folders`` maps an image-folder dataset (``isic2019``) to its
    folder; ``epochs`` / ``quick`` shorten every run (a smoke run); ``resume`` continues killed runs
    and takes the bundles of the recipes already finished (an interrupted reproduction goes on).
    ``track``: ``mlflow`` / ``tensorboard`` logs one run per recipe (default ``$MEDZOO_TRACK``)."""
    from zoo.train import train

    reports = list(REPORTS) if report == "all" else [report]
    base = (store or home()) / "reproduce"
    out: dict[str, list[Row]] = {}
    for rep in reports:
        root = Path(data_root).expanduser() if data_root is not None else None
        recipes = recipes_for(rep, datasets, root, download, archs, sizes)
        rows = []
        for i, recipe in enumerate(recipes, 1):
            recipe = _shorten(recipe, epochs, quick, track)
            where = (folders or {}).get(resolve_name(recipe.dataset), data_root)
            say(f"reproduce {rep}: [{i}/{len(recipes)}] {recipe.name} on {recipe.dataset} "
                f"({recipe.train.epochs} epochs)")
            t0 = time.perf_counter()
            try:
                card = train(recipe, data_root=where, store=store, device=device, download=download,
                             resume=resume, progress=progress).card
                rows.append(row_of(rep, recipe, card, time_s=time.perf_counter() - t0))
            except (UserError, RuntimeError, OSError) as e:  # one recipe's failure (or a GPU running out) is a row
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
                log.warning("reproduce %s: %s failed: %s", rep, recipe.name, msg)
                rows.append(row_of(rep, recipe, None, msg, time.perf_counter() - t0))
            say(f"reproduce {rep}: [{i}/{len(recipes)}] {rows[-1].status}")
        md, _ = write_tables(rows, base / rep, _title(rep, epochs, quick))
        say(f"reproduce {rep}: {sum(r.status == 'ok' for r in rows)}/{len(rows)} trained; {md}")
        out[rep] = rows
    if report == "all":
        write_tables([r for rows in out.values() for r in rows], base / "all", _title("all reports", epochs, quick))
    return out


def _shorten(recipe: Recipe, epochs: int | None, quick: bool, track: str | None = None) -> Recipe:
    overrides: dict[str, Any] = dict(QUICK) if quick else {}
    if epochs is not None:
        overrides["train.epochs"] = epochs
    if track is not None:
        overrides["train.track"] = track
    return apply_overrides(recipe, overrides) if overrides else recipe


def _title(report: str, epochs: int | None, quick: bool) -> str:
    label = "MedMNIST v2 protocol" if report == PROTOCOL else f"report {report}"
    note = " — QUICK SMOKE RUN (1 epoch of 2 batches: not a result)" if quick else (
        f" — shortened to {epochs} epochs" if epochs is not None else "")
    return f"zoo reproduce: {label}{note}"


__all__ = ["QUICK", "REPORTS", "V2_DATASETS", "V2_ROWS", "Row", "found_datasets", "recipes_for", "reproduce",
           "row_of", "v2_recipes", "write_tables"]
