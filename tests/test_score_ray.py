"""``zoo score --ray``: the same scoring on a local Ray cluster (real BreastMNIST images as PNG files).

What is checked: the output (CSV, Parquet, JSON Lines) and the errors file are byte-identical to
local ``zoo score``'s, bad files in the errors file with their reasons; an ensemble scores the same
on Ray; a file that crashes the decoder costs only itself; a Ray job killed with SIGKILL (the
``zoo score --ray ADDRESS`` driver, joining this module's cluster) leaves a journal that the next
run resumes, scoring nothing twice and writing the same bytes.

One Ray instance (2 CPUs) serves the whole module: Ray starts in seconds, not milliseconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zoo.card import read_card
from zoo.score import CRASH_REASON, ensure_onnx, score_folder

ray = pytest.importorskip("ray")

from zoo.score.ray_run import plan_pool, score_folder_ray  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POISON = b"POISON-PNG"
BAD = {  # relative path -> a word its reason must contain
    "bad/truncated.png": "truncated",
    "bad/random.png": "not an image",
    "bad/empty.png": "empty",
    "notes/readme.txt": "not an image",
}


# Installed in every process of this module's Ray jobs (the decode workers' forkserver included):
# a file whose bytes are POISON kills the process decoding it, as a segfaulting decoder would.
SITECUSTOMIZE = f"""
import os
try:
    from zoo.score import decode
except ImportError:
    decode = None
if decode is not None:
    real = decode.load_image

    def load(src, prep):
        if src == {POISON!r}:
            os._exit(11)
        return real(src, prep)

    decode.load_image = load
"""


@pytest.fixture(scope="module")
def bundle(breast_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("ray_bundle") / breast_bundle.name
    shutil.copytree(breast_bundle, dst)
    ensure_onnx(dst)
    return dst


@pytest.fixture(scope="module")
def ray_address(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray of 2 CPUs for the module; its GCS address lets a subprocess driver join it.
    (After ``bundle``: the session's BreastMNIST model trains before Ray's daemons take their share.)"""
    hooks = tmp_path_factory.mktemp("ray_hooks")
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
                   runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(hooks), str(REPO)])}})
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "L").save(path)


@pytest.fixture(scope="module")
def breast_images(breast_root: Path) -> np.ndarray:
    with np.load(breast_root / "breastmnist.npz") as f:
        return np.concatenate([f["val_images"], f["test_images"]])  # 234 real images, 28 x 28 grey


@pytest.fixture(scope="module")
def folder(breast_images: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real validation and test images as PNG in nested folders, plus unreadable files."""
    root = tmp_path_factory.mktemp("ray_images")
    for i, arr in enumerate(breast_images):
        _write_png(root / f"{['val', 'test'][i >= 78]}/{i % 3}/img_{i:04d}.png", arr)
    data = (root / "val/0/img_0000.png").read_bytes()
    for rel in BAD:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / "bad/truncated.png").write_bytes(data[: len(data) // 2])
    (root / "bad/random.png").write_bytes(np.random.default_rng(1).bytes(2000))
    (root / "bad/empty.png").write_bytes(b"")
    (root / "notes/readme.txt").write_text("not an image\n")
    return root


def test_plan_pool_sizes_to_the_cluster() -> None:
    assert plan_pool({"CPU": 2}).size == 1 and plan_pool({"CPU": 16}).size == 8
    gpu = plan_pool({"CPU": 16, "GPU": 4})
    assert (gpu.size, gpu.num_gpus) == (4, 1.0)
    assert plan_pool({"CPU": 8}, actors=3, threads=2).size == 3


def test_cli_refuses_options_of_the_other_mode(folder: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from zoo.cli import main

    base = ["score", str(folder), "--model", "breast", "--out", str(tmp_path / "x.csv")]
    assert main([*base, "--ray", "--workers", "2"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main([*base, "--actors", "2"]) == 2
    assert "go with --ray" in capsys.readouterr().err


def test_ray_output_is_byte_identical_to_local(ray_address: str, bundle: Path, folder: Path,
                                               tmp_path: Path) -> None:
    for ext in (".csv", ".parquet"):
        local = score_folder(folder, [bundle], tmp_path / f"local{ext}", chunk_size=16, batch_size=8, workers=1,
                             progress=False)
        on_ray = score_folder_ray(folder, [bundle], tmp_path / f"ray{ext}", chunk_size=16, batch_size=8,
                                  progress=False)
        assert on_ray.files == local.files == 234 + len(BAD)
        assert (on_ray.scored, on_ray.errors, on_ray.processed) == (234, len(BAD), local.files)
        assert "Ray actor" in on_ray.provider
        assert on_ray.out.read_bytes() == local.out.read_bytes(), ext
        assert on_ray.errors_out.read_bytes() == local.errors_out.read_bytes()
        assert not (tmp_path / f"ray{ext}.partial").exists()
    lines = (tmp_path / "ray.csv.errors.csv").read_text().splitlines()
    reasons = dict(line.split(",", 1) for line in lines[1:])
    assert sorted(reasons) == sorted(BAD)
    for rel, word in BAD.items():
        assert word in reasons[rel], (rel, reasons[rel])
    # done means done: a second run is a no-op, as locally
    again = score_folder_ray(folder, [bundle], tmp_path / "ray.csv", chunk_size=16, batch_size=8, progress=False)
    assert again.already_done and again.scored == 234


def test_ensemble_on_ray_equals_local(ray_address: str, bundle: Path, folder: Path, tmp_path: Path) -> None:
    import torch

    from zoo.bundle import build_net, save_bundle

    card = read_card(bundle)
    torch.manual_seed(3)
    raw = {k: v for k, v in card.to_json_dict().items() if k not in ("calibration", "ood", "exports")}
    other = save_bundle(tmp_path / "bundles" / (card.id + "-other"), build_net(card), raw,
                        (bundle / "recipe.yaml").read_text())
    members = [bundle, other]
    local = score_folder(folder / "test", members, tmp_path / "local.jsonl", ensemble=True, chunk_size=32,
                         workers=0, progress=False)
    on_ray = score_folder_ray(folder / "test", members, tmp_path / "ray.jsonl", ensemble=True, chunk_size=32,
                              progress=False)
    assert on_ray.models == local.models and len(on_ray.models) == 2
    assert on_ray.out.read_bytes() == local.out.read_bytes()
    assert b'"agreement"' in on_ray.out.read_bytes()


def test_a_file_that_crashes_the_decoder_costs_only_itself(ray_address: str, bundle: Path, folder: Path,
                                                          tmp_path: Path) -> None:
    crash = tmp_path / "crash"
    shutil.copytree(folder / "val", crash)
    (crash / "1" / "poison.png").write_bytes(POISON)
    s = score_folder_ray(crash, [bundle], tmp_path / "crash.csv", chunk_size=8, progress=False)
    errors = (tmp_path / "crash.csv.errors.csv").read_text().splitlines()
    assert errors == ["path,reason", f"1/poison.png,{CRASH_REASON}"]
    assert s.scored == 78 and s.errors == 1


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL")
def test_killed_ray_job_resumes_without_loss_or_duplicates(ray_address: str, bundle: Path,
                                                           breast_images: np.ndarray, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    n = 600
    for i in range(n):
        _write_png(folder / f"d{i % 5}" / f"{i:05d}.png", np.roll(breast_images[i % len(breast_images)], i, axis=-1))
    out, journal = tmp_path / "killed.csv", tmp_path / "killed.csv.partial"
    cmd = [sys.executable, "-m", "zoo.cli", "score", str(folder), f"--ray={ray_address}", "--model", str(bundle),
           "--out", str(out), "--chunk-size", "4", "--batch-size", "4", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(list(journal.glob("chunk-*.json"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "no chunk journalled in 240 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.stderr is not None
    proc.stderr.close()
    done = len(list(journal.glob("chunk-*.json")))
    assert not out.exists() and 3 <= done < n // 4, "the job was killed mid-way"

    resumed = score_folder_ray(folder, [bundle], out, chunk_size=4, batch_size=4, progress=False)
    assert resumed.resumed >= 4 * done and resumed.processed == n - resumed.resumed  # nothing scored twice
    paths = [line.split(",", 1)[0] for line in out.read_text().splitlines()[1:]]
    assert len(paths) == len(set(paths)) == n
    assert paths == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    reference = score_folder(folder, [bundle], tmp_path / "reference.csv", chunk_size=4, batch_size=4, workers=1,
                             progress=False)
    assert out.read_bytes() == reference.out.read_bytes()
    assert not journal.exists()
