"""``zoo serve``: build what is missing, then run the BentoML server.

Steps: read the serving config (``--config`` or ``$MEDZOO_SERVE_CONFIG``); train and export a
compact default model for each default task with no bundle (``serving.bootstrap``; skipped with
``--no-build``); export ``model.onnx`` for served bundles that lack it; then ``bentoml serve
serving.service:MedZoo`` with the config passed on through the environment. ``--package``
instead copies the served bundles into the BentoML model store for ``bentoml build``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from serving.config import (
    CONFIG_ENV,
    ServeConfig,
    load_config,
    resolve_ensemble,
    resolve_task,
)
from zoo.runtime import ONNX_FILE

log = logging.getLogger("serving")
REPO = Path(__file__).resolve().parents[1]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export_missing_onnx(cfg: ServeConfig, data_root: str | Path | None = None) -> list[Path]:
    """Export ``model.onnx`` for every served bundle that has none; returns those exported."""
    from serving.bootstrap import export_onnx

    paths = [r.path for r in (resolve_task(cfg, t) for t in cfg.task_names) if r.path is not None]
    paths += [r.path for r in resolve_ensemble(cfg)[0] if r.path is not None]
    done = []
    for p in dict.fromkeys(paths):
        if not (p / ONNX_FILE).is_file():
            _say(f"serve: exporting {p.name} to ONNX")
            export_onnx(p, data_root)
            done.append(p)
    return done


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """Environment of the server process: the store, the config file, no BentoML tracking."""
    env = dict(os.environ)
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    if args.store:
        env["MEDZOO_HOME"] = str(Path(args.store).expanduser().resolve())
    if args.config:
        env[CONFIG_ENV] = str(Path(args.config).expanduser().resolve())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def cmd_serve(args: argparse.Namespace) -> int:
    if args.store:
        os.environ["MEDZOO_HOME"] = str(Path(args.store).expanduser().resolve())
    cfg = load_config(args.config)
    if not args.no_build:
        from serving.bootstrap import build_default_models, tasks_to_build

        missing = tasks_to_build(cfg)
        if missing:
            _say(f"serve: no bundle for {', '.join(missing)} in the store: building the default models first")
            build_default_models(missing, store=cfg.store, data_root=args.data_root,
                                 download=not args.offline, epochs=args.epochs, say=_say)
    export_missing_onnx(cfg, args.data_root)
    if args.package:
        from serving.package import package_models

        tag = package_models(cfg)
        print(f"packaged {tag}; now run `bentoml build` in {REPO}")
        return 0
    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:MedZoo",
           "--port", str(args.port), "--host", args.host, "--working-dir", str(REPO)]
    _say(f"serve: {' '.join(cmd[2:])}")
    proc = subprocess.Popen(cmd, env=server_env(args), cwd=REPO)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        return 130


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``zoo serve`` to the ``zoo`` command."""
    s = sub.add_parser("serve", help="serve skin, organ, pathology (and the ensemble) over HTTP with BentoML")
    s.add_argument("--port", type=int, default=int(os.environ.get("BENTOML_PORT", 3000)))
    s.add_argument("--host", default=os.environ.get("BENTOML_HOST", "0.0.0.0"))
    s.add_argument("--config", help=f"serving config YAML (default ${CONFIG_ENV}); see serving/config.py")
    s.add_argument("--data-root", help="where the MedMNIST files are (default $MEDZOO_DATA or ~/.medmnist)")
    s.add_argument("--offline", action="store_true", help="never download data for the default models")
    s.add_argument("--no-build", action="store_true", help="do not train default models for tasks without a bundle")
    s.add_argument("--epochs", type=int, help="epochs of every default model (default: per task, see serving/bootstrap.py)")
    s.add_argument("--package", action="store_true",
                   help="copy the served bundles into the BentoML model store for `bentoml build`, then stop")
    s.set_defaults(func=cmd_serve)
