"""The BentoML service, started for real (``bentoml serve`` in a subprocess) and called over HTTP.

One server for the module, on a free loopback port, serving copies of the session's bundles
(synthetic skin / organ / pathology, the real BreastMNIST one as the extra task ``breast``, a
second synthetic pathology bundle so the ensemble has two members, and a task ``chest`` with no
bundle). Answers are compared with ``zoo.evaluate.evaluate_bundle`` and with ONNX Runtime on the
same decoded arrays. The endpoints are found in ``/docs.json`` and called by name through
``bentoml.SyncHTTPClient`` / ``AsyncHTTPClient``, with curl-style multipart, and with raw sockets
for what no client library sends (stalled uploads).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from servers import ZooServer as Server
from servers import serve_env, start_zoo_serve

REPO = Path(__file__).resolve().parents[1]
MAX_FILE_MB = 1  # the server's per-file limit in these tests
MAX_REQUEST_MB = 20
MAX_IMAGES = 64
# A request-pixel budget above the default (256 MP), so that one request can hold more decoding
# than REQUEST_TIMEOUT_S allows (the test that decoding stops when a request runs out of time).
MAX_REQUEST_MEGAPIXELS = 2000
REQUEST_TIMEOUT_S = 8
BODY_TIMEOUT_S = 2
FLAGS = {"skin": "dermamnist", "organ": "organamnist", "pathology": "pathmnist", "breast": "breastmnist"}


# --------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def array_to_image(arr: np.ndarray) -> Image.Image:
    """uint8 (C, H, W) → L or RGB image."""
    return Image.fromarray(arr[0]) if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0))


def write_pngs(images: np.ndarray, folder: Path, prefix: str) -> list[Path]:
    """Real PNG files of uint8 (N, C, H, W) images."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(images):
        p = folder / f"{prefix}-{i:03d}.png"
        array_to_image(arr).save(p)
        paths.append(p)
    return paths


def files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (name, data, "application/octet-stream")) for name, data in items]


def answer_of(model: Any, x: np.ndarray) -> Any:
    """What the service answers for decoded images: the exported model's outputs under the one rule
    (zoo.postprocess.interpret: calibrated probabilities, the OOD flag)."""
    from zoo.postprocess import interpret

    out = model.outputs(x)
    return interpret(out["logits"], model.meta, out.get("ood_score"))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def noise_image(mode: str = "RGB", size: tuple[int, int] = (28, 28), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


# --------------------------------------------------------------------------- fixtures


@dataclass
class Served:
    root: Path  # the store the server reads
    bundles: dict[str, Path]  # task → bundle directory
    members: list[Path]  # ensemble members
    data_roots: dict[str, Path]  # task → data root of its MedMNIST file


def _copy_and_export(src: Path, store_root: Path, data_root: Path) -> Path:
    from export import ensure_exported

    dst = store_root / "bundles" / src.name
    if not dst.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx", "model.fp16.onnx", "*.pt"))
        ensure_exported(dst, ("onnx",), data_root)
    return dst


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest,
           synthetic_bundles: dict[str, Path], synthetic_root: Path) -> Served:
    """Copies of the session bundles, exported to ONNX, in a store of their own."""
    from zoo.recipe import apply_overrides, find_recipe
    from zoo.train import train

    root = tmp_path_factory.mktemp("serve_store")
    bundles = {t: _copy_and_export(b, root, synthetic_root) for t, b in synthetic_bundles.items()}
    data_roots = {t: synthetic_root for t in bundles}
    try:
        breast = request.getfixturevalue("breast_bundle")
        breast_root = request.getfixturevalue("breast_root")
    except pytest.skip.Exception:
        breast = None
    if breast is not None:
        bundles["breast"] = _copy_and_export(breast, root, breast_root)
        data_roots["breast"] = breast_root
    # A second pathology bundle (another seed) so that the ensemble has two members.
    recipe = apply_overrides(find_recipe("path", "simplecnn"), {"epochs": 1, "batch_size": 32, "seed": 1})
    second = train(recipe, data_root=synthetic_root, store=root, progress=False, download=False).bundle
    from export import ensure_exported

    ensure_exported(second, ("onnx",), synthetic_root)
    return Served(root=root, bundles=bundles, members=sorted([bundles["pathology"], second]), data_roots=data_roots)


SERVER_SETTINGS = {  # the serving settings of every server here, as environment variables
    "MEDZOO_ENSEMBLE_ARCH": "simplecnn",
    "MEDZOO_MAX_FILE_MB": str(MAX_FILE_MB),
    "MEDZOO_MAX_REQUEST_MB": str(MAX_REQUEST_MB),
    "MEDZOO_MAX_IMAGES": str(MAX_IMAGES),
    "MEDZOO_MAX_REQUEST_MEGAPIXELS": str(MAX_REQUEST_MEGAPIXELS),
    "MEDZOO_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
    "MEDZOO_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "MEDZOO_MAX_BATCH_SIZE": "32",
}


def server_env(served: Served, config: Path, bentoml_home: Path) -> dict[str, str]:
    """The environment of a server (or ``zoo serve --package``) of ``served`` with ``config``."""
    return serve_env(served.root, config, bentoml_home, SERVER_SETTINGS)


@pytest.fixture(scope="module")
def server(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``bentoml serve serving.service:MedZoo`` on a free loopback port, until the module ends."""
    tasks: dict[str, Any] = {t: b.name for t, b in served.bundles.items()}
    tasks["chest"] = None  # a task without a bundle: answers 503, the others still work
    with start_zoo_serve(tmp_path_factory.mktemp("server"), served.root, {"tasks": tasks}, SERVER_SETTINGS,
                         command="bentoml") as server:
        yield server


def _test_images(served: Served, task: str, split: str = "test") -> np.ndarray:
    from zoo.data import load_dataset

    splits = load_dataset(FLAGS[task], size=28, root=served.data_roots[task], download=False)
    return getattr(splits, split).images.numpy()


def _onnx(bundle: Path):  # type: ignore[no-untyped-def]
    from zoo.runtime import OnnxModel

    return OnnxModel.open(bundle)


def _good_png(seed: int = 0) -> bytes:
    return encode(noise_image(seed=seed))


# --------------------------------------------------------------------------- the service over HTTP


def test_models_lists_the_served_cards(server: Server, served: Served) -> None:
    from zoo.card import read_card

    body = server.client().get("/models").json()
    by_task = {m["task"]: m for m in body["models"]}
    for task, bundle in served.bundles.items():
        card = read_card(bundle)
        m = by_task[task]
        assert m["status"] == "ok"
        assert (m["id"], m["arch"], m["dataset"], m["labels"]) == (card.id, card.arch, FLAGS[task], card.labels)
        assert m["weights_sha256"] == card.weights_sha256
        assert m["provider"] == "CPUExecutionProvider"
        assert set(m["metrics"]) >= {"val", "test"}
    assert by_task["chest"]["status"] == "missing"
    assert "zoo train chest" in by_task["chest"]["message"]
    ens = body["ensemble"]
    assert ens["status"] == "ok" and sorted(x["path"] for x in ens["members"]) == [str(p) for p in served.members]


@pytest.mark.parametrize("task", ["skin", "organ", "pathology", "breast"])
def test_answers_equal_zoo_eval(server: Server, served: Served, task: str, tmp_path: Path) -> None:
    """Real PNG files of the test split, uploaded in one request: top classes and probabilities
    are those of ``evaluate_bundle`` (the PyTorch model) for the same images."""
    from zoo.card import read_card
    from zoo.evaluate import evaluate_bundle

    if task not in served.bundles:
        pytest.skip("no BreastMNIST bundle (the real file is not available)")
    bundle = served.bundles[task]
    ref = evaluate_bundle(bundle, "test", served.data_roots[task], device="cpu", download=False)
    n = min(MAX_IMAGES, len(ref["pred"]))
    paths = write_pngs(_test_images(served, task)[:n], tmp_path, task)
    k = len(read_card(bundle).labels)
    upload = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
    r = server.client().post(f"/{task}", files=upload, data={"top_k": str(k)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["id"] == read_card(bundle).id
    for i, res in enumerate(body["results"]):
        assert res["filename"] == paths[i].name
        assert res["model"] == {"id": read_card(bundle).id, "weights_sha256": read_card(bundle).weights_sha256}
        assert res["top"][0]["class"] == int(ref["pred"][i])
        probs = np.zeros(k)
        for t in res["top"]:
            probs[t["class"]] = t["prob"]
            assert t["label"] == read_card(bundle).labels[t["class"]]
        np.testing.assert_allclose(probs, ref["probs"][i], atol=1e-4)
    # the default top-k is 3, and one image alone answers the same
    one = server.client().post(f"/{task}", files=upload[:1]).json()["results"][0]
    assert [t["class"] for t in one["top"]] == [t["class"] for t in body["results"][0]["top"][:min(3, k)]]


def test_missing_task_answers_503_and_the_others_still_work(server: Server) -> None:
    c = server.client()
    r = c.post("/chest", files=files(("a.png", _good_png())))
    assert r.status_code == 503
    assert "zoo train chest" in r.json()["error"]
    assert c.post("/skin", files=files(("a.png", _good_png()))).status_code == 200


def test_concurrent_requests_are_batched(server: Server, served: Served) -> None:
    """200 concurrent single-image requests: all answered, each with its own image's classes,
    and the pathology model saw batches of more than one image."""
    from zoo.preprocess import load_image

    model = _onnx(served.bundles["pathology"])
    images = np.concatenate([_test_images(served, "pathology", s) for s in ("test", "val", "train")])[:200]
    pngs = [encode(array_to_image(a)) for a in images]
    expected = answer_of(model, np.stack([load_image(p, model.preprocessing) for p in pngs])).probs
    before = server.client().get("/stats").json()["batches"].get("pathology", {}).get("sizes", {})

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*[
                client.post("/pathology", files=files((f"{i}.png", p)), data={"top_k": "9"})
                for i, p in enumerate(pngs)
            ])

    responses = asyncio.run(run())
    failed = [(i, r.status_code, r.text[:300]) for i, r in enumerate(responses) if r.status_code != 200]
    assert not failed, failed
    for i, r in enumerate(responses):
        res = r.json()["results"][0]
        assert res["filename"] == f"{i}.png"
        got = np.zeros(expected.shape[1])
        for t in res["top"]:
            got[t["class"]] = t["prob"]
        np.testing.assert_allclose(got, expected[i], atol=1e-5)
    after = server.client().get("/stats").json()["batches"]["pathology"]["sizes"]
    seen = Counter({int(k): v for k, v in after.items()}) - Counter({int(k): v for k, v in before.items()})
    assert sum(k * v for k, v in seen.items()) == len(pngs)
    assert max(seen) > 1, f"no batching: batch sizes {dict(seen)}"


# --------------------------------------------------------------------------- bad inputs


def _bomb_png() -> bytes:
    """A PNG of 8001 x 8001 black pixels (64 M pixels, a few kB): above MAX_PIXELS."""
    return encode(Image.new("L", (8001, 8001)), "PNG", optimize=False)


def _header_bomb_png() -> bytes:
    """A PNG header claiming 100000 x 100000 pixels."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def _corrupt_png() -> bytes:
    png = bytearray(_good_png())
    i = png.index(b"IDAT") + 4
    png[i + 10 : i + 60] = bytes(50)
    return bytes(png)


def _oversized_png() -> bytes:
    rng = np.random.default_rng(1)
    return _good_png()[:16] + rng.bytes(int(1.5 * 2**20))


BAD_FILES: dict[str, tuple[Callable[[], bytes], set[int]]] = {
    "empty": (lambda: b"", {400}),
    "text": (lambda: b"just some text, not an image\n", {415}),
    "pdf": (lambda: b"%PDF-1.4\n1 0 obj << >> endobj\n%%EOF\n", {415}),
    "gif": (lambda: encode(noise_image("P"), "GIF"), {415}),
    "bmp of a variant Pillow does not read": (
        lambda: encode(noise_image(size=(8, 8)), "BMP")[:30] + struct.pack("<I", 7) + encode(noise_image(size=(8, 8)),
                                                                                           "BMP")[34:], {415}),
    "png signature then garbage": (lambda: b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, {415, 422}),
    "corrupt png": (_corrupt_png, {422}),
    "truncated png": (lambda: _good_png()[: len(_good_png()) // 2], {422}),
    "truncated jpeg": (lambda: encode(noise_image(size=(64, 64)), "JPEG")[:400], {422}),
    "decompression bomb": (_bomb_png, {413}),
    "header bomb": (_header_bomb_png, {413}),
    "oversized file": (_oversized_png, {413}),
    "float tiff without a finite pixel": (
        lambda: encode(Image.fromarray(np.full((8, 8), np.nan, np.float32)), "TIFF"), {422}),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_refused_with_4xx(server: Server, case: str) -> None:
    make, statuses = BAD_FILES[case]
    c = server.client()
    r = c.post("/skin", files=files((f"{case}.bin", make())))
    assert r.status_code in statuses, (r.status_code, r.text)
    body = r.json()
    assert body["error"] and body["results"][0]["status"] == r.status_code
    assert c.post("/skin", files=files(("ok.png", _good_png()))).status_code == 200


def test_mixed_request_answers_per_item(server: Server, served: Served) -> None:
    from zoo.preprocess import load_image

    good0, good2 = _good_png(0), _good_png(2)
    r = server.client().post("/skin", files=files(("a.png", good0), ("b.png", _corrupt_png()), ("c.png", good2),
                                                  ("d.txt", b"")))
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["index"] for x in res] == [0, 1, 2, 3]
    assert res[1]["status"] == 422 and "corrupt" in res[1]["error"] and "top" not in res[1]
    assert res[3]["status"] == 400 and res[3]["error"] == "empty file"
    model = _onnx(served.bundles["skin"])
    expected = model.predict(np.stack([load_image(g, model.preprocessing) for g in (good0, good2)])).argmax(1)
    assert [res[0]["top"][0]["class"], res[2]["top"][0]["class"]] == expected.tolist()
    # every image bad: the request fails with their status
    r = server.client().post("/skin", files=files(("b.png", _corrupt_png()), ("c.png", _corrupt_png())))
    assert r.status_code == 422 and len(r.json()["results"]) == 2
    # the ensemble answers per image too (a refused one used to fail the whole request with 400)
    r = server.client().post("/pathology_ensemble", files=files(("a.png", good0), ("b.png", _corrupt_png())))
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert res[0]["status"] == 200 and res[0]["members"] and res[1]["status"] == 422 and "corrupt" in res[1]["error"]


def _mode_cases() -> dict[str, bytes]:
    rgb = noise_image(size=(40, 30))
    rng = np.random.default_rng(3)
    wide = (rng.random((30, 40)) * 4000).astype(np.uint16)
    frames = [noise_image(size=(28, 28), seed=s) for s in (4, 5)]
    multi = io.BytesIO()
    frames[0].save(multi, "TIFF", save_all=True, append_images=frames[1:])
    return {
        "palette png": encode(rgb.convert("P"), "PNG"),
        "palette png with transparency": encode(rgb.convert("P"), "PNG", transparency=0),
        "rgba png": encode(rgb.convert("RGBA"), "PNG"),
        "la png": encode(rgb.convert("LA"), "PNG"),
        "cmyk jpeg": encode(rgb.convert("CMYK"), "JPEG"),
        "cmyk tiff": encode(rgb.convert("CMYK"), "TIFF"),
        "16-bit grey png": encode(Image.fromarray(wide), "PNG"),
        "16-bit grey tiff": encode(Image.fromarray(wide), "TIFF"),
        "32-bit int tiff": encode(Image.fromarray(wide.astype(np.int32) * 1000), "TIFF"),
        "float tiff": encode(Image.fromarray(wide.astype(np.float32) / 4000), "TIFF"),
        "float tiff with nan and inf": encode(Image.fromarray(np.where(wide > 3900, np.nan, np.where(
            wide < 100, np.inf, wide / 4000)).astype(np.float32)), "TIFF"),
        "bilevel png": encode(rgb.convert("1"), "PNG"),
        "grey png": encode(rgb.convert("L"), "PNG"),
        "rgb bmp": encode(rgb, "BMP"),
        "rgb jpeg": encode(rgb, "JPEG"),
        "lab tiff": encode(rgb.convert("LAB"), "TIFF"),
        "multi-frame tiff": multi.getvalue(),
        "large rgb png": encode(noise_image(size=(640, 480)), "PNG"),
    }


@pytest.mark.parametrize("task", ["skin", "organ"])  # an RGB model and a grey one
@pytest.mark.parametrize("case", list(_mode_cases()))
def test_every_image_mode_is_converted_by_the_documented_rule(server: Server, served: Served, task: str,
                                                              case: str) -> None:
    """Each mode answers 200 with the classes of ``load_image`` (zoo.preprocess) + the model."""
    from zoo.preprocess import load_image

    data = _mode_cases()[case]
    model = _onnx(served.bundles[task])
    expected = answer_of(model, load_image(data, model.preprocessing)[None]).probs[0]
    r = server.client().post(f"/{task}", files=files((case, data)), params={"top_k": "2"})
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]["top"]
    assert [t["class"] for t in top] == np.argsort(-expected, kind="stable")[:2].tolist()
    np.testing.assert_allclose([t["prob"] for t in top], np.sort(expected)[::-1][:2], atol=1e-5)


def test_raw_image_body(server: Server) -> None:
    r = server.client().post("/organ", content=_good_png(), headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["results"][0]["filename"] == "body"


# --------------------------------------------------------------------------- ensemble


def test_ensemble_averages_member_logits(server: Server, served: Served) -> None:
    from zoo.preprocess import load_image

    members = [_onnx(p) for p in served.members]
    images = _test_images(served, "pathology")[:8]
    pngs = [encode(array_to_image(a)) for a in images]
    r = server.client().post("/pathology_ensemble", files=files(*[(f"{i}.png", p) for i, p in enumerate(pngs)]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(m["id"] for m in body["model"]["ensemble"]) == sorted(m.id for m in members)
    order = [m["id"] for m in body["model"]["ensemble"]]
    by_id = {m.id: m for m in members}
    from zoo.ensemble import combine

    x = np.stack([load_image(p, members[0].preprocessing) for p in pngs])
    outs = [by_id[i].outputs(x) for i in order]
    # each member's logits calibrated by its own card, then averaged (zoo.ensemble.combine)
    from zoo.postprocess import calibrated_logits, two_class_logits

    calibrated = [calibrated_logits(o["logits"], by_id[i].meta.calibration) for o, i in zip(outs, order, strict=True)]
    if len({c.shape[1] for c in calibrated}) > 1:  # a Dirichlet-calibrated member answers with K columns
        calibrated = [two_class_logits(c) for c in calibrated]
    member_logits = np.stack(calibrated, axis=1)  # (N, M, K)
    mean = member_logits.mean(axis=1)
    expected = combine([o["logits"] for o in outs], [by_id[i].meta for i in order], [o.get("ood_score") for o in outs])
    for n, res in enumerate(body["results"]):
        np.testing.assert_allclose(res["logits"], mean[n], atol=1e-5)
        np.testing.assert_allclose(res["probs"], expected.probs[n], atol=1e-5)
        top = int(mean[n].argmax())
        assert res["top"][0]["class"] == top
        assert [m["class"] for m in res["members"]] == member_logits[n].argmax(1).tolist()
        assert res["agreement"] == pytest.approx(float((member_logits[n].argmax(1) == top).mean()))
        if expected.in_distribution is not None:
            assert res["in_distribution"] == bool(expected.in_distribution[n])


def _local_frontend(cfg: Any) -> Any:
    """The API layer over the models in this process (same code as the server, no HTTP)."""
    from serving.frontend import Frontend
    from serving.models import LocalInference, ModelTable

    return Frontend(LocalInference(ModelTable(cfg)), cfg.limits, cfg.top_k, refuse_ood=cfg.refuse_ood)


@pytest.mark.parametrize("members", ["default arch", "one member"])
def test_ensemble_with_fewer_than_two_members_answers_503(served: Served, members: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process (same handlers, no second server): resnet152 by default, of which there is none."""
    from serving.config import load_config
    from serving.uploads import Upload

    monkeypatch.setenv("MEDZOO_HOME", str(served.root))
    monkeypatch.setenv("MEDZOO_SERVE_SOURCE", "store")
    if members == "one member":
        monkeypatch.setenv("MEDZOO_ENSEMBLE_MEMBERS", served.members[0].name)
    cfg = load_config().model_copy(update={"store": served.root})
    fe = _local_frontend(cfg)

    async def run() -> tuple[tuple[int, Any], tuple[int, Any]]:
        ens = await fe.ensemble([Upload(0, "a.png", _good_png())], None)
        task = await fe.classify("pathology", [Upload(0, "a.png", _good_png())], None)
        return ens, task

    (status, body), (task_status, _) = asyncio.run(run())
    assert status == 503
    assert "zoo train path resnet152 --seed 1" in body.error and "zoo train path resnet152 --seed 2" in body.error
    assert task_status == 200  # the tasks themselves still answer


# --------------------------------------------------------------------------- typed endpoints: OpenAPI, BentoML clients

TASK_ROUTES = ("skin", "organ", "pathology", "breast", "chest")


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A schema with its top-level ``$ref`` (``#/components/schemas/X``) followed."""
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def test_every_route_is_a_method_or_added_by_the_one_route_function(server: Server) -> None:
    """The running service's routes (/docs.json), each found in the API class: written out as a method
    of ``MedZoo``, or added by ``task_routes`` (the one function for the configured tasks' routes); and
    no class in serving/ is built with ``type()``."""
    import ast

    import psutil

    paths = set(server.client().get("/docs.json").json()["paths"])
    code = ("import json, serving.service as s; "
            "print(json.dumps({a.route: a.func.__qualname__ for a in s.MedZoo.apis.values()}))")
    env = psutil.Process(server.proc.pid).environ()  # the server's config
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    routes: dict[str, str] = json.loads(done.stdout.splitlines()[-1])
    assert set(routes) <= paths and {"/skin", "/skin/explain", "/breast", "/pathology_ensemble"} <= set(routes)
    for route, qualname in routes.items():
        name = route.strip("/").replace("/explain", "")
        written = qualname == f"MedZoo.{name}" or qualname == f"MedZoo.explain_{name}"
        assert written or qualname.startswith("task_routes.<locals>."), (route, qualname)
    for path in (REPO / "serving").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "type":
                assert len(node.args) < 3, f"{path.name}:{node.lineno} builds a class with type()"


def test_openapi_lists_every_route_with_request_and_response_schemas(server: Server, served: Served) -> None:
    """``/docs.json`` (the Swagger page's source) has each task, the ensemble, /models and /stats,
    with the multipart request (files + top_k) and the answer's schema, per-image fields included."""
    c = server.client()
    spec = c.get("/docs.json").json()
    routes = [t for t in TASK_ROUTES if t in served.bundles or t == "chest"]
    for route in (*routes, "pathology_ensemble"):
        op = spec["paths"][f"/{route}"]["post"]
        body = op["requestBody"]["content"]["multipart/form-data"]["schema"]
        body = _resolve(spec, body)
        assert body["properties"]["images"]["type"] == "array"
        assert body["properties"]["images"]["items"] == {"type": "string", "format": "binary"}
        assert body["properties"]["top_k"]["type"] == "integer" and body["required"] == ["images"]
        answer = _resolve(spec, op["responses"]["200"]["content"]["application/json"]["schema"])
        assert {"task", "model", "results"} <= set(answer["properties"])
        item = _resolve(spec, answer["properties"]["results"]["items"])
        assert {"index", "filename", "status", "error", "top", "calibrated", "ood_score",
                "in_distribution"} <= set(item["properties"])
        assert "413" in op["description"] and "415" in op["description"]
    for route, field in (("models", "models"), ("stats", "batches")):
        answer = _resolve(spec, spec["paths"][f"/{route}"]["post"]["responses"]["200"]["content"]["application/json"]
                          ["schema"])
        assert field in answer["properties"]
    ens = _resolve(spec, spec["paths"]["/pathology_ensemble"]["post"]["responses"]["200"]["content"]
                   ["application/json"]["schema"])
    ens_item = _resolve(spec, ens["properties"]["results"]["items"])
    assert {"probs", "logits", "agreement", "members"} <= set(ens_item["properties"])
    page = c.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_sync_client_calls_every_endpoint_by_name(server: Server, served: Served, tmp_path: Path) -> None:
    """``bentoml.SyncHTTPClient(url)`` finds the routes in /schema.json; real PNG and JPEG files of
    the test split (BreastMNIST when available) answer what the model says for them."""
    import bentoml
    from bentoml.exceptions import ServiceUnavailable

    from zoo.preprocess import load_image

    task = "breast" if "breast" in served.bundles else "organ"
    arrays = _test_images(served, task)[:3]
    paths = write_pngs(arrays, tmp_path, task)
    jpeg = tmp_path / f"{task}.jpg"
    array_to_image(arrays[0]).save(jpeg, quality=95)
    model = _onnx(served.bundles[task])
    expected = answer_of(model, np.stack([load_image(p, model.preprocessing) for p in (*paths, jpeg)])).probs
    with bentoml.SyncHTTPClient(server.url, timeout=60) as client:
        assert {*served.bundles, "chest", "pathology_ensemble", "models", "stats"} <= set(client.endpoints)
        out = client.call(task, images=[*paths, jpeg], top_k=2)
        assert [r["filename"] for r in out["results"]] == [p.name for p in (*paths, jpeg)]
        for res, probs in zip(out["results"], expected, strict=True):
            assert [t["class"] for t in res["top"]] == np.argsort(-probs, kind="stable")[:2].tolist()
            np.testing.assert_allclose([t["prob"] for t in res["top"]], np.sort(probs)[::-1][:2], atol=1e-5)
        one = client.skin(images=[paths[0]], top_k=3)  # by attribute, as users write it
        assert one["task"] == "skin" and len(one["results"][0]["top"]) == 3
        ens = client.pathology_ensemble(images=[paths[0]])
        assert len(ens["results"][0]["members"]) == len(served.members)
        assert {m["task"] for m in client.models()["models"]} >= set(served.bundles)
        assert client.stats()["requests"][task] >= 1
        with pytest.raises(ServiceUnavailable, match="zoo train chest"):
            client.chest(images=[paths[0]])


def test_async_client_calls_by_name(server: Server, tmp_path: Path) -> None:
    import bentoml

    png = tmp_path / "a.png"
    png.write_bytes(_good_png())

    async def run() -> dict[str, Any]:
        async with bentoml.AsyncHTTPClient(server.url, timeout=60) as client:
            return await client.organ(images=[png], top_k=1)

    out = asyncio.run(run())
    assert out["results"][0]["status"] == 200 and len(out["results"][0]["top"]) == 1


def _dicom_files() -> dict[str, bytes]:
    """Real DICOM files that pydicom ships: CT and MR (16-bit), JPEG 2000 and RLE compressed, RGB JPEG."""
    from pydicom.data import get_testdata_file

    names = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm")
    return {n: Path(get_testdata_file(n)).read_bytes() for n in names}


def _decoder_takes_dicom() -> bool:
    """Whether zoo.preprocess decodes DICOM (issue 10's other half; the service only routes it)."""
    from zoo.preprocess import ImageError, Preprocessing, load_image

    try:
        from pydicom.data import get_testdata_file

        load_image(Path(get_testdata_file("CT_small.dcm")).read_bytes(), Preprocessing(28, 28, 1, (0.5,), (0.5,)))
    except (ImageError, ImportError, OSError):
        return False
    return True


NEEDS_DECODER = pytest.mark.skipif(not _decoder_takes_dicom(), reason=(
    "zoo.preprocess does not yet decode DICOM nor bound its memory (issue 10, the decoding half): "
    "these service tests run once it does"))


@NEEDS_DECODER
@pytest.mark.parametrize("task", ["organ", "skin"])  # a grey model and an RGB one
def test_dicom_uploads_answer_what_the_decoder_and_model_say(server: Server, served: Served, task: str,
                                                             tmp_path: Path) -> None:
    import bentoml

    from zoo.preprocess import load_image

    dicoms = _dicom_files()
    paths = []
    for name, data in dicoms.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    model = _onnx(served.bundles[task])
    expected = answer_of(model, np.stack([load_image(d, model.preprocessing) for d in dicoms.values()])).probs
    with bentoml.SyncHTTPClient(server.url, timeout=60) as client:
        out = client.call(task, images=paths, top_k=1)
    for res, probs in zip(out["results"], expected, strict=True):
        assert res["status"] == 200, res
        assert res["top"][0]["class"] == int(probs.argmax())
        assert res["top"][0]["prob"] == pytest.approx(float(probs.max()), abs=1e-5)
    raw = server.client().post(f"/{task}", content=dicoms["CT_small.dcm"],
                               headers={"content-type": "application/dicom"})
    assert raw.status_code == 200 and raw.json()["results"][0]["top"][0]["class"] == int(expected[0].argmax())


# --------------------------------------------------------------------------- hardening (issue 10's defects)


def _raw_request(url: str, head: bytes, body: bytes, wait_s: float) -> tuple[float, bytes]:
    """Send ``head + body`` on a raw socket, then read the answer for up to ``wait_s`` s."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        s.sendall(head + body)
        t0 = time.monotonic()
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
        return time.monotonic() - t0, data


@pytest.mark.parametrize("kind", ["raw body"])  # multipart: tests/test_uploads.py (no server)
def test_stalled_upload_gets_408_after_the_body_timeout(server: Server, kind: str) -> None:
    """An upload that stops sending is answered 408 after body_timeout_s (not held until the
    request timeout and answered 504); the server still answers others."""
    png = _good_png()
    if kind == "raw body":
        head = b"POST /skin HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        body = png
    else:
        head = (b"POST /skin HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b0\r\n"
                b"Content-Length: 100000\r\n\r\n")
        body = b'--b0\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n' + png[:50]
    took, answer = _raw_request(server.url, head, body, wait_s=REQUEST_TIMEOUT_S + 10)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert BODY_TIMEOUT_S - 0.5 < took < BODY_TIMEOUT_S + 3
    assert server.client().post("/skin", files=files(("ok.png", png))).status_code == 200


def _png_16bit(side: int = 7999) -> bytes:
    """A 16-bit grey PNG of side x side pixels (64 MP for 7999), a few hundred kB."""
    rng = np.random.default_rng(0)
    arr = np.zeros((side, side), np.uint16)
    arr[:: side // 16, :: side // 16] = rng.integers(0, 65535, arr[:: side // 16, :: side // 16].shape)
    return encode(Image.fromarray(arr), "PNG")


def _peak_growth(worker: Any, run: Callable[[], Any]) -> tuple[Any, int]:
    """``run()``'s result and how far the process's peak RSS rose above its RSS before (bytes)."""
    Path(f"/proc/{worker.pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = worker.memory_info().rss
    out = run()
    hwm = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{worker.pid}/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return out, hwm - before


@NEEDS_DECODER
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_64mp_16bit_png_costs_bounded_memory(server: Server) -> None:
    """The 16-bit 7999 x 7999 PNG (inside every limit): 200 or 413, and the API worker's peak memory
    grows by little, also for two at once (it used to take ~2 GB each)."""
    data = _png_16bit()
    assert len(data) < MAX_FILE_MB * 2**20
    worker = server.api_worker()

    async def two() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*[c.post("/organ", files=files((f"{i}.png", data))) for i in range(2)])

    one, growth_one = _peak_growth(worker, lambda: server.client().post("/organ", files=files(("big.png", data))))
    assert one.status_code in (200, 413), one.text
    pair, growth_two = _peak_growth(worker, lambda: asyncio.run(two()))
    assert all(r.status_code in (200, 413) for r in pair), [r.text for r in pair]
    assert growth_one < 400 * 2**20, f"one image: the API worker grew by {growth_one / 2**20:.0f} MB"
    assert growth_two < 700 * 2**20, f"two images: the API worker grew by {growth_two / 2**20:.0f} MB"


def test_many_large_images_in_one_request_hit_the_pixel_budget_before_decoding(server: Server) -> None:
    """45 images of 64 MP (the issue's 17.6 MB request): 413 from the headers, at once, naming the
    per-request pixel limit; the API worker decoded none of them."""
    data = encode(Image.new("L", (7999, 7999)), "PNG")  # 64 MP, ~60 kB
    worker = server.api_worker()
    cpu0, t0 = sum(worker.cpu_times()[:2]), time.monotonic()
    r = server.client().post("/skin", files=files(*[(f"{i}.png", data) for i in range(45)]))
    took, cpu = time.monotonic() - t0, sum(worker.cpu_times()[:2]) - cpu0
    assert r.status_code == 413, r.text
    assert f"{MAX_REQUEST_MEGAPIXELS * 1_000_000:,} pixel limit per request" in r.json()["error"]
    assert took < 5 and cpu < 2, (took, cpu)


@NEEDS_DECODER
def test_a_request_past_its_time_stops_decoding(server: Server) -> None:
    """A request with more decoding than request_timeout_s allows (within the pixel budget) is
    answered 504 at its time, and the API worker stops decoding then (it used to go on ~110 s)."""
    data = _png_16bit()  # 64 MP, about 0.3-1 s to decode each
    n = MAX_REQUEST_MEGAPIXELS // 64
    worker = server.api_worker()
    t0 = time.monotonic()
    r = server.client(timeout=REQUEST_TIMEOUT_S + 30).post("/organ", files=files(*[(f"{i}.png", data)
                                                                                   for i in range(n)]))
    took = time.monotonic() - t0
    if r.status_code == 200:
        pytest.skip(f"this machine decoded {n} x 64 MP within {REQUEST_TIMEOUT_S} s: nothing to stop")
    assert r.status_code == 504 and took < REQUEST_TIMEOUT_S + 5, (r.status_code, took, r.text[:200])
    time.sleep(1.5)  # the image being decoded when time ran out may finish
    cpu0 = sum(worker.cpu_times()[:2])
    time.sleep(3)
    spent = sum(worker.cpu_times()[:2]) - cpu0
    assert spent < 0.5, f"the API worker used {spent:.1f} s of CPU in the 3 s after answering"
    assert server.client().post("/organ", files=files(("ok.png", _good_png()))).status_code == 200


def test_bomb_refusals_quote_the_services_limit(server: Server) -> None:
    for data in (_bomb_png(), _header_bomb_png()):
        r = server.client().post("/skin", files=files(("bomb.png", data)))
        assert r.status_code == 413
        msg = r.json()["results"][0]["error"]
        assert "64,000,000 pixel limit" in msg, msg
        assert "178956970" not in msg and "89478485" not in msg


def _many_frames_tiff(frames: int) -> bytes:
    """A TIFF of ``frames`` 1 x 1 pages (about 120 bytes each), written directly: Pillow's own writer
    takes minutes for tens of thousands of pages."""
    entry = struct.Struct("<HHII")
    header_size, strip = 8, 8  # the one pixel byte every page points at sits at offset 8
    first = header_size + 2  # IFDs start after the header and the pixel (padded to a word)
    ifd_size = 2 + 9 * entry.size + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", first) + b"\x7f\x00")
    for i in range(frames):
        nxt = first + (i + 1) * ifd_size if i + 1 < frames else 0
        tags = [(256, 4, 1, 1), (257, 4, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, strip),
                (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, 1, 1)]
        out += struct.pack("<H", len(tags)) + b"".join(entry.pack(*t) for t in tags) + struct.pack("<I", nxt)
    return bytes(out)


def _sample_rss(worker: Any, stop: Any, peak: list[int]) -> None:
    """The API worker's RSS every 20 ms until ``stop`` is set; the largest seen in ``peak[0]``."""
    while not stop.is_set():
        peak[0] = max(peak[0], worker.memory_info().rss)
        time.sleep(0.02)


def test_frame_and_aspect_ratio_bombs_are_refused_from_the_header(server: Server) -> None:
    """A TIFF of 8,000 pages (counting them took 2.5 s) and an image of 1 x 1,000,000 pixels (Pillow's
    resize of such a shape took gigabytes): 413 within a second each, saying why."""
    for name, data, reason in (("pages.tif", _many_frames_tiff(8_000), "frames"),
                               ("tall.png", encode(Image.new("L", (1, 1_000_000))), "aspect ratio")):
        t0 = time.monotonic()
        r = server.client().post("/organ", files=files((name, data), ("ok.png", _good_png())))
        took = time.monotonic() - t0
        assert r.status_code == 200 and took < 2, (took, r.text[:300])
        res = r.json()["results"]
        assert res[0]["status"] == 413 and reason in res[0]["error"], res[0]
        assert res[1]["status"] == 200


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_overload_is_shed_with_503_and_what_is_admitted_finishes(server: Server) -> None:
    """16 requests of four 64 MP images each at once (they all ran into 504 before): each is answered
    200 or, when its decoding could not finish soon, 503 with Retry-After; none times out, and the
    API worker stays under 1 GB all along (RGB and RGBA images, whose decoding takes 256-512 MB)."""
    import threading

    images = [encode(Image.new("L", (8000, 8000), 9)), encode(Image.new("RGB", (8000, 8000), (9, 8, 7))),
              encode(Image.new("RGBA", (8000, 8000), (9, 8, 7, 200))), encode(Image.new("L", (8000, 8000), 3))]
    worker = server.api_worker()
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_sample_rss, args=(worker, stop, peak))
    sampler.start()

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT_S + 30) as c:
            return await asyncio.gather(*[c.post("/organ", files=files(*[(f"{r}-{i}.png", data)
                                                                          for i, data in enumerate(images)]))
                                          for r in range(16)])

    try:
        answers = asyncio.run(flood())
    finally:
        stop.set()
        sampler.join()
    statuses = Counter(r.status_code for r in answers)
    print(f"16 x four 64 MP images: {dict(statuses)}, API worker peak RSS {peak[0] / 2**20:.0f} MB")
    assert set(statuses) <= {200, 503} and statuses[200] >= 1, statuses
    for r in answers:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and "retry in" in r.json()["error"], r.text
        else:
            assert [x["status"] for x in r.json()["results"]] == [200] * 4
    assert peak[0] < 2**30, f"the API worker reached {peak[0] / 2**20:.0f} MB"
    assert server.client().post("/organ", files=files(("ok.png", _good_png()))).status_code == 200


FUZZ_PER_FORMAT = 40


def test_fuzzed_files_get_the_same_verdict_over_http_in_zoo_score_and_the_python_api(
        server: Server, served: Served, tmp_path: Path) -> None:
    """Mutated real PNG / JPEG / TIFF / BMP / DICOM files, and GIF, WebP and TGA files: over HTTP each
    request (one good image among them) answers 200 with every file's own status, never 5xx; `zoo
    score` and `zoo.load().predict` accept exactly the files the service answers and refuse the rest."""
    import csv

    from fuzzing import FORMATS, corpus

    import zoo
    from zoo.errors import ImageError
    from zoo.score import score_folder

    ext = {"png": "png", "jpeg": "jpg", "tiff": "tif", "bmp": "bmp", "dicom": "dcm"}
    sample = [(f"{name}.{ext[fmt]}", data) for fmt in FORMATS for name, data in corpus(fmt, FUZZ_PER_FORMAT, seed=7)]
    sample += [("other.gif", encode(noise_image("P"), "GIF")), ("other.webp", encode(noise_image(), "WEBP")),
               ("other.tga", encode(noise_image(), "TGA"))]
    http: dict[str, int] = {}
    for start in range(0, len(sample), MAX_IMAGES - 1):
        r = server.client().post("/skin", files=files(("good.png", _good_png()), *sample[start:start + MAX_IMAGES - 1]))
        assert r.status_code == 200, r.text[:500]
        for res in r.json()["results"][1:]:
            assert res["status"] in (200, 400, 413, 415, 422), res
            http[res["filename"]] = res["status"]
    assert [http[f"other.{e}"] for e in ("gif", "webp", "tga")] == [415] * 3
    folder = tmp_path / "fuzz"
    folder.mkdir()
    for name, data in sample:
        (folder / name).write_bytes(data)
    summary = score_folder(folder, [served.bundles["skin"]], tmp_path / "scores.csv", workers=0, progress=False)
    with open(summary.out, newline="") as f:
        scored = {row["path"] for row in csv.DictReader(f)}
    model = zoo.load(served.bundles["skin"])
    api = set()
    for name, data in sample:
        try:
            model.predict(data)
            api.add(name)
        except ImageError:
            pass
    answered = {name for name, status in http.items() if status == 200}
    assert answered == scored == api
    assert 0 < len(answered) < len(sample)


def _tiff_with_compression(code: int) -> bytes:
    """A real deflate TIFF whose compression tag (259) is rewritten to ``code`` (first IFD)."""
    data = bytearray(encode(Image.new("L", (64, 64), 7), "TIFF", compression="tiff_adobe_deflate"))
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 259:
            struct.pack_into("<H", data, entry + 8, code)
    return bytes(data)


@NEEDS_DECODER
def test_tiff_with_an_unsupported_codec_gets_415_with_the_reason(server: Server) -> None:
    r = server.client().post("/skin", files=files(("slide.tif", _tiff_with_compression(34712))))  # JPEG 2000
    assert r.status_code == 415, r.text
    assert "compress" in r.json()["results"][0]["error"].lower()


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_to_zoo_serve_leaves_nothing_behind(served: Served, tmp_path: Path, sig: int) -> None:
    """``zoo serve`` (the real CLI) gets SIGTERM / SIGINT: it exits, no process of its server tree
    remains and the port is free for the next ``zoo serve``."""
    import psutil

    config = {"pathology": served.bundles["pathology"].name}
    args = ("--store", str(served.root), "serve", "--no-build")
    with start_zoo_serve(tmp_path, served.root, config, SERVER_SETTINGS, args=args) as server:
        tree = psutil.Process(server.proc.pid).children(recursive=True)
        assert len(tree) >= 3  # the BentoML arbiter, the API worker, the inference worker
        server.proc.send_signal(sig)
        assert server.proc.wait(timeout=60) == 128 + sig
        gone, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
        with socket.socket() as s:
            s.bind(("127.0.0.1", server.port))  # nothing holds the port any more


# --------------------------------------------------------------------------- config, runtime, CLI, build


def test_predict_bound_equals_predict(served: Served) -> None:
    """The io_binding path (used on GPU providers) gives the same logits, here on the CPU."""
    model = _onnx(served.bundles["skin"])
    x = _test_images(served, "skin")[:5]
    np.testing.assert_allclose(model.predict_bound(x), model.predict(x), atol=1e-6)


def test_zoo_serve_offline_without_data_stops_with_the_data_error(tmp_path: Path) -> None:
    env = {**os.environ, "MEDZOO_DATA": str(tmp_path / "data"), "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("MEDZOO_SERVE_CONFIG", None)
    r = subprocess.run([sys.executable, "-m", "zoo.cli", "--store", str(tmp_path / "store"), "serve", "--offline"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("zoo: error: dermamnist.npz is not in") and "downloads disabled" in last


def test_default_model_build(tmp_path: Path, synthetic_root: Path) -> None:
    """What `zoo serve` does for a task without a bundle, on the synthetic DermaMNIST file."""
    from serving.config import load_config
    from zoo.bootstrap import build_default_models, tasks_to_build

    cfg = load_config().model_copy(update={"store": tmp_path})
    assert tasks_to_build(cfg) == ["skin", "organ", "pathology"]
    lines: list[str] = []
    built = build_default_models(["skin"], store=tmp_path, data_root=synthetic_root, download=False,
                                 epochs=1, progress=False, say=lines.append)
    assert (built["skin"] / "model.onnx").is_file()
    assert tasks_to_build(cfg) == ["organ", "pathology"]
    assert any("training the default skin model" in line for line in lines)


@pytest.mark.slow
def test_bentoml_build_packs_models_and_service(served: Served, tmp_path: Path) -> None:
    """`zoo serve --package` then `bentoml build`, offline, into a private BentoML home."""
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"tasks": {t: b.name for t, b in served.bundles.items()}}))
    env = server_env(served, config, tmp_path / "bentoml_home")
    pkg = subprocess.run([sys.executable, "-m", "zoo.cli", "serve", "--package", "--no-build"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert pkg.returncode == 0, pkg.stderr
    tag = pkg.stdout.split()[1].rstrip(";")
    build = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    bentos = tmp_path / "bentoml_home" / "bentos" / "medzoo"
    info = yaml.safe_load(next(p for p in bentos.glob("*/bento.yaml")).read_text())
    assert [m["tag"] for m in info["models"]] == [tag]
    assert info["service"] == "serving.service:MedZoo"
    assert {s["name"] for s in info["services"]} == {"MedZoo", "MedZooInference", "MedZooExplainer"}
    src = next(p for p in bentos.glob("*/bento.yaml")).parent / "src"
    assert (src / "serving" / "ui" / "index.html").is_file() and (src / "serving" / "ui" / "app.js").is_file()
    model_dir = tmp_path / "bentoml_home" / "models" / tag.split(":")[0] / tag.split(":")[1]
    manifest = json.loads((model_dir / "serving.json").read_text())
    for task, bundle in served.bundles.items():
        assert manifest["tasks"][task] == f"bundles/{bundle.name}"
        assert (model_dir / "bundles" / bundle.name / "model.onnx").is_file()
    assert sorted(manifest["ensemble"]) == sorted(f"bundles/{p.name}" for p in served.members)


def test_package_with_a_task_unserved(served: Served, tmp_path: Path) -> None:
    """`zoo serve --package` when a configured task has no bundle: the others are packaged, the
    manifest says the task has none (BentoML's model metadata takes no null: JSON text there)."""
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"tasks": {**{t: b.name for t, b in served.bundles.items()}, "chest": None}}))
    env = server_env(served, config, tmp_path / "bentoml_home")
    pkg = subprocess.run([sys.executable, "-m", "zoo.cli", "serve", "--package", "--no-build"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert pkg.returncode == 0, pkg.stderr
    tag = pkg.stdout.split()[1].rstrip(";")
    model_dir = tmp_path / "bentoml_home" / "models" / tag.split(":")[0] / tag.split(":")[1]
    manifest = json.loads((model_dir / "serving.json").read_text())
    assert manifest["tasks"]["chest"] is None
    assert manifest["tasks"]["skin"] == f"bundles/{served.bundles['skin'].name}"
    assert manifest["settings"]["max_request_megapixels"] == MAX_REQUEST_MEGAPIXELS
    info = yaml.safe_load((model_dir / "model.yaml").read_text())
    assert json.loads(info["metadata"]["manifest"]) == manifest


# --------------------------------------------------------------------------- API-side coalescing (no server)


def test_coalescer_sends_waiting_arrays_together_and_splits_the_answers() -> None:
    """While ``depth`` calls are in flight, arrays wait and go together; each caller gets the rows
    of its own array; a caller cancelled while waiting sends nothing; a failure reaches every waiter."""
    from serving.batching import Coalescer

    sent: list[int] = []

    async def call(x: np.ndarray) -> np.ndarray:
        sent.append(len(x))
        await asyncio.sleep(0.05)
        if (x == 99).any():
            raise RuntimeError("backend down")
        return x[:, :1].astype(np.float32) * 10  # one row per image, tied to the image

    async def run() -> None:
        co = Coalescer(call, max_batch=8, depth=1)
        arrays = [np.full((n, 3), i, np.uint8) for i, n in enumerate((1, 2, 3, 1, 4))]
        first = asyncio.ensure_future(co(arrays[0]))
        await asyncio.sleep(0.01)  # the first call is in flight: the next ones wait
        rest = [asyncio.ensure_future(co(a)) for a in arrays[1:]]
        doomed = asyncio.ensure_future(co(np.full((5, 3), 7, np.uint8)))
        await asyncio.sleep(0)
        doomed.cancel()
        outs = await asyncio.gather(first, *rest)
        for i, (a, out) in enumerate(zip(arrays, outs, strict=True)):
            assert out.shape == (len(a), 1) and (out == i * 10).all()
        assert sent == [1, 6, 4]  # 2+3+1 fit in max_batch 8, the 4 go next; the cancelled 5 never
        busy = asyncio.ensure_future(co(np.full((1, 3), 1, np.uint8)))
        await asyncio.sleep(0.01)
        failing = [asyncio.ensure_future(co(np.full((1, 3), v, np.uint8))) for v in (99, 2)]  # sent together
        results = await asyncio.gather(busy, *failing, return_exceptions=True)
        assert not isinstance(results[0], Exception)
        assert all(isinstance(r, RuntimeError) for r in results[1:])

    asyncio.run(run())


# --------------------------------------------------------------------------- calibration and the OOD flag (issue 11)


def _photographs(n: int) -> np.ndarray:
    from zoo.data.shifted import natural_photographs

    return natural_photographs(28, 1, crops=2)[:n]


def test_served_scored_and_python_api_answers_are_identical(server: Server, served: Served, tmp_path: Path) -> None:
    """The same PNG files through HTTP, `zoo score` and `zoo.load().predict`: the same calibrated
    float32 probabilities and the same out-of-distribution flags (photographs flagged)."""
    import zoo
    from zoo.score import score_folder

    if "breast" not in served.bundles:
        pytest.skip("the real BreastMNIST is not available")
    bundle = served.bundles["breast"]
    folder = tmp_path / "images"
    paths = write_pngs(_test_images(served, "breast")[:6], folder, "scan")
    paths += write_pngs(_photographs(3), folder, "photo")
    r = server.client().post("/breast", files=files(*[(p.name, p.read_bytes()) for p in paths]), params={"top_k": 2})
    assert r.status_code == 200, r.text
    labels = zoo.load(bundle).labels
    http = {}
    for res in r.json()["results"]:
        by_label = {t["label"]: t["prob"] for t in res["top"]}
        http[res["filename"]] = (np.float32([by_label[lab] for lab in labels]), res["in_distribution"],
                                 res["calibrated"])
    summary = score_folder(folder, [bundle], tmp_path / "scores.csv", workers=0, progress=False)
    import csv

    with open(summary.out, newline="") as f:
        scored = {row["path"]: (np.float32([row[f"prob_{lab}"] for lab in labels]), row["in_distribution"] == "True")
                  for row in csv.DictReader(f)}
    api = {p.name: a for p, a in zip(paths, zoo.load(bundle).predict(paths), strict=True)}
    for p in paths:
        probs, flag, calibrated = http[p.name]
        assert calibrated is True
        np.testing.assert_array_equal(probs, scored[p.name][0])
        np.testing.assert_array_equal(probs, np.float32(api[p.name].probs))
        assert flag == scored[p.name][1] == api[p.name].in_distribution
    assert not any(http[p.name][1] for p in paths if p.name.startswith("photo"))  # photographs are flagged


def test_refuse_ood_answers_422_for_flagged_images_only(served: Served, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """With `refuse_ood`, a flagged image is refused with 422 and a reason; the others are answered."""
    from serving.config import load_config
    from serving.uploads import Upload

    if "breast" not in served.bundles:
        pytest.skip("the real BreastMNIST is not available")
    monkeypatch.setenv("MEDZOO_SERVE_SOURCE", "store")
    monkeypatch.setenv("MEDZOO_REFUSE_OOD", "true")
    monkeypatch.setenv("MEDZOO_SERVE_BREAST", str(served.bundles["breast"]))
    cfg = load_config().model_copy(update={"store": served.root})
    assert cfg.refuse_ood
    fe = _local_frontend(cfg)
    scan = encode(array_to_image(_test_images(served, "breast")[0]))
    photo = encode(array_to_image(_photographs(1)[0]))
    status, body = asyncio.run(fe.classify("breast", [Upload(0, "scan.png", scan), Upload(1, "photo.png", photo)],
                                           None))
    results = {r.filename: r for r in body.results}
    assert status == 200 and results["scan.png"].top and results["photo.png"].status == 422
    assert "unlike the model's training images" in results["photo.png"].error
    status, body = asyncio.run(fe.classify("breast", [Upload(0, "photo.png", photo)], None))
    assert status == 422 and "out-of-distribution score" in body.error


# --------------------------------------------------------------------------- prediction sets (issue 20)


def _sets(body: dict[str, Any]) -> list[tuple[list[str], float]]:
    return [(r["prediction_set"], r["alpha"]) for r in body["results"]]


@pytest.mark.parametrize("task", ["organ", "breast"])  # 11 synthetic classes; the real 2-class BreastMNIST
def test_prediction_sets_are_the_python_apis_and_alpha_changes_them(server: Server, served: Served, task: str,
                                                                     tmp_path: Path) -> None:
    """Every answer carries its prediction set (labels, most probable first) and α: the sets of
    ``zoo.load(bundle).predict`` and ``zoo.postprocess.interpret`` for the same files, at the card's
    α by default and at any α asked for (form field or query); a smaller α never gives a smaller set."""
    import zoo
    from zoo.card import read_card
    from zoo.postprocess import interpret
    from zoo.preprocess import load_image

    if task not in served.bundles:
        pytest.skip("no BreastMNIST bundle (the real file is not available)")
    bundle = served.bundles[task]
    conformal = read_card(bundle).conformal
    assert conformal is not None, "training fits the conformal scores (zoo.trust.fit)"
    paths = write_pngs(_test_images(served, task)[:12], tmp_path, task)
    upload = files(*[(p.name, p.read_bytes()) for p in paths])
    c = server.client()
    answers = {None: c.post(f"/{task}", files=upload), 0.05: c.post(f"/{task}", files=upload, data={"alpha": "0.05"}),
               0.3: c.post(f"/{task}", files=upload, params={"alpha": "0.3"})}
    assert all(r.status_code == 200 for r in answers.values()), [r.text for r in answers.values()]
    model, onnx = zoo.load(bundle), _onnx(bundle)
    out = onnx.outputs(np.stack([load_image(p, onnx.preprocessing) for p in paths]))
    for alpha, r in answers.items():
        api = model.predict(paths, alpha=alpha)
        ref = interpret(out["logits"], onnx.meta, out.get("ood_score"), alpha)
        for n, (plausible, level) in enumerate(_sets(r.json())):
            assert level == (conformal.alpha if alpha is None else alpha) == api[n].alpha
            assert plausible == list(api[n].prediction_set) == ref.prediction_set(n, onnx.labels)
            assert plausible[0] == r.json()["results"][n]["top"][0]["label"]  # most probable first
    by_alpha = {a: [set(s) for s, _ in _sets(r.json())] for a, r in answers.items()}
    for wide, default, narrow in zip(by_alpha[0.05], by_alpha[None], by_alpha[0.3], strict=True):
        assert wide >= default >= narrow  # p-values >= alpha: a smaller alpha keeps every class a larger one keeps


BAD_ALPHAS = ("0", "1", "-0.1", "1.5", "abc", "nan", "")


@pytest.mark.parametrize("route", ["/skin", "/pathology_ensemble", "/pathology/explain"])
def test_bad_alpha_answers_422_with_the_reason(server: Server, route: str) -> None:
    """As a form field or a query parameter, before any work (an explanation loads nothing)."""
    c = server.client()
    for raw in BAD_ALPHAS[:-1]:
        for how in ({"data": {"alpha": raw}}, {"params": {"alpha": raw}}):
            r = c.post(route, files=files(("a.png", _good_png())), **how)
            assert r.status_code == 422, (route, raw, how, r.text)
            assert "alpha must be" in r.json()["error"] and "between 0 and 1" in r.json()["error"]
    if not route.endswith("/explain"):  # (the first explanation loads torch: tests/test_ui.py)
        r = c.post(route, files=files(("a.png", _good_png())), data={"alpha": BAD_ALPHAS[-1]})
        assert r.status_code == 200, r.text  # an empty field is no alpha: the card's


def _member_paths(served: Served, order: list[str]) -> list[Path]:
    from zoo.card import read_card

    by_id = {read_card(p).id: p for p in served.members}
    return [by_id[i] for i in order]


def test_ensemble_answers_its_own_sets_and_so_does_its_explanation(server: Server, served: Served,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The ensemble's sets are its own (``zoo.ensemble.ensemble_conformal`` of its members' validation
    logits, then ``combine``); the explanation worker (in-process here: its first call loads torch,
    longer than this server's request timeout) answers the same sets for the same images."""
    from serving.config import ENSEMBLE_ROUTE, load_config
    from serving.explainer import ExplainTable
    from zoo.ensemble import combine, ensemble_conformal
    from zoo.preprocess import load_image

    pngs = [encode(array_to_image(a)) for a in _test_images(served, "pathology")[:6]]
    ens = server.client().post("/pathology_ensemble", files=files(*[(f"{i}.png", p) for i, p in enumerate(pngs)]),
                               params={"alpha": "0.2"})
    assert ens.status_code == 200, ens.text
    paths = _member_paths(served, [m["id"] for m in ens.json()["model"]["ensemble"]])
    members = [_onnx(p) for p in paths]
    x = np.stack([load_image(p, members[0].preprocessing) for p in pngs])
    outs = [m.outputs(x) for m in members]
    conformal = ensemble_conformal(paths, [m.meta for m in members])
    assert conformal is not None, "both members keep their validation logits"
    expected = combine([o["logits"] for o in outs], [m.meta for m in members], [o.get("ood_score") for o in outs],
                       conformal, 0.2)
    assert _sets(ens.json()) == [(expected.prediction_set(n, members[0].labels), 0.2) for n in range(len(pngs))]
    monkeypatch.setenv("MEDZOO_HOME", str(served.root))
    monkeypatch.setenv("MEDZOO_SERVE_SOURCE", "store")
    monkeypatch.setenv("MEDZOO_ENSEMBLE_MEMBERS", ",".join(p.name for p in paths))
    table = ExplainTable(load_config().model_copy(update={"store": served.root}))
    explained = table.explain(ENSEMBLE_ROUTE, x, None, 3, 0.2)
    assert explained.error is None, explained.error
    assert _sets(explained.model_dump()) == _sets(ens.json())


def test_openapi_documents_alpha_and_the_prediction_set(server: Server) -> None:
    spec = server.client().get("/docs.json").json()
    for route in ("/skin", "/pathology_ensemble", "/skin/explain", "/pathology_ensemble/explain"):
        op = spec["paths"][route]["post"]
        body = _resolve(spec, op["requestBody"]["content"]["multipart/form-data"]["schema"])
        alpha = body["properties"]["alpha"]
        assert "422" in alpha["description"] and "1 - alpha" in alpha["description"]
        assert ("preview" in body["properties"]) == (not route.endswith("/explain"))
        answer = _resolve(spec, op["responses"]["200"]["content"]["application/json"]["schema"])
        item = _resolve(spec, answer["properties"]["results"]["items"])
        assert {"prediction_set", "alpha"} <= set(item["properties"]), route
        assert "alpha" in op["description"]


def test_preview_is_the_decoded_image_the_model_saw(server: Server, served: Served) -> None:
    """``preview=true``: each answered image carries the decoded array (uint8, the model's image size)
    as a PNG, exactly what ``zoo.preprocess.load_image`` gives (a DICOM file too); not asked, none."""
    import base64

    from zoo.preprocess import load_image

    prep = _onnx(served.bundles["organ"]).preprocessing
    items = {"a.png": _good_png(), "b.jpg": encode(noise_image(seed=3), "JPEG")}
    if _decoder_takes_dicom():
        items["c.dcm"] = _dicom_files()["CT_small.dcm"]
    c = server.client()
    r = c.post("/organ", files=files(*items.items()), data={"preview": "true"})
    assert r.status_code == 200, r.text
    for res in r.json()["results"]:
        with Image.open(io.BytesIO(base64.b64decode(res["preview_png"]))) as img:
            assert img.format == "PNG"
            np.testing.assert_array_equal(np.asarray(img)[None], load_image(items[res["filename"]], prep))
    assert "preview_png" not in c.post("/organ", files=files(("a.png", items["a.png"]))).json()["results"][0]
    assert c.post("/organ", files=files(("a.png", items["a.png"])), params={"preview": "maybe"}).status_code == 400
