"""The local stack's files, checked without a Docker engine: the compose file against the
compose-spec schema, the Dockerfile with hadolint, and the facts the stack relies on (its
commands run natively in tests/test_smoke.py). Also: .env.example and the README's
configuration table name every variable there is, and nothing else."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from helpers_stack import compose, interpolate, service_command, service_environment
from pydantic import TypeAdapter

from app.settings import Settings

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
    services = compose()["services"]
    assert services["redis"]["healthcheck"]
    assert services["trainer"]["depends_on"]["redis"]["condition"] == "service_healthy"
    api_deps = services["api"]["depends_on"]
    assert api_deps["trainer"]["condition"] == "service_completed_successfully"
    assert api_deps["redis"]["condition"] == "service_healthy"
    assert "artifacts:/artifacts:ro" in services["api"]["volumes"]
    assert "artifacts:/artifacts" in services["trainer"]["volumes"]
    assert services["trainer"]["restart"] == "no"
    assert services["api"]["environment"]["MODEL_DIR"] == "/artifacts"
    assert services["trainer"]["environment"]["MODEL_DIR"] == "/artifacts"
    # Read-only artifacts: the replicas cache built indexes on a writable volume they share,
    # a directory the image creates for its non-root user (a new volume copies its owner).
    cache = services["api"]["environment"]["INDEX_CACHE_DIR"]
    assert f"index-cache:{cache}" in services["api"]["volumes"]
    assert "index-cache" in compose()["volumes"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"chown recall:recall .*{cache}\b", dockerfile)


def test_api_environment_keeps_what_the_stack_relies_on() -> None:
    api = service_environment("api", {})
    assert api["ADMIN_TOKEN"] == "change-me"  # unset: the documented default
    # Set but empty turns the admin API off (README), rather than falling back to the default.
    assert service_environment("api", {"ADMIN_TOKEN": ""})["ADMIN_TOKEN"] == ""
    # lb proxies to api:8000: a PORT or HOST in .env (read through env_file, which the
    # environment block overrides) must not move the replicas.
    assert (api["PORT"], api["HOST"]) == ("8000", "0.0.0.0")
    assert {"path": ".env", "required": False} in compose()["services"]["api"]["env_file"]


def test_the_trainer_publishes_the_history_the_service_keeps() -> None:
    """HISTORY_CAP in .env or the shell reaches both the service and the trainer's
    publish-features (it published 200 items whatever the cap said; a cap set in the shell
    reached the trainer alone)."""
    for variables, cap in (({}, "200"), ({"HISTORY_CAP": "500"}, "500")):
        assert service_environment("trainer", variables)["HISTORY_CAP"] == cap
        assert service_environment("api", variables)["HISTORY_CAP"] == cap
    command = service_command("trainer", {})[-1]
    assert '--history-length "$HISTORY_CAP"' in command.split("publish-features", 1)[1]


def test_the_training_job_has_no_service_healthcheck() -> None:
    # The image's HEALTHCHECK probes /health/ready, which a training job never serves.
    assert compose()["services"]["trainer"]["healthcheck"] == {"disable": True}


def test_movielens_mount_works_when_the_directory_is_absent() -> None:
    (mount,) = [v for v in compose()["services"]["trainer"]["volumes"] if isinstance(v, dict)]
    assert mount["source"] == "${MOVIELENS_DIR:-./data}" and mount["target"] == "/data"
    assert mount["read_only"] is True and mount["bind"]["create_host_path"] is True
    assert "/data/" in (ROOT / ".gitignore").read_text().split()
    assert "data" in (ROOT / ".dockerignore").read_text().split()


def test_api_replicas_sit_behind_one_published_load_balancer() -> None:
    stack = compose()
    api, lb = stack["services"]["api"], stack["services"]["lb"]
    assert "ports" not in api, "replicas cannot share a host port"
    assert api["deploy"]["replicas"] == "${API_REPLICAS:-2}"
    assert api["expose"] == ["8000"]
    assert lb["ports"] == ["${API_PORT:-8000}:8000"]
    assert lb["depends_on"]["api"]["condition"] == "service_healthy"
    (config,) = lb["configs"]
    assert config["target"] == "/etc/nginx/conf.d/default.conf"
    nginx = interpolate(stack["configs"][config["source"]]["content"], {})
    # Docker's DNS, asked again at run time (a variable in proxy_pass), so every replica,
    # even one added later, receives requests.
    assert re.search(r"^resolver 127\.0\.0\.11 valid=\d+s", nginx, re.MULTILINE)
    assert "listen 8000;" in nginx
    assert "set $api http://api:8000;" in nginx and "proxy_pass $api;" in nginx


def test_dockerfile_is_cpu_only_non_root_with_a_readiness_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "whl/cpu" in text
    assert "\nUSER 10001\n" in text
    assert "/health/ready" in text.split("HEALTHCHECK", 1)[1]
    assert text.rstrip().endswith('CMD ["python", "-m", "app"]')
    # Only the virtual environment (with the installed project) reaches the final image.
    runtime = text.rsplit("\nFROM ", 1)[1]
    assert re.findall(r"^COPY .*$", runtime, re.MULTILINE) == [
        "COPY --from=build /opt/venv /opt/venv"
    ]


def _compose_variables() -> set[str]:
    return set(re.findall(r"\$\{(\w+)", (ROOT / "docker-compose.yml").read_text()))


def _env_example() -> set[str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return {line.split("=", 1)[0] for line in lines if line and not line.startswith("#")}


def test_env_example_documents_every_compose_variable_and_only_real_names() -> None:
    settings = {name.upper() for name in Settings.model_fields}
    example = _env_example()
    assert _compose_variables() <= example
    assert example - _compose_variables() <= settings, "not a compose variable nor a setting"


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Configuration", 1)[1].split("\n#", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_the_cluster_profile_joins_six_nodes_and_the_stack_can_use_it() -> None:
    services = compose()["services"]
    nodes = [services[f"redis-node-{n}"] for n in range(1, 7)]
    for node in nodes:
        assert node["profiles"] == ["cluster"]
        assert node["command"][:3] == ["redis-server", "--cluster-enabled", "yes"]
        assert node["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    join = services["redis-cluster"]
    assert join["profiles"] == ["cluster"] and join["restart"] == "no"
    assert "--cluster-replicas 1" in join["command"][2]
    assert join["depends_on"] == {
        f"redis-node-{n}": {"condition": "service_healthy"} for n in range(1, 7)
    }
    # Outside the profile the dependency is skipped, not an error; inside, the trainer
    # publishes only once the cluster is formed (and the api waits for the trainer).
    needs = services["trainer"]["depends_on"]["redis-cluster"]
    assert needs == {"condition": "service_completed_successfully", "required": False}
    for service in ("api", "trainer"):
        env = service_environment(service, {})
        assert (env["REDIS_URL"], env["REDIS_CLUSTER"]) == ("redis://redis:6379/0", "false")
        cluster = {"STACK_REDIS_URL": "redis://redis-node-1:6379", "REDIS_CLUSTER": "true"}
        env = service_environment(service, cluster)
        assert (env["REDIS_URL"], env["REDIS_CLUSTER"]) == tuple(cluster.values())


def test_the_trainer_publishes_to_a_cluster_only_when_told(tmp_path: Path) -> None:
    """The trainer's command run by a shell, `python` standing in to record its arguments."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n')
    fake.chmod(0o755)
    # Every spelling the service reads (`True` and `1` made the replicas use the cluster
    # client while the trainer published as to one server).
    for flag in ("true", "True", "1", "yes", "ON", "false", "False", "0", "no", "off"):
        expected = TypeAdapter(bool).validate_python(flag)
        calls = tmp_path / f"calls-{flag}"
        env = service_environment("trainer", {"REDIS_CLUSTER": flag})
        env |= {"PATH": f"{tmp_path}:/usr/bin:/bin", "CALLS": str(calls)}
        done = subprocess.run(
            service_command("trainer", {}), env=env, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        train, publish = calls.read_text().splitlines()
        assert train.startswith("-m models train") and publish.startswith("-m models publish")
        assert publish.endswith("--redis-cluster") is expected
