"""The installed package is `eventaudit` alone: the services are its subpackages, not generic
top-level names (`publisher`, `subscriber`, `exporter`) in site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tools import stack


def test_the_wheel_installs_only_eventaudit_with_the_services_inside(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        cwd=stack.ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = tmp_path.glob("eventaudit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
        archive.extractall(tmp_path / "site")
    assert {n.split("/")[0] for n in names} == {
        "eventaudit",
        wheel.name.split("-py")[0] + ".dist-info",
    }
    for module in ("publisher/audited.py", "subscriber/audited.py", "exporter/evaluator.py"):
        assert f"eventaudit/{module}" in names
    for service in ("publisher", "subscriber", "exporter"):
        assert f"eventaudit-{service} = eventaudit.{service}.__main__:main" in scripts

    # From outside the repository, with only the unpacked wheel on the path.
    probe = (
        "import importlib.util, eventaudit.publisher.audited, eventaudit.subscriber.audited, "
        "eventaudit.exporter.evaluator;"
        "print([importlib.util.find_spec(n) is None for n in ('publisher', 'subscriber', "
        "'exporter')], eventaudit.publisher.audited.__file__)"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); {probe}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    missing, location = run.stdout.strip().split("] ")
    assert missing == "[True, True, True"
    assert location.startswith(str(tmp_path / "site"))
