"""The simulation on the in-memory store: many schedules per run (profiles in tests/conftest.py:
`ci` for `make test`, `soak` for `make soak`)."""

from __future__ import annotations

from tests.fakes import MemoryStore
from tests.sim.machine import Simulation
from tests.sim.world import World, memory_records


def memory_world() -> World:
    store = MemoryStore()
    return World(store, memory_records(store))


class InMemorySimulation(Simulation):
    make_world = staticmethod(memory_world)


TestInMemorySimulation = InMemorySimulation.TestCase
