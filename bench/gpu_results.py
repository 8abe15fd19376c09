"""The result of `make gpu-check` (``bench/gpu_check.py``): typed, and its Markdown rows for docs/BENCHMARKS.md.

Each stage runs in a process of its own and hands its figures over as JSON; they are validated
here on arrival (a benchmark whose JSON changed shape fails its stage, it does not corrupt the file).
The bench scripts' extra keys are kept (``extra="allow"``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
SHORT = {"TensorrtExecutionProvider": "TensorRT", "CUDAExecutionProvider": "CUDA", "CPUExecutionProvider": "CPU"}


class _Figures(BaseModel):
    """A benchmark's JSON: the fields read here are typed, the others kept as they came."""

    model_config = ConfigDict(extra="allow")


class Utilisation(BaseModel):
    """GPU utilisation and memory sampled by ``nvidia-smi -lms 200`` while a stage ran."""

    samples: int = 0
    util_mean: float | None = None  # %
    util_max: float | None = None
    memory_mean_mib: float | None = None
    memory_max_mib: float | None = None
    note: str | None = None  # why there are no samples


class StageRun(BaseModel):
    """How one stage went."""

    name: str
    status: Literal["ok", "failed", "timeout", "skipped"]
    seconds: float = 0.0
    timeout_s: float | None = None
    command: list[str] = Field(default_factory=list)
    reason: str | None = None  # why it was skipped, or the end of its log when it failed
    notes: list[str] = Field(default_factory=list)  # e.g. a GPU provider asked for and not obtained
    utilisation: Utilisation | None = None


class ProviderProbe(BaseModel):
    """One ONNX Runtime provider asked for alone (with the CPU behind it) on a small convolution."""

    asked: str
    obtained: str | None = None
    ok: bool = False  # obtained what was asked, and its answer equals the CPU's
    max_abs_diff: float | None = None
    error: str | None = None


class ProbeData(_Figures):
    available: list[str]  # ort.get_available_providers(): what the build holds, not what loads
    default_choice: list[str]  # zoo.runtime.choose_providers() with the default options
    providers: list[ProviderProbe]
    onnxruntime: str
    torch: str | None = None
    torch_cuda: str | None = None  # the CUDA torch was built with
    cudnn: int | None = None
    torch_sees_gpu: bool = False
    torch_device: str | None = None
    bf16: bool | None = None

    def obtained(self, provider: str) -> bool:
        return any(p.asked == provider and p.ok for p in self.providers)


class GpuTestCase(BaseModel):
    name: str
    outcome: Literal["passed", "failed", "error", "skipped"]
    message: str | None = None


class GpuTestsData(BaseModel):
    passed: int
    failed: int
    errors: int
    skipped: int
    cases: list[GpuTestCase]


class InferenceRow(_Figures):
    model: str
    size: int
    batch: int
    provider: str
    eager: float | None = None
    torchscript: float | None = None
    onnxruntime: float | None = None


class InferenceData(_Figures):
    rows: list[InferenceRow]
    providers_asked: list[str]
    providers_obtained: list[str]
    torch_device: str


class ServeLevel(_Figures):
    concurrency: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    mean_batch: float | None = None


class ServeData(_Figures):
    ort: dict[int, float]  # raw ONNX Runtime images/s at batch 64, per concurrency level
    ort_1: float
    ratios: dict[int, float]
    vs_naive: dict[int, float]
    results: dict[str, list[ServeLevel]]
    served_provider: str | None
    ort_provider: str | None


class TrainData(_Figures):
    device: str
    dataset: str
    sizes: list[int]
    batch: int
    epochs: int
    samples_per_s: dict[str, dict[str, float]]  # model → precision (or "baseline") → samples/s


class ScoreData(_Figures):
    score: float
    score_loop: float
    decode: float
    engine: float
    torch_loop: float
    ratio_to_limit: float
    images: int
    arch: str
    batch_size: int
    provider: str


class Environment(BaseModel):
    device: str  # nvidia-smi's name, or "cpu (dry run)"
    slug: str  # the file name part: gpu-<slug>.json
    driver: str | None = None
    cuda: str | None = None  # the CUDA version the driver supports (nvidia-smi)
    gpu_memory_mib: int | None = None
    gpu_count: int = 0
    python: str
    platform: str
    cpus: int
    versions: dict[str, str | None]  # installed distributions (importlib.metadata), None when absent


class GpuCheckResult(BaseModel):
    """``bench/results/gpu-<device>.json``: written after every stage, complete when ``finished`` is set."""

    schema_version: Literal[1] = 1
    kind: Literal["gpu", "dry-run-cpu"]
    started: str
    finished: str | None = None
    budget_s: float
    elapsed_s: float = 0.0
    environment: Environment
    providers_obtained: dict[str, bool] = Field(default_factory=dict)  # TensorRT / CUDA, from the probe
    stages: list[StageRun] = Field(default_factory=list)
    probe: ProbeData | None = None
    gpu_tests: GpuTestsData | None = None
    inference: dict[str, InferenceData] = Field(default_factory=dict)  # by stage name
    serve: ServeData | None = None
    train: TrainData | None = None
    score: ScoreData | None = None

    def stage(self, name: str) -> StageRun | None:
        return next((s for s in self.stages if s.name == name), None)


# --------------------------------------------------------------------------- Markdown


def _table(head: list[str], rows: list[list[str]], numeric_from: int = 1, text_last: bool = False) -> list[str]:
    """A Markdown table: text columns before ``numeric_from`` (and the last with ``text_last``), numbers right."""
    rule = ["---" if i < numeric_from or (text_last and i == len(head) - 1) else "---:" for i in range(len(head))]
    return ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def _num(v: float | None, fmt: str = ",.0f") -> str:
    return "–" if v is None else format(v, fmt)


def _header(r: GpuCheckResult) -> list[str]:
    e = r.environment
    v = e.versions
    ort = v.get("onnxruntime-gpu") or v.get("onnxruntime")
    trt = r.probe and next((p for p in r.probe.providers if p.asked == "TensorrtExecutionProvider"), None)
    trt_note = "" if trt is None or trt.ok else f" (TensorRT not obtained: {trt.error or trt.obtained})"
    got = ", ".join(SHORT.get(k, k) for k, ok in r.providers_obtained.items() if ok) or "none"
    return [f"{e.device}, driver {e.driver or '–'}, CUDA {e.cuda or '–'}, {e.cpus} CPUs; ONNX Runtime {ort}, "
            f"torch {v.get('torch')}; GPU providers obtained: {got}{trt_note}. `make gpu-check` ({r.kind}), "
            f"{r.elapsed_s:.0f} s of a {r.budget_s:.0f} s budget, started {r.started}.", ""]


def _stages(r: GpuCheckResult) -> list[str]:
    rows = []
    for s in r.stages:
        u = s.utilisation
        util = "–" if u is None or not u.samples else f"{u.util_mean:.0f} / {u.util_max:.0f}"
        mem = "–" if u is None or not u.samples else _num(u.memory_max_mib)
        why = "; ".join(filter(None, [*s.notes, s.reason if s.status != "ok" else None]))
        rows.append([s.name, s.status, f"{s.seconds:.0f}", util, mem, why.replace("|", "/")[:300]])
    return _table(["stage", "status", "s", "GPU util % mean / max", "GPU memory max MiB", "notes"], rows, 2, True)


def _inference(r: GpuCheckResult) -> list[str]:
    rows = []
    for d in r.inference.values():
        for x in d.rows:
            ratio = x.onnxruntime / x.eager if x.onnxruntime and x.eager else None
            rows.append([x.model, SHORT.get(x.provider, x.provider), str(x.size), str(x.batch),
                         _num(x.eager), _num(x.onnxruntime), _num(ratio, ".2f")])
    if not rows:
        return []
    device = next(iter(r.inference.values())).torch_device
    return ["", *_table(["model", "ORT provider", "px", "batch", f"eager ({device}) img/s", "ONNX Runtime img/s",
                         "× eager"], rows, 2)]


def _serve(r: GpuCheckResult) -> list[str]:
    s = r.serve
    if s is None:
        return []
    naive = {lv.concurrency: lv for lv in s.results.get("naive", [])}
    rows = [[str(c := lv.concurrency), f"{lv.rps:.1f}", f"{lv.p50_ms:.0f}", f"{lv.p99_ms:.0f}", _num(s.ort.get(c)),
             _num(s.ratios.get(c), ".2f"), _num(lv.mean_batch, ".1f"),
             _num(naive[c].rps if c in naive else None, ".1f"), _num(s.vs_naive.get(c), ".2f"), str(lv.errors)]
            for lv in s.results.get("bentoml", [])]
    head = ["concurrency", "served req/s", "p50 ms", "p99 ms", "raw ORT img/s (batch 64)", "served / ORT",
            "mean batch", "naive req/s", "served / naive", "errors"]
    return ["", f"Served on {s.served_provider}; raw ONNX Runtime on {s.ort_provider}, "
                f"{s.ort_1:,.0f} img/s at batch 1.", "", *_table(head, rows, 0)]


def _train(r: GpuCheckResult) -> list[str]:
    t = r.train
    if t is None:
        return []
    rows = []
    for model, figures in t.samples_per_s.items():
        fp32, bf16 = figures.get("fp32"), figures.get("bf16")
        rows.append([model, t.dataset, t.device, f"{t.sizes[0]:,}", str(t.batch), _num(fp32), _num(bf16),
                     _num(bf16 / fp32 if fp32 and bf16 else None, ".2f")])
    return ["", *_table(["model", "data (synthetic)", "device", "train images", "batch", "fp32 samples/s",
                         "bf16 samples/s", "bf16 / fp32"], rows, 3)]


def _score(r: GpuCheckResult) -> list[str]:
    s = r.score
    if s is None:
        return []
    row = [f"{s.arch} ({SHORT.get(s.provider, s.provider)})", f"{s.images:,}", f"{s.score:,.0f}",
           f"{s.score_loop:,.0f}", f"{s.engine:,.0f}", f"{s.decode:,.0f}", f"{s.ratio_to_limit:.2f}",
           f"{s.torch_loop:,.0f}"]
    return ["", *_table(["`zoo score`", "images", "end to end img/s", "loop img/s", "engine-only img/s",
                         "decode-only img/s", "/ lower limit", "per-image PyTorch img/s"], [row], 1)]


def _tests(r: GpuCheckResult) -> list[str]:
    t = r.gpu_tests
    if t is None:
        return []
    skips = sorted({c.message or "" for c in t.cases if c.outcome == "skipped"})
    bad = [c.name for c in t.cases if c.outcome in ("failed", "error")]
    return ["", f"tests/test_gpu.py: {t.passed} passed, {t.failed} failed, {t.errors} errors, {t.skipped} skipped"
            + (f" (failed: {', '.join(bad)})" if bad else "") + (f" (skipped: {'; '.join(skips)})" if skips else "")
            + "."]


def markdown(r: GpuCheckResult) -> str:
    """The rows for docs/BENCHMARKS.md ("GPU check"): the machine, each stage, each benchmark's table."""
    return "\n".join([*_header(r), *_stages(r), *_tests(r), *_inference(r), *_serve(r), *_train(r),
                      *_score(r)]) + "\n"


STAGE_DATA: dict[str, type[BaseModel]] = {"probe": ProbeData, "probe_again": ProbeData, "gpu_tests": GpuTestsData,
                                          "inference_cuda": InferenceData, "inference_trt": InferenceData,
                                          "serve": ServeData, "train": TrainData, "score": ScoreData}


def store(result: GpuCheckResult, stage: str, raw: Any) -> None:
    """Validate a stage's JSON and put it in its place in ``result`` (pydantic's ValidationError otherwise)."""
    data = STAGE_DATA[stage].model_validate(raw)
    if stage in ("probe", "probe_again"):
        assert isinstance(data, ProbeData)
        result.probe = data
        result.providers_obtained = {p: data.obtained(p) for p in GPU_PROVIDERS}
    elif stage.startswith("inference"):
        assert isinstance(data, InferenceData)
        result.inference[stage] = data
    else:
        setattr(result, stage, data)
