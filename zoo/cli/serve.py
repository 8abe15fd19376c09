"""``zoo serve``: build what is missing, then run the BentoML server.

Steps: read the serving config (``--config`` or ``$MEDZOO_SERVE_CONFIG``); train and export a
compact default model for each default task with no bundle (:mod:`zoo.bootstrap`; skipped with
``--no-build``); export ``model.onnx`` for served bundles that lack it; then run ``bentoml serve
serving.service:MedZoo`` (:mod:`serving.launch`: signals passed on, nothing left behind).
``--package`` instead copies the served bundles into the BentoML model store for ``bentoml build``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.config import load_config

    if args.store:
        os.environ["MEDZOO_HOME"] = str(Path(args.store).expanduser().resolve())
    # A mistake in the config (a ConfigError, one line) is reported before torch and BentoML are imported.
    cfg = load_config(args.config)
    if cfg.audit_log is not None:  # here, not in the API worker, whose failure BentoML would retry for ever
        from serving.audit import check_folder

        check_folder(cfg.audit_log)
    from serving.launch import REPO, run_server, server_command, server_env, stop_grace
    from zoo.bootstrap import build_default_models, export_served, tasks_to_build

    if not args.no_build:
        missing = tasks_to_build(cfg)
        if missing:
            _say(f"serve: no bundle for {', '.join(missing)} in the store: building the default models first")
            build_default_models(missing, store=cfg.store, data_root=args.data_root,
                                 download=not args.offline, epochs=args.epochs, say=_say)
    export_served(cfg, args.data_root)
    if args.package:
        from serving.package import package_models

        tag = package_models(cfg)
        print(f"packaged {tag}; now run `bentoml build` in {REPO}")
        return 0
    cmd = server_command(args.port, args.host, cfg)
    _say(f"serve: {' '.join(cmd[2:])}")
    return run_server(cmd, server_env(args.store, args.config), stop_grace(cfg))


def register(sub: Any) -> None:
    """Add ``zoo serve`` to the ``zoo`` command."""
    s = sub.add_parser("serve", help="serve skin, organ, pathology (and the ensemble) over HTTP with BentoML")
    s.add_argument("--port", type=int, default=int(os.environ.get("BENTOML_PORT", 3000)))
    s.add_argument("--host", default=os.environ.get("BENTOML_HOST", "0.0.0.0"))
    s.add_argument("--config", help="serving config YAML (default $MEDZOO_SERVE_CONFIG): settings, and extra tasks "
                                    "under tasks:; see serving/config.py")
    s.add_argument("--data-root", help="where the MedMNIST files are (default $MEDZOO_DATA or ~/.medmnist)")
    s.add_argument("--offline", action="store_true", help="never download data for the default models")
    s.add_argument("--no-build", action="store_true", help="do not train default models for tasks without a bundle")
    s.add_argument("--epochs", type=int, help="epochs of every default model (default: per task, see zoo/bootstrap.py)")
    s.add_argument("--package", action="store_true",
                   help="copy the served bundles into the BentoML model store for `bentoml build`, then stop")
    s.set_defaults(func=cmd_serve)
