"""Running the BentoML server as a child process that never outlives ``zoo serve``.

``bentoml serve`` starts a process tree (an arbiter, API workers, the inference worker). The tree
runs in its own process group; SIGINT and SIGTERM given to ``zoo serve`` are passed on to the
whole group, which then has the grace period (``shutdown_grace_s`` + ``KILL_MARGIN_S``, else
``GRACE_S``) to stop before it is killed, and on Linux the child also gets SIGTERM if ``zoo serve``
itself dies (``PR_SET_PDEATHSIG``). Nothing is left holding the port.

The drain on SIGTERM: the API workers stop listening at once (new connections are refused) and
uvicorn lets the requests in flight finish for up to ``shutdown_grace_s`` (``--timeout-graceful-shutdown``);
the inference and explanation workers keep answering until the API workers are gone
(:mod:`serving.connections`). ``--timeout-keep-alive`` is ``idle_timeout_s``: uvicorn closes an
idle keep-alive connection as the connection guard does. Once an API worker has drained, BentoML runs
the service's shutdown hook, which writes what the audit trail still holds and syncs it
(:mod:`serving.audit`); the kill ``KILL_MARGIN_S`` after the grace leaves it that time.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from serving.config import CONFIG_ENV, ServeConfig

log = logging.getLogger("serving")
REPO = Path(__file__).resolve().parents[1]
GRACE_S = 20  # seconds to stop when no config is given
KILL_MARGIN_S = 5  # after shutdown_grace_s: the dependency workers and the arbiter stopping
AUDIT_ENV = "MEDZOO_AUDIT_LOG"


def server_env(store: str | Path | None, config: str | Path | None) -> dict[str, str]:
    """Environment of the server process: the store, the config file, no BentoML tracking."""
    env = dict(os.environ)
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    if store:
        env["MEDZOO_HOME"] = str(Path(store).expanduser().resolve())
    if config:
        env[CONFIG_ENV] = str(Path(config).expanduser().resolve())
    audit = env.get(AUDIT_ENV)
    if audit:  # the server runs in the repository: a relative audit folder is this process's cwd's
        env[AUDIT_ENV] = str(Path(audit).expanduser().resolve())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def server_command(port: int, host: str, cfg: ServeConfig | None = None) -> list[str]:
    """``bentoml serve``; with a config, uvicorn's keep-alive and graceful-shutdown timeouts (whole seconds)."""
    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:MedZoo",
           "--port", str(port), "--host", host, "--working-dir", str(REPO)]
    if cfg is not None:
        cmd += ["--timeout-keep-alive", str(max(1, math.ceil(cfg.idle_timeout_s))),
                "--timeout-graceful-shutdown", str(max(1, math.ceil(cfg.shutdown_grace_s)))]
    return cmd


def stop_grace(cfg: ServeConfig | None) -> float:
    """Seconds between SIGTERM and SIGKILL for the server tree."""
    return GRACE_S if cfg is None else cfg.shutdown_grace_s + KILL_MARGIN_S


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM this process when its parent dies (even by SIGKILL)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = GRACE_S) -> int:
    """Signal the server's process group, wait ``grace`` seconds, then kill what is left."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return proc.wait()
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("the server did not stop within %s s: killing it", grace)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait()


def run_server(cmd: Sequence[str], env: dict[str, str], grace: float = GRACE_S) -> int:
    """Run the server until it exits or this process gets SIGINT / SIGTERM (passed on as SIGTERM;
    the tree is killed ``grace`` seconds later if it still runs)."""
    proc = subprocess.Popen(list(cmd), env=env, cwd=REPO, preexec_fn=_die_with_parent)  # noqa: PLW1509
    received: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    except KeyboardInterrupt:
        sig = received[-1] if received else signal.SIGINT
        stop_group(proc, signal.SIGTERM, grace)
        return 128 + int(sig)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if proc.poll() is None:
            stop_group(proc, signal.SIGKILL, 5)


__all__ = ["GRACE_S", "KILL_MARGIN_S", "REPO", "run_server", "server_command", "server_env", "stop_grace",
           "stop_group"]
