"""The explanation endpoints and the upload page, against one real server (the session's shared
``breast_server``, a ``zoo serve`` in a subprocess: tests/conftest.py) and a real headless browser
(Debian's chromium driven by Playwright; no browser download).

The server serves the real BreastMNIST bundle as the task ``breast`` and a copy of it without
``model.safetensors`` as ``noweights`` (predictions work, explanations answer 503); skin, organ,
pathology and the ensemble have no bundle (503). That importing ``serving.service`` loads neither
torch nor the explanation libraries is checked in test_architecture.py. Screenshots go to ``tests/artifacts/``
(git-ignored; the path is printed). Run alone: ``pytest tests/test_ui.py -s``.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import ZooServer

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = Path(os.environ.get("MEDZOO_CHROMIUM", "/usr/bin/chromium"))


@dataclass
class Server:
    url: str
    log: Path
    images: list[Path]  # real BreastMNIST test images as PNG files
    bundle: Path  # the bundle served as "breast"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)


@pytest.fixture(scope="module")
def server(breast_server: ZooServer, breast_bundle: Path, breast_root: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Server:
    """The shared server, and three real BreastMNIST test images as PNG files."""
    work = tmp_path_factory.mktemp("ui_images")
    images = []
    for i, arr in enumerate(np.load(breast_root / "breastmnist.npz")["test_images"][:3]):
        images.append(work / f"breast-{i}.png")
        Image.fromarray(arr).save(images[-1])
    return Server(url=breast_server.url, log=breast_server.log, images=images,
                  bundle=breast_server.store / "bundles" / breast_bundle.name)


def _files(paths: list[Path], extra: list[tuple[str, bytes]] = ()) -> list[tuple[str, tuple[str, bytes, str]]]:
    items = [(p.name, p.read_bytes()) for p in paths] + list(extra)
    return [("images", (name, data, "image/png")) for name, data in items]


def _png_size(b64: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return img.size


def _onnx_answer(bundle: Path, images: list[Path]) -> dict[str, Any]:
    """What the exported model answers for these files under zoo.postprocess.interpret."""
    from zoo.postprocess import interpret
    from zoo.preprocess import load_image
    from zoo.runtime import OnnxModel

    model = OnnxModel.open(bundle)
    batch = np.stack([load_image(p, model.meta.preprocessing) for p in images])
    out = model.outputs(batch)
    answer = interpret(out[model.output_names[0]], model.meta, out.get("ood_score"))
    return {"labels": model.labels, "probs": answer.probs, "ood": answer.in_distribution}


# --------------------------------------------------------------------------- the explain endpoints


def test_explain_endpoints_are_in_the_openapi_document(server: Server) -> None:
    with server.client() as c:
        doc = c.get("/docs.json")
    assert doc.status_code == 200
    paths = doc.json()["paths"]
    for route in ("breast", "noweights", "skin", "organ", "pathology", "pathology_ensemble"):
        post = paths[f"/{route}/explain"]["post"]
        body = post["requestBody"]["content"]
        assert "multipart/form-data" in body, f"/{route}/explain takes uploads: {list(body)}"
        schema = post["responses"]["200"]["content"]["application/json"]["schema"]
        assert "results" in str(doc.json()["components"]) and schema
    assert not any(p.startswith("/ui") for p in paths), "the page's static files are not API routes"


def test_explain_answers_classes_and_overlays(server: Server) -> None:
    corrupt = ("broken.png", server.images[0].read_bytes()[:80])  # a truncated PNG
    with server.client() as c:
        predicted = c.post("/breast", files=_files(server.images))
        answer = c.post("/breast/explain", files=_files(server.images, [corrupt]))
    assert predicted.status_code == 200 and answer.status_code == 200, answer.text
    body = answer.json()
    assert body["task"] == "breast" and body["method"] == "grad-cam" and body["layer"] == "conv3.ReLU[0]"
    assert body["feature_size"] == [7, 7] and body["models"][0]["id"]
    results = body["results"]
    assert [r["filename"] for r in results] == [p.name for p in server.images] + ["broken.png"]
    assert results[-1]["status"] == 422 and results[-1].get("overlay_png") is None and results[-1]["error"]
    expected = _onnx_answer(server.bundle, server.images)
    for n, (mine, onnx) in enumerate(zip(results, predicted.json()["results"])):
        assert mine["status"] == 200 and _png_size(mine["overlay_png"]) == (224, 224)
        assert [t["label"] for t in mine["top"]] == [t["label"] for t in onnx["top"]]
        # the torch explainer and the exported model are the same model, answered by the one rule
        # (zoo.postprocess.interpret: calibrated probabilities, the OOD flag when the card has a detector)
        probs = {t["label"]: t["prob"] for t in mine["top"]}
        assert np.allclose([probs[label] for label in expected["labels"]], expected["probs"][n], atol=1e-4)
        assert mine.get("in_distribution") == (None if expected["ood"] is None else bool(expected["ood"][n]))
        assert mine["explained"] == mine["predicted"] == mine["top"][0]
        # the prediction set and its level, as the prediction endpoint answers them (issue 20)
        assert (mine["prediction_set"], mine["alpha"]) == (onnx["prediction_set"], onnx["alpha"])


def test_explain_target_by_label_and_refusals(server: Server) -> None:
    with server.client() as c:
        malignant = c.post("/breast/explain", files=_files(server.images[:2]), data={"target": "malignant"})
        typo = c.post("/breast/explain", files=_files(server.images[:1]), data={"target": "malignnt"})
        skin = c.post("/skin/explain", files=_files(server.images[:1]))
        bare = c.post("/noweights/explain", files=_files(server.images[:1]))
        bare_predict = c.post("/noweights", files=_files(server.images[:1]))
        bad_k = c.post("/breast/explain", files=_files(server.images[:1]), data={"top_k": "0"})
    assert malignant.status_code == 200
    assert all(r["explained"]["label"] == "malignant" for r in malignant.json()["results"])
    assert typo.status_code == 400 and "did you mean 'malignant'" in typo.json()["error"]
    assert skin.status_code == 503 and "no dermamnist bundle" in skin.json()["error"]
    assert bare.status_code == 503 and "model.safetensors" in bare.json()["error"]
    assert bare_predict.status_code == 200, "predictions do not need the torch weights"
    assert bad_k.status_code == 400


def test_sync_http_client_calls_explain(server: Server) -> None:
    import bentoml

    with bentoml.SyncHTTPClient(server.url, timeout=120) as client:
        out = client.explain_breast(images=[server.images[0]], target="1")
    out = out if isinstance(out, dict) else out.model_dump()
    assert out["results"][0]["explained"]["class"] == 1 and _png_size(out["results"][0]["overlay_png"]) == (224, 224)


# --------------------------------------------------------------------------- the page, in a browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.is_file():
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install chromium (or set MEDZOO_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def _outside(requests: list[str], base: str) -> list[str]:
    """Requests the page made to anything but the server (data: and blob: URLs are local)."""
    return [u for u in requests if urlparse(u).scheme not in ("data", "blob") and not u.startswith(base + "/")]


def _screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"\nscreenshot: {path}")
    return path


def _plausible(result: dict[str, Any]) -> str:
    """The page's line for an answer's prediction set: the level, then the labels, best first ("; "
    between them when a label holds a comma, as BreastMNIST's "normal, benign" does)."""
    labels = result["prediction_set"]
    sep = "; " if any("," in label for label in labels) else ", "
    return f"plausible at {100 * (1 - result['alpha']):g} %: {sep.join(labels)}"


def test_page_uploads_classifies_and_shows_the_overlay(server: Server, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    response = page.goto(f"{server.url}/ui")
    assert response is not None and response.ok and "default-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_selector("#task option[value=breast]:not([disabled])", state="attached")
    assert page.locator("#task option[value=skin]").is_disabled(), "a task without a bundle cannot be chosen"
    page.select_option("#task", "breast")
    page.set_input_files("#files", [str(p) for p in server.images[:2]])
    page.click("#run")
    page.wait_for_selector(".card .overlay:not([hidden]) img", timeout=120_000)
    # predicates as functions: the page's Content-Security-Policy forbids eval of expression strings
    page.wait_for_function("() => document.querySelectorAll('.card .overlay:not([hidden])').length === 2",
                           timeout=120_000)
    page.wait_for_function("() => [...document.querySelectorAll('.overlay img')].every(i => i.naturalWidth > 0)")
    with server.client() as c:
        expected = c.post("/breast", files=_files(server.images[:2])).json()["results"]
    cards = page.locator(".card")
    assert cards.count() == 2
    for i, want in enumerate(expected):
        card = cards.nth(i)
        assert card.locator(".filename").inner_text() == server.images[i].name
        first = card.locator(".classes li").first
        assert first.get_attribute("data-label") == want["top"][0]["label"]
        assert f"{100 * want['top'][0]['prob']:.1f} %" in first.inner_text()
        overlay = card.locator(".overlay img")
        assert overlay.get_attribute("src").startswith("data:image/png;base64,")
        assert overlay.evaluate("img => img.naturalWidth") == 224
        assert "Grad-CAM for" in card.locator(".overlay figcaption").inner_text()
        assert card.locator(".ood").is_hidden()
        assert card.locator(".plausible").inner_text() == _plausible(want)
    assert page.locator("#status").inner_text().startswith("Done")
    _screenshot(page, "ui-breast.png")
    assert not errors, errors
    assert f"{server.url}/breast/explain" in requests and f"{server.url}/models" in requests
    assert not _outside(requests, server.url), _outside(requests, server.url)
    page.close()


def test_page_shows_the_out_of_distribution_warning(server: Server, browser: Any) -> None:
    """Answers carry ``in_distribution`` / ``ood_score`` once a model has a detector (optional
    fields): the server's answer is extended in the browser, the page must warn."""
    import json

    with server.client() as c:
        body = c.post("/breast", files=_files(server.images[:1])).json()
    for r in body["results"]:
        r.update(in_distribution=False, ood_score=4.25)
    page = browser.new_page()
    page.route(f"{server.url}/breast", lambda route: route.fulfill(status=200, content_type="application/json",
                                                                   body=json.dumps(body)))
    page.goto(f"{server.url}/ui/")
    page.wait_for_selector("#task option[value=breast]:not([disabled])", state="attached")
    page.select_option("#task", "breast")
    page.uncheck("#explain")
    page.set_input_files("#files", [str(server.images[0])])
    page.click("#run")
    page.wait_for_selector(".card .ood:not([hidden])", timeout=60_000)
    assert "unlike the images the model was trained on (score 4.25)" in page.locator(".card .ood").inner_text()
    assert page.locator(".card .overlay").is_hidden(), "explanations were switched off"
    _screenshot(page, "ui-ood-warning.png")
    page.close()


def _dicom_file() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


def test_page_offers_dicom_and_shows_a_dicom_upload_as_the_model_saw_it(server: Server, browser: Any) -> None:
    """The file chooser offers DICOM; a DICOM file, which the browser cannot show, is shown as the
    server decoded it for the model (the answer's ``preview_png``), with its prediction set."""
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server.url}/ui/")
    accept = page.locator("#files").get_attribute("accept")
    assert "application/dicom" in accept and ".dcm" in accept
    assert "DICOM" in page.locator(".drop .muted").inner_text()
    page.wait_for_selector("#task option[value=breast]:not([disabled])", state="attached")
    page.select_option("#task", "breast")
    page.uncheck("#explain")
    page.set_input_files("#files", [str(_dicom_file())])
    page.click("#run")
    page.wait_for_selector(".card .original.decoded img", timeout=60_000)
    page.wait_for_function("() => document.querySelector('.card .original img').naturalWidth > 0")
    size = page.locator(".card .original img").evaluate("i => [i.naturalWidth, i.naturalHeight]")
    with server.client() as c:
        want = c.post("/breast", files=[("images", ("CT_small.dcm", _dicom_file().read_bytes(), "application/dicom"))]
                      ).json()["results"][0]
        prep = next(m for m in c.get("/models").json()["models"] if m["task"] == "breast")["preprocessing"]
    assert size == [prep["image_size"]] * 2, "the image the model saw, at its image size"
    assert "as the model saw it" in page.locator(".card .original figcaption").inner_text()
    assert page.locator(".card .plausible").inner_text() == _plausible(want)
    _screenshot(page, "ui-dicom.png")
    assert not errors, errors
    page.close()
