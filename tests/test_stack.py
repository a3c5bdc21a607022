"""The local stack's files, checked without a Docker engine: the compose file against the
compose-spec schema, the Dockerfile with hadolint, and the facts the stack relies on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is a dev dependency (pyproject.toml) and must be installed"
    return path


def test_compose_file_validates_against_the_compose_spec() -> None:
    result = subprocess.run(
        [
            _tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_orders_the_stack() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert services["redis"]["healthcheck"]
    assert services["trainer"]["depends_on"]["redis"]["condition"] == "service_healthy"
    api_deps = services["api"]["depends_on"]
    assert api_deps["trainer"]["condition"] == "service_completed_successfully"
    assert api_deps["redis"]["condition"] == "service_healthy"
    assert "artifacts:/artifacts:ro" in services["api"]["volumes"]
    assert "artifacts:/artifacts" in services["trainer"]["volumes"]


def test_dockerfile_is_cpu_only_non_root_with_a_readiness_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "whl/cpu" in text
    assert "\nUSER 10001\n" in text
    assert "/health/ready" in text.split("HEALTHCHECK", 1)[1]
    assert text.rstrip().endswith('CMD ["python", "-m", "app"]')
