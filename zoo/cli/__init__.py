"""The ``zoo`` command: a thin layer over functions that tests call directly.

Sub-commands: ``zoo/cli/commands.py`` (train, eval, list, models, recipes, card),
``zoo/cli/export.py``, ``zoo/cli/explain.py``, ``zoo/cli/score.py``, ``zoo/cli/serve.py``,
``zoo/cli/tune.py``, ``zoo/cli/calibrate.py``, ``zoo/cli/reproduce.py``, ``zoo/cli/audit.py``. Each
imports the package it drives only when it runs, so ``zoo --help``, ``zoo list``, ``zoo models`` and
``zoo recipes`` never import torch. Errors a user can act on (:class:`zoo.errors.UserError` and its
kinds, nothing else) print one line per mistake on stderr and exit 2; any other exception is a bug: its
traceback, then one line asking for a report. Output piped into a closed pipe (``zoo eval … | head -1``) ends quietly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from zoo._version import __version__
from zoo.errors import UserError

BUG_REPORT = f"zoo: this is a bug in medzoo {__version__}, please report it with the traceback above"


def _plugins() -> list[Callable[[Any], None]]:
    """Every sub-command's ``register(subparsers)``."""
    from zoo.cli.audit import register as audit_cmd
    from zoo.cli.calibrate import register as calibrate_cmd
    from zoo.cli.commands import register as core_cmds
    from zoo.cli.explain import register as explain_cmd
    from zoo.cli.export import register as export_cmd
    from zoo.cli.reproduce import register as reproduce_cmd
    from zoo.cli.score import register as score_cmd
    from zoo.cli.serve import register as serve_cmd
    from zoo.cli.tune import register as tune_cmd

    return [core_cmds, calibrate_cmd, export_cmd, explain_cmd, score_cmd, serve_cmd, tune_cmd, reproduce_cmd, audit_cmd]


def _common(p: argparse.ArgumentParser, top: bool) -> None:
    """``--store`` and ``-v`` before or after the sub-command (``zoo list --store S`` works)."""
    default = None if top else argparse.SUPPRESS
    p.add_argument("--store", default=default, help="bundle store (default $MEDZOO_HOME or ~/.medzoo)")
    p.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="log what happens (INFO)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo", description="medzoo: medical image classification model zoo")
    _common(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _plugins():
        register(sub)
    for name, sp in sub.choices.items():
        if name in sub.choices and "--store" not in sp._option_string_actions:
            _common(sp, top=False)
    return p


def _report(e: BaseException) -> None:
    lines = str(e).strip().splitlines() or [type(e).__name__]
    print(f"zoo: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"zoo: error: {line.strip()}", file=sys.stderr)


def _quiet_broken_pipe() -> int:
    """The reader went away (``| head``): stop without a traceback, as POSIX tools do."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return 141  # 128 + SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # `zoo train --nproc N` runs it again
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except UserError as e:  # what the user can act on: the message, no traceback
        _report(e)
        return 2
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(BUG_REPORT, file=sys.stderr)
        return 1


__all__ = ["BUG_REPORT", "build_parser", "main"]
