"""Live metrics, drift and the Prometheus files (issue 21, items 1, 2 and 4).

The drift tests' arithmetic on arrays (no server); the observer's counts in this process; the card's
drift reference against the exported model; then, with the real parts: one ``zoo serve`` for the
module (the real BreastMNIST bundle as the task ``breast``, two API workers, a drift window of 300)
and one Debian Prometheus on loopback scraping it every second, queried through its HTTP API. The
images are real: BreastMNIST test images, scikit-image's photographs, rotated test images.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from servers import free_port, start_zoo_serve, stop_group

from serving.drift import DriftWindow, class_mix_test, ood_score_test, pooled_cells
from serving.events import ImageEvent, RequestEvent, RequestMeta, ServedModel
from serving.metrics import ServiceMetrics, drift_gauges, export_drift
from zoo.card import DriftReference
from zoo.postprocess import Predictions

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
WINDOW = 300  # the server's drift_window
ALPHA = 0.01  # the drift p-value the acceptance names
# scikit-image's bundled images (no download): photographs, micrographs, scans; none an ultrasound
PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "horse", "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page", "retina",
          "rocket", "text", "colorwheel")


# --------------------------------------------------------------------------- the tests' arithmetic


def test_rare_classes_are_pooled_until_every_cell_expects_five() -> None:
    observed = np.array([3, 0, 40, 57])
    expected = np.array([1.0, 2.5, 46.5, 50.0])
    obs, exp, pooled = pooled_cells(observed, expected)
    # 1 + 2.5 < 5: the least expected other class (46.5) joins the pooled cell
    assert pooled == [0, 1, 2] and obs.tolist() == [57, 43] and exp.tolist() == [50.0, 50.0]
    obs, exp, pooled = pooled_cells(np.array([10, 20, 30]), np.array([20.0, 20.0, 20.0]))
    assert pooled == [] and obs.tolist() == [10, 20, 30]


def test_class_mix_and_ood_tests_are_scipys_on_the_pooled_cells() -> None:
    from scipy import stats

    labels = ["a", "b", "c", "d"]
    counts = np.array([2, 1, 120, 177])
    shares = [0.005, 0.01, 0.385, 0.6]  # expected 1.5 and 3: pooled with c (115.5)
    test = class_mix_test(counts, shares, labels)
    assert test is not None and test.pooled == ["a", "b", "c"] and test.dof == 1
    want = stats.chisquare([177, 123], [180.0, 120.0])
    assert (test.statistic, test.p_value) == pytest.approx((want.statistic, want.pvalue))
    assert class_mix_test(np.array([1, 2]), [0.5, 0.5], ["x", "y"]) is None  # 3 images: no cell expects 5
    rng = np.random.default_rng(0)
    window, ref = rng.normal(size=50), np.sort(rng.normal(size=80))
    ks = ood_score_test(window, ref.tolist())
    assert ks is not None and ks.p_value == pytest.approx(stats.ks_2samp(window, ref).pvalue)
    assert ood_score_test(np.array([]), ref.tolist()) is None


def _answers(classes: list[int], scores: list[float], threshold: float = 1.0) -> Predictions:
    s = np.asarray(scores, dtype=np.float32)
    return Predictions(probs=np.zeros((len(classes), 2), np.float32), classes=np.asarray(classes),
                       ood_score=s, in_distribution=s <= threshold)


def test_the_window_keeps_the_last_images_and_an_old_card_gets_no_test() -> None:
    ref = DriftReference(images=4, class_proportions=[0.5, 0.5], ood_scores=[0.0, 0.1, 0.2, 0.3], ood_rate=0.0)
    w = DriftWindow("t", "m", ["x", "y"], 4, ref)
    w.add(_answers([0, 0, 0], [5.0, 5.0, 5.0]))
    w.add(_answers([1, 1, 0], [0.0, 2.0, 0.5]))  # the first two images leave the window
    r = w.report()
    assert r.images == 4 and [c.images for c in r.class_mix] == [2, 2] and r.ood_rate == 0.5
    assert r.ood_test is not None and r.class_test is None  # 4 images: no cell expects 5 (2 and 2)
    old = DriftWindow("t", "m", ["x", "y"], 4, None).report()
    assert old.status == "no reference" and old.class_test is None and old.ood_test is None
    export_drift(old.model_copy(update={"task": "old-card"}))  # no gauge, no error
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("medzoo_drift_p_value", {"task": "old-card", "test": "ood_score"}) is None
    assert REGISTRY.get_sample_value("medzoo_drift_window_images", {"task": "old-card"}) == 0
    assert drift_gauges() is drift_gauges()  # created once per process


def test_the_observer_counts_images_by_class_flag_and_refusal() -> None:
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    task = {"task": "unit", "endpoint": "classify"}
    model = {**task, "model": "b1"}
    before = (value("medzoo_images_total", **model, predicted="y"), value("medzoo_images_flagged_total", **model),
              value("medzoo_images_refused_total", **task, status="415", kind="unsupported"),
              value("medzoo_images_received_total", **task), value("medzoo_prediction_set_size_count", **model))
    images = (ImageEvent(0, "a.png", "s", 200, top=(("y", 0.9),), prediction_set=("y",), in_distribution=True),
              ImageEvent(1, "b.png", "s", 200, top=(("y", 0.6),), prediction_set=("y", "x"), in_distribution=False),
              ImageEvent(2, "c.txt", "s", 415, kind="unsupported"))
    watcher = ServiceMetrics(["unit"])
    unknown = value("medzoo_requests_total", task="unknown", endpoint="v2", status="404")
    watcher.observe(RequestEvent(meta=RequestMeta(), route="unit", status=200, images=images,
                                 models=(ServedModel("b1", "w"),), decode_s=0.01, infer_s=0.02, batch=2))
    watcher.observe(RequestEvent(meta=RequestMeta(), route="v2/models/made-up-name/infer", status=404))
    after = (value("medzoo_images_total", **model, predicted="y"), value("medzoo_images_flagged_total", **model),
             value("medzoo_images_refused_total", **task, status="415", kind="unsupported"),
             value("medzoo_images_received_total", **task), value("medzoo_prediction_set_size_count", **model))
    assert [a - b for a, b in zip(after, before)] == [2, 1, 1, 3, 2]
    # a name no task has adds no series: it counts under task="unknown"
    assert value("medzoo_requests_total", task="unknown", endpoint="v2", status="404") == unknown + 1
    assert value("medzoo_requests_total", task="made-up-name", endpoint="v2", status="404") == 0


@pytest.fixture(scope="module")
def exported(breast_store: Path, breast_bundle: Path) -> Path:
    """The session's BreastMNIST bundle with its ``model.onnx`` (the ``breast_store`` copy, which the server serves)."""
    return breast_store / "bundles" / breast_bundle.name


def test_the_card_carries_the_validation_answers_of_the_exported_model(exported: Path, breast_root: Path) -> None:
    """The reference is what the served model answers on the validation split (same classes, same scores)."""
    from zoo.card import read_card
    from zoo.data import load_dataset
    from zoo.postprocess import interpret
    from zoo.runtime import OnnxModel

    bundle = exported
    card = read_card(bundle)
    ref = card.drift
    assert ref is not None and card.ood is not None and ref.ood_scores is not None
    val = load_dataset("breastmnist", size=28, root=breast_root, download=False).val.images.numpy()
    out = OnnxModel.open(bundle).outputs(val)
    served = interpret(out["logits"], card, out["ood_score"])
    assert ref.images == len(val) and ref.ood_rate == card.ood.rates["val_flagged"]
    assert ref.class_proportions == pytest.approx(np.bincount(served.classes, minlength=2) / len(val), abs=1e-12)
    assert ref.ood_scores == sorted(ref.ood_scores)
    assert np.allclose(ref.ood_scores, np.sort(served.ood_score), atol=1e-4)


# --------------------------------------------------------------------------- the Prometheus files


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is missing (Debian's prometheus package; .ci/run installs it)")
    return tool


def test_promtool_accepts_the_rules_and_the_config() -> None:
    tool = _promtool()
    rules = sorted(str(p) for p in (DEPLOY / "prometheus").glob("*.yml"))
    r = subprocess.run([tool, "check", "rules", *rules], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([tool, "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_alerts_fire_on_the_series_the_service_exports(tmp_path: Path) -> None:
    """``promtool test rules``: each alert fires on series named as the service names them, and not before
    its ``for``."""
    tool = _promtool()
    job = 'job="medzoo", instance="localhost:3000"'
    series = [
        {"series": f'medzoo_drift_p_value{{{job}, task="breast", test="ood_score"}}', "values": "0.5 0.001x40"},
        {"series": f'medzoo_drift_p_value{{{job}, task="breast", test="class_mix"}}', "values": "0.0001x40"},
        {"series": f'medzoo_drift_window_images{{{job}, task="breast"}}', "values": "300x40"},
        {"series": f'medzoo_drift_ood_rate{{{job}, task="breast"}}', "values": "0.6x40"},
        {"series": f'medzoo_drift_reference_ood_rate{{{job}, task="breast"}}', "values": "0.05x40"},
        {"series": f'medzoo_images_received_total{{{job}, task="breast", endpoint="classify"}}', "values": "0+10x40"},
        {"series": f'medzoo_images_refused_total{{{job}, task="breast", endpoint="classify", status="415", '
                   f'kind="unsupported"}}', "values": "0+5x40"},
        {"series": f'bentoml_service_request_total{{{job}, service_name="MedZoo", endpoint="/breast", '
                   f'http_response_code="200"}}', "values": "0+10x40"},
        {"series": f'bentoml_service_request_total{{{job}, service_name="MedZoo", endpoint="/breast", '
                   f'http_response_code="503"}}', "values": "0+1x40"},
    ]
    # the minute each alert fires: true from minute 0 (gauges) or 1 (a rate needs two samples), then its `for`
    fired = {"MedzooOODScoreDrift": 11, "MedzooClassMixDrift": 30, "MedzooOODRateHigh": 10,
             "MedzooRefusalRateHigh": 11, "MedzooServerErrors": 6}
    alerts = [{"eval_time": f"{minute}m", "alertname": name, "exp_alerts": exp}
              for name, at in fired.items()
              for minute, exp in ((at - 1, []), (at, [{"exp_labels": _labels(name)}]))]
    # the rules as shipped, less their annotations (promtool would compare the rendered texts too; `check
    # rules` above parses their templates)
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    spec = {"rule_files": [str(tmp_path / "alerts.yml")], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": alerts}]}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(spec))
    r = subprocess.run([tool, "test", "rules", str(tmp_path / "alerts_test.yml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _labels(alert: str) -> dict[str, str]:
    """The labels an alert carries: its series' (per task but the 5xx one) and its severity."""
    labels = {"job": "medzoo", "instance": "localhost:3000", "task": "breast", "severity": "warning"}
    extra = {"MedzooOODScoreDrift": {"test": "ood_score"}, "MedzooClassMixDrift": {"test": "class_mix",
                                                                                   "severity": "info"}}
    labels.update(extra.get(alert, {}))
    if alert == "MedzooServerErrors":
        labels = {"job": "medzoo", "instance": "localhost:3000", "severity": "critical"}
    return labels


# --------------------------------------------------------------------------- the real parts


@dataclass
class Served:
    url: str
    multiproc: Path  # BentoML's PROMETHEUS_MULTIPROC_DIR: one file per process and kind of metric
    test_images: np.ndarray  # BreastMNIST test split, uint8 (N, 1, 28, 28)


@pytest.fixture(scope="module")
def served(exported: Path, breast_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``zoo serve`` of the BreastMNIST bundle as ``/breast``: two API workers, a drift window of 300. Its own
    server, not the session's shared one: the shared one has a single API worker, whose ``/stats`` counts
    tests/test_v2.py reads."""
    from zoo.data import load_dataset

    config = {"tasks": {"breast": exported.name}, "api_workers": 2, "drift_window": WINDOW, "access_log": False}
    with start_zoo_serve(tmp_path_factory.mktemp("metrics_server"), exported.parents[1], config) as server:
        test = load_dataset("breastmnist", size=28, root=breast_root, download=False).test.images.numpy()
        yield Served(url=server.url, multiproc=Path(server.env["BENTOML_HOME"]) / "prometheus_multiproc_dir",
                     test_images=test)


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(expr)}

    def until(self, expr: str, label: str, want: dict[str, float], limit_s: float = 30) -> dict[str, float]:
        """The query's answer once it equals ``want`` (scraped every second), else the last one."""
        deadline = time.monotonic() + limit_s
        got = self.by(expr, label)
        while got != want and time.monotonic() < deadline:
            time.sleep(0.5)
            got = self.by(expr, label)
        return got


@pytest.fixture(scope="module")
def prometheus(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Debian's Prometheus on loopback with the shipped config and rules, scraping the server every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is missing (Debian's prometheus package; .ci/run installs it)")
    work = tmp_path_factory.mktemp("prometheus")
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    cfg["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
    cfg["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    cfg["scrape_configs"][0]["static_configs"] = [{"targets": [served.url.removeprefix("http://")]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    with open(work / "prometheus.log", "wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (work / "prometheus.log").read_text()[-3000:]
            time.sleep(0.3)
        yield Prometheus(url)
    finally:
        stop_group(proc)  # the process group this module started


def _png(image: np.ndarray | Image.Image) -> bytes:
    img = image if isinstance(image, Image.Image) else Image.fromarray(image[0])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


def _shifted(test: np.ndarray, n: int, seed: int) -> list[bytes]:
    """Half rotated test images (90° or 270°), half random crops of the photographs (seeded)."""
    rng = np.random.default_rng(seed)
    out = [_png(np.rot90(test[i], int(rng.choice([1, 3])), axes=(1, 2)).copy())
           for i in rng.choice(len(test), n // 2, replace=False)]
    photos = [np.asarray(_photo(name)) for name in PHOTOS]
    while len(out) < n:
        img = photos[int(rng.integers(len(photos)))]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
        y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        out.append(_png(Image.fromarray(img[y:y + side, x:x + side]).resize((64, 64))))
    return out


def _send(url: str, images: list[bytes], per_request: int = 20) -> list[dict[str, Any]]:
    """Answers in order, one request after the other (the window's last images are the last sent)."""
    results: list[dict[str, Any]] = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for i in range(0, len(images), per_request):
            chunk = images[i:i + per_request]
            r = http.post("/breast", files=[("images", (f"{i + j}.png", data, "image/png"))
                                            for j, data in enumerate(chunk)])
            assert r.status_code == 200, r.text[:500]
            results += r.json()["results"]
    return results


def _metric_values(url: str, name: str, label: str) -> dict[str, float]:
    """One counter's samples on the server's /metrics, by one label (for the test's starting point)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == name and s.labels.get("task") == "breast":
                out[s.labels.get(label, "")] += s.value
    return dict(out)


def _workers_counting(multiproc: Path, name: str) -> list[float]:
    """Per process, what it added to counter ``name`` (the files BentoML's /metrics sums)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    per_process = []
    for f in sorted(multiproc.glob("counter_*.db")):
        total = sum(s.value for m in MultiProcessCollector.merge([str(f)], accumulate=True) for s in m.samples
                    if s.name == name)
        if total:
            per_process.append(total)
    return per_process


def test_prometheus_counts_what_the_answers_said(served: Served, prometheus: Prometheus) -> None:
    """Acceptance: after 40 BreastMNIST test images and 20 photographs, Prometheus' flagged count is the
    number the answers flagged and its images by class are the answers' classes, summed over two API
    workers."""
    flagged_q = 'sum(medzoo_images_flagged_total{task="breast"})'
    classes_q = 'sum by (predicted) (medzoo_images_total{task="breast"})'
    start_flagged = _metric_values(served.url, "medzoo_images_flagged_total", "task").get("breast", 0.0)
    start_classes = _metric_values(served.url, "medzoo_images_total", "predicted")
    images = [_png(served.test_images[i]) for i in range(40)] + [_png(_photo(name)) for name in PHOTOS]

    def one(data: bytes) -> dict[str, Any]:
        # a connection per request, four at a time: both API workers take some
        r = httpx.post(f"{served.url}/breast", files=[("images", ("image.png", data, "image/png"))], timeout=120)
        assert r.status_code == 200, r.text[:500]
        return r.json()["results"][0]

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, images))
    flagged = sum(1 for a in answers if a["in_distribution"] is False)
    classes = Counter(a["top"][0]["label"] for a in answers)
    want_classes = {c: start_classes.get(c, 0.0) + classes.get(c, 0) for c in {*start_classes, *classes}}
    got_flagged = prometheus.until(flagged_q, "", {"": start_flagged + flagged})
    got_classes = prometheus.until(classes_q, "predicted", want_classes)
    photos_flagged = sum(1 for a in answers[40:] if a["in_distribution"] is False)
    print(f"flagged {flagged} of 60 ({photos_flagged} of the 20 photographs); classes {dict(classes)}; "
          f"per API worker {_workers_counting(served.multiproc, 'medzoo_images_received_total')}")
    assert got_flagged == {"": start_flagged + flagged}
    assert got_classes == want_classes
    assert len(_workers_counting(served.multiproc, "medzoo_images_received_total")) == 2  # both workers counted


def _drift(url: str) -> dict[str, Any]:
    body = httpx.get(f"{url}/drift", timeout=30).json()
    assert body["window_size"] == WINDOW
    return body["tasks"]["breast"]


def _gauge_equals(prometheus: Prometheus, p_value: float) -> float:
    q = 'medzoo_drift_p_value{task="breast", test="ood_score"}'
    return prometheus.until(q, "test", {"ood_score": p_value}).get("ood_score", float("nan"))


def test_drift_is_found_in_shifted_images_and_gone_with_a_fresh_window(served: Served,
                                                                       prometheus: Prometheus) -> None:
    """Acceptance: after 300 test images then 300 shifted ones, ``/drift`` and the gauge give an OOD-test
    p-value below 0.01; after 300 more test images alone (a fresh window) they do not."""
    test = served.test_images
    rng = np.random.default_rng(21)
    draws = [np.concatenate([rng.permutation(len(test)), rng.choice(len(test), WINDOW - len(test), replace=False)])
             for _ in range(2)]  # every test image once, then 144 of them again
    _send(served.url, [_png(test[i]) for i in draws[0]])
    shifted = _send(served.url, _shifted(test, WINDOW, seed=21))
    after_shift = _drift(served.url)
    shifted_gauge = _gauge_equals(prometheus, after_shift["ood_test"]["p_value"])
    fresh = _send(served.url, [_png(test[i]) for i in draws[1]])
    after_fresh = _drift(served.url)
    fresh_gauge = _gauge_equals(prometheus, after_fresh["ood_test"]["p_value"])
    print(f"OOD-test p-value: {after_shift['ood_test']['p_value']:.3g} after the shifted images "
          f"(window OOD rate {after_shift['ood_rate']:.2f}), {after_fresh['ood_test']['p_value']:.3g} after the "
          f"fresh window (OOD rate {after_fresh['ood_rate']:.3f}, validation {after_fresh['reference_ood_rate']:.3f}); "
          f"class-mix p {after_fresh['class_test']['p_value']:.3g}")
    for state, answers in ((after_shift, shifted), (after_fresh, fresh)):  # the window is the last 300 answers
        assert state["images"] == WINDOW
        assert {c["label"]: c["images"] for c in state["class_mix"] if c["images"]} == \
            Counter(a["top"][0]["label"] for a in answers)
        assert state["ood_rate"] == pytest.approx(sum(a["in_distribution"] is False for a in answers) / WINDOW)
    assert after_shift["ood_test"]["p_value"] < ALPHA and shifted_gauge == after_shift["ood_test"]["p_value"]
    assert after_fresh["ood_test"]["p_value"] >= ALPHA and fresh_gauge == after_fresh["ood_test"]["p_value"]


def test_every_dashboard_query_runs(prometheus: Prometheus) -> None:
    """The Grafana dashboard's PromQL, with its variables filled in, is accepted by Prometheus."""
    dashboard = json.loads((DEPLOY / "grafana" / "medzoo.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        prometheus.query(expr.replace("$__rate_interval", "1m").replace("$task", ".*"))
