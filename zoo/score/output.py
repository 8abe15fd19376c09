"""The output files of a scoring run: CSV, JSON Lines or Parquet, written atomically."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from zoo.errors import UsageError
from zoo.io import atomic_write

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
PROB_PREFIX = "prob_"


def output_format(out: Path) -> str:
    """``csv``, ``jsonl`` or ``parquet`` from the file's extension."""
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot tell the output format of {out.name}: use .csv, .jsonl or .parquet")
    if fmt == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise UsageError("Parquet output needs pyarrow (pip install pyarrow); or write .csv / .jsonl") from None
    return fmt


SET_SEPARATOR = "|"


def output_columns(labels: Sequence[str], ensemble: bool, ood: bool = False, sets: bool = False) -> list[str]:
    """Column names of the output, in order: ``path, model_id, top_class, prob_<label>…,
    [agreement], calibrated, [ood_score, in_distribution], [prediction_set]`` (the labels of the
    set, most probable first, joined by ``|``)."""
    probs = [PROB_PREFIX + lab for lab in labels]
    return (["path", "model_id", "top_class", *probs] + (["agreement"] if ensemble else []) + ["calibrated"]
            + (["ood_score", "in_distribution"] if ood else []) + (["prediction_set"] if sets else []))


def _arrow_type(column: str) -> Any:
    import pyarrow as pa

    if column in ("path", "model_id", "top_class", "prediction_set"):
        return pa.string()
    if column in ("calibrated", "in_distribution"):
        return pa.bool_()
    return pa.float32()


def write_output(out: Path, fmt: str, columns: list[str], rows: Iterator[list[Any]]) -> int:
    """Write the rows (values in the order of ``columns``); returns their count."""
    count = 0
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols: list[list[Any]] = [[] for _ in columns]
        for row in rows:
            for c, v in zip(cols, row, strict=True):
                c.append(v)
            count += 1
        table = pa.table({name: pa.array(c, type=_arrow_type(name)) for name, c in zip(columns, cols, strict=True)})
        atomic_write(out, lambda f: pq.write_table(table, f))
        return count

    def write(f: IO[bytes]) -> None:
        nonlocal count
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        if fmt == "csv":
            w = csv.writer(text, lineterminator="\n")
            w.writerow(columns)
            for row in rows:
                w.writerow(row)
                count += 1
        else:
            for row in rows:
                text.write(json.dumps(dict(zip(columns, row, strict=True)), ensure_ascii=False) + "\n")
                count += 1
        text.flush()
        text.detach()

    atomic_write(out, write)
    return count


def count_rows(path: Path, fmt: str) -> int:
    """Rows in an existing output (for the no-op message)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "csv":
            return max(sum(1 for _ in csv.reader(f)) - 1, 0)
        return sum(1 for line in f if line.strip())
