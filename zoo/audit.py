"""The audit trail's format, and its reader (``zoo audit DIR``): the one definition of a trail line.

The service (``audit_log: DIR``, :mod:`serving.audit`) writes one JSON line per answered or refused
image, and one per request refused as a whole (no image fields): when, which request (its id, the
client's address), the file's name and the sha256 of its bytes (never the image), the task, the
models (bundle id, weights sha256), the answer (top classes, prediction set, OOD score and flag) and
the status. :class:`AuditLine` is that line: the writer dumps it, this reader validates it; a line
of another ``schema_version`` does not validate.

Files: ``audit-<start>-p<pid>-<seq>.jsonl`` in the trail's folder, one per API worker process and
per size rotation, each written by one process only and never renamed or truncated. The writer hands
each line to the kernel in one ``write`` on an ``O_APPEND`` descriptor, so only the last line of a
file can be incomplete (a machine crash, or a process killed inside that very ``write``): the reader
reports such a torn last line and goes on. Torch-free; below serving and the CLI.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from zoo.errors import UsageError, describe_validation_error

SCHEMA_VERSION = 1
FILE_PREFIX = "audit-"
FILE_SUFFIX = ".jsonl"
SHA256 = r"^[0-9a-f]{64}$"


class AuditClass(BaseModel):
    """One class of an answer's top classes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str
    prob: float


class AuditModel(BaseModel):
    """A model that answered: its bundle id and the sha256 of its weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    weights_sha256: str


class AuditLine(BaseModel):
    """One line of the trail: one image (``index`` set), or one request refused as a whole (no image
    fields). ``status`` is the image's own (200: answered), or the request's when refused whole."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    time: AwareDatetime  # when the answer (or refusal) was given
    received: AwareDatetime  # when the request arrived
    request_id: str  # the client's X-Request-Id, or the one the service gave (answered in that header)
    client: str | None = None  # the client's address
    route: str  # skin, skin/explain, pathology_ensemble …
    task: str  # the route's task (skin for skin/explain)
    request_status: int  # the HTTP status of the whole request
    status: int
    kind: str | None = None  # why refused, one word (too_large, unsupported, corrupt, out_of_distribution …)
    error: str | None = None
    index: int | None = None  # the image's place in the request
    filename: str | None = None
    sha256: str | None = Field(None, pattern=SHA256)  # of the uploaded bytes (absent: they were never read)
    top: tuple[AuditClass, ...] | None = None  # most probable first
    prediction_set: tuple[str, ...] | None = None
    alpha: float | None = None
    ood_score: float | None = None
    in_distribution: bool | None = None
    models: tuple[AuditModel, ...] = ()

    @property
    def image(self) -> bool:
        """Whether the line is an image's (else a request refused as a whole)."""
        return self.index is not None

    @property
    def ood_flag(self) -> str:
        """``in``, ``out`` (flagged out of distribution) or ``unknown`` (no detector, not answered)."""
        return "unknown" if self.in_distribution is None else "in" if self.in_distribution else "out"

    def to_line(self) -> bytes:
        """The line as written: compact JSON (fields that are None left out) and a newline."""
        return self.model_dump_json(exclude_none=True).encode() + b"\n"


@dataclass(frozen=True)
class BadLine:
    """A line that does not parse: where, whether it is a torn last line, and why."""

    file: str
    line: int  # 1-based
    torn: bool  # the file's unterminated last line (a crash while it was written)
    problem: str


class AuditSummary(BaseModel):
    """What ``zoo audit`` says of a trail (``--json`` prints it)."""

    directory: str
    files: int = 0
    lines: int = 0  # lines that parse
    images: int = 0
    refused_whole: int = 0  # requests refused before any image was read
    requests: int = 0  # distinct request ids
    first: AwareDatetime | None = None
    last: AwareDatetime | None = None
    by_task: dict[str, int] = {}
    by_status: dict[str, int] = {}
    by_ood: dict[str, int] = {}
    refusals: dict[str, int] = {}  # by kind
    bad: list[str] = []  # "file:line: problem" for lines that do not parse (torn last lines excluded)
    torn: list[str] = []  # "file:line: problem" for torn last lines

    @property
    def ok(self) -> bool:
        return not self.bad


def trail_files(directory: str | Path) -> list[Path]:
    """The trail's files, in name order (start time, process, rotation)."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise UsageError(f"{d} is not a folder: give the audit_log folder of the serving config")
    return sorted(p for p in d.iterdir() if p.name.startswith(FILE_PREFIX) and p.name.endswith(FILE_SUFFIX)
                  and p.is_file())


def _parse(raw: bytes) -> AuditLine | str:
    try:
        return AuditLine.model_validate_json(raw)
    except ValidationError as e:
        return describe_validation_error(e, AuditLine).replace("\n", "; ")[:300]


def read_file(path: str | Path) -> Iterator[AuditLine | BadLine]:
    """Every line of one trail file, parsed, or a :class:`BadLine` saying why not (streamed)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            terminated = raw.endswith(b"\n")
            body = raw.rstrip(b"\n")
            if not terminated and not body.strip(b"\0 \t\r"):
                yield BadLine(str(path), n, True, f"{len(raw)} bytes of zeros or blanks (a machine crash)")
                continue
            parsed = _parse(body)
            if isinstance(parsed, AuditLine):
                yield parsed  # a whole line whose newline alone is missing is still whole
            else:
                yield BadLine(str(path), n, not terminated, parsed)


@dataclass
class _Tally:
    """Counts gathered while the lines stream by (one pass, whatever the trail's size)."""

    tasks: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    ood: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    requests: set[str] = field(default_factory=set)
    first: datetime | None = None
    last: datetime | None = None
    images: int = 0
    whole: int = 0

    def add(self, line: AuditLine) -> None:
        self.images += line.image
        self.whole += not line.image
        self.requests.add(line.request_id)
        self.first = line.time if self.first is None else min(self.first, line.time)
        self.last = line.time if self.last is None else max(self.last, line.time)
        self.tasks[line.task] += 1
        self.statuses[str(line.status)] += 1
        if line.image:
            self.ood[line.ood_flag] += 1
        if line.status != 200:
            self.refusals[line.kind or "refused"] += 1


def check_trail(directory: str | Path) -> AuditSummary:
    """Parse every line of every file of the trail in ``directory`` and summarise it."""
    files = trail_files(directory)
    t = _Tally()
    bad: list[str] = []
    torn: list[str] = []
    for path in files:
        for item in read_file(path):
            if isinstance(item, BadLine):
                (torn if item.torn else bad).append(f"{path.name}:{item.line}: {item.problem}")
            else:
                t.add(item)
    return AuditSummary(
        directory=str(directory), files=len(files), lines=t.images + t.whole, images=t.images, refused_whole=t.whole,
        requests=len(t.requests), first=t.first, last=t.last,
        by_task=dict(t.tasks.most_common()), by_status=dict(sorted(t.statuses.items())),
        by_ood=dict(t.ood.most_common()), refusals=dict(t.refusals.most_common()), bad=bad, torn=torn)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _listed(items: list[str], shown: int) -> list[str]:
    more = [f"    … and {len(items) - shown} more"] if len(items) > shown else []
    return [f"    {x}" for x in items[:shown]] + more


def describe(s: AuditSummary, shown: int = 20) -> list[str]:
    """The summary as lines of text (``zoo audit`` without ``--json``)."""
    span = f"{s.first.isoformat()} → {s.last.isoformat()}" if s.first and s.last else "no lines"
    out = [f"audit trail {s.directory}: {s.files} files, {s.lines} lines ({s.images} images, {s.refused_whole} "
           f"requests refused whole; {s.requests} requests), {span}",
           f"  by task: {_counts(s.by_task)}", f"  by status: {_counts(s.by_status)}",
           f"  by OOD flag: {_counts(s.by_ood)}", f"  refusals by kind: {_counts(s.refusals)}"]
    if s.bad:
        out.append(f"  {len(s.bad)} lines do not parse:")
        out += _listed(s.bad, shown)
    if s.torn:
        out.append(f"  {len(s.torn)} torn last lines (a crash while the line was written; the lines before are "
                   "whole):")
        out += _listed(s.torn, shown)
    if not s.bad and not s.torn:
        out.append("  every line parses")
    return out


__all__ = ["SCHEMA_VERSION", "AuditClass", "AuditLine", "AuditModel", "AuditSummary", "BadLine", "check_trail",
           "describe", "read_file", "trail_files"]
