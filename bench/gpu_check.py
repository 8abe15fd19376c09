"""`make gpu-check`: the GPU tests and the GPU benchmarks in one budget, or one line where there is no GPU.

    python bench/gpu_check.py                 # on a GPU machine (make gpu-check installs first)
    python bench/gpu_check.py --dry-run-cpu   # every stage at tiny sizes on the CPU, results in a temp folder
    python bench/gpu_check.py --detect        # exit 0 with a GPU, 10 (and one line) without

Stages, by value: ``probe`` (the providers ONNX Runtime really gives: TensorRT, CUDA, each on a
small convolution checked against the CPU, since ONNX Runtime falls back to the CPU silently; torch's
CUDA and bf16), ``install_gpu_extra`` + ``probe_again`` (only when CUDA was not obtained: ``pip
install -e '.[gpu]'``, CUDA and cuDNN from pip), ``gpu_tests`` (tests/test_gpu.py), ``inference_cuda``
(bench_inference, eager on the GPU against ONNX Runtime CUDA, batch 1-256), ``serve`` (bench_serve
at concurrency 1 / 16 / 64), ``train`` (bench_train: ResNet-18 on a PathMNIST-sized synthetic set,
fp32 and bf16), ``inference_trt`` (TensorRT, only when the probe obtained it), ``score`` (bench_score).

Each stage runs in its own process group with its own timeout (SIGTERM, then SIGKILL); a stage
that fails is recorded with the end of its log and the next one runs; a stage is skipped when the
time left in the budget (default 480 s from ``--since``, which `make gpu-check` sets before it
installs) is below what it needs. ``nvidia-smi -lms 200`` samples GPU utilisation and memory during
each stage. After every stage ``gpu-<device>.json`` (:class:`gpu_results.GpuCheckResult`),
``gpu-<device>.md`` (the rows for docs/BENCHMARKS.md) and ``gpu-<device>.log`` (every stage's
output) are rewritten in ``--out`` (default bench/results/).

The module imports only the standard library at the top: ``--detect`` runs under the system
Python of a fresh clone, before `make install`.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpu_results import GpuCheckResult, Utilisation

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
NO_GPU = 10  # --detect's exit status without a GPU (the Makefile then exits 0)
BUDGET_S = 480.0
TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
GPU = (TRT, CUDA)
VERSIONS = ("medzoo", "onnxruntime-gpu", "onnxruntime", "torch", "torchvision", "bentoml", "numpy", "onnx",
            "tensorrt", "tensorrt-libs", "tensorrt-cu12-libs", "tensorrt-cu13-libs", "nvidia-cudnn-cu12",
            "nvidia-cudnn-cu13", "nvidia-cuda-runtime", "nvidia-cuda-runtime-cu12", "nvidia-ml-py")


# --------------------------------------------------------------------------- is there a GPU


def gpu_visible(environ: Mapping[str, str] | None = None) -> bool:
    """Whether an NVIDIA GPU is visible: :func:`zoo.runtime.gpu_present` with the environment's options."""
    env = os.environ if environ is None else environ
    try:
        from zoo.runtime import gpu_present
        from zoo.settings import runtime_options
    except ImportError:  # a fresh clone's system Python, before `make install`: zoo.runtime's rule, restated
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip() in ("", "-1"):
            return False
        return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/proc/driver/nvidia/gpus/*"))
    return gpu_present(runtime_options(env))


def _smi(*args: str) -> str | None:
    """nvidia-smi's output, or None when it is missing or fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def smi_info() -> dict[str, Any]:
    """GPU names, driver, memory and the CUDA version the driver supports, as nvidia-smi reports them."""
    out: dict[str, Any] = {"names": [], "driver": None, "memory_mib": None, "cuda": None}
    listing = _smi("--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits")
    for line in (listing or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            out["names"].append(parts[0])
            out["driver"] = parts[1]
            out["memory_mib"] = int(float(parts[2])) if parts[2].replace(".", "").isdigit() else None
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", _smi() or "")
    out["cuda"] = cuda.group(1) if cuda else None
    return out


def no_gpu_line() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return (f"gpu-check: no NVIDIA GPU visible (no /dev/nvidia* device{hidden}): nothing to measure; "
            f"`python bench/gpu_check.py --dry-run-cpu` checks the plumbing on the CPU")


# --------------------------------------------------------------------------- the probe (its own process)


def _tiny_onnx(path: Path) -> None:
    """Conv 3→8 (3×3) + ReLU + global average pool on float NCHW 28 px, any batch: small, and run by
    every provider (TensorRT included), so that what is measured is whether the provider loads."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper, save

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 1, 1])], [w])
    # IR 8 (opset 17): what every ONNX Runtime ≥ 1.14 loads, whatever IR the installed onnx writes by default
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def _probe_provider(path: Path, provider: str, x: Any, reference: Any) -> dict[str, Any]:
    from zoo.errors import ModelFileError
    from zoo.runtime import RuntimeOptions, create_session

    try:
        session, got = create_session(path, RuntimeOptions(providers=(provider,)))
        y = session.run(None, {"x": x})[0]
    except (ModelFileError, RuntimeError) as e:  # onnxruntime's own errors are RuntimeError subclasses
        return {"asked": provider, "error": str(e).splitlines()[0][:300]}
    diff = float(abs(y - reference).max())
    return {"asked": provider, "obtained": got, "max_abs_diff": diff, "ok": got == provider and diff < 1e-3,
            "error": None if got == provider else f"ONNX Runtime gave {got}"}


def probe(out: Path) -> None:
    """Write what this machine gives: providers (each asked for alone), torch's CUDA and bf16."""
    import numpy as np
    import onnxruntime as ort

    from zoo.io import write_json
    from zoo.runtime import RuntimeOptions, choose_providers, create_session

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        _tiny_onnx(path)
        x = np.random.default_rng(1).random((4, 3, 28, 28), dtype=np.float32)
        ref = create_session(path, RuntimeOptions(providers=(CPU,)))[0].run(None, {"x": x})[0]
        providers = [_probe_provider(path, p, x, ref) for p in (TRT, CUDA, CPU)]
    data: dict[str, Any] = {"available": ort.get_available_providers(), "default_choice": choose_providers(),
                            "providers": providers, "onnxruntime": ort.__version__}
    try:
        import torch
    except ImportError:
        write_json(out, data)
        return
    sees = torch.cuda.is_available()
    data.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                torch_sees_gpu=sees, torch_device=torch.cuda.get_device_name(0) if sees else None,
                bf16=torch.cuda.is_bf16_supported() if sees else None)
    write_json(out, data)


# --------------------------------------------------------------------------- utilisation


def parse_smi_samples(lines: list[str]) -> dict[str, Any]:
    """``utilization.gpu, memory.used`` lines (csv, no header, no units) → mean / max; "[N/A]" is skipped."""
    util, mem = [], []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            continue
        for value, into in zip(parts, (util, mem), strict=True):
            try:
                into.append(float(value))
            except ValueError:
                pass
    if not util and not mem:
        return {"samples": 0, "note": "nvidia-smi gave no samples"}
    return {"samples": max(len(util), len(mem)),
            "util_mean": sum(util) / len(util) if util else None, "util_max": max(util) if util else None,
            "memory_mean_mib": sum(mem) / len(mem) if mem else None, "memory_max_mib": max(mem) if mem else None}


class Sampler:
    """``nvidia-smi --query-gpu=utilization.gpu,memory.used -lms 200`` in the background of one stage."""

    def __init__(self, enabled: bool) -> None:
        self.lines: list[str] = []
        self.note: str | None = None if enabled else "dry run: no GPU to sample"
        self.proc: subprocess.Popen[str] | None = None
        self.thread: threading.Thread | None = None
        if enabled and shutil.which("nvidia-smi") is None:
            self.note = "nvidia-smi not found"

    def __enter__(self) -> Sampler:
        if self.note is None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                   "-lms", "200", "-i", visible if visible.isdigit() else "0"]
            try:
                self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError as e:
                self.note = f"nvidia-smi could not start: {e}"
                return self
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def result(self) -> Utilisation:
        from gpu_results import Utilisation

        if self.note is not None:
            return Utilisation(note=self.note)
        return Utilisation.model_validate(parse_smi_samples(self.lines))


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """One stage: the command after the interpreter, its limits, and what it must run on."""

    name: str
    argv: list[str]
    timeout_s: float
    need_s: float  # the least time left in the budget for it to be worth starting
    expect: tuple[str, ...] = ()  # providers (or torch device types) one of which it must report


def plan(dry: bool, work: Path) -> list[Stage]:
    """The stages in order of value; ``dry``: the same commands at tiny sizes on the CPU."""
    def j(name: str) -> list[str]:
        return ["--json", str(work / f"{name}.json")]

    gpu = (CPU,) if dry else GPU
    inf = ["--quick", "--batches", *(["1", "2"] if dry else ["1", "16", "64", "256"]),
           "--models", *(["simplecnn"] if dry else ["simplecnn", "resnet18"])] + (["--threads", "1"] if dry else [])
    tests = ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_gpu.py"),
             f"--junitxml={work / 'junit.xml'}"] + (["-k", "exactly_one"] if dry else [])
    sizes = ["--sizes", "128", "32", "32", "--models", "mlp", "--batch", "32", "--precisions", "fp32", "auto"] if dry \
        else ["--models", "resnet18", "--batch", "128", "--precisions", "fp32", "bf16"]
    score = ["--images", "64", "--torch-images", "4", "--workers", "1", "--batch-size", "32"] if dry else ["--quick"]
    return [
        Stage("probe", [str(BENCH / "gpu_check.py"), "--probe", str(work / "probe.json")], 120, 15),
        Stage("install_gpu_extra", ["-m", "pip", "install", "--quiet", "--retries", "1", "--timeout", "30",
                                    "-e", f"{REPO}[gpu]"], 300, 60),
        Stage("probe_again", [str(BENCH / "gpu_check.py"), "--probe", str(work / "probe_again.json")], 120, 15),
        Stage("gpu_tests", tests, 300, 40),
        Stage("inference_cuda", [str(BENCH / "bench_inference.py"), *inf, "--backends", "eager", "onnxruntime",
                                 "--torch-device", "cpu" if dry else "cuda", "--providers", gpu[-1],
                                 *j("inference_cuda")], 180, 30, (gpu[-1],)),
        Stage("serve", [str(BENCH / "bench_serve.py"), "--concurrency", *(["1", "2"] if dry else ["1", "16", "64"]),
                        "--rounds", "1", "--requests", "4" if dry else "256", *j("serve")], 300, 60 if dry else 90,
              gpu),
        Stage("train", [str(BENCH / "bench_train.py"), "--dataset", "pathmnist", *sizes, "--epochs", "1",
                        "--rounds", "1", "--no-baseline", *j("train")], 300, 30 if dry else 90,
              ("cpu",) if dry else ("cuda",)),
        Stage("inference_trt", [str(BENCH / "bench_inference.py"), *inf, "--backends", "onnxruntime",
                                "--providers", TRT, CUDA, *j("inference_trt")], 300, 90, (TRT,)),
        Stage("score", [str(BENCH / "bench_score.py"), *score, "--repeat", "1", "--json"], 240, 30 if dry else 60,
              gpu),
    ]


def skip_reason(stage: Stage, result: GpuCheckResult, args: argparse.Namespace) -> str | None:
    """Why ``stage`` does not run (None: it runs), budget aside."""
    if args.stages and stage.name not in args.stages:
        return "not among --stages"
    cuda_ok = result.providers_obtained.get(CUDA, False)
    if stage.name == "install_gpu_extra":
        if args.dry_run_cpu or args.no_install:
            return "not asked to install (--dry-run-cpu / --no-install)"
        if cuda_ok:
            return "not needed: the CUDA provider loads"
    if stage.name == "probe_again":
        done = result.stage("install_gpu_extra")
        if done is None or done.status != "ok":
            return "no install was made"
    if stage.name == "inference_trt" and not result.providers_obtained.get(TRT, False):
        probe = result.probe and next((p for p in result.probe.providers if p.asked == TRT), None)
        return f"TensorRT not obtained in the probe ({probe.error if probe else 'no probe'}); CUDA measured instead"
    return None


def stage_env(work: Path, dry: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MEDZOO_HOME": str(work / "home"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # every stage on the CPU, on any machine
    return env


def run_process(cmd: list[str], timeout: float, env: dict[str, str], log: Path) -> tuple[str, float]:
    """Run ``cmd`` in its own process group, output to ``log``; ("ok" | "failed" | "timeout", seconds)."""
    t0 = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            stop_group(proc)
            return "timeout", time.monotonic() - t0
        except BaseException:  # Ctrl-C or SIGTERM of the check: its stage goes too
            stop_group(proc)
            raise
    return ("ok" if rc == 0 else "failed"), time.monotonic() - t0


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the stage's process group (bench_serve stops its servers then), SIGKILL after 20 s; then
    any descendant that left the group (servers start their own sessions) and is still alive."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()
    alive = []
    for p in descendants:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                p.terminate()
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    for p in psutil.wait_procs(alive, timeout=10)[1]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def log_tail(log: Path, lines: int = 6) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return " ⏎ ".join(line.strip()[:240] for line in text[-lines:]) or "(no output)"


def load_errors(log: Path) -> dict[str, str]:
    """Why ONNX Runtime could not load a provider, from its own error lines in the probe's log
    (``Failed to load library …providers_cuda.so with error: libcudnn…``); the probe's Python side sees
    only the fallback."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace")) if log.is_file() else ""
    out = {}
    for provider, lib in ((TRT, "tensorrt"), (CUDA, "cuda")):
        found = re.findall(rf"providers_{lib}\.so with error: (.+)", text)
        if found:
            out[provider] = found[-1].strip()[:300]
    return out


def stage_data(stage: Stage, work: Path, log: Path) -> Any:
    """The stage's JSON: its file, the junit summary of the tests, the JSON line bench_score prints."""
    if stage.name == "gpu_tests":
        return junit_summary(work / "junit.xml") if (work / "junit.xml").is_file() else None
    if stage.name == "score":
        found = [line for line in log.read_text(errors="replace").splitlines() if line.startswith('{"')]
        return json.loads(found[-1]) if found else None
    path = work / f"{stage.name}.json"
    data = json.loads(path.read_text()) if path.is_file() else None
    if stage.name in ("probe", "probe_again") and data is not None:
        reasons = load_errors(log)
        for p in data["providers"]:
            if not p.get("ok") and p["asked"] in reasons:
                p["error"] = f"{p.get('error') or 'not obtained'}: {reasons[p['asked']]}"
    return data


def junit_summary(path: Path) -> dict[str, Any]:
    """pytest's junit XML (written by pytest in this run) → counts and each case's outcome."""
    import xml.etree.ElementTree as ET

    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child in tc:
            kind = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(child.tag)
            if kind is not None:
                outcome, message = kind, (child.get("message") or "")[:300]
        cases.append({"name": tc.get("name", "?"), "outcome": outcome, "message": message})
    count = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"passed": count["passed"], "failed": count["failed"], "errors": count["error"],
            "skipped": count["skipped"], "cases": cases}


def reported(stage: Stage, result: GpuCheckResult) -> list[str]:
    """What the stage says it ran on (providers, or the torch device type)."""
    if stage.name in result.inference:
        return result.inference[stage.name].providers_obtained
    if stage.name == "serve" and result.serve is not None:
        return [p for p in (result.serve.served_provider, result.serve.ort_provider) if p]
    if stage.name == "score" and result.score is not None:
        return [result.score.provider]
    if stage.name == "train" and result.train is not None:
        return [result.train.device.split(":")[0]]
    return []


# --------------------------------------------------------------------------- the check


def environment(dry: bool) -> dict[str, Any]:
    smi = {"names": []} if dry else smi_info()
    names = smi["names"]
    device = "cpu (dry run)" if dry else (names[0] if names else "unknown NVIDIA GPU")
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"device": device, "slug": "cpu-dry-run" if dry else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-"),
            "driver": smi.get("driver"), "cuda": smi.get("cuda"), "gpu_memory_mib": smi.get("memory_mib"),
            "gpu_count": len(names), "python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count() or 0, "versions": versions}


def save(result: GpuCheckResult, out: Path, since: float) -> Path:
    """Rewrite the JSON and the Markdown rows (atomically), now."""
    from gpu_results import markdown

    from zoo.io import atomic_write_bytes, write_json

    result.elapsed_s = round(time.time() - since, 1)
    slug = result.environment.slug
    write_json(out / f"gpu-{slug}.json", result.model_dump(mode="json"))
    try:
        text = markdown(result)
    except (ArithmeticError, KeyError, TypeError, ValueError) as e:  # figures of an unforeseen shape: the JSON has them
        text = f"The Markdown rows could not be made ({type(e).__name__}: {e}); gpu-{slug}.json holds the figures.\n"
    atomic_write_bytes(out / f"gpu-{slug}.md", text.encode())
    return out / f"gpu-{slug}.json"


def run_stage(stage: Stage, result: GpuCheckResult, args: argparse.Namespace, work: Path, log: Path) -> None:
    """Run one stage (or say why not), record it and its validated figures in ``result``."""
    from gpu_results import StageRun, store
    from pydantic import ValidationError

    left = args.since + args.budget - time.time()
    why = skip_reason(stage, result, args)
    if why is None and left < stage.need_s:
        why = f"budget: {left:.0f} s left, needs {stage.need_s:.0f} s"
    cmd = [sys.executable, *stage.argv]
    if why is not None:
        result.stages.append(StageRun(name=stage.name, status="skipped", reason=why, command=cmd))
        return
    timeout = min(stage.timeout_s, left)
    print(f"gpu-check: {stage.name} (up to {timeout:.0f} s) …", flush=True)
    own = work / f"{stage.name}.log"
    with Sampler(enabled=not args.dry_run_cpu) as sampler:
        status, seconds = run_process(cmd, timeout, stage_env(work, args.dry_run_cpu), own)
    run = StageRun(name=stage.name, status=status, seconds=round(seconds, 1), timeout_s=round(timeout),
                   command=cmd, utilisation=sampler.result())
    if status != "ok":
        run.reason = f"exit status ≠ 0: {log_tail(own)}" if status == "failed" else f"timed out after {timeout:.0f} s"
    try:
        data = stage_data(stage, work, own)
        if data is not None:
            store(result, stage.name, data)
        elif status == "ok" and stage.name != "install_gpu_extra":
            run.status, run.reason = "failed", "it wrote no figures"
    except (ValidationError, ValueError, OSError) as e:  # json / XML / the figures' shape
        run.status, run.reason = "failed", f"its figures could not be read: {str(e).splitlines()[0][:300]}"
    got = reported(stage, result)
    if stage.expect and got and not set(got) <= set(stage.expect):
        run.notes.append(f"ran on {', '.join(got)}, not {' / '.join(stage.expect)}")
        run.status = "failed"
    with open(log, "ab") as f:  # every stage's output, one after the other, in one file
        f.write(f"\n===== {stage.name}: {run.status} in {run.seconds:.0f} s =====\n".encode())
        f.write(own.read_bytes() if own.is_file() else b"")
    result.stages.append(run)


def check(args: argparse.Namespace) -> int:
    """Run every stage within the budget; 0 when none failed."""
    from gpu_results import Environment, GpuCheckResult, StageRun

    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gpu-check-dry-")) if args.dry_run_cpu
                                            else BENCH / "results")
    out.mkdir(parents=True, exist_ok=True)
    env = Environment.model_validate(environment(args.dry_run_cpu))
    result = GpuCheckResult(kind="dry-run-cpu" if args.dry_run_cpu else "gpu", budget_s=args.budget,
                            started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(args.since)), environment=env)
    log = out / f"gpu-{env.slug}.log"
    log.write_bytes(b"")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for stage in plan(args.dry_run_cpu, Path(tmp)):
            try:
                run_stage(stage, result, args, Path(tmp), log)
            except Exception as e:  # a slip in this script's bookkeeping must not cost the stages after it
                result.stages.append(StageRun(name=stage.name, status="failed",
                                              reason=f"bench/gpu_check.py: {type(e).__name__}: {e}"))
            save(result, out, args.since)
    result.finished = time.strftime("%Y-%m-%dT%H:%M:%S")
    path = save(result, out, args.since)
    print((out / f"gpu-{env.slug}.md").read_text())
    bad = [s.name for s in result.stages if s.status in ("failed", "timeout")]
    ran = [s for s in result.stages if s.status != "skipped"]
    print(f"gpu-check: {env.device}: {len(ran) - len(bad)} of {len(ran)} stages ran clean"
          + (f", {', '.join(bad)} did not" if bad else "") + f", {len(result.stages) - len(ran)} skipped, "
          f"in {result.elapsed_s:.0f} s; results in {path} (+ .md, .log)")
    return 1 if bad else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detect", action="store_true", help=f"exit 0 with a GPU, {NO_GPU} (one line) without")
    p.add_argument("--dry-run-cpu", action="store_true", help="every stage at tiny sizes on the CPU")
    p.add_argument("--out", help="results folder (default bench/results/, a temp folder for --dry-run-cpu)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for everything, from --since")
    p.add_argument("--since", type=float, default=None, help="when the budget started (epoch s; default: now)")
    p.add_argument("--stages", nargs="+", help="only these stages (the others are recorded as skipped)")
    p.add_argument("--no-install", action="store_true", help="never pip install '.[gpu]'")
    p.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # the probe stage, in its own process
    args = p.parse_args(argv)
    args.since = time.time() if args.since is None else args.since
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        probe(args.probe)
        return 0
    if not args.dry_run_cpu and not gpu_visible():
        print(no_gpu_line(), flush=True)
        return NO_GPU if args.detect else 0
    if args.detect:
        names = smi_info()["names"]
        print(f"gpu-check: {', '.join(names) or 'an NVIDIA GPU'} found", flush=True)
        return 0
    sys.path.insert(0, str(BENCH))  # gpu_results beside this file, also when imported as a module
    # SIGTERM (a caller's timeout) unwinds like Ctrl-C: the running stage's process group is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
