"""Scale-out: `zoo score` against `zoo score --ray` on a local Ray cluster, and `zoo tune` trials per
hour with one and two workers. Every figure has its baseline measured in the same run.

* Scoring: the same folder of 28 px RGB PNGs and the same exported bundle (bench_score.py's
  ResNet-18, stem "small") scored by :func:`zoo.score.score_folder` (decode worker processes +
  ONNX Runtime in the process) and by :func:`zoo.score.ray_run.score_folder_ray` on a local Ray
  started here (Ray Data decode tasks + an ONNX Runtime actor pool). Rounds alternate local and Ray
  (the machine's load drifts); best round kept. Ray's overhead is shown three ways: the start of a
  local Ray instance, the fixed cost of a job (scoring a folder of one chunk: actors starting,
  sessions opening, tasks scheduled) against local `zoo score` on the same folder, and the
  throughput ratio on the large folder.
* Training processes: `zoo train` with one process (torch's threads: one per core) against
  `zoo train --nproc 2` (torchrun, DistributedDataParallel over gloo, one thread each), the same
  recipe and global batch (per-process batch halved), on a synthetic DermaMNIST-sized file; samples
  per second over the training epochs (the card's training time), alternating rounds.
* Tuning: the same trials (a fixed list of learning rates enqueued in the study; random sampler,
  no pruning, so every trial does the same work) run by one `zoo tune` worker, then by two workers
  started at once on one journal file; trials per hour from launch to the last worker's exit
  (process start-up included, as a user pays it).

    python bench/bench_scale.py --quick        # ~5 min on 2 CPU cores
    python bench/bench_scale.py --images 5000 --trials 8 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's zoo (and bench_score), not an installed one

from bench_score import machine, make_bundle, make_folder  # noqa: E402

from zoo.data.synthetic import write_synthetic_medmnist  # noqa: E402
from zoo.recipe import load_recipe_file  # noqa: E402
from zoo.score import score_folder  # noqa: E402
from zoo.score.decode import default_workers  # noqa: E402
from zoo.score.ray_run import ray_session, score_folder_ray  # noqa: E402
from zoo.settings import runtime_options  # noqa: E402
from zoo.tune import open_study  # noqa: E402

REPO = HERE.parent


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def score_round(folder: Path, bundle: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """Seconds of local runs (ONNX Runtime's default threads, and 1 thread as each Ray actor runs) and
    of one Ray run of the same folder (the Ray instance already up)."""
    opts = {"batch_size": args.batch_size, "chunk_size": args.chunk_size, "overwrite": True, "progress": False}
    local, t_local = timed(lambda: score_folder(folder, [bundle], out / "local.csv", **opts))
    ray, t_ray = timed(lambda: score_folder_ray(folder, [bundle], out / "ray.csv", **opts))
    one = runtime_options(threads=1)
    _, t_local1 = timed(lambda: score_folder(folder, [bundle], out / "local1.csv", options=one, **opts))
    assert (out / "local.csv").read_bytes() == (out / "ray.csv").read_bytes(), "Ray's output differs"
    assert local.scored == ray.scored == local.files
    return {"local_s": t_local, "local_t1_s": t_local1, "ray_s": t_ray}


def bench_score(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bundle = make_bundle(args.arch, work)
    folder, small = work / f"images_{args.images}", work / "images_one_chunk"
    if not folder.is_dir():
        make_folder(folder, args.images)
    if not small.is_dir():
        make_folder(small, min(args.chunk_size, 64), seed=2)
    out = work / "out"
    out.mkdir(exist_ok=True)
    score_folder(small, [bundle], out / "warm.csv", overwrite=True, progress=False)  # sessions, page cache warm
    import ray

    with ray_session(None, num_cpus=args.ray_cpus):
        pass  # a first start warms the page cache with Ray's binaries
    opts = {"num_cpus": args.ray_cpus or default_workers(), "include_dashboard": False,
            "logging_level": logging.ERROR}
    _, init_s = timed(lambda: ray.init(address="local", **opts))  # left up: score_folder_ray joins it
    try:
        fixed = score_round(small, bundle, out, args)
        print(f"  Ray start {init_s:.1f} s; one chunk: local {fixed['local_s']:.1f} s, Ray {fixed['ray_s']:.1f} s",
              flush=True)
        rounds = [score_round(folder, bundle, out, args) for _ in range(args.repeat)]
        for r in rounds:
            print(f"  round: local {r['local_s']:.1f} s (1 ORT thread: {r['local_t1_s']:.1f} s), "
                  f"Ray {r['ray_s']:.1f} s for {args.images} images", flush=True)
        resources = ray.cluster_resources()
    finally:
        ray.shutdown()
    best_local, best_ray = min(r["local_s"] for r in rounds), min(r["ray_s"] for r in rounds)
    best_local1 = min(r["local_t1_s"] for r in rounds)
    return {"images": args.images, "ray_init_s": init_s, "local_images_per_s": args.images / best_local,
            "local_t1_images_per_s": args.images / best_local1, "ray_images_per_s": args.images / best_ray,
            "ray_vs_local": best_local / best_ray, "ray_vs_local_t1": best_local1 / best_ray,
            "one_chunk_local_s": fixed["local_s"], "one_chunk_ray_s": fixed["ray_s"],
            "ray_job_overhead_s": fixed["ray_s"] - fixed["local_s"], "ray_cpus": resources.get("CPU")}


def tune_recipe(work: Path, epochs: int) -> Path:
    """A report-000-style MLP on synthetic DermaMNIST-shaped data; lr searched, no pruning."""
    path = work / "bench-tune.yaml"
    path.write_text(yaml.safe_dump({
        "name": "derma-mlp-bench", "dataset": "derma", "arch": "mlp", "report": "bench", "citation": "bench",
        "model": {"hidden": [256, 128], "batchnorm": True, "dropout": 0.2},
        "train": {"epochs": epochs, "batch_size": 64, "early_stopping": {"patience": None, "metric": "acc"}},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "tune": {"sampler": "random", "pruner": {"name": "none"},
                 "params": {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}},
    }, sort_keys=False))
    return path


def run_workers(n_workers: int, trials: int, recipe: Path, data: Path, work: Path, threads: int | None) -> float:
    """Seconds from launching ``n_workers`` `zoo tune` processes on one fresh study to the last exit."""
    storage, name = work / f"tune_{n_workers}w.journal", f"bench-{n_workers}w"
    storage.unlink(missing_ok=True)  # a fresh study each time
    shutil.rmtree(work / f"store_{n_workers}w", ignore_errors=True)
    study = open_study(load_recipe_file(recipe), name, str(storage))
    for k in range(trials):  # the same learning rates for every configuration
        study.enqueue_trial({"optimizer.lr": 10 ** (-4 + 3 * k / max(trials - 1, 1))})
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    cmd = [sys.executable, "-m", "zoo.cli", "tune", "derma", "mlp", "--recipe", str(recipe), "--study", name,
           "--storage", str(storage), "--store", str(work / f"store_{n_workers}w"), "--data-root", str(data),
           "--offline", "--json", "--trials"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*cmd, str(trials // n_workers)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(n_workers)]
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err.decode()[-2000:]
    seconds = time.perf_counter() - t0
    done = len([t for t in study.get_trials() if t.state.name == "COMPLETE"])
    assert done == trials, f"{done} of {trials} trials completed"
    return seconds


def bench_tune(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data = work / "tune_data"
    write_synthetic_medmnist(data, "dermamnist", 28, (args.tune_train, 500, 100), seed=0)
    recipe = tune_recipe(work, args.tune_epochs)
    one = run_workers(1, args.trials, recipe, data, work, args.tune_threads)
    print(f"  1 worker: {args.trials} trials in {one:.1f} s", flush=True)
    two = run_workers(2, args.trials, recipe, data, work, args.tune_threads)
    print(f"  2 workers: {args.trials} trials in {two:.1f} s", flush=True)
    return {"trials": args.trials, "epochs": args.tune_epochs, "train_images": args.tune_train,
            "one_worker_s": one, "two_workers_s": two, "one_worker_per_hour": args.trials / one * 3600,
            "two_workers_per_hour": args.trials / two * 3600, "two_vs_one": one / two}


def train_once(data: Path, store: Path, nproc: int, args: argparse.Namespace) -> float:
    """Training samples per second of one `zoo train` (its card's training time)."""
    batch = args.ddp_batch // nproc
    cmd = [sys.executable, "-m", "zoo.cli", "--store", str(store), "train", "derma", args.ddp_arch, "--data-root",
           str(data), "--epochs", str(args.ddp_epochs), "--batch-size", str(batch), "--offline", "--json",
           "--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else str(os.cpu_count() or 1)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    card = json.loads((Path(json.loads(out.strip().splitlines()[-1])["bundle"]) / "card.json").read_text())
    return card["dataset"]["sizes"]["train"] * card["training"]["epochs_run"] / card["training"]["time_s"]


def bench_ddp(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data = work / "ddp_data"
    write_synthetic_medmnist(data, "dermamnist", 28, (7007, 1003, 2005))
    rates: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.repeat):
        for nproc in (1, 2):
            rates[nproc].append(train_once(data, work / f"ddp_store_{r}_{nproc}", nproc, args))
            print(f"  {nproc} process(es): {rates[nproc][-1]:.0f} samples/s", flush=True)
    one, two = max(rates[1]), max(rates[2])
    return {"arch": args.ddp_arch, "epochs": args.ddp_epochs, "global_batch": args.ddp_batch,
            "one_process_per_s": one, "two_processes_per_s": two, "two_vs_one": two / one}


def report(score: dict[str, Any] | None, tune: dict[str, Any] | None, args: argparse.Namespace,
           ddp: dict[str, Any] | None = None) -> None:
    print(f"\nScale-out on {machine()}; Python {sys.version.split()[0]}")
    if score:
        print(f"Scoring: {args.arch} (stem small), 28 px PNGs, batch {args.batch_size}, chunk {args.chunk_size}; "
              f"local Ray with {score['ray_cpus']:.0f} CPUs")
        print(f"  local zoo score          {score['local_images_per_s']:8.1f} images/s  ({score['images']} images)")
        print(f"  local, --threads 1       {score['local_t1_images_per_s']:8.1f} images/s")
        print(f"  zoo score --ray (local)  {score['ray_images_per_s']:8.1f} images/s  "
              f"= {score['ray_vs_local']:.2f} x local, {score['ray_vs_local_t1']:.2f} x local --threads 1")
        print(f"  Ray start (ray.init)     {score['ray_init_s']:8.1f} s")
        print(f"  one chunk ({min(args.chunk_size, 64)} images): local {score['one_chunk_local_s']:.1f} s, "
              f"Ray {score['one_chunk_ray_s']:.1f} s: {score['ray_job_overhead_s']:.1f} s of fixed cost per Ray job")
    if ddp:
        print(f"Training: {ddp['arch']} on a synthetic DermaMNIST-sized file (7007 images), global batch "
              f"{ddp['global_batch']}, {ddp['epochs']} epochs")
        print(f"  1 process (torch threads = cores)   {ddp['one_process_per_s']:8.0f} samples/s")
        print(f"  2 processes (DDP, gloo, 1 thread)   {ddp['two_processes_per_s']:8.0f} samples/s "
              f"= {ddp['two_vs_one']:.2f} x 1 process")
    if tune:
        print(f"Tuning: {tune['trials']} trials of an MLP, {tune['epochs']} epochs on {tune['train_images']} "
              f"synthetic 28 px images each; OMP_NUM_THREADS {args.tune_threads or 'unset'}")
        print(f"  1 worker   {tune['one_worker_per_hour']:8.0f} trials/hour")
        print(f"  2 workers  {tune['two_workers_per_hour']:8.0f} trials/hour = {tune['two_vs_one']:.2f} x 1 worker")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2000 images, 1 round, 4 trials of 2 epochs")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray (default: the cores)")
    ap.add_argument("--repeat", type=int, default=2, help="scoring rounds (best kept)")
    ap.add_argument("--trials", type=int, default=8, help="trials per tuning configuration (even)")
    ap.add_argument("--tune-epochs", type=int, default=3)
    ap.add_argument("--tune-train", type=int, default=7007, help="training images of the tuning data")
    ap.add_argument("--tune-threads", type=int, help="OMP_NUM_THREADS of each `zoo tune` worker (default unset)")
    ap.add_argument("--ddp-arch", default="simplecnn")
    ap.add_argument("--ddp-epochs", type=int, default=2)
    ap.add_argument("--ddp-batch", type=int, default=128, help="global batch (per process: divided by processes)")
    ap.add_argument("--skip", choices=["score", "tune", "ddp"], action="append", default=[])
    ap.add_argument("--workdir", help="keep bundle, images and data here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()
    if args.quick:
        args.images, args.repeat, args.trials, args.tune_epochs = 2000, 1, 4, 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("MEDZOO_HOME", str(work / "home"))
        score = bench_score(args, work) if "score" not in args.skip else None
        tune = bench_tune(args, work) if "tune" not in args.skip else None
        ddp = bench_ddp(args, work) if "ddp" not in args.skip else None
    report(score, tune, args, ddp)
    if args.json:
        print(json.dumps({"score": score, "tune": tune, "ddp": ddp, "machine": machine()}))


if __name__ == "__main__":
    main()
