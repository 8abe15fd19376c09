"""The Open Inference Protocol v2 (serving.v2): ``tritonclient.http`` against a real ``zoo serve``,
and the protocol's corners on the pipeline in-process.

The server is the session's shared ``breast_server`` (tests/conftest.py): the BreastMNIST bundle as
the task ``breast``, ``max_request_mb: 1`` and ``body_timeout_s: 1`` for the limits test (no ensemble:
``pathology_ensemble`` is not ready there); tritonclient's answers are compared with ``POST /breast``'s
for the same real test images, as PNG files, as a uint8 tensor and as a DICOM file. The in-process
tests run the v2 app behind ``UploadGuard`` on a :class:`~serving.frontend.Frontend` whose inference
worker is a fake with known answers (three classes, an OOD score, conformal scores), with requests
built by tritonclient's own ``generate_request_body`` and answers read by its ``InferResult``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from servers import ZooServer
from test_pipeline import LABELS, FakeInference

from serving.config import ENSEMBLE_ROUTE, Limits
from serving.decoding import DecodePool
from serving.events import RequestEvent, subscribe, unsubscribe_all
from serving.frontend import Frontend
from serving.uploads import Upload, UploadGuard
from serving.v2 import INFER_PATH, v2_app
from zoo.card import ConformalInfo

LIMITS = Limits(max_file_bytes=200_000, max_request_bytes=1_000_000, max_images=8, body_timeout_s=1.0)


def png(arr: np.ndarray) -> bytes:
    """A PNG file of a uint8 (1, H, W) or (H, W) grey image."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr.reshape(arr.shape[-2:]))).save(buf, "PNG")
    return buf.getvalue()


def dicom(arr: np.ndarray) -> bytes:
    """A DICOM file (Secondary Capture, 8-bit MONOCHROME2) of a uint8 grey image, written by pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.ascontiguousarray(arr.reshape(arr.shape[-2:]))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "US"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def files_input(items: list[bytes]) -> triton.InferInput:
    inp = triton.InferInput("image_files", [len(items)], "BYTES")
    inp.set_data_from_numpy(np.array(items, dtype=np.object_))
    return inp


def tensor_input(arr: np.ndarray, binary: bool = True) -> triton.InferInput:
    inp = triton.InferInput("images", list(arr.shape), "UINT8")
    inp.set_data_from_numpy(arr, binary_data=binary)
    return inp


# ----------------------------------------------------------------- in-process: test_pipeline's fake worker


def make_frontend(refuse_ood: bool = False) -> Frontend:
    fake = FakeInference(conformal=ConformalInfo(scores=[[0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9]]),
                         members_agree=False)
    return Frontend(fake, LIMITS, 3, DecodePool(threads=2, memory_bytes=64 << 20, queue_s=5),
                    refuse_ood=refuse_ood)


class Local:
    """The v2 app behind UploadGuard (as serving.service mounts them) on a fake-backed Frontend,
    called in this process through httpx's ASGI transport on one event loop."""

    def __init__(self, refuse_ood: bool = False) -> None:
        fe = make_frontend(refuse_ood)
        app = UploadGuard(v2_app(lambda: fe), upload_routes=[], get_routes=[], limits=LIMITS, body_routes=INFER_PATH)
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://local")

    def get(self, path: str) -> httpx.Response:
        return self.loop.run_until_complete(self.client.get(path))

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.loop.run_until_complete(self.client.post(path, **kw))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


@pytest.fixture()
def local() -> Iterator[Local]:
    client = Local()
    yield client
    client.close()


def post_infer(client: Any, model: str, inputs: list[triton.InferInput],
               outputs: list[triton.InferRequestedOutput] | None = None, **params: Any) -> Any:
    """A request body as tritonclient builds it, posted; the response (httpx)."""
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs,
                                                                          parameters=params or None)
    headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
    return client.post(f"/v2/models/{model}/infer", content=body, headers=headers)


def result_of(resp: Any) -> triton.InferResult:
    assert resp.status_code == 200, resp.text
    length = resp.headers.get("inference-header-content-length")
    return triton.InferResult.from_response_body(resp.content, header_length=int(length) if length else None)


def reference(model: str, arrays: np.ndarray) -> Any:
    """What ``POST /<task>`` / ``POST /pathology_ensemble`` answer for the same images (their own Frontend)."""
    fe = make_frontend()
    uploads = [Upload(i, f"{i}.png", data=png(a)) for i, a in enumerate(arrays)]
    call = fe.classify(model, uploads, 3) if model != ENSEMBLE_ROUTE else fe.ensemble(uploads, 3)
    status, answer = asyncio.run(call)
    assert status == 200
    return answer


def probs_of(answer: Any) -> np.ndarray:
    return np.array([[next(c.prob for c in r.top if c.label == lab) for lab in LABELS] for r in answer.results],
                    dtype=np.float32)


GREYS = np.array([[np.full((28, 28), v, np.uint8)] for v in (20, 120, 200, 250)])  # classes 0, 1, 2, 2


@pytest.mark.parametrize("model", ["skin", ENSEMBLE_ROUTE])
def test_v2_answers_are_the_routes_answers(local: Local, model: str) -> None:
    """A uint8 tensor, the same images as PNG files, binary or JSON outputs: the probabilities, OOD
    flag and prediction sets of ``POST /<task>`` (or the ensemble's), one row per image."""
    ref = reference(model, GREYS)
    for inputs in ([tensor_input(GREYS)], [tensor_input(GREYS, binary=False)], [files_input([png(a) for a in GREYS])]):
        res = result_of(post_infer(local, model, inputs))
        np.testing.assert_array_equal(res.as_numpy("probabilities"), probs_of(ref))
        assert res.as_numpy("in_distribution").tolist() == [r.in_distribution for r in ref.results]
        ood = np.array([r.ood_score for r in ref.results], np.float32)
        np.testing.assert_array_equal(res.as_numpy("ood_score"), ood)
        sets = res.as_numpy("prediction_set")
        expected_sets = [sorted(LABELS.index(label) for label in r.prediction_set) for r in ref.results]
        assert [np.flatnonzero(row).tolist() for row in sets] == expected_sets
        assert res.get_response()["parameters"]["alpha"] == 0.1
    wanted = [triton.InferRequestedOutput(n, binary_data=False) for n in ("logits", "probabilities")]
    as_json = result_of(post_infer(local, model, [tensor_input(GREYS)], wanted))
    assert [o["name"] for o in as_json.get_response()["outputs"]] == ["logits", "probabilities"]
    assert "data" in as_json.get_response()["outputs"][1]  # JSON, not binary
    np.testing.assert_array_equal(as_json.as_numpy("probabilities"), probs_of(ref))
    if model == ENSEMBLE_ROUTE:
        np.testing.assert_allclose(as_json.as_numpy("logits"), [r.logits for r in ref.results], rtol=1e-6)
    narrower = result_of(post_infer(local, model, [tensor_input(GREYS)], alpha=0.5)).as_numpy("prediction_set")
    assert narrower.sum() <= sets.sum()


def test_metadata_and_health(local: Local) -> None:
    meta = local.get("/v2/models/skin").json()
    assert meta["versions"] == ["skin-1"] and meta["parameters"]["labels"] == LABELS
    assert meta["parameters"]["preprocessing"]["image_size"] == 28
    assert {i["name"]: i["shape"] for i in meta["inputs"]} == {"images": [-1, 1, 28, 28], "image_files": [-1]}
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "logits", "ood_score", "in_distribution",
                                                    "prediction_set"]
    assert local.get("/v2/models/skin/versions/skin-1").status_code == 200
    assert local.get("/v2").json()["extensions"] == ["binary_tensor_data", "parameters"]
    assert [local.get(p).status_code for p in ("/v2/health/live", "/v2/health/ready", "/v2/models/skin/ready",
                                               f"/v2/models/{ENSEMBLE_ROUTE}/ready", "/v2/models/organ/ready",
                                               "/v2/models/nope/ready")] == [200, 200, 200, 200, 400, 404]


def _raw(body: bytes, length: int | None = None) -> dict[str, Any]:
    return {"content": body, "headers": {"Inference-Header-Content-Length": str(length)} if length is not None else {}}


def _req(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


GOOD_PNG = base64.b64encode(png(GREYS[0])).decode()
ONE = {"name": "images", "shape": [1, 1, 28, 28], "datatype": "UINT8"}
BAD_REQUESTS: dict[str, tuple[str, dict[str, Any], int, str]] = {
    "malformed JSON": ("skin", _raw(b'{"inputs": ['), 400, "malformed inference request"),
    "no inputs": ("skin", _raw(_req([])), 400, "inputs"),
    "float pixels": ("skin", _raw(_req([{**ONE, "datatype": "FP32", "data": [0.5] * 784}])), 400, "UINT8"),
    "wrong size": ("skin", _raw(_req([{**ONE, "shape": [1, 3, 28, 28], "data": [0] * 2352}])), 400, "[N, 1, 28, 28]"),
    "too few values": ("skin", _raw(_req([{**ONE, "data": [0] * 783}])), 400, "784 integers"),
    "value above 255": ("skin", _raw(_req([{**ONE, "data": [256] * 784}])), 400, "0 to 255"),
    "too many images": ("skin", _raw(_req([{**ONE, "shape": [9, 1, 28, 28], "data": [0] * 9 * 784}])), 413, "8 images"),
    "two inputs": ("skin", _raw(_req([{**ONE, "data": [0] * 784}, {**ONE, "data": [0] * 784}])), 400, "exactly one"),
    "unknown input": ("skin", _raw(_req([{**ONE, "name": "pixels", "data": [0] * 784}])), 400, "exactly one"),
    "header past the body": ("skin", _raw(_req([{**ONE, "data": [0] * 784}]), 10**6), 400,
                             "Inference-Header-Content-Length"),
    "bytes after the header": ("skin", _raw(_req([{**ONE, "data": [0] * 784}]) + b"xx",
                                            len(_req([{**ONE, "data": [0] * 784}]))), 400, "belong to no input"),
    "binary size past the body": ("skin", _raw(_req([{**ONE, "parameters": {"binary_data_size": 784}}]) + b"\0" * 10,
                                               len(_req([{**ONE, "parameters": {"binary_data_size": 784}}]))), 400,
                                  "binary_data_size"),
    "bad base64": ("skin", _raw(_req([{"name": "image_files", "shape": [1], "datatype": "BYTES", "data": ["%%"]}])),
                   400, "base64"),
    "unknown output": ("skin", _raw(_req([{**ONE, "data": [0] * 784}], outputs=[{"name": "probs"}])), 400,
                       "unknown output 'probs'"),
    "bad alpha": ("skin", _raw(_req([{**ONE, "data": [0] * 784}], parameters={"alpha": 2})), 422, "alpha"),
    "unknown model": ("nope", _raw(_req([{**ONE, "data": [0] * 784}])), 404, "unknown model 'nope'"),
    "unknown version": ("skin/versions/7", _raw(_req([{**ONE, "data": [0] * 784}])), 404, "no version '7'"),
    "model without bundle": ("organ", _raw(_req([{**ONE, "data": [0] * 784}])), 503, "zoo train organ"),
    "compressed body": ("skin", {"content": b"x", "headers": {"Content-Encoding": "gzip"}}, 415, "Content-Encoding"),
    "corrupt file": ("skin", _raw(_req([{"name": "image_files", "shape": [2], "datatype": "BYTES",
                                        "data": [GOOD_PNG, "AAAA"]}])), 415, "image_files[1]: not an image"),
    "file over the limit": ("skin", _raw(_req([{"name": "image_files", "shape": [1], "datatype": "BYTES",
                                               "data": ["A" * 300_000]}])), 413, "larger than"),
    "body over the limit": ("skin", _raw(b"x" * 1_000_001), 413, "request larger than"),
}


def test_a_json_request_gets_a_json_answer_with_its_id(local: Local) -> None:
    r = local.post("/v2/models/skin/infer", content=_req([{**ONE, "data": GREYS[1].ravel().tolist()}], id="42"))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["id"] == "42" and body["model_name"] == "skin" and body["model_version"] == "skin-1"
    probs = next(o for o in body["outputs"] if o["name"] == "probabilities")
    assert probs["shape"] == [1, 3] and probs["datatype"] == "FP32" and len(probs["data"]) == 3


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_clients_mistake_gets_a_4xx_with_the_reason(local: Local, case: str) -> None:
    model, kw, status, words = BAD_REQUESTS[case]
    r = local.post(f"/v2/models/{model}/infer", **kw)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_wrong_method_is_answered_in_the_protocols_error_shape(local: Local) -> None:
    r = local.get("/v2/models/skin/infer")
    assert r.status_code == 405 and r.json()["error"]


def test_refuse_ood_refuses_the_whole_request_and_observers_see_each_image() -> None:
    events: list[RequestEvent] = []
    subscribe(type("Rec", (), {"observe": lambda self, e: events.append(e)})())
    try:
        client = Local(refuse_ood=True)
        ok = post_infer(client, "skin", [tensor_input(GREYS[:2])])  # means 20, 120: in distribution
        flagged = post_infer(client, "skin", [tensor_input(GREYS)])  # 200, 250 are above the threshold
        client.close()
    finally:
        unsubscribe_all()
    assert ok.status_code == 200
    assert flagged.status_code == 422 and "images[2]" in flagged.json()["error"]
    first = events[0]
    assert (first.route, first.status, first.models[0].id) == ("v2/models/skin/infer", 200, "skin-1")
    assert [i.predicted for i in first.images] == ["a", "b"] and all(i.sha256 for i in first.images)
    assert events[1].status == 422


# --------------------------------------------------------------------------- a real `zoo serve`


@pytest.fixture(scope="module")
def zoo(breast_server: ZooServer) -> ZooServer:
    """The shared ``zoo serve --no-build`` (tests/conftest.py) with the BreastMNIST bundle as ``breast``."""
    return breast_server


def _post_breast(url: str, named: list[tuple[str, bytes]]) -> np.ndarray:
    """``POST /breast``'s probabilities (N, K) in class order for the files, in one request."""
    r = httpx.post(f"{url}/breast", files=[("images", (n, d, "application/octet-stream")) for n, d in named],
                   params={"top_k": 10}, timeout=60)
    assert r.status_code == 200, r.text
    return np.array([[c["prob"] for c in sorted(res["top"], key=lambda c: c["class"])] for res in r.json()["results"]],
                    dtype=np.float32)


def test_tritonclient_talks_to_zoo_serve(zoo: ZooServer, breast_root: Path) -> None:
    """The issue's acceptance: health, metadata, and infer with a uint8 tensor and with PNG and DICOM
    files, each answering exactly ``POST /breast``'s probabilities for the same images."""
    images = np.load(breast_root / "breastmnist.npz")["test_images"][:8][:, None]  # uint8 (8, 1, 28, 28)
    pngs = [(f"t{i}.png", png(a)) for i, a in enumerate(images)]
    dcm = ("t0.dcm", dicom(images[0]))
    client = triton.InferenceServerClient(zoo.url.removeprefix("http://"), network_timeout=60)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("breast") and not client.is_model_ready(ENSEMBLE_ROUTE)
        meta = client.get_model_metadata("breast")
        labels = meta["parameters"]["labels"]
        assert len(labels) == 2 and {i["name"]: i["shape"] for i in meta["inputs"]}["images"] == [-1, 1, 28, 28]
        by_tensor = client.infer("breast", [tensor_input(images)])
        by_files = client.infer("breast", [files_input([d for _, d in [*pngs, dcm]])])
        as_json = client.infer("breast", [tensor_input(images, binary=False)],
                               outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)])
    finally:
        client.close()
    expected = _post_breast(zoo.url, pngs)
    np.testing.assert_array_equal(by_tensor.as_numpy("probabilities"), expected)
    np.testing.assert_array_equal(as_json.as_numpy("probabilities"), expected)
    np.testing.assert_array_equal(by_files.as_numpy("probabilities"), _post_breast(zoo.url, [*pngs, dcm]))
    assert [o["name"] for o in by_tensor.get_response()["outputs"]] == [o["name"] for o in meta["outputs"]]
    assert by_tensor.as_numpy("logits").shape[0] == 8


def _raw_request(url: str, head: bytes, body: bytes, wait_s: float) -> tuple[float, bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        start = time.monotonic()
        s.sendall(head + body)
        answer = s.recv(65536)
        return time.monotonic() - start, answer


def test_v2_bodies_get_the_upload_limits_over_http(zoo: ZooServer) -> None:
    """UploadGuard reads /v2 infer bodies: 413 above max_request_mb before reading, 408 for a stalled
    body, 400 for malformed JSON, each as {"error": …} (never a 5xx), with an X-Request-Id."""
    body_timeout_s = zoo.config["body_timeout_s"]
    assert zoo.config["max_request_mb"] * 2**20 < 5_000_000
    path = b"POST /v2/models/breast/infer HTTP/1.1\r\nHost: x\r\n"
    _, big = _raw_request(zoo.url, path + b"Content-Length: 5000000\r\n\r\n", b"", wait_s=10)
    assert big.startswith(b"HTTP/1.1 413"), big[:200]
    took, stalled = _raw_request(zoo.url, path + b"Content-Length: 1000\r\n\r\n", b'{"inputs": [', wait_s=15)
    assert stalled.startswith(b"HTTP/1.1 408"), stalled[:200]
    assert took < body_timeout_s + 3
    bad = httpx.post(f"{zoo.url}/v2/models/breast/infer", content=b"{not json", timeout=30)
    assert bad.status_code == 400 and "malformed" in bad.json()["error"] and bad.headers["x-request-id"]
    stats = httpx.get(f"{zoo.url}/stats", timeout=30).json()
    assert stats["requests"].get("v2/models/breast/infer", 0) >= 1  # counted as its own route
