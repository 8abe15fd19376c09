"""Real servers for the tests: ``zoo serve`` (or ``bentoml serve serving.service:MedZoo``) in a
subprocess of its own session, on a free loopback port, with a serve config YAML; ready when
``GET /readyz`` answers 200; stopped with its process group at the end.

:func:`start_zoo_serve` is the one way the tests start a server (tests/conftest.py's shared
``breast_server`` and the modules' own ones). The server's environment is this process's, less
every serving setting it carries (``MEDZOO_<SETTING>``, ``MEDZOO_SERVE_*``, ``MEDZOO_ENSEMBLE_*``):
the config file and what the caller passes in ``env`` decide.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback TCP port nothing listens on (now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(proc: subprocess.Popen[bytes], url: str, output: Callable[[], str], limit_s: float = 240) -> None:
    """Poll ``GET {url}/readyz`` until it answers 200; fail with the server's output when the
    process exits first or ``limit_s`` passes."""
    deadline = time.monotonic() + limit_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{output()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the server was not ready within {limit_s:.0f} s:\n{output()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def stop_group(proc: subprocess.Popen[bytes], wait_s: float = 30) -> None:
    """SIGTERM the process group ``proc`` leads (one the tests started), wait ``wait_s``, then
    SIGKILL it and whatever of its tree is left. Nothing when ``proc`` has already exited."""
    if proc.poll() is not None:
        return
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=wait_s)
    except ProcessLookupError:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        for p in tree:  # `zoo serve` runs bentoml's tree in a group of its own
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=10)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group ``proc`` leads, if ``proc`` still runs."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def _serving_setting(key: str) -> bool:
    """Whether an environment variable configures the server (pydantic-settings reads them in any case)."""
    from serving.config import SETTINGS

    key = key.upper()
    return (key.startswith(("MEDZOO_SERVE_", "MEDZOO_ENSEMBLE_"))
            or key in {f"MEDZOO_{s.upper()}" for s in SETTINGS})


def serve_env(store: Path, config: Path | None, bentoml_home: Path,
              env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A server's environment (also for ``zoo serve --package`` / ``bentoml build``): this process's
    without its serving settings; the store, the config file (none: ``MEDZOO_SERVE_CONFIG`` unset),
    a private BentoML home, no tracking, the repository on ``PYTHONPATH``; then ``env``."""
    out = {k: v for k, v in os.environ.items() if not _serving_setting(k)}
    out.update({"MEDZOO_HOME": str(store), "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    if config is not None:
        out["MEDZOO_SERVE_CONFIG"] = str(config)
    out.update(env or {})
    return out


@dataclass
class ZooServer:
    url: str
    port: int
    proc: subprocess.Popen  # type: ignore[type-arg]
    log: Path  # stdout and stderr of the server
    env: dict[str, str]  # its environment
    store: Path  # MEDZOO_HOME
    config: dict[str, Any]  # the serve config YAML's content ({} for none)

    def client(self, timeout: float = 60, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, **kw)

    def api_worker(self) -> Any:
        """The (first) API worker process (psutil): the one that reads and decodes the uploads."""
        import psutil

        for p in psutil.Process(self.proc.pid).children(recursive=True):
            cmd = p.cmdline()
            if "--service-name" in cmd and cmd[cmd.index("--service-name") + 1] == "MedZoo":
                return p
        raise AssertionError("no API worker process found")

    def assert_no_traceback(self) -> None:
        text = self.log.read_text()
        assert "Traceback" not in text, text[-4000:]


@contextmanager
def start_zoo_serve(work: Path, store: Path, config: Mapping[str, Any] | None,
                    env: Mapping[str, str] | None = None, command: Literal["zoo", "bentoml"] = "zoo",
                    args: Sequence[str] = ("serve", "--no-build"), ready_s: float = 240, stop_s: float = 30,
                    check_log: bool = True) -> Iterator[ZooServer]:
    """A ready server on a free loopback port, for the ``with`` block.

    ``work`` gets ``serve.yaml`` (``config``; ``None``: no config file), ``server.log`` and
    ``bentoml_home``. ``command`` ``"zoo"`` runs ``python -m zoo.cli ARGS --host 127.0.0.1 --port P``,
    ``"bentoml"`` ``python -m bentoml serve serving.service:MedZoo``. At the end (the server may have
    been stopped or killed by the test already) the process group gets SIGTERM, ``stop_s`` seconds,
    then SIGKILL; then, unless ``check_log`` is false or the block raised, the log must hold no
    ``Traceback``."""
    work.mkdir(parents=True, exist_ok=True)
    config_path = None
    if config is not None:
        config_path = work / "serve.yaml"
        config_path.write_text(yaml.safe_dump(dict(config)))
    full_env = serve_env(store, config_path, work / "bentoml_home", env)
    port, log = free_port(), work / "server.log"
    if command == "zoo":
        cmd = [sys.executable, "-m", "zoo.cli", *args, "--host", "127.0.0.1", "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:MedZoo", "--host", "127.0.0.1",
               "--port", str(port), "--working-dir", str(REPO)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=full_env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = ZooServer(url=f"http://127.0.0.1:{port}", port=port, proc=proc, log=log, env=full_env, store=store,
                       config=dict(config or {}))
    try:
        wait_ready(proc, server.url, log.read_text, ready_s)
        yield server
    finally:
        stop_group(proc, stop_s)
    if check_log:
        server.assert_no_traceback()
