"""The deployment files in manifests/ say what the README promises: probes on /ready and
/health, two replicas, secrets from a Secret (never inline values), a non-root image whose
entry point is `gpuherd serve`, a systemd unit that runs it and restarts it on failure, and
every GPUHERD_* variable they set is a real setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpuherd.core.config import ENV_PREFIX, Settings

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the manifests (pip install pyyaml)")

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
SECRET_VARS = {"GPUHERD_DATABASE_URL", "GPUHERD_SECRET_KEY", "VAST_API_KEY", "RUNPOD_API_KEY", "SURF_API_TOKEN"}


def _load(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]
    assert len(docs) == 1, name
    return docs[0]


def _container(doc: dict) -> dict:
    [container] = doc["spec"]["template"]["spec"]["containers"]
    return container


def _known(var: str) -> bool:
    field = var.removeprefix(ENV_PREFIX).lower()
    return field in Settings.model_fields or var in {"VAST_API_KEY", "RUNPOD_API_KEY", "SURF_API_TOKEN"}


def test_deployment_runs_two_probed_replicas_with_secrets_from_a_secret() -> None:
    dep = _load("k8s/deployment.yaml")
    assert dep["kind"] == "Deployment" and dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    c = _container(dep)
    port = c["ports"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["port"] in (port["name"], port["containerPort"])
    env = {e["name"]: e for e in c["env"]}
    for var in SECRET_VARS:
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "gpuherd" and ref["key"] == var and "value" not in env[var]
    assert all(_known(name) for name in env), sorted(n for n in env if not _known(n))
    # time to finish requests (15 s) and leave the runtime before a SIGKILL
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert pod["securityContext"]["runAsNonRoot"] is True
    # the selector matches the pods, and the Service the same pods on the named port
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = _load("k8s/service.yaml")
    assert svc["kind"] == "Service" and svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == port["name"]


def test_the_example_secret_has_every_key_the_deployment_reads() -> None:
    secret = _load("k8s/secret.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "gpuherd"
    assert set(secret["stringData"]) == SECRET_VARS
    job = _load("k8s/migrate-job.yaml")
    assert _container(job)["command"] == ["gpuherd", "db", "upgrade"]
    [url] = [e for e in _container(job)["env"] if e["name"] == "GPUHERD_DATABASE_URL"]
    assert url["valueFrom"]["secretKeyRef"]["key"] == "GPUHERD_DATABASE_URL"


def test_dockerfile_is_non_root_with_the_server_as_entry_point() -> None:
    text = (MANIFESTS / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0].startswith("FROM python:3.11-slim")
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    entry = [ln for ln in lines if ln.startswith("ENTRYPOINT")]
    assert entry == ['ENTRYPOINT ["gpuherd", "serve", "--host", "0.0.0.0"]']
    assert lines.index(next(ln for ln in lines if ln.startswith("USER "))) < lines.index(entry[0])
    assert re.search(r'pip install "\.\[server,postgres,slack,discord\]"', text), "the image runs every chat surface"
    assert "HEALTHCHECK" in text and "/health" in text
    assert re.search(r"^VOLUME .*/var/lib/gpuherd", text, re.M) and "GPUHERD_HOME=/var/lib/gpuherd" in text


def test_compose_waits_for_a_healthy_postgres() -> None:
    compose = _load("docker-compose.yml")
    pg, app = compose["services"]["postgres"], compose["services"]["gpuherd"]
    assert pg["image"].startswith("postgres:16") and "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert app["depends_on"]["postgres"]["condition"] == "service_healthy"
    env = app["environment"]
    assert env["GPUHERD_DATABASE_URL"].startswith("postgresql+psycopg://") and "@postgres:5432/" in env["GPUHERD_DATABASE_URL"]
    assert env["GPUHERD_SECRET_KEY"].startswith("${GPUHERD_SECRET_KEY")     # from the environment, not inline
    assert app["build"]["dockerfile"] == "manifests/Dockerfile"
    assert all(_known(name) for name in env)


def test_systemd_unit_runs_gpuherd_serve() -> None:
    unit: dict[str, dict[str, str]] = {}
    section = ""
    for raw in (MANIFESTS / "gpuherd.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            unit[section] = {}
        else:
            key, _, value = line.partition("=")
            unit[section][key] = value
    svc = unit["Service"]
    exec_start = svc["ExecStart"].split()
    assert exec_start[0].endswith("/gpuherd") and exec_start[1] == "serve"
    assert svc["Restart"] == "on-failure" and svc["KillSignal"] == "SIGTERM"
    assert svc["EnvironmentFile"].startswith("/") and svc["User"] not in ("root", "0")
    assert int(svc["TimeoutStopSec"]) >= 30
    assert unit["Install"]["WantedBy"] == "multi-user.target"
