"""`make gpu-check` (bench/gpu_check.py) where there is no GPU: one line and exit 0 in seconds, and its
plumbing on the CPU (``--dry-run-cpu``): the result file validates, the Markdown rows come out, a
stage past its timeout is stopped with its whole process group, a budget too small skips stages.

The full dry run (every stage: serving, training, scoring at tiny sizes) takes minutes on two cores and
is run by hand (docs/BENCHMARKS.md, "GPU check"); here the probe and the GPU tests' stage run for real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from zoo.runtime import gpu_present
from zoo.settings import runtime_options

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402  (bench/ is not a package)
from gpu_results import GpuCheckResult, GpuTestsData, markdown  # noqa: E402

no_gpu_only = pytest.mark.skipif(gpu_present(runtime_options()), reason="this machine has a GPU: the check would run")


def _run(cmd: list[str], timeout: float = 120, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
    return done, time.monotonic() - t0


@no_gpu_only
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0() -> None:
    done, seconds = _run(["make", "--no-print-directory", "gpu-check", f"PYTHON={sys.executable}"], timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no NVIDIA GPU visible"), done.stdout
    assert "--dry-run-cpu" in lines[0] and done.stderr == ""
    assert seconds < 10, f"{seconds:.1f} s"


@no_gpu_only
def test_a_fresh_clones_python_without_medzoo_detects_the_same() -> None:
    # -I -S: no site-packages, no PYTHONPATH, so zoo (numpy, pydantic) cannot be imported, as under the
    # system Python of a fresh clone before `make install`; the restated rule must agree with zoo.runtime
    done, _ = _run([sys.executable, "-I", "-S", "bench/gpu_check.py", "--detect"])
    assert done.returncode == gpu_check.NO_GPU, done.stderr
    assert done.stdout.startswith("gpu-check: no NVIDIA GPU visible") and done.stderr == ""
    hidden, _ = _run([sys.executable, "-I", "-S", "bench/gpu_check.py", "--detect"], CUDA_VISIBLE_DEVICES="")
    assert hidden.returncode == gpu_check.NO_GPU and "CUDA_VISIBLE_DEVICES=''" in hidden.stdout


def test_cuda_visible_devices_hides_the_gpu_as_zoo_runtime_says() -> None:
    for value in ("", "-1"):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": value}
        assert gpu_check.gpu_visible(env) is False is gpu_present(runtime_options(env))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The dry run's probe and GPU-test stages, for real, on this CPU (≈ 15 s on two idle cores)."""
    out = tmp_path_factory.mktemp("gpu_check")
    done, seconds = _run([sys.executable, "bench/gpu_check.py", "--dry-run-cpu", "--out", str(out),
                          "--stages", "probe", "gpu_tests", "inference_trt"], timeout=240)
    return {"done": done, "seconds": seconds, "out": out}


def test_the_dry_run_writes_a_result_that_validates(dry_run: dict[str, Any]) -> None:
    done, out = dry_run["done"], dry_run["out"]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = GpuCheckResult.model_validate_json((out / "gpu-cpu-dry-run.json").read_text())
    assert result.kind == "dry-run-cpu" and result.finished is not None
    assert result.environment.versions["torch"] and result.environment.cpus >= 1
    status = {s.name: s.status for s in result.stages}
    assert status["probe"] == "ok" and status["gpu_tests"] == "ok"
    assert status["serve"] == "skipped" and result.stage("serve").reason == "not among --stages"  # type: ignore[union-attr]
    # the probe asked for each provider alone: the CPU answers, and on this machine neither GPU provider
    # is obtained, with ONNX Runtime's own reason (a library it could not load)
    probe = {p.asked: p for p in result.probe.providers}  # type: ignore[union-attr]
    assert probe["CPUExecutionProvider"].ok and probe["CPUExecutionProvider"].max_abs_diff == 0.0
    for gpu in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        assert not probe[gpu].ok and probe[gpu].error
        assert result.providers_obtained[gpu] is False
    assert "TensorRT not obtained" in (result.stage("inference_trt").reason or "")  # type: ignore[union-attr]
    assert isinstance(result.gpu_tests, GpuTestsData) and result.gpu_tests.passed == 1 and not result.gpu_tests.failed


def test_the_dry_run_writes_the_markdown_rows_and_ends_with_one_summary_line(dry_run: dict[str, Any]) -> None:
    done, out = dry_run["done"], dry_run["out"]
    md = (out / "gpu-cpu-dry-run.md").read_text()
    assert md.startswith("cpu (dry run), ") and "| stage | status | s |" in md
    assert "| probe | ok |" in md and "| gpu_tests | ok |" in md and "tests/test_gpu.py: 1 passed" in md
    result = GpuCheckResult.model_validate_json((out / "gpu-cpu-dry-run.json").read_text())
    assert markdown(result) == md
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu-check: cpu (dry run): 2 of 2 stages ran clean") and str(out) in last
    log = (out / "gpu-cpu-dry-run.log").read_text()
    assert "===== probe: ok" in log and "===== gpu_tests: ok" in log


def test_a_budget_too_small_skips_every_stage_and_still_writes_the_result(tmp_path: Path) -> None:
    done, _ = _run([sys.executable, "bench/gpu_check.py", "--dry-run-cpu", "--out", str(tmp_path), "--budget", "0"])
    assert done.returncode == 0, done.stderr
    result = GpuCheckResult.model_validate(json.loads((tmp_path / "gpu-cpu-dry-run.json").read_text()))
    assert {s.status for s in result.stages} == {"skipped"}
    assert result.stage("probe").reason.startswith("budget: ")  # type: ignore[union-attr]


def test_a_stage_past_its_timeout_is_stopped_with_its_children(tmp_path: Path) -> None:
    # the grandchild starts a session of its own, as bench_serve's servers do: out of the stage's group
    child = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)'], start_new_session=True); open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    t0 = time.monotonic()
    status, seconds = gpu_check.run_process([sys.executable, "-c", code], 3, dict(os.environ), tmp_path / "log")
    assert status == "timeout" and seconds < 30 and time.monotonic() - t0 < 30
    import psutil

    pid = int(child.read_text())
    time.sleep(0.2)
    try:  # the grandchild went too (gone, or a zombie not yet reaped)
        assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass


def test_nvidia_smi_samples_are_averaged_and_na_skipped() -> None:
    lines = ["37, 1024\n", "63, 2048\n", "[N/A], 3072\n", "garbage\n"]
    u = gpu_check.parse_smi_samples(lines)
    assert u["samples"] == 3 and u["util_mean"] == 50.0 and u["util_max"] == 63.0
    assert u["memory_mean_mib"] == 2048.0 and u["memory_max_mib"] == 3072.0
    assert gpu_check.parse_smi_samples([])["samples"] == 0
