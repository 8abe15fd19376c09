"""Put the served bundles into the BentoML model store, so that ``bentoml build`` packs them.

``zoo serve --package`` (or :func:`package_models`) copies every bundle the configuration serves
(``card.json``, ``recipe.yaml``, ``model.onnx``) into one BentoML model, ``medzoo-serving``,
with a manifest (``serving.json``) saying which bundle serves which task and which bundles form
the ensemble. ``bentofile.yaml`` lists ``medzoo-serving:latest``; inside the Bento the service
reads its bundles from there (``serving.config.load_config`` with source ``bento``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from serving.config import BENTO_MODEL_NAME, MANIFEST, ServeConfig, resolve_ensemble, resolve_task
from zoo.card import CARD, ONNX_FILE, RECIPE, read_card
from zoo.errors import ConfigError
from zoo.io import atomic_write_bytes, sha256_of

log = logging.getLogger("serving")

PACKED_FILES = (CARD, RECIPE, ONNX_FILE)


def _servable(path: Path) -> bool:
    return (path / CARD).is_file() and (path / ONNX_FILE).is_file()


# What a Bento carries of the settings (serving.config.SETTINGS): the serving behaviour, its answers,
# limits and timeouts. HOST_SETTINGS are this host's (workers, threads, memory, connections, logs,
# store path): the machine running the Bento sets them. Every setting is in exactly one of the two
# (tests/test_config.py), so a new one is packaged or not by decision.
PACKAGED_SETTINGS = ("top_k", "max_batch_size", "max_latency_ms", "max_file_mb", "max_request_mb", "max_images",
                     "max_image_megapixels", "max_request_megapixels", "body_timeout_s", "request_timeout_s",
                     "refuse_ood")
HOST_SETTINGS = ("store", "idle_timeout_s", "max_connections", "shutdown_grace_s", "decode_threads",
                 "decode_memory_mb", "decode_queue_s", "api_workers", "access_log", "ort_threads", "ort_spinning",
                 "audit_log", "audit_max_mb", "audit_flush_s", "drift_window")


def plan(cfg: ServeConfig) -> tuple[dict[str, Any], dict[str, Path]]:
    """The manifest and the bundle directories it names (by bundle id)."""
    tasks: dict[str, str | None] = {}
    bundles: dict[str, Path] = {}
    for task in cfg.task_names:
        r = resolve_task(cfg, task)
        if r.path is None or not _servable(r.path):
            log.warning("%s: nothing to package (%s)", task, r.message or f"{r.path} has no {ONNX_FILE}")
            tasks[task] = None
            continue
        bid = read_card(r.path).id
        bundles[bid] = r.path
        tasks[task] = f"bundles/{bid}"
    members, _ = resolve_ensemble(cfg)
    ensemble = []
    for r in members:
        if r.path is not None and _servable(r.path):
            bid = read_card(r.path).id
            bundles[bid] = r.path
            ensemble.append(f"bundles/{bid}")
    if not bundles:
        raise ConfigError("no exported bundle to package: train and export one per task first (`zoo serve` does)")
    manifest = {
        "tasks": tasks,
        "ensemble": ensemble,
        "ensemble_arch": cfg.ensemble_arch,
        "settings": {k: v for k, v in cfg.to_dict().items() if k in PACKAGED_SETTINGS},
        "weights": {bid: read_card(p).weights_sha256 for bid, p in sorted(bundles.items())},
        "onnx": {bid: sha256_of(p / ONNX_FILE) for bid, p in sorted(bundles.items())},
    }
    return manifest, bundles


def package_models(cfg: ServeConfig) -> str:
    """Create (or find) the ``medzoo-serving`` model for this configuration; returns its tag."""
    import bentoml
    from bentoml.exceptions import NotFound

    manifest, bundles = plan(cfg)
    version = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    tag = f"{BENTO_MODEL_NAME}:{version}"
    try:
        bentoml.models.get(tag)
        log.info("%s is already in the BentoML model store", tag)
        return tag
    except NotFound:
        pass
    labels = {"project": "medzoo"}
    labels.update({t: (rel.split("/", 1)[1] if rel else "none")[:63] for t, rel in manifest["tasks"].items()})
    # metadata takes basic types only (a task without a bundle is null): the manifest as JSON text
    metadata = {"manifest": json.dumps(manifest, sort_keys=True)}
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
        root = Path(model.path)
        for bid, src in bundles.items():
            dst = root / "bundles" / bid
            dst.mkdir(parents=True)
            for name in PACKED_FILES:
                shutil.copy2(src / name, dst / name)
        atomic_write_bytes(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    log.info("packaged %d bundle(s) as %s", len(bundles), tag)
    return tag
