"""The deployment files, checked without Docker (there is none on CI): docker-compose.yml
parsed with PyYAML, the Dockerfile read as text, deploy/tollgate.toml with tomllib, the
Prometheus files with `promtool` (Debian package `prometheus`, installed by scripts/test.sh),
and the compose healthcheck commands run against a real gateway.

What needs Docker (building the image, `docker compose up`) is not exercised here; the
README's "Deploy" section says so. The same configs run against the real binaries, services
and Prometheus in tests/tests/deploy_observability.rs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from harness import REPO_ROOT, _binary, _stop, _wait_ready

COMPOSE = REPO_ROOT / "docker-compose.yml"
DEPLOY = REPO_ROOT / "deploy"

# service → image (a tag, never `latest`); gateway and pipeline are built from ./Dockerfile
EXPECTED_SERVICES = {
    "postgres",
    "redis",
    "kafka",
    "kafka-topics",
    "clickhouse",
    "gateway",
    "pipeline",
    "prometheus",
    "grafana",
}
# services that run until stopped must say when they are healthy
ONE_SHOT = {"kafka-topics"}


def _in_ci() -> bool:
    return os.environ.get("CI", "") not in ("", "0", "false")


def _require_tool(name: str) -> str:
    """The tool's path; skips outside CI when it is missing, fails under CI."""
    path = shutil.which(name)
    if path is None:
        message = f"`{name}` is not installed (Debian package prometheus; scripts/test.sh installs it)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_runs_every_service_of_the_stack(compose: dict) -> None:
    assert set(compose["services"]) == EXPECTED_SERVICES


def test_every_image_is_pinned_and_the_binaries_are_built_here(compose: dict) -> None:
    for name, svc in compose["services"].items():
        image = svc.get("image")
        assert image, f"{name} has no image"
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
        if name in ("gateway", "pipeline"):
            assert svc.get("build") == ".", f"{name} is not built from ./Dockerfile"
            assert image == "tollgate:local"
    assert compose["services"]["pipeline"]["entrypoint"] == ["tollgate-pipeline"]


def test_every_published_port_is_on_loopback(compose: dict) -> None:
    published = []
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str), f"{name}: write ports as strings"
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
            published.append(port)
    # the API and the UIs; the metrics listeners stay inside the compose network
    for port in ("127.0.0.1:8080:8080", "127.0.0.1:9090:9090", "127.0.0.1:3000:3000"):
        assert port in published
    for svc in ("gateway", "pipeline"):
        ports = compose["services"][svc].get("ports", [])
        assert not any(p.endswith((":9464", ":9465")) for p in ports), f"{svc} publishes metrics"


def test_long_running_services_have_healthchecks_and_dependencies_wait_for_them(
    compose: dict,
) -> None:
    services = compose["services"]
    for name, svc in services.items():
        if name in ONE_SHOT:
            continue
        check = svc.get("healthcheck", {}).get("test")
        assert check and check[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            wanted = "service_completed_successfully" if dep in ONE_SHOT else None
            if wanted:
                assert cond["condition"] == wanted, f"{name} → {dep}: {cond}"
    gw_deps = services["gateway"]["depends_on"]
    for dep in ("postgres", "redis"):
        assert gw_deps[dep]["condition"] == "service_healthy"
    assert gw_deps["kafka-topics"]["condition"] == "service_completed_successfully"


def test_every_file_the_compose_file_mounts_exists_in_the_repo(compose: dict) -> None:
    mounted = []
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            if source.startswith("./"):
                path = REPO_ROOT / source
                assert path.exists(), f"{name} mounts {source}, which is not in the repo"
                mounted.append(source)
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        for env_file in svc.get("env_file", []):
            assert (REPO_ROOT / env_file).is_file(), f"{name}: {env_file} missing"
            mounted.append(env_file)
        if "build" in svc:
            assert (REPO_ROOT / svc["build"] / "Dockerfile").is_file()
    for wanted in (
        "./deploy/tollgate.toml",
        "./deploy/pipeline.env",
        "./deploy/prometheus",
        "./deploy/grafana/provisioning",
        "./deploy/grafana/dashboards",
    ):
        assert wanted in mounted, f"{wanted} is not used by the compose file"


def test_compose_services_match_scripts_services_sh(compose: dict) -> None:
    """The backing services keep the ports, names and credentials of scripts/services.sh."""
    script = (REPO_ROOT / "scripts" / "services.sh").read_text()
    services = compose["services"]
    for svc, port, var in (
        ("postgres", 5432, "PG_PORT"),
        ("redis", 6379, "REDIS_PORT"),
        ("kafka", 9092, "KAFKA_PORT"),
        ("clickhouse", 8123, "CH_HTTP_PORT"),
    ):
        assert f"{var}={port}" in script
        assert f"127.0.0.1:{port}:{port}" in services[svc]["ports"]
    env = services["postgres"]["environment"]
    for key, var in (("POSTGRES_USER", "PG_USER"), ("POSTGRES_PASSWORD", "PG_PASSWORD"),
                     ("POSTGRES_DB", "PG_DB")):
        assert f"{var}={env[key]}" in script
    topics = re.search(r"llm\.requests,llm\.chunks,llm\.completions", script)
    assert topics and "llm.requests llm.chunks llm.completions" in str(
        services["kafka-topics"]["command"]
    )


def test_the_gateway_runs_the_production_path() -> None:
    config = tomllib.loads((DEPLOY / "tollgate.toml").read_text())
    assert config["server"]["production"] is True
    assert config["server"]["metrics_listen"].endswith(":9464")
    assert config["store"]["database_url"].startswith("postgres://")
    assert "@postgres:5432/" in config["store"]["database_url"]
    assert config["events"]["type"] == "kafka"
    assert config["events"]["bootstrap_servers"] == "kafka:19092"
    assert config["limits"] == {"backend": "redis", "redis_url": "redis://redis:6379"}
    assert config["billing"]["pipeline"] == "off"
    assert "mock_models" not in config["server"] and "env_providers" not in config["server"]
    env = dict(
        line.split("=", 1)
        for line in (DEPLOY / "pipeline.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert env["KAFKA_BOOTSTRAP"] == "kafka:19092"
    assert env["DATABASE_URL"] == config["store"]["database_url"]
    assert env["REDIS_URL"] == config["limits"]["redis_url"]
    assert env["TOLLGATE_PIPELINE_METRICS_LISTEN"].endswith(":9465")


def test_prometheus_scrapes_the_ports_the_services_listen_on() -> None:
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in scrape["scrape_configs"]
    }
    assert targets == {
        "tollgate-gateway": ["gateway:9464"],
        "tollgate-pipeline": ["pipeline:9465"],
    }
    for rule_file in scrape["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()


def test_the_dockerfile_is_multi_stage_non_root_and_ships_both_binaries() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE)
    assert len(stages) == 2, stages
    assert stages[-1][0].endswith("-slim") or "slim" in stages[-1][0], stages
    assert "--locked" in text
    assert "--bin tollgate --bin tollgate-pipeline" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and not users[-1].startswith(("root", "0")), users
    assert re.search(r"COPY --from=build .*tollgate-pipeline", text)
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert "target/" in ignored and ".git/" in ignored


def test_the_grafana_dashboard_uses_the_provisioned_data_source() -> None:
    ds = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = ds["datasources"][0]["uid"]
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "tollgate.json").read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests", "errors", "time to first token", "tokens", "cost per hour by tenant",
                  "cost per hour by model", "breaker", "pipeline lag"):
        assert topic in titles, f"no panel about {topic}"
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == uid
            assert target["expr"].strip()


def test_promtool_accepts_the_scrape_config_and_the_alert_rules() -> None:
    promtool = _require_tool("promtool")
    for args in (
        ["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        ["check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
    ):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    for wanted in ("TollgateEventsSpooling", "TollgateEventsLost", "TollgateBreakerOpen",
                   "TollgateLimiterDegraded", "TollgatePipelineLag", "TollgateHighErrorRatio"):
        assert wanted in names


def test_the_compose_healthcheck_commands_work_against_a_real_gateway(
    compose: dict, tmp_path: Path
) -> None:
    """The gateway's and the pipeline's healthchecks (bash's /dev/tcp: no curl in the image),
    run against a real gateway and a real tollgate-pipeline (only the port substituted)."""
    binary = _binary("tollgate")
    log_path = tmp_path / "gateway.log"
    config = tmp_path / "tollgate.toml"
    config.write_text("[server]\nmetrics_listen = \"127.0.0.1:0\"\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE")}
    with open(log_path, "wb") as stderr:
        proc = subprocess.Popen(
            [str(binary), "--data-dir", str(tmp_path / "data"), "serve", "--config", str(config),
             "--listen", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL, stderr=stderr, env={**env, "NO_COLOR": "1"},
        )
    pipeline = None
    try:
        base_url = _wait_ready(proc, log_path)
        port = base_url.rsplit(":", 1)[1]
        check = compose["services"]["gateway"]["healthcheck"]["test"]
        assert check[:3] == ["CMD", "bash", "-c"], check
        script = check[3].replace("/8080", f"/{port}")
        assert subprocess.run(["bash", "-c", script], check=False, timeout=10).returncode == 0
        # the same check fails when nothing answers
        dead = check[3].replace("/8080", "/1")
        assert subprocess.run(["bash", "-c", dead], check=False, timeout=10).returncode != 0

        pipeline_port = _free_port()
        pipeline = subprocess.Popen(
            [str(_binary("tollgate-pipeline")), "--local-log", str(tmp_path / "data" / "events.sqlite"),
             "--data-dir", str(tmp_path / "pipeline"), "--no-recovery",
             "--metrics-listen", f"127.0.0.1:{pipeline_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        check = compose["services"]["pipeline"]["healthcheck"]["test"]
        script = check[3].replace("/9465", f"/{pipeline_port}")
        for _ in range(100):
            if subprocess.run(["bash", "-c", script], check=False, timeout=10).returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the pipeline's healthcheck never passed")
    finally:
        if pipeline is not None:
            _stop(pipeline)
        _stop(proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
