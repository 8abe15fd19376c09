"""Serving load benchmark: the BentoML service against raw ONNX Runtime and a naive PyTorch server.

One ResNet-18 (28 px, stem "small", untrained weights: speed does not depend on them), made with
``create_model`` + ``save_bundle`` + ``zoo export``, is

* run by ONNX Runtime directly, batches of 64 already decoded: the ceiling (raw img/s);
* served by the real BentoML service (``bentoml serve serving.service:MedZoo``, adaptive
  batching) as the ``pathology`` task;
* served by a naive server: Starlette + uvicorn, a sync endpoint that decodes with PIL and runs
  the PyTorch model on that one image per request (no batching).

Both servers get the same PNG uploads (one image per request, loopback only) at concurrency 1,
16 and 64, from a bounded aiohttp client; each level reports requests/s and p50 / p99 latency.
``ratio vs ORT`` = served req/s ÷ raw ORT img/s (the cost of HTTP, decoding and batching);
``served / naive`` = served req/s ÷ naive req/s. The machine is shared, so both servers run at once
and each round measures raw ORT, the service and the naive server back to back; the figures are
medians over the rounds. Where the service's time goes: the CPU time each of its processes (API
worker, inference worker) and the load client spent per request (``/proc``), and the batch sizes
the model saw (``/stats``).

    python bench/bench_serve.py [--requests 200] [--concurrency 1 16 64] [--rounds 2] [--markdown]
                                [--before TREE]

``--json PATH`` also writes the figures (and the providers the service and raw ONNX Runtime got) as JSON.
``--before TREE`` serves the same bundle from another checkout too (e.g. ``git worktree add /tmp/before
COMMIT``), measured in the same rounds: ``after / before`` = this tree's served req/s ÷ that tree's,
for a change of the serving code.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 9
SIZE = 28


# --------------------------------------------------------------------------- the model


def make_bundle(store: Path) -> Path:
    """An untrained ResNet-18 (28 px, small stem) as a bundle, exported to ONNX."""
    import medmnist
    import torch
    import yaml

    from export import ensure_exported
    from zoo.bundle import save_bundle
    from zoo.models import create_model
    from zoo.preprocess import Preprocessing
    from zoo.recipe import apply_overrides, find_recipe

    torch.manual_seed(0)
    prep = Preprocessing(SIZE, SIZE, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    net = create_model("resnet18", num_classes=NUM_CLASSES, in_channels=3, input_size=SIZE,
                       pretrained=False, stem="small")
    recipe = apply_overrides(find_recipe("path", "resnet18"), {"epochs": 1, "pretrained": False})
    labels = [medmnist.INFO["pathmnist"]["label"][str(i)] for i in range(NUM_CLASSES)]
    card: dict[str, Any] = {
        "id": "bench-pathmnist-resnet18-small-untrained",
        "arch": "resnet18",
        "model_kwargs": {"stem": "small"},
        "num_outputs": NUM_CLASSES,
        "task": "multi-class",
        "labels": labels,
        "preprocessing": prep.to_dict(),
        "dataset": {"name": "pathmnist", "checksum": "none (untrained benchmark model)"},
        "recipe": recipe.to_dict(),
        "metrics": {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = save_bundle(store / "bundles" / card["id"], net, card, yaml.safe_dump(recipe.to_dict()))
    ensure_exported(path)  # no data for an untrained model: parity on random images
    return path


def sample_pngs(n: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def raw_ort(bundle: Path, batch: int = 64, seconds: float = 4.0) -> float:
    """Images/s of ONNX Runtime on already-decoded uint8 batches (the ceiling), with the session
    options the service's inference worker uses (idle intra-op threads sleep rather than spin:
    on this shared 2-core machine that is also the faster setting, see docs/BENCHMARKS.md)."""
    from zoo.runtime import OnnxModel
    from zoo.settings import runtime_options

    model = OnnxModel.open(bundle, runtime_options(spinning=False))
    x = (np.random.default_rng(0).random((batch, 3, SIZE, SIZE)) * 255).astype(np.uint8)
    model.predict(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.predict(x)
        n += batch
    return n / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- the naive server


def naive_app(bundle: Path) -> Any:
    """Starlette app: PIL decode + PyTorch forward per request, no batching."""
    import torch
    from PIL import Image
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from zoo.bundle import load_bundle

    b = load_bundle(bundle)
    model, labels = b.model, b.labels

    def classify(data: bytes) -> list[dict[str, Any]]:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())[None]
        with torch.inference_mode():
            probs = torch.softmax(model(x), dim=1)[0]
        top = torch.topk(probs, 3)
        return [{"class": int(i), "label": labels[int(i)], "prob": float(p)}
                for p, i in zip(top.values, top.indices, strict=True)]

    async def endpoint(request: Request) -> JSONResponse:
        form = await request.form()
        data = await form["images"].read()  # type: ignore[union-attr]
        from starlette.concurrency import run_in_threadpool

        return JSONResponse({"results": [{"top": await run_in_threadpool(classify, data)}]})

    return Starlette(routes=[Route("/pathology", endpoint, methods=["POST"])])


def run_naive(bundle: Path, port: int) -> None:
    import uvicorn

    uvicorn.run(naive_app(bundle), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --------------------------------------------------------------------------- load


@dataclass
class Level:
    concurrency: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms: dict[str, float] | None = None  # CPU time per request of each server process and the client
    mean_batch: float | None = None  # images per model call during this run (the service's /stats)


def multipart_bodies(pngs: list[bytes]) -> list[tuple[bytes, str]]:
    """Each PNG as a ready multipart body (field ``images``) and its Content-Type, encoded once:
    the load client shares the CPU with the servers it measures, so it does as little as it can."""
    import httpx

    out = []
    for i, png in enumerate(pngs):
        req = httpx.Request("POST", "http://x/", files=[("images", (f"{i}.png", png, "image/png"))])
        out.append((req.read(), req.headers["content-type"]))
    return out


async def _load(url: str, pngs: list[bytes], concurrency: int, n: int) -> Level:
    """``n`` one-image requests, at most ``concurrency`` in flight (aiohttp: a light client, since it
    shares the CPU with the servers it measures; the multipart bodies are encoded beforehand)."""
    import aiohttp

    bodies = multipart_bodies(pngs)
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as client:
        async def one(i: int) -> None:
            nonlocal errors
            body, ctype = bodies[i % len(bodies)]
            async with sem:
                t = time.perf_counter()
                try:
                    async with client.post("/pathology", data=body, headers={"content-type": ctype}) as r:
                        answer = await r.json()
                        status = r.status
                except aiohttp.ClientError as e:
                    print(f"request {i}: {e!r}", file=sys.stderr)
                    errors += 1
                    return
                lat.append(time.perf_counter() - t)
                if status != 200 or not answer["results"][0].get("top"):
                    print(f"request {i}: HTTP {status} {str(answer)[:200]}", file=sys.stderr)
                    errors += 1

        await asyncio.gather(*[one(i) for i in range(min(n, 2 * concurrency))])  # warm-up
        lat.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*[one(i) for i in range(n)])
        wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return Level(concurrency, n, n / wall, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), errors)


def worker_processes(proc: subprocess.Popen) -> dict[str, Any]:  # type: ignore[type-arg]
    """The BentoML server's API worker and inference worker (psutil processes)."""
    import psutil

    out = {}
    for p in psutil.Process(proc.pid).children(recursive=True):
        cmd = " ".join(p.cmdline())
        if "--service-name MedZooInference" in cmd:
            out["inference"] = p
        elif "--service-name MedZoo " in cmd + " ":
            out["api"] = p
    return out


def _calls(url: str) -> tuple[int, int]:
    import httpx

    stats = httpx.get(url + "/stats", timeout=30).json()["batches"].get("pathology", {})
    return stats.get("calls", 0), stats.get("images", 0)


def measured_load(url: str, pngs: list[bytes], concurrency: int, n: int, procs: dict[str, Any]) -> Level:
    """``_load`` with the CPU time each process (and this client) spent per request, and the mean
    batch the model saw."""
    calls0, images0 = _calls(url)
    before = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
    me = os.times()
    level = asyncio.run(_load(url, pngs, concurrency, n))
    me2 = os.times()
    calls1, images1 = _calls(url)
    level.mean_batch = (images1 - images0) / max(1, calls1 - calls0)
    total = n + min(n, 2 * concurrency)  # the warm-up requests are counted too
    level.cpu_ms = {k: (sum(p.cpu_times()[:2]) - before[k]) * 1000 / total for k, p in procs.items()}
    level.cpu_ms["client"] = (me2.user + me2.system - me.user - me.system) * 1000 / total
    return level


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 240) -> None:  # type: ignore[type-arg]
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=5).status_code in (200, 405):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:  # type: ignore[type-arg]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    os.killpg(proc.pid, signal.SIGTERM)  # the process group this benchmark started
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def median_level(runs: list[Level]) -> Level:
    """The median of each figure over the rounds of one concurrency level."""
    cpu = None
    if runs[0].cpu_ms:
        cpu = {k: float(np.median([r.cpu_ms[k] for r in runs if r.cpu_ms])) for k in runs[0].cpu_ms}
    batch = float(np.median([r.mean_batch for r in runs])) if runs[0].mean_batch is not None else None
    return Level(runs[0].concurrency, runs[0].requests, float(np.median([r.rps for r in runs])),
                 float(np.median([r.p50_ms for r in runs])), float(np.median([r.p99_ms for r in runs])),
                 sum(r.errors for r in runs), cpu, batch)


def bench(levels: list[int], n_requests: int, rounds: int, before: Path | None = None) -> dict[str, Any]:
    """Every server up at once; per level and round: raw ORT, then BentoML (and the ``before`` tree's),
    then naive (interleaved, so that they see the same background load on a shared machine)."""
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        return _bench(Path(tmp), levels, n_requests, rounds, before)


def _bench(work: Path, levels: list[int], n_requests: int, rounds: int, before: Path | None) -> dict[str, Any]:
    import httpx

    bundle = make_bundle(work / "store")
    pngs = sample_pngs(64)
    env = {**os.environ, "MEDZOO_HOME": str(work / "store"), "MEDZOO_SERVE_PATHOLOGY": bundle.name,
           "BENTOML_HOME": str(work / "bentoml_home"), "BENTOML_DO_NOT_TRACK": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("MEDZOO_SERVE_CONFIG", None)
    urls: dict[str, str] = {}
    procs: list[subprocess.Popen] = []  # type: ignore[type-arg]
    trees = {"bentoml": REPO, **({"before": before.resolve()} if before else {})}
    try:
        for name in (*trees, "naive"):
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            server_env = env
            if name in trees:
                cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:MedZoo", "--host", "127.0.0.1",
                       "--port", str(port), "--working-dir", str(trees[name])]
                server_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(trees[name]),
                                                                                os.environ.get("PYTHONPATH")])),
                              "BENTOML_HOME": str(work / f"bentoml_home_{name}")}
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--naive-server", str(bundle),
                       "--port", str(port)]
            procs.append(start(cmd, server_env, work / f"{name}.log"))
            wait_ready(urls[name], procs[-1], "/readyz" if name in trees else "/pathology")
        ort: dict[int, list[float]] = {c: [] for c in levels}
        ort_1: list[float] = []
        runs: dict[str, dict[int, list[Level]]] = {k: {c: [] for c in levels} for k in (*trees, "naive")}
        served_procs = {name: worker_processes(proc) for name, proc in zip(trees, procs, strict=False)}
        for c in levels:
            for _ in range(rounds):
                ort[c].append(raw_ort(bundle, seconds=2.0))
                if c == 1:  # the ceiling where nothing can be batched
                    ort_1.append(raw_ort(bundle, batch=1, seconds=2.0))
                n = max(n_requests, 2 * c)
                for name in trees:
                    runs[name][c].append(measured_load(urls[name], pngs, c, n, served_procs[name]))
                runs["naive"][c].append(asyncio.run(_load(urls["naive"], pngs, c, n)))
        stats = httpx.get(urls["bentoml"] + "/stats", timeout=30).json()["batches"].get("pathology", {})
        served_provider = _served_provider(urls["bentoml"])
    finally:
        for proc in procs:
            stop(proc)
    ratios = {c: float(np.median([s.rps / o for s, o in zip(runs["bentoml"][c], ort[c], strict=True)])) for c in levels}
    vs_naive = {c: float(np.median([s.rps / n.rps for s, n in zip(runs["bentoml"][c], runs["naive"][c], strict=True)]))
                for c in levels}
    vs_before = {c: float(np.median([s.rps / b.rps for s, b in zip(runs["bentoml"][c], runs["before"][c],
                                                                     strict=True)])) for c in levels} if before else {}
    return {"ort": {c: float(np.median(v)) for c, v in ort.items()}, "vs_before": vs_before,
            "ort_1": float(np.median(ort_1)) if ort_1 else raw_ort(bundle, batch=1, seconds=2.0), "ratios": ratios,
            "vs_naive": vs_naive, "rounds": rounds,
            "results": {k: [median_level(v[c]) for c in levels] for k, v in runs.items()},
            "stats": stats, "load": os.getloadavg(), "cpus": os.cpu_count(),
            "served_provider": served_provider, "ort_provider": _provider(bundle)}


def _served_provider(url: str) -> str | None:
    """The provider the service's pathology model runs on (``/models``), None when it does not say."""
    import httpx

    try:
        served = httpx.get(url + "/models", timeout=30).json()["models"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    return next((m.get("provider") for m in served if isinstance(m, dict) and m.get("task") == "pathology"), None)


def _provider(bundle: Path) -> str:
    """The provider raw ONNX Runtime gets here (``raw_ort``'s options)."""
    from zoo.runtime import OnnxModel
    from zoo.settings import runtime_options

    return OnnxModel.open(bundle, runtime_options(spinning=False)).provider


def write_results(out: dict[str, Any], path: Path) -> None:
    """The figures as JSON (``--json``), for bench/gpu_check.py."""
    import dataclasses

    from zoo.io import write_json

    results = {k: [dataclasses.asdict(level) for level in v] for k, v in out["results"].items()}
    write_json(path, {**out, "results": results, "load": list(out["load"])})


def report(out: dict[str, Any], markdown: bool) -> str:
    import bentoml
    import onnxruntime
    import torch

    served, naive = out["results"]["bentoml"], out["results"]["naive"]
    ort_all = list(out["ort"].values())
    head = (f"ResNet-18 (28 px, small stem, {NUM_CLASSES} classes, untrained), one PNG per request, loopback; "
            f"raw ONNX Runtime {min(ort_all):.0f}-{max(ort_all):.0f} img/s at batch 64 (measured before each "
            f"round), {out['ort_1']:.0f} img/s at batch 1 (measured in the concurrency-1 rounds); ONNX Runtime's "
            f"session options as in the service. Medians of {out['rounds']} interleaved rounds. "
            f"Machine: {out['cpus']} CPU cores ({platform.processor() or platform.machine()}), shared with other "
            f"jobs (load average {out['load'][0]:.1f} at the end), served on {out['served_provider']}; "
            f"bentoml {bentoml.__version__}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}.")
    rows = []
    for s, n in zip(served, naive, strict=True):
        c = s.concurrency
        rows.append([f"{c}", f"{s.requests}", f"{s.rps:.1f}", f"{s.p50_ms:.0f}", f"{s.p99_ms:.0f}",
                     f"{out['ort'][c]:.0f}", f"{out['ratios'][c]:.2f}", f"{s.mean_batch or 0:.1f}", f"{n.rps:.1f}",
                     f"{n.p50_ms:.0f}", f"{n.p99_ms:.0f}", f"{out['vs_naive'][c]:.2f}", f"{s.errors + n.errors}"])
    if out["vs_before"]:
        before = {s.concurrency: s for s in out["results"]["before"]}
        for row in rows:
            c = int(row[0])
            row += [f"{before[c].rps:.1f}", f"{out['vs_before'][c]:.2f}"]
    hist = out["stats"].get("sizes", {})
    notes = [f"Batch sizes the served model saw over the whole run (images per call: calls): "
             f"{', '.join(f'{k}: {v}' for k, v in hist.items())}; mean {out['stats'].get('mean', 0):.1f}.",
             "CPU ms per request (service processes and the load client): " + "; ".join(
                 f"concurrency {s.concurrency}: " + ", ".join(f"{k} {v:.2f}" for k, v in s.cpu_ms.items())
                 for s in served if s.cpu_ms) + "."]
    names = ["concurrency", "requests", "served req/s", "p50 ms", "p99 ms", "raw ORT img/s", "served / ORT",
             "mean batch", "naive req/s", "naive p50 ms", "naive p99 ms", "served / naive", "errors"]
    if out["vs_before"]:
        names += ["before req/s", "after / before"]
    if markdown:
        lines = [head, "", "| " + " | ".join(names) + " |", "|" + "---:|" * len(names)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join([*lines, "", *notes])
    widths = [max(len(h), 6) for h in names]
    lines = [head, " ".join(h.rjust(w) for h, w in zip(names, widths, strict=True))]
    lines += [" ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([*lines, *notes])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200, help="timed requests per concurrency level (at least 2x it)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per level (medians reported)")
    p.add_argument("--markdown", action="store_true", help="print the table for docs/BENCHMARKS.md")
    p.add_argument("--before", type=Path, metavar="TREE", help="also serve from this checkout (after / before)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--naive-server", metavar="BUNDLE", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.naive_server:
        run_naive(Path(args.naive_server), args.port)
        return
    # SIGTERM (a caller's timeout) unwinds through bench()'s `finally`, which stops the servers it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = bench(args.concurrency, args.requests, args.rounds, args.before)
    print(report(out, args.markdown))
    if args.json:
        write_results(out, args.json)


if __name__ == "__main__":
    main()
