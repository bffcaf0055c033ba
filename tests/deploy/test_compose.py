"""docker-compose.yml: valid for Compose (checked offline, no engine needed) and shaped as the docs say."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"


def _compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin) where it works, else Debian's `docker-compose` (v1)."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The file as Compose resolves it (anchors, merges and variables applied)."""
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (scripts/ensure_tools.sh installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILLERY_", "POSTGRES_"))}
    quiet = subprocess.run([*command, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True,
                           env=env, cwd=ROOT, check=False)
    assert quiet.returncode == 0, quiet.stderr
    full = subprocess.run([*command, "-f", str(COMPOSE_FILE), "config"], capture_output=True, text=True,
                          env=env, cwd=ROOT, check=True)
    return yaml.safe_load(full.stdout)


def test_compose_file_is_valid_with_every_service(resolved: dict[str, Any]) -> None:
    # Compose v1 lists opt-in profiles' services in `config` too; only the default set starts on `up`.
    default = {name for name, service in resolved["services"].items() if not service.get("profiles")}
    assert default == {"postgres", "redis", "migrate", "api", "worker-gpu", "worker-cpu"}
    assert set(resolved["services"]) - default <= {"worker-gpu4"}


def test_databases_have_health_checks_and_everything_waits_for_them(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ping" in services["redis"]["healthcheck"]["test"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker-gpu", "worker-cpu"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["postgres"]["condition"] == "service_healthy", name


def test_migration_is_a_one_shot(resolved: dict[str, Any]) -> None:
    migrate = resolved["services"]["migrate"]
    assert migrate["command"] == ["distillery", "admin", "migrate"]
    assert migrate.get("restart", "no") == "no"


def test_gpu_worker_reserves_an_nvidia_gpu_and_cpu_worker_takes_the_cpu_queue(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["worker-gpu"]["command"][:2] == ["distillery", "worker"]
    cpu = services["worker-cpu"]
    assert cpu["command"][cpu["command"].index("--queue") + 1] == "cpu"
    assert "deploy" not in cpu
    assert cpu["environment"]["CUDA_VISIBLE_DEVICES"] == ""


def test_api_and_workers_share_one_artifact_store_and_one_database(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    nodes = [services[name] for name in ("api", "worker-gpu", "worker-cpu")]
    urls = {node["environment"]["DISTILLERY_STORAGE_URL"] for node in nodes}
    assert urls == {"file:///artifacts"}
    for node in nodes:
        mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in node["volumes"]]
        assert any(m.startswith("artifacts:") or m.endswith(":/artifacts") for m in mounts), mounts
        assert node["environment"]["DISTILLERY_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert node["environment"]["DISTILLERY_BROKER_URL"] == "redis://redis:6379/0"
        assert node["environment"]["DISTILLERY_ALLOW_CODE_TEACHERS"] == "false"
    assert "artifacts" in resolved["volumes"]


def test_images_come_from_the_dockerfile_targets(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert services["api"]["build"]["target"] == "api"
    assert services["migrate"]["build"]["target"] == "api"
    assert services["worker-gpu"]["build"]["target"] == "worker"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM base AS api" in dockerfile and "FROM base AS worker" in dockerfile


def test_the_four_gpu_worker_is_an_opt_in_profile_that_takes_jobs_of_up_to_four_processes() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (scripts/ensure_tools.sh installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILLERY_", "POSTGRES_"))}
    env["DISTILLERY_MAX_JOB_PROCESSES"] = "4"
    full = subprocess.run([*command, "-f", str(COMPOSE_FILE), "--profile", "multi-gpu", "config"],
                          capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    services = yaml.safe_load(full.stdout)["services"]
    worker = services["worker-gpu4"]
    assert worker["command"][worker["command"].index("--gpus") + 1] == "4"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 4
    assert services["api"]["environment"]["DISTILLERY_MAX_JOB_PROCESSES"] == "4"
