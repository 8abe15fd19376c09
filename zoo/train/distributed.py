"""Training on several processes: ``torch.distributed`` with DistributedDataParallel, as started by
``torchrun`` (or ``zoo train --nproc N``, which runs torchrun).

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous; :func:`from_env` reads
them and joins the process group: gloo on the CPU, NCCL on GPUs (one per local rank). Each rank
draws its shard of every global batch from the same permutation (the recipe's ``batch_size`` is per
process, the effective batch is ``batch_size × world_size``), DDP averages the gradients, validation
is sharded and its logits gathered so that every rank computes the same metrics and makes the same
model-selection decisions, and rank 0 alone writes snapshots, the bundle and its card. Several
machines: torchrun's own options (``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``); the store
must then be on a filesystem every node sees (the snapshot rank 0 writes is what every rank resumes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# torchrun restarts the whole worker group this many times when a rank dies (a crashed or killed
# rank on a busy or flaky machine); the restarted ranks resume from rank 0's last snapshot.
MAX_RESTARTS = 2
# Seconds a rank waits for its peers' connections in init_process_group before it exits (and torchrun
# restarts the group). Gloo waits for its whole operation timeout (30 min) otherwise, and on a busy
# host a pair connection was seen to never complete (both ranks listening, neither connected).
CONNECT_TIMEOUT_ENV = "MEDZOO_DIST_CONNECT_TIMEOUT_S"
CONNECT_TIMEOUT_S = 120.0
EXIT_NO_PEERS = 75  # EX_TEMPFAIL: worth a restart


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group."""

    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes."""
        return self.rank == 0

    def device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if self.backend == "nccl" else torch.device("cpu")


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (a killed ``zoo train --nproc`` or torchrun
    must not leave its ranks training on)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def launched() -> bool:
    """Whether torchrun started this process (its environment variables are set)."""
    return all(k in os.environ for k in ENV) and int(os.environ["WORLD_SIZE"]) > 1


def is_main() -> bool:
    """Rank 0 under torchrun, or the one process (without joining the process group)."""
    return not launched() or int(os.environ["RANK"]) == 0


def restarted() -> bool:
    """Whether torchrun restarted this worker group after a rank died (the run then resumes)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def from_env(device: str | None = None) -> Dist | None:
    """Join the process group torchrun set up; None when this is a single process."""
    if not launched():
        return None
    rank, world, local = (int(os.environ[k]) for k in ENV)
    die_with_parent()
    gpu = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    backend = "nccl" if gpu else "gloo"
    if gpu:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        _join(backend, rank)
    return Dist(rank, world, local, backend)


def _join(backend: str, rank: int) -> None:
    """``init_process_group``, given up after the connect timeout: a watchdog thread ends the process
    (the main thread is inside gloo's C++ connect and cannot be interrupted), torchrun restarts the group."""
    import sys
    import threading

    limit = float(os.environ.get(CONNECT_TIMEOUT_ENV, CONNECT_TIMEOUT_S))
    joined = threading.Event()

    def watchdog() -> None:
        if not joined.wait(limit):
            sys.stderr.write(f"rank {rank}: not connected to the other ranks after {limit:.0f} s "
                             f"({CONNECT_TIMEOUT_ENV}); exiting so that torchrun restarts the group\n")
            sys.stderr.flush()
            os._exit(EXIT_NO_PEERS)

    threading.Thread(target=watchdog, name="medzoo-connect-watchdog", daemon=True).start()
    store, _, world = next(dist.rendezvous("env://"))
    # torchrun keeps its store across restarts of the group, so a restarted rank could read the dead
    # attempt's gloo addresses (seen: "Connection refused" until gloo's retries ran out): each attempt
    # gets keys of its own.
    store = dist.PrefixStore(f"medzoo/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    joined.set()


def shard(indices: torch.Tensor, d: Dist | None) -> torch.Tensor:
    """This rank's contiguous part of a global batch (sizes differ by at most one)."""
    return indices if d is None else torch.tensor_split(indices, d.world)[d.rank]


def mean(value: float, d: Dist | None) -> float:
    """The mean of a number over the ranks."""
    if d is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device())
    dist.all_reduce(t)
    return float(t.item()) / d.world


def gather(local: torch.Tensor, d: Dist | None) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (the shards of :func:`shard`), on every rank."""
    if d is None:
        return local
    device = d.device()
    n = torch.tensor([len(local)], device=device)
    sizes = [torch.zeros_like(n) for _ in range(d.world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local.to(device)
    parts = [torch.zeros_like(padded) for _ in range(d.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)]).cpu()


def broadcast(obj: Any, d: Dist | None) -> Any:
    """Rank 0's ``obj`` on every rank (a path, a stop flag)."""
    if d is None:
        return obj
    box = [obj if d.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist | None) -> None:
    if d is not None:
        dist.barrier()


def close(d: Dist | None) -> None:
    if d is not None and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """``zoo train --nproc N …`` as the torchrun command that runs N processes of ``zoo train …``."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={MAX_RESTARTS}", "-m", "zoo.cli", *argv]


__all__ = ["CONNECT_TIMEOUT_ENV", "CONNECT_TIMEOUT_S", "EXIT_NO_PEERS", "MAX_RESTARTS", "Dist", "barrier", "broadcast",
           "close", "die_with_parent", "from_env", "gather", "is_main", "launched", "mean", "restarted", "shard",
           "torchrun_command"]
