"""DICOM Structured Reports out: ``POST /<task>?output=dicom-sr`` on a running ``zoo serve`` and
``zoo score --dicom-sr``, on pydicom's CT and MR test files with the BreastMNIST model (1 channel, 28 px).

Each SR must pass ``dciodvfy`` (dicom3tools) with no error and read back, with highdicom, to the
answer the JSON endpoint or the CSV gives for the same file, and reference the source instance."""

from __future__ import annotations

import csv
import email.parser
import email.policy
import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from servers import ZooServer

from zoo.dicom_sr import SCHEME, class_code, read_sr

CT = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
MR = Path(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
LABELS = ["malignant", "normal, benign"]  # BreastMNIST's


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines of dciodvfy (dicom3tools) on a file; the test skips when it is not installed."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools; .ci/run installs it)")
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def server(breast_server: ZooServer) -> str:
    """The session's shared ``zoo serve`` (the real CLI, no training; tests/conftest.py) serving ``/breast``."""
    return breast_server.url


def _files(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def _json(url: str, *paths: Path) -> list[dict[str, Any]]:
    r = httpx.post(f"{url}/breast", files=_files(*paths), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def _parts(r: httpx.Response) -> list[bytes]:
    """The parts of a ``multipart/related`` answer, read with the standard library's MIME parser."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + r.headers["content-type"].encode() + b"\r\n\r\n" + r.content)
    assert msg.get_content_type() == "multipart/related" and msg.get_param("type") == "application/dicom"
    parts = [p for p in msg.iter_parts()]
    assert all(p.get_content_type() == "application/dicom" for p in parts)
    return [p.get_payload(decode=True) for p in parts]


def _check(sr: Any, source: Path, answer: dict[str, Any]) -> None:
    """The SR read back gives the JSON answer for its source and references the source instance."""
    src = pydicom.dcmread(source, stop_before_pixels=True)
    top = answer["top"][0]
    expected = class_code("breastmnist", top["class"], top["label"])
    assert (sr.class_code, sr.class_scheme, sr.class_meaning) == (expected.value, expected.scheme_designator,
                                                                  expected.meaning)
    assert sr.probability == pytest.approx(top["prob"], abs=1e-6)
    assert sr.out_of_distribution is (not answer["in_distribution"])
    assert sr.ood_score == pytest.approx(answer["ood_score"], rel=1e-6)
    plausible = answer["prediction_set"]
    assert sr.prediction_set == [class_code("breastmnist", LABELS.index(k), k).meaning for k in plausible]
    assert sr.alpha == pytest.approx(answer["alpha"])
    assert sr.source_sop_instance_uid == src.SOPInstanceUID and sr.source_sop_class_uid == src.SOPClassUID
    assert (sr.study_instance_uid, sr.patient_id) == (src.StudyInstanceUID, src.PatientID)
    assert sr.algorithm == "medzoo" and any(p.startswith("weights_sha256=") for p in sr.parameters)


def test_an_sr_of_a_ct_slice_over_http_is_valid_dicom_and_reads_back(server: str, tmp_path: Path) -> None:
    """One CT slice with ``?output=dicom-sr``: one Comprehensive SR; dciodvfy finds no error, and
    highdicom reads back the class, probability, OOD flag and the source instance UID."""
    (answer,) = _json(server, CT)
    assert answer["in_distribution"] is not None and answer["prediction_set"], answer  # the card has both
    r = httpx.post(f"{server}/breast?output=dicom-sr", files=_files(CT), timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(r.content))
    assert ds.SOPClassUID == pydicom.uid.ComprehensiveSRStorage and ds.Modality == "SR"
    assert r.headers["content-disposition"] == f'attachment; filename="{ds.SOPInstanceUID}.sr.dcm"'
    _check(read_sr(r.content), CT, answer)
    path = tmp_path / "ct.sr.dcm"
    path.write_bytes(r.content)
    assert dciodvfy_errors(path) == []


def test_several_images_answer_multipart_related_and_other_images_406(server: str) -> None:
    """``Accept: application/dicom`` with two DICOM files: one SR each, in upload order, as
    ``multipart/related``. A PNG beside them: 206 with a Warning naming it; a PNG alone: 406."""
    accept = {"accept": "application/dicom"}
    answers = _json(server, CT, MR)
    r = httpx.post(f"{server}/breast", files=_files(CT, MR), headers=accept, timeout=60)
    assert r.status_code == 200, r.text
    parts = _parts(r)
    assert len(parts) == 2
    for data, source, answer in zip(parts, (CT, MR), answers, strict=True):
        _check(read_sr(data), source, answer)
    assert len({pydicom.dcmread(io.BytesIO(p)).SeriesInstanceUID for p in parts}) == 2  # two studies

    png = io.BytesIO()
    Image.new("L", (28, 28), 128).save(png, "PNG")
    mixed = [*_files(CT), ("images", ("x.png", png.getvalue(), "image/png"))]
    r = httpx.post(f"{server}/breast", files=mixed, headers=accept, timeout=60)
    assert r.status_code == 206 and r.headers["content-type"] == "application/dicom", r.text
    assert "image 1 (x.png): 406" in r.headers["warning"]
    assert read_sr(r.content).source_sop_instance_uid == pydicom.dcmread(CT, stop_before_pixels=True).SOPInstanceUID

    r = httpx.post(f"{server}/breast?output=dicom-sr", files=mixed[1:], timeout=60)
    assert r.status_code == 406 and "DICOM images only" in r.json()["results"][0]["error"], r.text
    r = httpx.post(f"{server}/breast", files=_files(CT), data={"output": "xml"}, timeout=60)
    assert r.status_code == 400 and "output must be one of" in r.json()["error"], r.text
    # output=json wins over the Accept header
    r = httpx.post(f"{server}/breast?output=json", files=_files(CT), headers=accept, timeout=60)
    assert r.status_code == 200 and r.json()["results"][0]["top"], r.text


def test_zoo_score_writes_one_sr_per_dicom_file(breast_store: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``zoo score FOLDER --dicom-sr OUTDIR``: one valid SR per DICOM file, named by its SOP instance
    UID, carrying the CSV row's answer; the PNG is scored but gets none."""
    from zoo.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(CT, folder / "ct.dcm")
    shutil.copy(MR, folder / "mr.dcm")
    Image.new("L", (28, 28), 128).save(folder / "grey.png")
    bundle = next((breast_store / "bundles").iterdir())
    out, reports = tmp_path / "scores.csv", tmp_path / "sr"
    assert main(["score", str(folder), "-m", str(bundle), "-o", str(out), "--workers", "0", "--no-progress",
                 "--dicom-sr", str(reports)]) == 0
    assert f"2 DICOM structured reports -> {reports}; 1 scored files are not DICOM" in capsys.readouterr().out
    with open(out, newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert len(rows) == 3
    for name, source in (("ct.dcm", CT), ("mr.dcm", MR)):
        uid = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
        sr = read_sr(reports / f"{uid}.sr.dcm")
        row = rows[name]
        label = row["top_class"]
        assert sr.class_meaning == class_code("breastmnist", LABELS.index(label), label).meaning
        assert sr.probability == pytest.approx(float(row[f"prob_{label}"]), abs=1e-6)
        assert sr.source_sop_instance_uid == uid
        assert sr.out_of_distribution is (row["in_distribution"] == "False")
    assert sorted(p.name for p in reports.iterdir()) == sorted(
        f"{pydicom.dcmread(s, stop_before_pixels=True).SOPInstanceUID}.sr.dcm" for s in (CT, MR))
    assert dciodvfy_errors(next(reports.iterdir())) == []


def test_class_codes_are_snomed_only_where_dicom_codes_the_class() -> None:
    assert class_code("breastmnist", 0, "malignant").value == "21594007"
    assert class_code("breastmnist", 1, "normal, benign").scheme_designator == SCHEME
    assert class_code("dermamnist", 4, "melanoma").value == "1162635006"
    assert class_code("organamnist", 6, "liver").value == "10200004"
    assert class_code("organamnist", 4, "kidney-left").value == "organamnist-4"


@pytest.mark.parametrize(("accept", "dicom"), [
    ("application/dicom", True), ('multipart/related; type="application/dicom"', True), ("*/*", False),
    ("application/json;q=0.2, application/dicom", True), ("application/dicom;q=0.5, application/json", False),
    ("", False)])
def test_accept_header_asks_for_dicom_only_when_it_prefers_it(accept: str, dicom: bool) -> None:
    from serving.uploads import parse_accept

    assert parse_accept(accept) is dicom
