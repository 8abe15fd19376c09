"""GPU paths: ONNX Runtime on CUDA / TensorRT, GPU answers equal to the CPU's, a bf16 training step.

The tests marked ``requires_gpu`` run where an NVIDIA GPU is visible and are skipped, saying why,
where none is. The others check, on any machine, that the default install carries exactly one
ONNX Runtime package (the GPU build on Linux x86_64) and that without a GPU it says it runs on
the CPU.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from zoo.runtime import GPU_PROVIDERS, OnnxModel, RuntimeOptions, choose_providers, gpu_present
from zoo.settings import runtime_options

requires_gpu = pytest.mark.skipif(
    not gpu_present(runtime_options()),
    reason="no NVIDIA GPU visible (no /dev/nvidia*): the CUDA / TensorRT paths need one")

# fp32 on the GPU (TF32 off): cuDNN picks other convolution algorithms than MLAS on the CPU, so
# logits differ in the last bits; these bounds are the export parity's (1e-4 abs or 1e-3 rel).
ABS_TOL, REL_TOL = 1e-4, 1e-3


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_exactly_one_onnxruntime_package_is_installed() -> None:
    gpu, cpu = _installed("onnxruntime-gpu"), _installed("onnxruntime")
    assert gpu != cpu, f"onnxruntime-gpu installed: {gpu}, onnxruntime installed: {cpu} (exactly one expected)"
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert gpu, "the default install on Linux x86_64 is onnxruntime-gpu"


@pytest.mark.skipif(gpu_present(runtime_options()), reason="this machine has a GPU")
def test_without_a_gpu_the_cpu_provider_is_used_and_said(breast_bundle: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from export import ensure_exported

    assert choose_providers() == ["CPUExecutionProvider"]  # no GPU provider asked for: no noisy fallback
    bundle = tmp_path / breast_bundle.name
    shutil.copytree(breast_bundle, bundle)
    ensure_exported(bundle)
    from zoo import runtime

    runtime._log_cpu_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="zoo.runtime"):
        model = OnnxModel.open(bundle)
    assert model.provider == "CPUExecutionProvider"
    assert any("no GPU found" in r.getMessage() and "CPUExecutionProvider" in r.getMessage() for r in caplog.records)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    return diff <= ABS_TOL or diff <= REL_TOL * float(np.abs(b).max())


@requires_gpu
def test_onnx_on_gpu_passes_parity_and_equals_cpu(breast_bundle: Path, breast_root: Path, tmp_path: Path) -> None:
    from export import export_bundle
    from zoo.card import read_card
    from zoo.inference import bundle_splits
    from zoo.postprocess import predicted_class

    bundle = tmp_path / breast_bundle.name
    shutil.copytree(breast_bundle, bundle)
    records = export_bundle(bundle, formats=["onnx"], data_root=breast_root)
    assert records["onnx"]["provider"] in GPU_PROVIDERS and records["onnx"]["parity"]["passed"]
    images = bundle_splits(read_card(bundle), breast_root).test.images.numpy()
    gpu = OnnxModel.open(bundle)
    cpu = OnnxModel.open(bundle, RuntimeOptions(providers=("CPUExecutionProvider",)))
    assert gpu.provider in GPU_PROVIDERS and cpu.provider == "CPUExecutionProvider"
    a, b = gpu.predict_bound(images), cpu.predict(images)
    assert _close(a, b) and (predicted_class(a) == predicted_class(b)).all()
    np.testing.assert_array_equal(gpu.predict(images), a)  # bound and plain inputs agree


@requires_gpu
def test_scored_answers_on_gpu_equal_cpu(breast_bundle: Path, breast_root: Path, tmp_path: Path) -> None:
    import csv

    from PIL import Image

    from zoo.card import read_card
    from zoo.inference import bundle_splits
    from zoo.score import score_folder

    bundle = tmp_path / "b" / breast_bundle.name
    shutil.copytree(breast_bundle, bundle)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, arr in enumerate(bundle_splits(read_card(bundle), breast_root).test.images.numpy()[:64]):
        Image.fromarray(arr[0]).save(folder / f"{i:03d}.png")
    outs = {}
    for name, options in (("gpu", RuntimeOptions()), ("cpu", RuntimeOptions(providers=("CPUExecutionProvider",)))):
        summary = score_folder(folder, [bundle], tmp_path / f"{name}.csv", options=options, workers=0,
                               progress=False)
        with open(summary.out, newline="") as f:
            outs[name] = (summary.provider, list(csv.DictReader(f)))
    assert outs["gpu"][0] in GPU_PROVIDERS and outs["cpu"][0] == "CPUExecutionProvider"
    for g, c in zip(outs["gpu"][1], outs["cpu"][1], strict=True):
        assert g["path"] == c["path"] and g["top_class"] == c["top_class"]
        probs_g = np.array([float(v) for k, v in g.items() if k.startswith("prob_")])
        probs_c = np.array([float(v) for k, v in c.items() if k.startswith("prob_")])
        np.testing.assert_allclose(probs_g, probs_c, atol=1e-5)


@requires_gpu
def test_a_training_step_on_gpu_in_bf16(breast_root: Path, tmp_path: Path) -> None:
    import torch

    from zoo.recipe import apply_overrides, find_recipe
    from zoo.train import train
    from zoo.train.precision import native_bf16

    if not native_bf16(torch.device("cuda")):
        pytest.skip("this GPU has no native bf16")
    recipe = apply_overrides(find_recipe("breast", "simplecnn"), {"epochs": 1, "batch_size": 64})
    result = train(recipe, data_root=breast_root, store=tmp_path, download=False, progress=False)
    t = result.card.training
    assert t.device.startswith("cuda") and t.precision == "bf16 autocast" and t.epochs_run == 1
    assert np.isfinite(result.card.metrics.history[0]["train_loss"])
