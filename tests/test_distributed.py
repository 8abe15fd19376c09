"""Training with several processes: `zoo train --nproc 2` (torchrun, DistributedDataParallel over
gloo on the CPU) on the real BreastMNIST.

The gradient check: after one optimiser step, the weights of a 2-process run with 8 images per
process equal those of a 1-process run with the same 16 images as its batch (each rank takes its
half of the global batch drawn from the same permutation; DDP averages the two half-batch mean
gradients, which is the 16-image mean gradient). Tolerance: 1e-5 absolute on weights of magnitude
≈ 0.3 — the two runs sum the same gradients in another order (≈ 1e-7 measured).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from zoo.card import read_card

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6  # of the runs killed after their first snapshot: the rest is what a resume must finish
ONE_STEP = ("--epochs", "1", "--set", "train.max_batches=1", "--offline", "--json")


def _zoo(store: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "zoo.cli", "--store", str(store), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def _zoo_together(*runs: tuple[Path, tuple[str, ...]]) -> list[subprocess.CompletedProcess[str]]:
    """Several ``zoo`` runs at once (each store its own): most of a short run is starting Python and torch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [(subprocess.Popen([sys.executable, "-m", "zoo.cli", "--store", str(store), *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), args)
             for store, args in runs]
    done = []
    for proc, args in procs:
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return done


def _bundle(run: subprocess.CompletedProcess[str]) -> Path:
    assert run.returncode == 0, run.stderr[-3000:]
    return Path(json.loads(run.stdout.strip().splitlines()[-1])["bundle"])


@pytest.fixture(scope="module")
def two_and_one(breast_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same first step by 2 processes × 8 images and by 1 process × 16 images."""
    base = ("train", "breast", "simplecnn_v1", "--data-root", str(breast_root), *ONE_STEP)
    two, one = _zoo_together((tmp_path_factory.mktemp("ddp2"), (*base, "--batch-size", "8", "--nproc", "2")),
                             (tmp_path_factory.mktemp("ddp1"), (*base, "--batch-size", "16")))
    return _bundle(two), _bundle(one)


def test_two_processes_average_gradients_like_one_process_on_both_shards(two_and_one: tuple[Path, Path]) -> None:
    two, one = two_and_one
    a, b = load_file(str(two / "model.safetensors")), load_file(str(one / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-5, diff
    card = read_card(two)
    assert (card.training.world_size, card.training.effective_batch_size, card.training.backend) == (2, 16, "gloo")
    assert read_card(one).training.world_size == 1


def test_the_ddp_bundle_loads_exports_and_answers_like_any_other(two_and_one: tuple[Path, Path],
                                                                  breast_root: Path, tmp_path: Path) -> None:
    import zoo
    from export import ensure_exported
    from zoo.bundle import load_bundle
    from zoo.inference import bundle_splits

    two, _ = two_and_one
    load_bundle(two)  # sha256 checked, weights fit the architecture
    ensure_exported(two)  # parity-checked ONNX
    card = read_card(two)
    assert card.exports["onnx"].parity["passed"] and card.calibration is not None and card.ood is not None
    png = tmp_path / "scan.png"
    Image.fromarray(bundle_splits(card, breast_root).test.images.numpy()[0, 0]).save(png)
    (answer,) = zoo.load(two).predict(png)
    assert answer.label in card.labels and abs(float(np.sum(answer.probs)) - 1) < 1e-5 and answer.calibrated


def test_a_killed_distributed_run_resumes(breast_root: Path, tmp_path: Path) -> None:
    """SIGKILL to the whole torchrun group after a snapshot; `--resume --nproc 2` finishes the run."""
    args = ("train", "breast", "lenet", "--data-root", str(breast_root), "--epochs", str(EPOCHS), "--batch-size", "32",
            "--offline", "--nproc", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli", "--store", str(tmp_path), *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob("runs/*/state.pt")):
        time.sleep(0.05)
    assert list(tmp_path.glob("runs/*/state.pt")), "no snapshot before the run ended"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "bundles").exists() or not list((tmp_path / "bundles").iterdir())
    resumed = _zoo(tmp_path, "-v", *args, "--resume", "--json")
    bundle = _bundle(resumed)
    assert "resuming" in resumed.stderr
    card = read_card(bundle)
    assert card.training.epochs_run == EPOCHS and card.training.world_size == 2
    assert not list(tmp_path.glob("runs/*/state.pt"))


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc (Linux)")
def test_a_dead_rank_is_restarted_and_the_run_goes_on(breast_root: Path, tmp_path: Path) -> None:
    """One rank SIGKILLed after a snapshot (a crash, the OOM killer): torchrun restarts both ranks,
    which resume from rank 0's snapshot and finish the run."""
    args = ("train", "breast", "lenet", "--data-root", str(breast_root), "--epochs", str(EPOCHS), "--batch-size", "32",
            "--offline", "--nproc", "2", "-v", "--json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "zoo.cli", "--store", str(tmp_path), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob("runs/*/state.pt")):
            time.sleep(0.05)
        (torchrun,) = _children(proc.pid)
        ranks = _children(torchrun)
        assert len(ranks) == 2 and list(tmp_path.glob("runs/*/state.pt")), "no snapshot before the run ended"
        os.kill(ranks[-1], signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming" in err  # the restarted group continued from the snapshot, not from epoch 1
    card = read_card(Path(json.loads(out.strip().splitlines()[-1])["bundle"]))
    assert card.training.epochs_run == EPOCHS and card.training.world_size == 2


def test_a_rank_without_peers_gives_up_within_the_connect_timeout() -> None:
    """A rank whose peers never connect exits (for torchrun to restart the group) instead of waiting
    for gloo's 30-minute timeout."""
    import socket

    from zoo.train.distributed import CONNECT_TIMEOUT_ENV, EXIT_NO_PEERS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), CONNECT_TIMEOUT_ENV: "3"}
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", "from zoo.train.distributed import from_env; from_env('cpu')"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == EXIT_NO_PEERS, run.stderr[-2000:]
    assert "not connected to the other ranks after 3 s" in run.stderr
    assert time.perf_counter() - t0 < 60
