"""``zoo score --ray``: the same scoring on a Ray cluster, through Ray Data.

Pipeline (one Ray Data dataset, streamed)::

    driver: FOLDER listed once (zoo.score.listing), journal opened under its lock
      ─ one row per chunk still missing from the journal
      ─ map_batches(decode_chunks): Ray tasks read and decode a chunk each (decode_entries, in a
        child process so that a decoder crash costs only its file, as locally)
      ─ map_batches(ScoreChunks, ActorPoolStrategy): ONNX Runtime actors, one per GPU (or one per
        two CPUs), score a chunk each (zoo.score.models.infer, ensembles via zoo.ensemble.combine)
        and return its journal record (zoo.score.journal.chunk_record)
      ─ driver: each record written atomically into the journal as it arrives
      ─ zoo.score.run.run_journalled assembles the output in chunk order, as for local scoring.

So the output, the errors file and their bytes are those of a local ``zoo score`` with the same
chunk and batch sizes; a killed job leaves a journal that the next run (local or Ray) resumes.
Ray may run a task twice (retries after a lost worker or node); the driver keeps the first record
of a chunk, so every file appears exactly once.

The workers read FOLDER at the driver's path: on a cluster it must be on a shared filesystem
(NFS, a mounted bucket). The ONNX files travel through Ray's object store, so the store need not
be shared. Every node needs medzoo installed (``pip install 'medzoo[ray]'``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zoo.errors import ModelFileError, UsageError, UserError
from zoo.io import atomic_write_bytes
from zoo.postprocess import check_alpha
from zoo.preprocess import Preprocessing
from zoo.runtime import OnnxModel, RuntimeOptions
from zoo.score.decode import DecodedChunk, Decoder, default_workers
from zoo.score.journal import Run, chunk_name, chunk_record
from zoo.score.listing import FileEntry, list_folder
from zoo.score.models import infer, model_identity, open_models, resolve_models
from zoo.score.run import DEFAULT_BATCH, DEFAULT_CHUNK, ScorePaths, ScoreSummary, run_journalled
from zoo.settings import runtime_options

log = logging.getLogger(__name__)

LOCAL = "local"
WORKER_MEMORY = 128 << 20  # what a Ray worker process holds before any data (measured: ~110 MiB)


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError("`zoo score --ray` needs Ray Data: pip install 'medzoo[ray]'") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, verbose: bool = False) -> Iterator[Any]:
    """Ray for the length of a run: a new local instance (``address`` None or ``"local"``, with
    ``num_cpus``), or the cluster at ``address`` (``"auto"``: the one ``ray start`` runs here).
    A process already connected (a notebook, a test) keeps its connection and it stays up."""
    ray = _import_ray()
    _quiet_ray(verbose)
    if ray.is_initialized():
        yield ray
        return
    opts: dict[str, Any] = {"include_dashboard": False, "configure_logging": True,
                            "logging_level": logging.INFO if verbose else logging.ERROR}
    if address in (None, LOCAL):
        ray.init(address=LOCAL, num_cpus=num_cpus or default_workers(), **opts)
    else:
        if num_cpus is not None:
            raise UserError("--ray-cpus sizes a local Ray only; a cluster has its own CPUs")
        try:
            ray.init(address=address, **opts)
        except ConnectionError as e:
            raise UserError(f"cannot join the Ray cluster at {address}: {e}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _quiet_ray(verbose: bool) -> None:
    """Ray's and Ray Data's own INFO lines (execution plans, progress bars) only with ``-v``."""
    level = logging.INFO if verbose else logging.ERROR
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)


@dataclass(frozen=True)
class Pool:
    """The ONNX Runtime actor pool: how many actors, and what each one reserves."""

    size: int
    num_cpus: float
    num_gpus: float
    threads: int  # ONNX Runtime intra-op threads per actor


def plan_pool(resources: dict[str, float], actors: int | None = None, threads: int | None = None) -> Pool:
    """One actor per GPU when the cluster has GPUs; else one per two CPUs (the other half decodes),
    each actor holding one CPU and running ONNX Runtime on ``threads`` (default 1) threads."""
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if gpus:
        return Pool(actors or gpus, 1.0, 1.0, threads or 2)
    return Pool(actors or max(1, cpus // 2), 1.0, 0.0, threads or 1)


# --- decode tasks -------------------------------------------------------------------------------

_DECODER: dict[tuple[str, Preprocessing], Decoder] = {}


def _decoder(folder: str, prep: Preprocessing) -> Decoder:
    """This Ray worker's decoder: one child process (from a forkserver: forking a Ray worker itself
    copies locks its threads hold), kept across tasks, that a crashing file kills instead of the
    worker (the Decoder restarts it and isolates the file, as locally)."""
    key = (folder, prep)
    if key not in _DECODER:
        for old in _DECODER.values():
            old.close()
        _DECODER.clear()
        _DECODER[key] = Decoder(Path(folder), prep, workers=1, depth=1, start_method="forkserver")
    return _DECODER[key]


def decode_chunks(batch: dict[str, np.ndarray], folder: str, prep: Preprocessing) -> dict[str, list[Any]]:
    """Ray Data map: chunk rows (``chunk``, ``entries`` JSON) → decoded rows (images as bytes)."""
    out: dict[str, list[Any]] = {"chunk": [], "entries": [], "images": [], "ok": [], "errors": []}
    decoder = _decoder(folder, prep)
    for chunk, entries_json in zip(batch["chunk"], batch["entries"]):
        entries = _entries(entries_json)
        decoder.feed(iter([entries]))
        decoded = decoder.next()
        out["chunk"].append(int(chunk))
        out["entries"].append(str(entries_json))
        out["images"].append(np.ascontiguousarray(decoded.images).tobytes())
        out["ok"].append(json.dumps(decoded.ok))
        out["errors"].append(json.dumps(decoded.errors))
    return out


# --- inference actors ---------------------------------------------------------------------------


def _entries(entries_json: str) -> list[FileEntry]:
    """The listing entries of a chunk row (``[rel, kind, size]`` as JSON)."""
    return [FileEntry(rel, int(size), 0, kind) for rel, kind, size in json.loads(entries_json)]


def _open_from_bytes(blobs: Sequence[Any], digests: Sequence[str], options: RuntimeOptions) -> list[OnnxModel]:
    """ONNX sessions from the files' bytes (checked against the driver's sha256): written to a
    private temporary folder, opened (the checks of :meth:`OnnxModel.open`), then removed."""
    import ray

    tmp = tempfile.mkdtemp(prefix="medzoo-ray-")
    try:
        models = []
        for k, (blob, digest) in enumerate(zip(blobs, digests, strict=True)):
            data = ray.get(blob) if isinstance(blob, ray.ObjectRef) else blob
            if hashlib.sha256(data).hexdigest() != digest:
                raise ModelFileError(f"ensemble member {k} reached the Ray worker altered (sha256 differs)")
            path = Path(tmp, f"member-{k}.onnx")
            path.write_bytes(data)
            models.append(OnnxModel.open(path, options))
        return models
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ScoreChunks:
    """Ray Data actor: the ONNX Runtime session(s) of a run, kept for all the chunks it scores."""

    def __init__(self, models: Sequence[Any], digests: Sequence[str], batch_size: int,
                 options: RuntimeOptions) -> None:
        self.models = _open_from_bytes(models, digests, options)
        self.batch_size = batch_size
        prep = self.models[0].preprocessing
        self.shape = (prep.in_channels, prep.image_size, prep.image_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"chunk": [], "record": [], "provider": []}
        for i, entries_json, images, ok, errors in zip(batch["chunk"], batch["entries"], batch["images"],
                                                       batch["ok"], batch["errors"]):
            arrays = np.frombuffer(images, dtype=np.uint8).reshape(-1, *self.shape)
            decoded = DecodedChunk(arrays, json.loads(ok), [(k, r) for k, r in json.loads(errors)])
            entries = _entries(entries_json)
            scores = infer(self.models, arrays, self.batch_size) if decoded.ok else None
            out["chunk"].append(int(i))
            out["record"].append(json.dumps(chunk_record(int(i), entries, decoded, scores)))
            out["provider"].append(self.models[0].provider)
        return out


# --- the driver ---------------------------------------------------------------------------------


def decode_memory(run: Run, todo: Sequence[int]) -> int:
    """Bytes a decode task reserves: a Ray worker (~128 MiB) plus its largest chunk's files and
    decoded arrays, twice over (the decoder child holds them too), at most 4 GiB. A reservation
    that differs from the actors' also keeps Ray Data from fusing decoding into the inference
    actors (it fuses operators with equal requests): decoding runs in tasks of its own."""
    prep = run.models[0].preprocessing
    pixels = prep.in_channels * prep.image_size**2
    need = max(sum(max(e.size, 0) + pixels for e in run.chunk_entries(i)) for i in todo)
    return int(min(WORKER_MEMORY + 2 * need, 4 << 30))


def _dataset(ray: Any, run: Run, todo: list[int], pool: Pool, options: RuntimeOptions) -> Any:
    """The Ray Data pipeline of the missing chunks: decode tasks, then the actor pool (ONNX Runtime with
    ``options``, on the pool's threads)."""
    rows = [{"chunk": i, "entries": json.dumps([[e.rel, e.kind, e.size] for e in run.chunk_entries(i)])}
            for i in todo]
    blobs = [ray.put(Path(m.path).read_bytes()) for m in run.models]
    digests = [model_identity(m)["onnx_sha256"] for m in run.models]
    return (
        ray.data.from_items(rows, override_num_blocks=len(rows))
        .map_batches(decode_chunks, batch_size=1, num_cpus=1, memory=decode_memory(run, todo),
                     fn_kwargs={"folder": str(run.folder), "prep": run.models[0].preprocessing})
        .map_batches(ScoreChunks, batch_size=1, compute=ray.data.ActorPoolStrategy(size=pool.size),
                     num_cpus=pool.num_cpus, num_gpus=pool.num_gpus or None,
                     fn_constructor_kwargs={"models": blobs, "digests": digests, "batch_size": run.batch_size,
                                            "options": options.replace(threads=pool.threads)})
    )


def _journal(run: Run, i: int, record_json: str) -> int:
    """Write a chunk's record (first arrival only); returns the files it covers (0 for a repeat)."""
    if i in run.done:
        return 0  # a task Ray ran twice
    record = json.loads(record_json)
    rels = sorted(e.rel for e in run.chunk_entries(i))
    got = sorted([r[0] for r in record["rows"]] + [e[0] for e in record["errors"]])
    if record.get("chunk") != i or got != rels:
        raise RuntimeError(f"the record of chunk {i} from Ray does not match the listing")
    atomic_write_bytes(run.journal / chunk_name(i), record_json.encode())
    run.done[i] = record
    return len(rels)


def _score_chunks_ray(run: Run, pool: Pool, options: RuntimeOptions, progress: bool,
                      seen: set[str]) -> tuple[int, float]:
    """Score every chunk missing from the journal on Ray; returns (files processed, seconds)."""
    from tqdm import tqdm

    ray = _import_ray()
    todo = [i for i in range(run.n_chunks) if i not in run.done]
    if not todo:
        return 0, 0.0
    ray.data.DataContext.get_current().enable_progress_bars = False
    already = sum(len(run.chunk_entries(i)) for i in run.done)
    bar = tqdm(total=len(run.entries), initial=already, unit="img", desc="zoo score --ray", disable=not progress,
               mininterval=0.5, smoothing=0.1, file=sys.stderr)
    processed = 0
    t0 = time.perf_counter()
    try:
        for batch in _dataset(ray, run, todo, pool, options).iter_batches(batch_size=None, batch_format="numpy"):
            for i, record, provider in zip(batch["chunk"], batch["record"], batch["provider"]):
                n = _journal(run, int(i), str(record))
                seen.add(str(provider))
                processed += n
                bar.update(n)
    finally:
        bar.close()
    missing = [i for i in todo if i not in run.done]
    if missing:
        raise RuntimeError(f"Ray returned no record for {len(missing)} chunk(s) (first: {missing[0]}); run again")
    return processed, time.perf_counter() - t0


def score_folder_ray(
    folder: str | Path,
    models: Sequence[str | Path],
    out: str | Path,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    actors: int | None = None,
    ensemble: bool = False,
    ensemble_size: int = 2,
    errors_out: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH,
    chunk_size: int = DEFAULT_CHUNK,
    options: RuntimeOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
    store: Path | None = None,
    verbose: bool = False,
    alpha: float | None = None,
    dicom_sr: str | Path | None = None,
) -> ScoreSummary:
    """:func:`zoo.score.score_folder` on Ray: same arguments and output, plus where to run.

    ``address``: None or ``"local"`` starts a local Ray with ``num_cpus`` CPUs (default: the
    cores of this machine); ``"auto"`` joins the cluster ``ray start`` runs on this machine; any
    other value is a cluster address (``host:6379``, ``ray://host:10001``). ``actors``: ONNX
    Runtime actors (default: one per GPU, else one per two CPUs); ``options``: how they run ONNX
    Runtime (default :func:`zoo.settings.runtime_options`, read here once; ``options.threads``: each
    actor's threads, default 2 on a GPU, else 1).
    """
    paths = ScorePaths.of(folder, out, errors_out)
    alpha = check_alpha(alpha)
    if batch_size < 1 or chunk_size < 1:
        raise UsageError("batch size and chunk size must be at least 1")
    if actors is not None and actors < 1:
        raise UsageError("--actors must be at least 1")
    if not overwrite and paths.finished():
        return paths.already_done()
    # The driver's own sessions only identify the models (journal manifest, labels): CPU, 1 thread.
    options = runtime_options() if options is None else options
    driver = options.replace(providers=("CPUExecutionProvider",), threads=1)
    onnx_models = open_models(resolve_models(models, ensemble, ensemble_size, store), driver)
    entries = list_folder(paths.folder, exclude=[paths.out, paths.errors, paths.journal])
    seen: set[str] = set()
    with ray_session(address, num_cpus, verbose) as ray:
        pool = plan_pool(ray.cluster_resources(), actors, options.threads)
        log.info("Ray cluster %s: %d ONNX Runtime actor(s), %s CPU / %s GPU each", ray.cluster_resources(),
                 pool.size, pool.num_cpus, pool.num_gpus)
        summary = run_journalled(paths, onnx_models, entries, chunk_size, batch_size, overwrite,
                                 lambda run: _score_chunks_ray(run, pool, options, progress, seen), alpha, dicom_sr)
    summary.provider = f"{'+'.join(sorted(seen)) or 'no provider'} in {pool.size} Ray actor(s)"
    return summary


__all__ = ["Pool", "ScoreChunks", "decode_chunks", "plan_pool", "ray_session", "score_folder_ray"]
