"""docker-compose.yml is valid for `docker-compose config` and wires what the README says."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
LONG_RUNNING = {
    "mongo",
    "pubsub",
    "publisher",
    "subscriber-audit",
    "push",
    "subscriber-lossy",
    "exporter",
    "prometheus",
    "alertmanager",
    "grafana",
}


def _config() -> dict:
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose is missing: run `make setup` (Debian package docker-compose)"
    result = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_config_is_valid_and_complete() -> None:
    services = _config()["services"]
    assert set(services) == LONG_RUNNING | {"pubsub-init"}
    for name in LONG_RUNNING:
        assert "healthcheck" in services[name], f"{name} has no healthcheck"


def test_images_are_pinned() -> None:
    for name, service in _config()["services"].items():
        image = service["image"]
        tag = image.rsplit(":", 1)[-1]
        assert ":" in image and tag not in {"latest", ""}, f"{name}: {image} is not pinned"
    assert _config()["services"]["mongo"]["image"].startswith("mongo:7")
    assert _config()["services"]["grafana"]["image"] == "grafana/grafana:11.6.0"


def test_start_order() -> None:
    services = _config()["services"]
    assert services["pubsub-init"]["depends_on"] == {"pubsub": {"condition": "service_healthy"}}
    for name in ("publisher", "subscriber-audit", "subscriber-lossy", "push", "exporter"):
        assert services[name]["depends_on"] == {
            "mongo": {"condition": "service_healthy"},
            "pubsub-init": {"condition": "service_completed_successfully"},
        }, name
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_mounted_files_exist_and_grafana_is_provisioned() -> None:
    services = _config()["services"]
    for name in ("prometheus", "alertmanager", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            assert Path(source).exists(), f"{name} mounts missing {source}"
    grafana_mounts = " ".join(str(v) for v in services["grafana"]["volumes"])
    assert "dashboards/eventaudit.json" in grafana_mounts and "provisioning" in grafana_mounts


def test_compose_prometheus_config_is_valid(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run `make setup`"
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus-compose.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {
        "eventaudit-exporter",
        "eventaudit-publisher",
        "eventaudit-subscriber",
        "eventaudit-push",
    }
    # Rule paths are container paths: point them at the repository's files to check it all.
    config["rule_files"] = [str(ROOT / "prometheus" / Path(p).name) for p in config["rule_files"]]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(local)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
