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
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

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


__all__ = ["runtime_options"]
