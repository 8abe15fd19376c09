"""``zoo score``: offline batch scoring of image folders (real BreastMNIST images written as files).

What is checked: predictions on lossless PNGs equal ``zoo eval``'s; JPEG rows are there and valid;
unreadable files land in the errors file with a reason; CSV, JSON Lines and Parquet carry the
same content; a run killed with SIGKILL resumes without losing or repeating anything and writes
the same bytes as an uninterrupted run; resumes refuse a journal of other inputs; ensembles
average logits; a decoder crash in a worker costs only the guilty file; DICOM files are scored and the
ones that cannot be decoded are listed with the reason.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.bundle import save_bundle
from zoo.card import ONNX_FILE, read_card
from zoo.cli import main
from zoo.errors import EnsembleError, UsageError
from zoo.evaluate import evaluate_bundle
from zoo.inference import bundle_splits
from zoo.postprocess import calibrated_logits, interpret, to_probs, two_class_logits
from zoo.preprocess import load_image
from zoo.runtime import OnnxModel, RuntimeOptions
from zoo.score import CRASH_REASON, ensure_onnx, score_folder
from zoo.score import decode as score_decode
from zoo.score import run as score_run

REPO = Path(__file__).resolve().parents[1]
BAD = {  # relative path -> a word the reason must contain
    "bad/truncated.png": "truncated",
    "bad/deep/random.png": "not an image",
    "bad/empty.png": "empty",
    "notes/readme.txt": "not an image",
    "bad/dangling.png": "no such file",  # a symbolic link to nothing
}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[0], "L").save(path)


@pytest.fixture(scope="module")
def bundle(breast_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the BreastMNIST bundle without any export (scoring exports it)."""
    dst = tmp_path_factory.mktemp("score_bundle") / breast_bundle.name
    shutil.copytree(breast_bundle, dst, ignore=shutil.ignore_patterns("model.*onnx", "*.pt"))
    return dst


@pytest.fixture(scope="module")
def test_split(bundle: Path, breast_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The exact test arrays and labels ``zoo eval`` uses."""
    ds = bundle_splits(read_card(bundle), breast_root).test
    return ds.images.numpy(), ds.labels.numpy()


@pytest.fixture(scope="module")
def image_folder(test_split: tuple[np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """All test images as PNG in nested folders, a quarter also as JPEG, plus unreadable files."""
    images, _ = test_split
    root = tmp_path_factory.mktemp("score_images")
    png, jpeg = {}, {}
    for i, arr in enumerate(images):
        rel = f"png/{i % 3}/{i % 2}/img_{i:04d}.png"
        _write_png(root / rel, arr)
        png[rel] = i
        if i % 4 == 0:
            rel = f"jpeg/img_{i:04d}.jpg"
            (root / "jpeg").mkdir(exist_ok=True)
            Image.fromarray(arr[0], "L").save(root / rel, quality=90)
            jpeg[rel] = i
    big = np.random.default_rng(0).integers(0, 256, (1, 96, 96), dtype=np.uint8)
    _write_png(root / "tmp_big.png", big)
    data = (root / "tmp_big.png").read_bytes()
    (root / "tmp_big.png").unlink()
    for rel in BAD:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / "bad/truncated.png").write_bytes(data[: len(data) // 2])
    (root / "bad/deep/random.png").write_bytes(np.random.default_rng(1).bytes(2000))
    (root / "bad/empty.png").write_bytes(b"")
    (root / "notes/readme.txt").write_text("not an image\n")
    (root / "bad/dangling.png").symlink_to(root / "nowhere.png")
    (root / ".hidden.png").write_bytes(data)  # hidden files are not scored
    return {"root": root, "png": png, "jpeg": jpeg}


@pytest.fixture(scope="module")
def scored(bundle: Path, breast_root: Path, image_folder: dict[str, Any],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One CSV scoring run of the mixed folder (2 decode workers, small chunks), and ``zoo eval``'s answer."""
    had_onnx = (bundle / ONNX_FILE).exists()
    out = tmp_path_factory.mktemp("score_out") / "scores.csv"
    summary = score_folder(image_folder["root"], [str(bundle)], out, workers=2, chunk_size=64, batch_size=32,
                           progress=False)
    return {"out": out, "summary": summary, "had_onnx": had_onnx,
            "eval": evaluate_bundle(bundle, "test", breast_root)}


def test_png_predictions_equal_zoo_eval(scored: dict[str, Any], image_folder: dict[str, Any], bundle: Path,
                                        breast_root: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert not scored["had_onnx"] and (bundle / ONNX_FILE).is_file(), "scoring exports a bundle without model.onnx"
    rows = _read_csv(scored["out"])
    labels = read_card(bundle).labels
    ev = scored["eval"]
    expected = sorted([*image_folder["png"], *image_folder["jpeg"]])
    assert [r["path"] for r in rows] == expected  # one row per image, sorted relative paths
    assert list(rows[0]) == ["path", "model_id", "top_class", *(f"prob_{lab}" for lab in labels), "calibrated",
                             "ood_score", "in_distribution", "prediction_set"]
    assert all(r["prediction_set"].split("|")[0] == r["top_class"] for r in rows)  # the set, best first
    assert {r["model_id"] for r in rows} == {read_card(bundle).id}
    assert {r["calibrated"] for r in rows} == {"True"}  # the card carries a temperature: calibrated probabilities

    by_path = {r["path"]: r for r in rows}
    idx = np.array([image_folder["png"][p] for p in sorted(image_folder["png"])])
    png_rows = [by_path[p] for p in sorted(image_folder["png"])]
    pred = np.array([labels.index(r["top_class"]) for r in png_rows])
    probs = np.array([[float(r[f"prob_{lab}"]) for lab in labels] for r in png_rows])
    assert np.array_equal(pred, ev["pred"][idx])  # lossless PNG: the same predictions as zoo eval
    np.testing.assert_allclose(probs, ev["probs"][idx], atol=1e-5)
    ood = np.array([float(r["ood_score"]) for r in png_rows])
    np.testing.assert_allclose(ood, ev["ood_score"][idx], rtol=1e-3, atol=1e-3)  # ONNX's score = eager's
    threshold = read_card(bundle).ood.threshold
    assert [r["in_distribution"] == "True" for r in png_rows] == list(ood <= threshold)
    acc = float((pred == ev["labels"][idx]).mean())
    assert acc == float((ev["pred"][idx] == ev["labels"][idx]).mean())

    # every test image is there as PNG, so the accuracy is `zoo eval`'s on the test split
    assert main(["--store", str(store), "eval", str(bundle), "--data-root", str(breast_root), "--json"]) == 0
    assert acc == pytest.approx(json.loads(capsys.readouterr().out)["acc"], abs=1e-12)

    jpeg_rows = [by_path[p] for p in image_folder["jpeg"]]
    assert len(jpeg_rows) == len(image_folder["jpeg"]) > 0
    for r in jpeg_rows:  # lossy: valid rows, not necessarily the PNG's numbers
        p = np.array([float(r[f"prob_{lab}"]) for lab in labels])
        assert r["top_class"] == labels[int(p.argmax())] and abs(p.sum() - 1) < 1e-5 and (p >= 0).all()


def test_unreadable_files_are_listed_with_a_reason(scored: dict[str, Any], image_folder: dict[str, Any]) -> None:
    summary = scored["summary"]
    errors = _read_csv(summary.errors_out)
    assert summary.errors_out == scored["out"].with_name("scores.csv.errors.csv")
    assert [e["path"] for e in errors] == sorted(BAD)
    for e in errors:
        assert BAD[e["path"]] in e["reason"].lower(), e
    n_images = len(image_folder["png"]) + len(image_folder["jpeg"])
    assert (summary.files, summary.scored, summary.errors) == (n_images + len(BAD), n_images, len(BAD))
    assert not scored["out"].with_name("scores.csv.partial").exists()  # journal removed when done


def test_formats_carry_the_same_content(scored: dict[str, Any], image_folder: dict[str, Any], bundle: Path,
                                        tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    rows = _read_csv(scored["out"])
    columns = list(rows[0])
    for name in ("scores.jsonl", "scores.parquet"):
        s = score_folder(image_folder["root"], [bundle], tmp_path / name, workers=0, chunk_size=64, batch_size=32,
                         progress=False)
        assert s.scored == len(rows)
        assert _read_csv(s.errors_out) == _read_csv(scored["summary"].errors_out)
    lines = (tmp_path / "scores.jsonl").read_text(encoding="utf-8").splitlines()
    jsonl = [json.loads(line) for line in lines]
    table = pq.read_table(tmp_path / "scores.parquet")
    assert table.column_names == columns == list(jsonl[0])
    parquet = table.to_pylist()
    for c, j, p in zip(rows, jsonl, parquet, strict=True):
        for key in ("path", "model_id", "top_class", "prediction_set"):
            assert c[key] == j[key] == p[key]
        for key in ("calibrated", "in_distribution"):
            assert c[key] == str(j[key]) == str(p[key]), key
        for key in columns[3:]:
            if key not in ("calibrated", "in_distribution", "prediction_set"):
                # the same float32 value in the three files
                assert np.float32(c[key]) == np.float32(j[key]) == np.float32(p[key]), key


def test_cli_rerun_is_a_noop_and_overwrite_rescores(scored: dict[str, Any], image_folder: dict[str, Any], bundle: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.csv"
    args = ["score", str(image_folder["root"]), "--model", str(bundle), "--out", str(out), "--chunk-size", "64",
            "--batch-size", "32", "--workers", "0", "--no-progress"]
    assert main(args) == 0
    assert f"{len(BAD)} unreadable files" in capsys.readouterr().out
    first = out.read_bytes()
    assert first == scored["out"].read_bytes()  # same chunks and batches: same bytes, whatever the workers
    mtime = out.stat().st_mtime_ns
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out and out.stat().st_mtime_ns == mtime
    assert main([*args, "--overwrite"]) == 0
    assert out.read_bytes() == first
    assert main(["score", str(image_folder["root"]), "--model", str(bundle), "--out", str(tmp_path / "x.txt")]) == 2
    assert "format" in capsys.readouterr().err


def test_listing_rules(tmp_path: Path) -> None:
    """Recursive, sorted, hidden and excluded paths skipped, special files kept for the errors file."""
    from zoo.io import display_name
    from zoo.score import SPECIAL, list_folder

    for rel in ("b/2.png", "b/10.png", "a.jpg", ".hidden/x.png", "b/.x.png", "out.csv.partial/chunk-000000.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "b" / "pipe.png")
    entries = list_folder(tmp_path, exclude=[tmp_path / "out.csv.partial"])
    rels = [e.rel for e in entries]
    assert rels == sorted(rels) == ["a.jpg", "b/10.png", "b/2.png", *(["b/pipe.png"] if hasattr(os, "mkfifo") else [])]
    assert all(e.size == 1 and e.kind == "file" for e in entries[:3])
    assert len(entries) == 3 or (entries[3].kind == SPECIAL and entries[3].size == 0)
    assert display_name(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"


def _crash_after(chunks: int) -> Any:
    """An ``infer`` that dies (like a kill) once ``chunks`` chunks have been scored."""
    real, calls = score_run.infer, {"n": 0}

    def infer(*args: Any, **kwargs: Any) -> Any:
        if calls["n"] == chunks:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    return infer


def test_resume_checks_the_journal(bundle: Path, image_folder: dict[str, Any], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder, twin = tmp_path / "imgs", tmp_path / "twin"
    shutil.copytree(image_folder["root"] / "png" / "0", folder)
    shutil.copytree(folder, twin)  # the same files, for an uninterrupted reference run
    out = folder / "scores.csv"  # inside the folder: never scored itself, nor its journal
    kw: dict[str, Any] = {"workers": 0, "chunk_size": 10, "batch_size": 10, "progress": False}
    with monkeypatch.context() as m:
        m.setattr(score_run, "infer", _crash_after(2))
        with pytest.raises(KeyboardInterrupt):
            score_folder(folder, [bundle], out, **kw)
    journal = folder / "scores.csv.partial"
    assert sorted(p.name for p in journal.glob("chunk-*.json")) == ["chunk-000000.json", "chunk-000001.json"]
    assert not out.exists()

    shutil.copy(next(folder.rglob("*.png")), folder / "added.png")  # the folder changed: refused
    with pytest.raises(UsageError, match="--overwrite"):
        score_folder(folder, [bundle], out, **kw)
    (folder / "added.png").unlink()
    (journal / "chunk-000001.json").write_text('{"chunk": 1, "rows": [')  # damaged: scored again
    s = score_folder(folder, [bundle], out, **kw)
    assert s.resumed == 10 and s.processed == s.files - 10 and not journal.exists()
    rows = _read_csv(out)
    assert [r["path"] for r in rows] == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert out.read_bytes() == score_folder(twin, [bundle], tmp_path / "ref.csv", **kw).out.read_bytes()


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that just ended
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigkilled_run_resumes_without_loss_or_duplicates(bundle: Path, test_split: tuple[np.ndarray, np.ndarray],
                                                          scored: dict[str, Any], tmp_path: Path) -> None:
    images, _ = test_split
    folder = tmp_path / "many"
    n = 1200
    for i in range(n):
        _write_png(folder / f"d{i % 7}" / f"{i:05d}.png", np.roll(images[i % len(images)], i // len(images), axis=-1))
    out = tmp_path / "killed.csv"
    journal = tmp_path / "killed.csv.partial"
    opts = ["--chunk-size", "8", "--batch-size", "8", "--workers", "2", "--threads", "1"]
    cmd = [sys.executable, "-m", "zoo.cli", "score", str(folder), "--model", str(bundle), "--out", str(out),
           *opts, "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not list(journal.glob("chunk-*.json")):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "no chunk journalled in 180 s"
        time.sleep(0.005)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.stderr is not None
    proc.stderr.close()
    done = len(list(journal.glob("chunk-*.json")))
    assert not out.exists() and 1 <= done < n // 8, "the run was killed mid-way"
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "decode workers outlived the killed run"

    resumed = score_folder(folder, [bundle], out, chunk_size=8, batch_size=8, workers=2,
                           options=RuntimeOptions(threads=1), progress=False)
    assert resumed.resumed >= 8 and resumed.processed == n - resumed.resumed
    rows = _read_csv(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == n  # every image exactly once
    assert paths == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    reference = score_folder(folder, [bundle], tmp_path / "reference.csv", chunk_size=8, batch_size=8, workers=2,
                             options=RuntimeOptions(threads=1), progress=False)
    assert out.read_bytes() == reference.out.read_bytes()
    assert not journal.exists() and not list(tmp_path.glob(".killed.csv.*"))


@pytest.fixture(scope="module")
def second_bundle(bundle: Path, scored: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained network of the same card in a private store (another ensemble member)."""
    from zoo.bundle import build_net

    card = read_card(bundle)
    torch.manual_seed(7)
    net = build_net(card)
    store = tmp_path_factory.mktemp("ensemble_store")
    new_id = card.id + "-untrained"
    raw = {k: v for k, v in card.to_json_dict().items() if k not in ("calibration", "conformal", "ood", "exports")}
    path = save_bundle(store / "bundles" / new_id, net, raw, (bundle / "recipe.yaml").read_text())
    shutil.copytree(bundle, store / "bundles" / bundle.name)
    ensure_onnx(path)
    return path


def test_ensemble_averages_logits(bundle: Path, second_bundle: Path, image_folder: dict[str, Any],
                                  tmp_path: Path) -> None:
    folder = image_folder["root"] / "png" / "1"
    out = tmp_path / "ens.csv"
    s = score_folder(folder, [bundle, second_bundle], out, ensemble=True, workers=0, progress=False)
    rows = _read_csv(out)
    models = [OnnxModel.open(bundle), OnnxModel.open(second_bundle)]
    labels = models[0].labels
    # one member has no detector: no OOD columns; one is calibrated: not every probability is
    assert list(rows[0])[-2:] == ["agreement", "calibrated"] and s.models == [m.id for m in models]
    assert {r["calibrated"] for r in rows} == {"False"}
    prep = models[0].preprocessing
    x = np.stack([load_image(folder / r["path"], prep) for r in rows])
    # the first member's logits are calibrated first (its card's calibration, whichever was chosen)
    logits = [calibrated_logits(models[0].predict(x), models[0].meta.calibration), models[1].predict(x)]
    if logits[0].shape != logits[1].shape:  # a Dirichlet calibration answers with one column per class
        logits = [two_class_logits(lg) for lg in logits]
    expected = to_probs((logits[0] + logits[1]) / 2)
    got = np.array([[float(r[f"prob_{lab}"]) for lab in labels] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    tops = np.stack([lg.argmax(1) for lg in logits])
    agreement = (tops == expected.argmax(1)).mean(0)
    np.testing.assert_allclose([float(r["agreement"]) for r in rows], agreement)
    assert {r["model_id"] for r in rows} == {"+".join(s.models)}
    assert 0.5 in set(agreement) or (tops[0] == tops[1]).all()

    # a task name with --ensemble: its best bundles of one architecture, from the given store
    by_task = score_folder(folder, ["breast"], tmp_path / "task.csv", ensemble=True, workers=0, progress=False,
                           store=second_bundle.parent.parent)
    assert sorted(by_task.models) == sorted(s.models)
    with pytest.raises(UsageError, match="--ensemble"):
        score_folder(folder, [bundle, second_bundle], tmp_path / "no.csv", workers=0, progress=False)
    # the one resolution of model references (zoo.ensemble.resolve_models), as zoo.load: a member twice is refused
    with pytest.raises(EnsembleError, match="the same model is given twice"):
        score_folder(folder, [bundle, bundle.resolve()], tmp_path / "twice.csv", ensemble=True, workers=0,
                     progress=False)


@pytest.mark.skipif(sys.platform != "linux", reason="relies on fork copying the patched decoder into the worker")
def test_a_file_that_crashes_the_decoder_costs_only_itself(bundle: Path, scored: dict[str, Any],
                                                          image_folder: dict[str, Any], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "crash"
    shutil.copytree(image_folder["root"] / "png" / "2", folder)
    (folder / "0" / "poison.png").write_bytes(b"POISON")
    real = score_decode.load_image

    def load(src: Any, prep: Any) -> np.ndarray:
        if src == b"POISON":
            os._exit(11)  # what a segfaulting decoder does to its worker
        return real(src, prep)

    monkeypatch.setattr(score_decode, "load_image", load)
    s = score_folder(folder, [bundle], tmp_path / "crash.csv", workers=1, chunk_size=16, progress=False)
    assert _read_csv(s.errors_out) == [{"path": "0/poison.png", "reason": CRASH_REASON}]
    assert s.scored == s.files - 1


def test_dicom_files_are_scored(bundle: Path, tmp_path: Path) -> None:
    """A folder of pydicom's real DICOM files (CT, MR, RLE, JPEG 2000, a MONOCHROME1 radiograph named
    without extension, YBR colour JPEG): one row each, with the probabilities of the model on
    ``load_image`` of that file; a transfer syntax no handler decodes and a multi-frame file go
    to the errors file with the reason."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import JPEG2000MC

    good = {"ct/CT_small.dcm": "CT_small.dcm", "mr/MR_small.dcm": "MR_small.dcm",
            "mr/MR_small_RLE.dcm": "MR_small_RLE.dcm", "mr/MR_small_jp2k.dcm": "MR_small_jp2klossless.dcm",
            "cr/6154": "6154", "sc/rgb_ybr_jpeg.dcm": "SC_rgb_jpeg_dcmtk.dcm"}
    folder = tmp_path / "dicom"
    for rel, name in good.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(name), folder / rel)
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    ds.file_meta.TransferSyntaxUID = JPEG2000MC  # JPEG 2000 Part 2: pydicom has no decoder for it
    (folder / "bad").mkdir()
    ds.save_as(folder / "bad" / "part2.dcm")
    shutil.copy(get_testdata_file("SC_rgb_rle_2frame.dcm"), folder / "bad" / "two_frames.dcm")

    out = tmp_path / "scores.csv"
    summary = score_folder(folder, [str(bundle)], out, workers=2, chunk_size=3, progress=False)
    rows = {r["path"]: r for r in _read_csv(out)}
    assert sorted(rows) == sorted(good) and summary.scored == len(good)
    card = read_card(bundle)
    model = OnnxModel.open(ensure_onnx(bundle))
    for rel in good:
        out = model.outputs(load_image(folder / rel, card.preprocessing)[None])
        probs = interpret(out["logits"], model.meta, out.get("ood_score")).probs[0]  # calibrated, as scored
        got = np.array([float(rows[rel][f"prob_{lab}"]) for lab in card.labels])
        np.testing.assert_allclose(got, probs, atol=1e-5)
        assert rows[rel]["top_class"] == card.labels[int(probs.argmax())]
    errors = {e["path"]: e["reason"] for e in _read_csv(summary.errors_out)}
    assert set(errors) == {"bad/part2.dcm", "bad/two_frames.dcm"}
    assert "JPEG 2000 Part 2" in errors["bad/part2.dcm"] and "not supported" in errors["bad/part2.dcm"]
    assert "multi-frame DICOM (2 frames)" in errors["bad/two_frames.dcm"]
