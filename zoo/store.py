"""The local zoo: where bundles and training runs live (``$MEDZOO_HOME``, default ``~/.medzoo``)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from zoo.bundle import BundleError, read_card

# Service task → the MedMNIST flag it serves.
TASKS = {"skin": "dermamnist", "organ": "organamnist", "pathology": "pathmnist"}


def home() -> Path:
    return Path(os.environ.get("MEDZOO_HOME", Path.home() / ".medzoo")).expanduser()


def bundles_dir(root: Path | None = None) -> Path:
    return (root or home()) / "bundles"


def runs_dir(root: Path | None = None) -> Path:
    return (root or home()) / "runs"


def list_bundles(root: Path | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Every readable bundle in the store, sorted by id; unreadable ones are skipped."""
    base = bundles_dir(root)
    out = []
    if base.is_dir():
        for p in sorted(base.iterdir()):
            try:
                out.append((p, read_card(p)))
            except BundleError:
                continue
    return out


def validation_score(card: dict[str, Any]) -> float:
    """Model selection uses validation only: best validation AUC, then ACC."""
    val = card.get("metrics", {}).get("val", {})
    auc, acc = val.get("auc", float("nan")), val.get("acc", float("nan"))
    return (0 if math.isnan(auc) else auc) * 10 + (0 if math.isnan(acc) else acc)


def rank_bundles(
    dataset: str, root: Path | None = None, arch: str | None = None
) -> list[tuple[Path, dict[str, Any]]]:
    """Bundles of a dataset (task name, alias or flag), best validation score first."""
    from zoo.data import resolve_name

    flag = resolve_name(TASKS.get(dataset, dataset))
    found = [
        (p, c)
        for p, c in list_bundles(root)
        if c.get("dataset", {}).get("name") == flag and (arch is None or c.get("arch") == arch)
    ]
    return sorted(found, key=lambda pc: (-validation_score(pc[1]), str(pc[1].get("id"))))


def best_bundle(dataset: str, root: Path | None = None, arch: str | None = None) -> Path | None:
    """The best bundle for a dataset by validation metrics, or None."""
    ranked = rank_bundles(dataset, root, arch)
    return ranked[0][0] if ranked else None


def resolve_bundle(ref: str, root: Path | None = None) -> Path:
    """A bundle path, a bundle id in the store, or a task/dataset name (its best bundle)."""
    p = Path(ref).expanduser()
    if (p / "card.json").is_file():
        return p
    q = bundles_dir(root) / ref
    if (q / "card.json").is_file():
        return q
    try:
        best = best_bundle(ref, root)
    except ValueError:
        best = None
    if best is None:
        raise BundleError(f"no bundle found for {ref!r} (a path, a bundle id, or a dataset with a trained bundle)")
    return best
