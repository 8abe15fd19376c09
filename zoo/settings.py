"""The settings medzoo reads from the environment, read in one place.

:func:`runtime_options` turns the ``MEDZOO_*`` variables that steer ONNX Runtime into a frozen
:class:`~zoo.runtime.RuntimeOptions`; the entry points (``zoo score``, :func:`zoo.load`, export
parity checks, benchmarks, the service) call it once and pass the result down, so
:mod:`zoo.runtime` itself reads no environment variable and a test can give any options it likes.

==========================  =========================================================================
variable                    ``RuntimeOptions`` field
==========================  =========================================================================
``MEDZOO_PROVIDERS``        ``providers``: comma-separated ONNX Runtime providers, best first
``MEDZOO_TF32``             ``tf32``: ``1`` lets CUDA use TF32 matmuls (default off: fp32 answers)
``MEDZOO_TRT_FP16``         ``trt_fp16``: ``1`` lets TensorRT build fp16 engines
``MEDZOO_TRT_CACHE``        ``trt_cache``: folder where TensorRT caches its engines
``MEDZOO_ORT_SPINNING``     ``spinning``: ``0`` / ``false`` / ``no`` / ``off``: idle threads sleep
``CUDA_VISIBLE_DEVICES``    ``visible_devices``: ``""`` or ``-1`` hides every GPU
==========================  =========================================================================

:func:`tracking_settings` reads the experiment tracking defaults of ``zoo train`` / ``zoo tune`` /
``zoo reproduce`` (:mod:`zoo.train.tracking`): ``MEDZOO_TRACK`` (``mlflow``, ``tensorboard`` or
``none``: the tracker when the recipe's ``train.track`` is unset), ``MLFLOW_TRACKING_URI`` (where
MLflow logs; default a local store under ``$MEDZOO_HOME/mlruns``) and ``MLFLOW_EXPERIMENT_NAME``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zoo.errors import UsageError
from zoo.runtime import RuntimeOptions

_OFF = ("0", "false", "no", "off")


def runtime_options(environ: Mapping[str, str] | None = None, **changes: Any) -> RuntimeOptions:
    """The :class:`RuntimeOptions` the environment (``environ``, default ``os.environ``) asks for,
    with ``changes`` (fields of :class:`RuntimeOptions`, e.g. ``threads=2``) applied on top."""
    env = os.environ if environ is None else environ
    options = RuntimeOptions(
        providers=tuple(p.strip() for p in env.get("MEDZOO_PROVIDERS", "").split(",") if p.strip()),
        tf32=env.get("MEDZOO_TF32", "").strip() == "1",
        trt_fp16=env.get("MEDZOO_TRT_FP16", "").strip() == "1",
        trt_cache=env.get("MEDZOO_TRT_CACHE") or None,
        spinning=env.get("MEDZOO_ORT_SPINNING", "").strip().lower() not in _OFF,
        visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
    )
    return options.replace(**changes) if changes else options


TRACKERS = ("none", "mlflow", "tensorboard")


@dataclass(frozen=True)
class TrackingSettings:
    """The environment's tracking defaults (None: not set)."""

    track: str | None = None  # MEDZOO_TRACK
    mlflow_uri: str | None = None  # MLFLOW_TRACKING_URI
    experiment: str | None = None  # MLFLOW_EXPERIMENT_NAME


def tracking_settings(environ: Mapping[str, str] | None = None) -> TrackingSettings:
    """:class:`TrackingSettings` from the environment (``environ``, default ``os.environ``); an
    unknown ``MEDZOO_TRACK`` is a :class:`~zoo.errors.UsageError` naming the choices."""
    env = os.environ if environ is None else environ
    track = env.get("MEDZOO_TRACK", "").strip().lower() or None
    if track is not None and track not in TRACKERS:
        raise UsageError(f"MEDZOO_TRACK={track!r} is not a tracker; choose from {', '.join(TRACKERS)}")
    return TrackingSettings(track, env.get("MLFLOW_TRACKING_URI", "").strip() or None,
                            env.get("MLFLOW_EXPERIMENT_NAME", "").strip() or None)


__all__ = ["TRACKERS", "TrackingSettings", "runtime_options", "tracking_settings"]
