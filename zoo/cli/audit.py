"""``zoo audit DIR``: check a service's audit trail (every line parses) and summarise it
(:mod:`zoo.audit`, imported when the command runs; torch-free)."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_audit(args: argparse.Namespace) -> int:
    """0 when every line parses (a torn last line too, unless ``--strict``), 1 otherwise."""
    from zoo.audit import check_trail, describe

    summary = check_trail(args.directory)
    if args.json:
        print(summary.model_dump_json())
    else:
        print("\n".join(describe(summary)))
    return 0 if summary.ok and not (args.strict and summary.torn) else 1


def register(sub: Any) -> None:
    """Add ``zoo audit`` to the ``zoo`` command."""
    p = sub.add_parser(
        "audit", help="check a service's audit trail and summarise it",
        description="Parse every line of every file of the audit trail in DIR (the serving config's audit_log) "
                    "against the line format, and summarise it: files, lines, time range, counts by task, status "
                    "and out-of-distribution flag, refusals by kind. Exit status 1 when a line does not parse; a "
                    "torn last line (a crash while it was written) is reported, and fails only with --strict.")
    p.add_argument("directory", help="the audit trail's folder")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--strict", action="store_true", help="a torn last line fails the check too")
    p.set_defaults(func=cmd_audit)


__all__ = ["cmd_audit", "register"]
