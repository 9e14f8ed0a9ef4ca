"""Fixtures that start real services on free ports: FerretDB, the Pub/Sub emulator.

A service that cannot start fails the tests that need it, with the reason and its log tail;
nothing here skips.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from eventaudit.store import MongoStore
from tools import stack

PROJECT = "eventaudit-test"


@dataclass
class Ferret:
    """A running FerretDB and how to reach, stop and restart it."""

    port: int
    data_dir: Path
    log_dir: Path
    service: stack.Service

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        self.service.kill()

    def restart(self) -> None:
        self.service = stack.ferretdb(self.port, self.data_dir, self.log_dir).start()


def _start_ferret(tmp: Path) -> Ferret:
    port = stack.free_port()
    service = stack.ferretdb(port, tmp / "data", tmp / "logs").start()
    return Ferret(port, tmp / "data", tmp / "logs", service)


@pytest.fixture(scope="session")
def ferret(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ferret]:
    """One FerretDB for the session; each test uses its own database."""
    f = _start_ferret(tmp_path_factory.mktemp("ferret"))
    yield f
    f.service.stop()


@pytest.fixture
def private_ferret(tmp_path: Path) -> Iterator[Ferret]:
    """A FerretDB of the test's own, for tests that stop it."""
    f = _start_ferret(tmp_path)
    yield f
    f.service.stop()


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Pub/Sub emulator; PUBSUB_EMULATOR_HOST points the clients at it."""
    port = stack.free_port()
    service = stack.pubsub_emulator(port, tmp_path_factory.mktemp("emulator")).start()
    host = f"127.0.0.1:{port}"
    old = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    yield host
    if old is None:
        os.environ.pop("PUBSUB_EMULATOR_HOST", None)
    else:
        os.environ["PUBSUB_EMULATOR_HOST"] = old
    service.stop()


def unique(prefix: str) -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store(ferret: Ferret) -> Iterator[MongoStore]:
    """A store on a fresh database of the shared FerretDB."""
    s = MongoStore(ferret.uri, unique("db").replace("-", "_"), timeout_seconds=5)
    s.ping()
    yield s
    s.close()


@pytest.fixture
def topic_factory(emulator: str) -> Callable[[int], tuple[str, list[str]]]:
    """Create a unique topic with n subscriptions on the emulator."""

    def make(n: int) -> tuple[str, list[str]]:
        topic = unique("topic")
        subs = [f"{topic}-sub{i}" for i in range(n)]
        stack.create_topic(PROJECT, topic, subs)
        return topic, subs

    return make


def service_env(ferret: Ferret, emulator: str, database: str | None = None) -> dict[str, str]:
    """Environment for eventaudit service processes on the test's FerretDB and emulator."""
    return {
        "PUBSUB_EMULATOR_HOST": emulator,
        "EVENTAUDIT_PROJECT": PROJECT,
        "EVENTAUDIT_MONGO_URI": ferret.uri,
        "EVENTAUDIT_DATABASE": database or unique("db").replace("-", "_"),
    }


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll until condition() holds; fail with `what` otherwise."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


# The simulation's Hypothesis profiles (tests/sim): `ci` for `make test`, `soak` for
# `make soak`, chosen by HYPOTHESIS_PROFILE. Schedules are run on virtual time, so no deadline.
for profile, examples, steps in (("ci", 200, 50), ("soak", 2000, 80)):
    settings.register_profile(
        profile,
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How much the simulation ran (schedules, steps, faults by kind), when it ran."""
    from tests.sim.machine import COUNTS

    if COUNTS:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(COUNTS.items()))
        terminalreporter.write_line(f"simulation: {counts}")
