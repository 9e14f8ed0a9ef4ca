"""Each service's example configuration is its settings class, every setting at its default,
in the form the service reads it (environment variables)."""

from __future__ import annotations

import pytest

from eventaudit.settings import load_settings
from tools import examples


@pytest.mark.parametrize("service", sorted(examples.SERVICES))
def test_the_example_configuration_is_the_settings_class(service: str) -> None:
    written = (examples.ROOT / service / "example.env").read_text()
    assert written == examples.render(service, examples.SERVICES[service]), (
        f"{service}/example.env is stale: run `python -m tools.examples`"
    )


@pytest.mark.parametrize("service", sorted(examples.SERVICES))
def test_every_example_value_is_accepted_and_is_the_default(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = examples.SERVICES[service]
    lines = (examples.ROOT / service / "example.env").read_text().splitlines()
    assigned = [line.removeprefix("# ") for line in lines if "=" in line and "EVENTAUDIT_" in line]
    assert len(assigned) == len(cls.model_fields)
    for line in assigned:
        name, _, value = line.partition("=")
        if value:  # an empty one stands for "unset" (a default of None)
            monkeypatch.setenv(name, value)
    defaults = {
        name: examples.REQUIRED_EXAMPLES[name]
        if field.is_required()
        else field.get_default(call_default_factory=True)
        for name, field in cls.model_fields.items()
    }
    assert load_settings(cls, []).model_dump() == defaults
