"""The local zoo: where bundles and training runs live (``$MEDZOO_HOME``, default ``~/.medzoo``).

No torch: listing, ranking and resolving bundles read only their cards.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from zoo.card import CARD, Card, read_card
from zoo.errors import BundleError, UnknownNameError, did_you_mean
from zoo.names import TASKS, known_names, resolve_name

log = logging.getLogger(__name__)

# What names a model: a bundle path or id, a task or dataset name (its best bundle), an ``.onnx`` file.
ModelRef = str | os.PathLike[str]


def home() -> Path:
    return Path(os.environ.get("MEDZOO_HOME", Path.home() / ".medzoo")).expanduser()


def bundles_dir(root: Path | None = None) -> Path:
    return (root or home()) / "bundles"


def runs_dir(root: Path | None = None) -> Path:
    return (root or home()) / "runs"


def list_bundles(root: Path | None = None) -> list[tuple[Path, Card]]:
    """Every readable bundle in the store, sorted by id; unreadable ones are skipped (logged)."""
    base = bundles_dir(root)
    out = []
    if base.is_dir():
        for p in sorted(base.iterdir()):
            if not (p / CARD).is_file():
                continue  # a bundle being written, or not a bundle
            try:
                out.append((p, read_card(p)))
            except BundleError as e:
                log.warning("skipping %s: %s", p.name, e)
    return out


def dataset_of(name: str) -> str:
    """The canonical dataset of a task or dataset name (``skin`` → ``dermamnist``)."""
    return resolve_name(TASKS.get(name, name))


def rank_bundles(dataset: str, root: Path | None = None, arch: str | None = None) -> list[tuple[Path, Card]]:
    """Bundles of a dataset (task name, alias or flag), best validation score first."""
    flag = dataset_of(dataset)
    found = [(p, c) for p, c in list_bundles(root) if c.dataset.name == flag and (arch is None or c.arch == arch)]
    return sorted(found, key=lambda pc: (-pc[1].validation_score(), pc[1].id))


def best_bundle(dataset: str, root: Path | None = None, arch: str | None = None) -> Path | None:
    """The best bundle for a dataset by validation metrics, or None."""
    ranked = rank_bundles(dataset, root, arch)
    return ranked[0][0] if ranked else None


def resolve_bundle(ref: str | Path, root: Path | None = None) -> Path:
    """A bundle path, a bundle id in the store, or a task/dataset name (its best bundle)."""
    ref = str(ref)
    p = Path(ref).expanduser()
    if (p / CARD).is_file():
        return p
    q = bundles_dir(root) / ref
    if (q / CARD).is_file():
        return q
    try:
        best = best_bundle(ref, root)
    except UnknownNameError:
        best = None
    if best is not None:
        return best
    ids = [c.id for _, c in list_bundles(root)]
    hint = did_you_mean(ref, [*ids, *TASKS, *known_names()]) or (
        f"; the store {bundles_dir(root)} has {len(ids)} bundle(s): see `zoo list`" if ids else
        f"; the store {bundles_dir(root)} is empty: `zoo train DATASET ARCH` makes one")
    raise BundleError(f"no bundle found for {ref!r} (a path, a bundle id, or a dataset with a trained bundle){hint}")


def resolve_target(ref: ModelRef, root: Path | None = None) -> Path:
    """A lone ``.onnx`` file, or the bundle a reference names (:func:`resolve_bundle`)."""
    p = Path(ref).expanduser()
    if p.is_file() and p.suffix == ".onnx":
        return p
    return resolve_bundle(str(ref), root)


__all__ = ["TASKS", "ModelRef", "best_bundle", "bundles_dir", "dataset_of", "home", "list_bundles", "rank_bundles",
           "resolve_bundle", "resolve_target", "runs_dir"]
