"""Start and stop the local services (FerretDB, Pub/Sub emulator, Prometheus, Alertmanager,
and eventaudit's own processes) as plain foreground processes on loopback.

Used by `make run` (tools/run.py) and by the test fixtures, so both run the same thing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FERRETDB = ROOT / ".tools" / "bin" / "ferretdb"
EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
PYTHON = ROOT / ".venv" / "bin" / "python"


class ServiceError(RuntimeError):
    """A service could not be started; the message says which and why."""


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def http_ok(url: str) -> bool:
    """True when GET url answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return 200 <= resp.status < 300
    except OSError:
        return False


class Service:
    """One child process in its own process group, with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        ready: Callable[[], bool] | None = None,
        timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.stop_timeout = stop_timeout
        self.argv = list(argv)
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self._ready = ready
        self._timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> Service:
        """Start and wait until ready; raise ServiceError with the log tail otherwise."""
        if not Path(self.argv[0]).exists() and shutil.which(self.argv[0]) is None:
            raise ServiceError(f"{self.name}: {self.argv[0]} not found (run `make setup`)")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})},
            start_new_session=True,
            cwd=ROOT,
        )
        log.close()
        deadline = time.monotonic() + self._timeout
        while self._ready is not None and not self._ready():
            if self.proc.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(
                    f"{self.name} not ready after {self._timeout:g}s:\n{self.tail()}"
                )
            time.sleep(0.1)
        return self

    def running(self) -> bool:
        """True while the process lives."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the process group, then SIGKILL what is left after `timeout` (default: the
        service's stop_timeout). Whatever else is left in the group is killed too, so no
        child of the service outlives it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                print(f"[stack] {self.name} did not stop in time: killed", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL the process group at once (a crash, for outage tests)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    def tail(self, lines: int = 30) -> str:
        """The last lines of the service's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def ferretdb(port: int, data_dir: Path, log_dir: Path) -> Service:
    """FerretDB with SQLite files under data_dir."""
    if not FERRETDB.exists():
        raise ServiceError(f"FerretDB binary missing at {FERRETDB}: run `make setup`")
    return Service(
        "ferretdb",
        [str(FERRETDB), f"--listen-addr=127.0.0.1:{port}", f"--sqlite-dir={data_dir}"],
        log_dir,
        ready=lambda: port_open(port),
    )


def pubsub_emulator(port: int, log_dir: Path) -> Service:
    """The official Pub/Sub emulator (in-memory)."""
    if not EMULATOR.exists():
        raise ServiceError(
            f"Pub/Sub emulator missing at {EMULATOR}: install the Debian package "
            "google-cloud-cli-pubsub-emulator"
        )
    return Service(
        "pubsub-emulator",
        [str(EMULATOR), "--host=127.0.0.1", f"--port={port}"],
        log_dir,
        ready=lambda: http_ok(f"http://127.0.0.1:{port}/"),
        timeout=90,
    )


def prometheus(config: Path, port: int, data_dir: Path, log_dir: Path) -> Service:
    """Prometheus on loopback with the given config."""
    return Service(
        "prometheus",
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={data_dir}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        log_dir,
        ready=lambda: http_ok(f"http://127.0.0.1:{port}/-/ready"),
    )


def alertmanager(config: Path, port: int, data_dir: Path, log_dir: Path) -> Service:
    """Alertmanager on loopback, no clustering."""
    return Service(
        "alertmanager",
        [
            "prometheus-alertmanager",
            f"--config.file={config}",
            f"--storage.path={data_dir}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        log_dir,
        ready=lambda: http_ok(f"http://127.0.0.1:{port}/-/ready"),
    )


def python_service(
    name: str,
    module: str,
    args: Sequence[str],
    log_dir: Path,
    env: dict[str, str],
    ready_url: str,
    stop_timeout: float = 30.0,
) -> Service:
    """One of eventaudit's own services (`module`: publisher, subscriber or exporter), run as
    `python -m eventaudit.<module>` with the venv's Python."""
    python = str(PYTHON) if PYTHON.exists() else sys.executable
    return Service(
        name,
        [python, "-m", f"eventaudit.{module}", *args],
        log_dir,
        env=env,
        ready=lambda: http_ok(ready_url),
        stop_timeout=stop_timeout,
    )


def create_topic(
    project: str,
    topic: str,
    subscriptions: Sequence[str],
    push: Mapping[str, str] | None = None,
) -> None:
    """Create a topic and its subscriptions on the emulator (PUBSUB_EMULATOR_HOST must be set);
    those in `push` (subscription -> endpoint URL) are push subscriptions."""
    from google.api_core.exceptions import AlreadyExists
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    topic_path = publisher.topic_path(project, topic)
    with contextlib.suppress(AlreadyExists):
        publisher.create_topic(name=topic_path)
    with pubsub_v1.SubscriberClient() as subscriber:
        for sub in [*subscriptions, *(push or {})]:
            endpoint = (push or {}).get(sub)
            with contextlib.suppress(AlreadyExists):
                subscriber.create_subscription(
                    name=subscriber.subscription_path(project, sub),
                    topic=topic_path,
                    ack_deadline_seconds=10,
                    push_config={"push_endpoint": endpoint} if endpoint else None,
                )
