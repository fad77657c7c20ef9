"""The cluster's docker-compose.yml, checked as a file (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from prunelab.db.engine import DB_URL_ENV
from prunelab.orchestrator.tracking import TRACKING_URI_ENV

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_services_and_images():
    assert set(SERVICES) == {"postgres", "mlflow", "ray-head", "ray-worker"}
    assert SERVICES["postgres"]["image"].startswith("postgres:")
    assert SERVICES["mlflow"]["build"]["dockerfile"] == "Dockerfile"
    for name in ("mlflow", "ray-head", "ray-worker"):
        assert SERVICES[name]["image"] == "prunelab:latest"
    assert (ROOT / "Dockerfile").read_text().count("FROM ") == 1


def test_healthchecks_and_start_order():
    for name in ("postgres", "mlflow", "ray-head"):
        assert SERVICES[name]["healthcheck"]["test"], name
    assert SERVICES["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    head = SERVICES["ray-head"]["depends_on"]
    assert head["postgres"]["condition"] == head["mlflow"]["condition"] == "service_healthy"
    assert SERVICES["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_mlflow_uses_postgres_and_serves_artifacts():
    command = SERVICES["mlflow"]["command"]
    assert "--backend-store-uri postgresql+psycopg://" in command
    assert "--serve-artifacts" in command and "@postgres:5432/" in command


def test_gpu_workers_join_the_head():
    worker = SERVICES["ray-worker"]
    assert "--address ray-head:6379" in worker["command"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "replicas" in worker["deploy"]
    assert "--head" in SERVICES["ray-head"]["command"]


def test_ports_bind_to_loopback_by_default():
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)


def test_env_variables_are_the_ones_the_code_reads():
    for name in ("ray-head", "ray-worker"):
        env = SERVICES[name]["environment"]
        assert env[DB_URL_ENV].startswith("postgresql://")
        assert env[TRACKING_URI_ENV] == "http://mlflow:5000"


def test_no_credentials_in_the_repo():
    text = (ROOT / "docker-compose.yml").read_text()
    assert "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?" in text
    assert not re.search(r"PASSWORD:\s*[\"']?[A-Za-z0-9]", text)
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    example = (ROOT / "docker" / "cluster.env.example").read_text()
    assert "POSTGRES_PASSWORD=change-me" in example
