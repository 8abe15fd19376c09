"""ONNX Runtime inference shared by export checks, serving and batch scoring.

``OnnxModel`` opens an exported model (``model.onnx`` inside a bundle, or a lone ONNX file: the
file carries its card in its metadata) on the best execution provider present — TensorRT,
then CUDA, then CPU — and says which one it actually got, because onnxruntime falls back to
CPU silently when a GPU provider fails to initialise.

Opening checks the file before any session is made: protobuf decoding, the medzoo metadata, the
ONNX checker and, inside a bundle, the sha256 ``zoo export`` recorded in the card and the weights
the file was exported from. Every failure is a :class:`ModelFileError` with a one-line message.

How sessions are made (providers, threads, TF32, TensorRT, spinning) is a frozen
:class:`RuntimeOptions` given to :meth:`OnnxModel.open`; this module reads no environment variable
(:func:`zoo.settings.runtime_options` builds the options from it).
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import functools
import glob
import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from zoo.card import CARD, EXPORT_FILES, ONNX_FILE, ONNX_FP16_FILE, TORCHSCRIPT_FILE, Card, ExportMeta, read_card
from zoo.errors import BundleError, ModelFileError, describe_validation_error
from zoo.io import sha256_of
from zoo.preprocess import Preprocessing

log = logging.getLogger(__name__)

PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
METADATA_KEY = "medzoo.card"  # ONNX metadata_props key holding the card subset as JSON
OOD_OUTPUT = "ood_score"  # the out-of-distribution score output of a model with a detector


@dataclass(frozen=True)
class RuntimeOptions:
    """How ONNX Runtime sessions are made. The defaults are ONNX Runtime's own choices plus medzoo's
    accuracy rules (TF32 off, TensorRT in fp32); :func:`zoo.settings.runtime_options` reads them from
    the environment."""

    providers: tuple[str, ...] = ()  # asked for, best first; empty: TensorRT / CUDA on a GPU, else the CPU
    threads: int | None = None  # intra-op threads; None: ONNX Runtime's default (one per core)
    spinning: bool = True  # False: idle intra-op threads sleep instead of spin-waiting
    tf32: bool = False  # CUDA: TF32 matmuls (10 mantissa bits); off, GPU answers match the CPU's to fp32
    trt_fp16: bool = False  # TensorRT: fp16 engines
    trt_cache: str | None = None  # TensorRT: folder caching its engines (None: no cache)
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES as set; "" or "-1": no GPU is visible

    def replace(self, **changes: Any) -> RuntimeOptions:
        """A copy with ``changes`` (field names) applied."""
        return dataclasses.replace(self, **changes)


DEFAULT_OPTIONS = RuntimeOptions()


def gpu_present(options: RuntimeOptions = DEFAULT_OPTIONS) -> bool:
    """Whether an NVIDIA GPU is visible to this process (driver device nodes; ``visible_devices``)."""
    visible = options.visible_devices
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*")) or bool(glob.glob("/proc/driver/nvidia/gpus/*"))


def _tensorrt_libraries() -> bool:
    """TensorRT's runtime (``libnvinfer``) can be loaded: only then is its provider worth asking for."""
    return importlib.util.find_spec("tensorrt_libs") is not None or ctypes.util.find_library("nvinfer") is not None


@functools.lru_cache(maxsize=1)
def _preload_cuda() -> None:
    """Load CUDA and cuDNN from the ``nvidia-*`` pip packages when they are installed (ONNX Runtime
    ≥ 1.21), so that ``onnxruntime-gpu`` finds them without LD_LIBRARY_PATH."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except (OSError, RuntimeError) as e:
            log.info("could not preload CUDA libraries from pip packages: %s", e)


def choose_providers(options: RuntimeOptions = DEFAULT_OPTIONS) -> list[str]:
    """Providers to ask for, best first: ``options.providers``, else TensorRT (when its libraries
    load) and CUDA when a GPU is present, always ending with the CPU."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    if options.providers:
        wanted = list(options.providers)
    elif gpu_present(options):
        wanted = [p for p in PREFERRED if p != "TensorrtExecutionProvider" or _tensorrt_libraries()]
    else:
        wanted = ["CPUExecutionProvider"]
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    if any(p in GPU_PROVIDERS for p in chosen):
        _preload_cuda()
    return chosen


def provider_options(providers: Sequence[str],
                     options: RuntimeOptions = DEFAULT_OPTIONS) -> list[tuple[str, dict[str, str]]]:
    """Options per provider. CUDA: TF32 off unless ``options.tf32``, so that GPU answers match
    the CPU's to fp32 precision (TF32 matmuls keep 10 mantissa bits); TensorRT: fp32 unless
    ``options.trt_fp16``, engines cached in ``options.trt_cache`` when set."""
    out: list[tuple[str, dict[str, str]]] = []
    for p in providers:
        if p == "CUDAExecutionProvider":
            out.append((p, {"use_tf32": "1" if options.tf32 else "0"}))
        elif p == "TensorrtExecutionProvider":
            opts = {"trt_fp16_enable": "1" if options.trt_fp16 else "0"}
            if options.trt_cache:
                opts.update(trt_engine_cache_enable="1", trt_engine_cache_path=options.trt_cache)
            out.append((p, opts))
        else:
            out.append((p, {}))
    return out


def create_session(path: str | Path, options: RuntimeOptions = DEFAULT_OPTIONS) -> tuple[Any, str]:
    """An InferenceSession and the provider it really runs on (first of ``get_providers()``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if options.threads:
        opts.intra_op_num_threads = options.threads
    if not options.spinning:
        # Idle intra-op threads sleep instead of spin-waiting: for a process that shares the CPU
        # with others (the inference worker of `zoo serve` next to its HTTP workers).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    chosen = choose_providers(options)
    names, per_provider = zip(*provider_options(chosen, options), strict=True)
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=list(names),
                                    provider_options=list(per_provider))
    except Exception as e:  # onnxruntime raises its own pybind exception types
        raise ModelFileError(f"{path} cannot be loaded by ONNX Runtime: {str(e).splitlines()[0][:200]}") from None
    got = sess.get_providers()[0]
    if got != chosen[0]:
        log.warning("asked for %s, ONNX Runtime gave %s", chosen[0], got)
    if got == "CPUExecutionProvider" and not gpu_present(options):
        _log_cpu_once()
    log.info("ONNX Runtime session for %s on %s", Path(path).name, got)
    return sess, got


@functools.lru_cache(maxsize=1)
def _log_cpu_once() -> None:
    import onnxruntime as ort

    log.info("no GPU found: ONNX Runtime %s (%s build) runs on the CPU (CPUExecutionProvider)",
             ort.__version__, "GPU" if "CUDAExecutionProvider" in ort.get_available_providers() else "CPU")


def load_onnx(path: str | Path) -> Any:
    """The ``onnx.ModelProto`` of a file; truncated or non-ONNX bytes give :class:`ModelFileError`."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ModelFileError(f"{path} is not a readable ONNX file: {_first_line(e)}") from None


def check_onnx(proto: Any, path: str | Path) -> None:
    """``onnx.checker.check_model``; a malformed graph gives :class:`ModelFileError`."""
    import onnx

    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise ModelFileError(f"{path} fails the ONNX checker: {_first_line(e)}") from None


def parse_metadata(text: str | None, path: str | Path) -> ExportMeta:
    """The card subset stored in an export (JSON), validated; :class:`ModelFileError` otherwise."""
    if text is None:
        raise ModelFileError(f"{path} carries no medzoo metadata; export it with `zoo export`")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path} has corrupt medzoo metadata (not JSON: {e})") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path} has corrupt medzoo metadata (not a JSON object)")
    try:
        return ExportMeta.model_validate(meta)
    except ValidationError as e:
        problems = "; ".join(describe_validation_error(e, ExportMeta).splitlines())
        raise ModelFileError(f"{path} has invalid medzoo metadata: {problems}") from None


def onnx_metadata(proto: Any, path: str | Path) -> ExportMeta:
    """The medzoo metadata of a loaded ``ModelProto``."""
    props = {p.key: p.value for p in proto.metadata_props}
    return parse_metadata(props.get(METADATA_KEY), path)


def read_metadata(path: str | Path) -> ExportMeta:
    """The card subset an export carries (labels, preprocessing, ids), without loading weights."""
    return onnx_metadata(load_onnx(path), path)


def bundle_card(path: str | Path) -> Card | None:
    """The card of the bundle an export file lies in (``None`` for a lone file)."""
    p = Path(path)
    if p.name not in EXPORT_FILES.values() or not (p.parent / CARD).is_file():
        return None
    try:
        return read_card(p.parent)
    except BundleError as e:
        raise ModelFileError(str(e)) from None


def check_origin(path: str | Path, card: Card, meta: ExportMeta) -> None:
    """An export's metadata must name its bundle's id and weights (``weights_sha256``)."""
    if meta.weights_sha256 != card.weights_sha256 or meta.id != card.id:
        raise ModelFileError(
            f"{path} was exported from {meta.id} (weights sha256 {meta.weights_sha256[:12]}…), "
            f"not from this bundle {card.id} (weights sha256 {card.weights_sha256[:12]}…); "
            f"run `zoo export {Path(path).parent}` again"
        )


def export_file(path: str | Path, name: str) -> Path:
    """``path`` itself, or the file ``name`` inside it when it is a bundle directory; it must exist."""
    p = Path(path)
    if p.is_dir():
        p = p / name
    if not p.is_file():
        raise ModelFileError(f"{p} does not exist; run `zoo export` on the bundle first")
    return p


def verify_export(path: str | Path, card: Card, meta: ExportMeta | None = None) -> None:
    """Check an export file against its bundle's card: the sha256 recorded at export time and,
    when ``meta`` is given, that the file was exported from this bundle's weights."""
    p = Path(path)
    if meta is not None:
        check_origin(p, card, meta)
    again = f"run `zoo export {p.parent}` again"
    record = next((r for r in card.exports.values() if r.file == p.name), None)
    if record is None:
        raise ModelFileError(
            f"{p} is not recorded in {p.parent.name}/card.json (no sha256 to check it against); {again}"
        )
    digest = sha256_of(p)
    if digest != record.sha256:
        raise ModelFileError(
            f"{p} does not match the sha256 its card recorded at export ({digest[:12]}…, {p.stat().st_size} bytes; "
            f"card: {record.sha256[:12]}…, {record.size} bytes): the file was altered, "
            f"truncated or replaced; {again}"
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


class ExportedModel:
    """What an exported file's metadata says, shared by the ONNX and TorchScript wrappers."""

    meta: ExportMeta

    @property
    def preprocessing(self) -> Preprocessing:
        return self.meta.preprocessing

    @property
    def labels(self) -> list[str]:
        return list(self.meta.labels)

    @property
    def id(self) -> str:
        """The bundle id of the model (``card.id``)."""
        return self.meta.id


@dataclass
class OnnxModel(ExportedModel):
    """An exported classifier: uint8 NCHW images at ``image_size`` in, logits out."""

    path: Path
    session: Any
    provider: str
    meta: ExportMeta

    @classmethod
    def open(cls, path: str | Path, options: RuntimeOptions | None = None) -> OnnxModel:
        """Check the file (see the module docstring), then open a session with ``options``
        (``None``: :class:`RuntimeOptions`' defaults, not the environment's)."""
        p = export_file(path, ONNX_FILE)
        proto = load_onnx(p)
        meta = onnx_metadata(proto, p)
        card = bundle_card(p)
        if card is not None:  # inside a bundle: the file must be the one `zoo export` recorded
            verify_export(p, card, meta)
        check_onnx(proto, p)
        del proto
        sess, got = create_session(p, options or DEFAULT_OPTIONS)
        return cls(path=p, session=sess, provider=got, meta=meta)

    @functools.cached_property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    @property
    def has_ood(self) -> bool:
        """Whether answers carry the out-of-distribution flag: the file returns an ``ood_score`` beside
        the logits and its metadata holds the detector's threshold."""
        return OOD_OUTPUT in self.output_names and self.meta.ood is not None

    def outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every output (``logits``, and ``ood_score`` when present) for a uint8 batch (N, C, H, W)."""
        if images.dtype != np.uint8:
            raise ValueError("OnnxModel takes uint8 images")
        name = self.session.get_inputs()[0].name
        values = self.session.run(None, {name: np.ascontiguousarray(images)})
        return {n: v.astype(np.float32) for n, v in zip(self.output_names, values, strict=True)}

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Logits (N, K) for a uint8 batch (N, C, H, W) (the first output)."""
        return self.outputs(images)[self.output_names[0]]

    def outputs_bound(self, images: np.ndarray, device_id: int = 0) -> dict[str, np.ndarray]:
        """``outputs`` through io_binding: the batch is copied once into the provider's memory
        (the GPU for TensorRT / CUDA, host memory for the CPU provider) and bound there, the
        logits are allocated on that device and copied back once."""
        import onnxruntime as ort

        if images.dtype != np.uint8:
            raise ValueError("OnnxModel takes uint8 images")
        device = "cuda" if self.provider in GPU_PROVIDERS else "cpu"
        binding = self.session.io_binding()
        x = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(images), device, device_id)
        binding.bind_ortvalue_input(self.session.get_inputs()[0].name, x)
        for name in self.output_names:
            binding.bind_output(name, device, device_id)
        self.session.run_with_iobinding(binding)
        values = binding.copy_outputs_to_cpu()
        return {n: v.astype(np.float32) for n, v in zip(self.output_names, values, strict=True)}

    def predict_bound(self, images: np.ndarray, device_id: int = 0) -> np.ndarray:
        """Logits through io_binding (see :meth:`outputs_bound`)."""
        return self.outputs_bound(images, device_id)[self.output_names[0]]


__all__ = ["DEFAULT_OPTIONS", "EXPORT_FILES", "GPU_PROVIDERS", "METADATA_KEY", "OOD_OUTPUT", "ONNX_FILE",
           "ONNX_FP16_FILE", "PREFERRED", "TORCHSCRIPT_FILE", "ExportedModel", "ModelFileError", "OnnxModel",
           "RuntimeOptions", "bundle_card", "check_onnx",
           "check_origin", "choose_providers", "create_session", "export_file", "gpu_present", "load_onnx",
           "onnx_metadata", "parse_metadata", "provider_options", "read_metadata", "verify_export"]
