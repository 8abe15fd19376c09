"""The API worker's request pipeline (serving.frontend) with a fake inference worker: no server, no
model. What every route shares — per-image refusals, the request's status, batching of the good
images, calibrated answers and the OOD flag, refuse_ood, the ensemble's combination — is checked on
arrays whose answers are known."""

from __future__ import annotations

import asyncio
import hashlib
import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serving.config import ENSEMBLE_ROUTE, Limits
from serving.decoding import DecodePool
from serving.events import RequestEvent, ServedModel, subscribe, unsubscribe_all
from serving.frontend import Frontend
from serving.outputs import read_record, to_record
from serving.schemas import ServedEnsembleInfo, ServedModelInfo, ServedTable
from serving.uploads import Problem, Upload
from zoo.card import ConformalInfo, ModelInfo, OODInfo
from zoo.preprocess import Preprocessing

LABELS = ["a", "b", "c"]
PREP = Preprocessing(28, 28, 1, (0.5,), (0.5,))


class FakeInference:
    """Logits from the mean pixel value: class = mean // 86 (0, 1 or 2); OOD score = mean / 255 (the
    detector's threshold 0.5). ``conformal``: the card's conformal scores (prediction sets);
    ``members_agree=False``: the ensemble's second member sees the inverted image."""

    def __init__(self, with_ood: bool = True, conformal: ConformalInfo | None = None,
                 members_agree: bool = True) -> None:
        self.with_ood, self.conformal, self.members_agree = with_ood, conformal, members_agree
        self.batches: list[int] = []

    def outputs(self, images: np.ndarray) -> np.ndarray:
        means = images.reshape(len(images), -1).mean(axis=1)
        logits = np.eye(3, dtype=np.float32)[(means // 86).astype(int)] * 2 + means[:, None].astype(np.float32) / 255
        return to_record({"logits": logits, "ood_score": means / 255}, self.with_ood)

    async def describe(self) -> ServedTable:
        card = ModelInfo(id="skin-1", arch="fake", task="multi-class", labels=LABELS, num_outputs=3, preprocessing=PREP,
                         weights_sha256="0" * 64, ood=OODInfo(threshold=0.5) if self.with_ood else None,
                         conformal=self.conformal)
        info = ServedModelInfo(task="skin", status="ok", id="skin-1", arch="fake", labels=LABELS, num_outputs=3,
                               preprocessing=PREP, weights_sha256="0" * 64, provider="CPUExecutionProvider",
                               has_ood=self.with_ood, model_info=card)
        members = [info.model_copy(update={"id": f"m{i}", "task": ENSEMBLE_ROUTE}) for i in range(2)]
        ensemble = ServedEnsembleInfo(task=ENSEMBLE_ROUTE, status="ok", arch="fake", members=members,
                                      has_ood=self.with_ood, labels=LABELS, preprocessing=PREP,
                                      conformal=self.conformal)
        missing = ServedModelInfo(task="organ", status="missing", message="train one: zoo train organ simplecnn")
        return ServedTable(tasks={"skin": info, "organ": missing}, ensemble=ensemble, config={})

    async def stats(self) -> dict[str, Any]:
        return {}

    async def predict(self, task: str, images: np.ndarray) -> np.ndarray:
        self.batches.append(len(images))
        return self.outputs(images)

    async def predict_members(self, images: np.ndarray) -> np.ndarray:
        self.batches.append(len(images))
        second = images if self.members_agree else 255 - images
        return np.stack([self.outputs(images), self.outputs(second)], axis=1)


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (32, 32), value).save(buf, "PNG")
    return buf.getvalue()


def frontend(with_ood: bool = False, refuse_ood: bool = False) -> tuple[Frontend, FakeInference]:
    fake = FakeInference(with_ood)
    pool = DecodePool(threads=2, memory_bytes=64 << 20, queue_s=5)
    return Frontend(fake, Limits(), top_k=2, pool=pool, refuse_ood=refuse_ood), fake


def uploads(*files: bytes) -> list[Upload]:
    return [Upload(i, f"{i}.png", data) for i, data in enumerate(files)]


def test_each_image_answers_for_itself_in_upload_order() -> None:
    """Good images are sent as one batch; a corrupt and an empty one are refused with their own status
    and the request answers 200."""
    fe, fake = frontend()
    status, body = asyncio.run(fe.classify("skin", uploads(png(10), png(120)[:60], b"", png(200)), None))
    assert status == 200 and fake.batches == [2]
    res = body.results
    assert [r.index for r in res] == [0, 1, 2, 3]
    assert [r.status for r in res] == [200, 422, 400, 200]
    assert res[0].top[0].label == "a" and res[3].top[0].label == "c" and len(res[0].top) == 2
    assert res[0].model.id == "skin-1" and body.model.provider == "CPUExecutionProvider"


def test_a_request_of_refused_images_fails_with_their_status() -> None:
    fe, fake = frontend()
    status, body = asyncio.run(fe.classify("skin", uploads(png(1)[:50], png(2)[:50]), None))
    assert status == 422 and fake.batches == [] and "0.png" in body.error and "1.png" in body.error
    status, body = asyncio.run(fe.classify("skin", uploads(png(1)[:50], b""), None))
    assert status == 400  # statuses differ


def test_missing_and_unknown_tasks_answer_without_reading_the_images() -> None:
    fe, fake = frontend()
    status, body = asyncio.run(fe.classify("organ", uploads(png(1)), None))
    assert status == 503 and "zoo train organ" in body.error and fake.batches == []
    status, body = asyncio.run(fe.classify("chest", uploads(png(1)), None))
    assert status == 404 and body.task == "chest"


def test_the_ood_flag_and_refuse_ood() -> None:
    """A detector's score above its threshold flags the image; with refuse_ood it is refused (422)
    while the others of the request are answered."""
    fe, _ = frontend(with_ood=True)
    _, body = asyncio.run(fe.classify("skin", uploads(png(10), png(250)), None))
    assert [r.in_distribution for r in body.results] == [True, False]
    assert body.results[1].ood_score == pytest.approx(250 / 255, abs=1e-6)
    fe, _ = frontend(with_ood=True, refuse_ood=True)
    status, body = asyncio.run(fe.classify("skin", uploads(png(10), png(250)), None))
    assert status == 200 and body.results[0].status == 200
    assert body.results[1].status == 422 and "out-of-distribution score 0.980 above 0.500" in body.results[1].error


def test_ensemble_combines_the_members_and_refuses_per_image() -> None:
    fe, fake = frontend()
    status, body = asyncio.run(fe.ensemble(uploads(png(200), png(3)[:60]), 3))
    assert status == 200 and fake.batches == [1]
    good, bad = body.results
    assert good.top[0].label == "c" and good.agreement == 1.0 and [m.id for m in good.members] == ["m0", "m1"]
    assert bad.status == 422 and bad.members is None


def test_the_request_pixel_budget_and_admission_refuse_the_whole_request() -> None:
    fe, _ = frontend()
    fe.limits = Limits(max_request_pixels=2 * 32 * 32)
    with pytest.raises(Problem) as refused:
        asyncio.run(fe.classify("skin", uploads(png(1), png(2), png(3)), None))
    assert refused.value.status == 413
    fe, _ = frontend()
    fe.pool.pending_work, fe.pool.rate = 10**12, 1e6  # decoding already admitted: due in hours
    with pytest.raises(Problem) as busy:
        asyncio.run(fe.classify("skin", uploads(png(1)), None))
    assert busy.value.status == 503 and int(busy.value.headers["Retry-After"]) > 1


def test_outputs_travel_as_named_fields() -> None:
    """A model's outputs cross the process boundary as one record array with named fields, which
    BentoML's batching can join and split by rows."""
    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    record = to_record({"logits": logits, "ood_score": np.float32([0.1, 0.2])}, with_ood=True)
    joined = np.concatenate([record, record])
    assert joined.dtype.names == ("logits", "ood_score")
    out_logits, ood = read_record(joined[2:])
    np.testing.assert_array_equal(out_logits, logits)
    np.testing.assert_allclose(ood, [0.1, 0.2])
    assert read_record(to_record({"logits": logits}, with_ood=False))[1] is None


class Recorder:
    """An observer (serving.events) keeping every event it is given."""

    def __init__(self) -> None:
        self.events: list[RequestEvent] = []

    def observe(self, event: RequestEvent) -> None:
        self.events.append(event)


@pytest.fixture()
def recorder() -> Any:
    rec = Recorder()
    subscribe(rec)
    yield rec
    unsubscribe_all()


def test_every_request_is_published_to_the_observers_with_each_image(recorder: Recorder) -> None:
    """One event per request: each image's sha256, answer or refusal kind, the model, timings; an
    observer that raises fails no request."""
    subscribe(Broken())
    fe, _ = frontend(with_ood=True, refuse_ood=True)
    files = (png(10), png(120)[:60], b"", png(200))
    status, _ = asyncio.run(fe.classify("skin", uploads(*files), None))
    assert status == 200
    (event,) = recorder.events
    assert event.route == "skin" and event.status == 200 and event.batch == 2
    assert event.models == (ServedModel("skin-1", "0" * 64),)
    assert event.decode_s is not None and event.infer_s is not None
    good, corrupt, empty, flagged = event.images
    assert good.sha256 == hashlib.sha256(files[0]).hexdigest() and good.status == 200 and good.kind == ""
    assert good.predicted == "a" and good.in_distribution is True and good.ood_score == pytest.approx(10 / 255)
    assert (corrupt.status, corrupt.kind, corrupt.top) == (422, "corrupt", ())
    assert (empty.status, empty.kind, empty.sha256) == (400, "empty", hashlib.sha256(b"").hexdigest())
    assert (flagged.status, flagged.kind, flagged.in_distribution) == (422, "out_of_distribution", None)


def test_a_request_answered_before_decoding_is_published_too(recorder: Recorder) -> None:
    fe, _ = frontend()
    status, _ = asyncio.run(fe.classify("organ", uploads(png(10)), None))  # the task has no model: 503
    assert status == 503 and recorder.events == []  # nothing was read: no route ran
    status, _ = asyncio.run(fe.classify("skin", uploads(png(10)), None, alpha=2.0))
    assert status == 422 and recorder.events == []


class Broken:
    def observe(self, event: RequestEvent) -> None:
        raise RuntimeError("observer bug")
