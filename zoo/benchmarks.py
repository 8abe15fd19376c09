"""Published results on the same data (data: ``zoo/recipes/benchmarks/*.yaml``), shown beside
ours by ``zoo list``, the Markdown model card and ``zoo reproduce``. No torch."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml


@dataclass(frozen=True)
class Published:
    """One published row: a method's test AUC and ACC on a dataset."""

    method: str
    auc: float
    acc: float
    source: str
    arch: str | None = None
    input_size: int | None = None


@lru_cache(maxsize=1)
def _tables() -> list[dict[str, Any]]:
    folder = resources.files("zoo") / "recipes" / "benchmarks"
    return [yaml.safe_load(f.read_text(encoding="utf-8")) for f in sorted(folder.iterdir(), key=str)
            if f.name.endswith(".yaml")]


def published(dataset: str) -> list[Published]:
    """Every published row for a canonical dataset name (``dermamnist`` …), in table order."""
    rows = []
    for table in _tables():
        for method, (auc, acc) in (table["results"].get(dataset) or {}).items():
            meta = table["methods"].get(method) or {}
            rows.append(Published(method, float(auc), float(acc), table["source"], meta.get("arch"),
                                  meta.get("input_size")))
    return rows


def published_for(dataset: str, arch: str, input_size: int) -> Published | None:
    """The published row of this exact architecture and input size, if there is one."""
    return next((r for r in published(dataset) if r.arch == arch and r.input_size == input_size), None)


def best_published(dataset: str) -> Published | None:
    """The published row with the best test AUC."""
    rows = published(dataset)
    return max(rows, key=lambda r: (r.auc, r.acc)) if rows else None


__all__ = ["Published", "best_published", "published", "published_for"]
