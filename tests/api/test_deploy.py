"""deploy/ checked against the server it deploys (Docker and Kubernetes are not available here): every
manifest parses; every IMPETUS_* variable they set is a real setting with a valid value; ports, probes
and the HPA's metric are the ones the real server answers on; shutdown grace periods cover the drain;
the Dockerfile's pins match the project's; and each example is safe as shipped (issue 23, item 9):
published on loopback or inside the cluster only, keys from the environment or a Secret and long
enough to start, admin keys separate, the names clients use allowed, limits in front."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.web.guard import HostAllowList
from gerdsen_ai_server.web.keys import MIN_KEY_LENGTH, PROBE_PATHS
from tests.support import ROOT
from tests.support.server import Server

pytestmark = pytest.mark.server

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCS = ROOT / "docs" / "deployment.md"
SETTINGS = {f"IMPETUS_{name.upper()}" for name in Settings.model_fields}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s(kind: str, name: str = "impetus") -> dict[str, Any]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in documents(path):
            if doc.get("kind") == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in {K8S}")


def container() -> dict[str, Any]:
    return dict(k8s("Deployment")["spec"]["template"]["spec"]["containers"][0])


def k8s_env() -> dict[str, str]:
    return {e["name"]: e.get("value", "<secret>") for e in container()["env"]}


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "docker-compose.yml").read_text()))


def dockerfile_env() -> dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def settings_from(env: dict[str, str]) -> Settings:
    unknown = {k for k in env if k.startswith("IMPETUS_")} - SETTINGS
    assert not unknown, f"not settings of gerdsen_ai_server/config.py: {sorted(unknown)}"
    values = {
        k.removeprefix("IMPETUS_").lower(): v
        for k, v in env.items()
        if k.startswith("IMPETUS_") and "<secret>" not in v and "${" not in v
    }
    return Settings(**values)  # type: ignore[arg-type]  # a bad value raises ValidationError


def test_every_manifest_parses() -> None:
    files = sorted(K8S.glob("*.yaml")) + [DEPLOY / "docker-compose.yml"]
    assert len(files) >= 6
    for path in files:
        assert documents(path), path
    listed = documents(K8S / "kustomization.yaml")[0]["resources"]
    assert {"deployment.yaml", "service.yaml", "redis.yaml", "models-pvc.yaml"} <= set(listed)
    assert all((K8S / name).exists() for name in listed)


def test_settings_are_real_and_valid() -> None:
    for env in (
        k8s_env(),
        dockerfile_env(),
        {k: str(v) for k, v in compose()["services"]["impetus"]["environment"].items()},
    ):
        settings = settings_from(env)
        if "IMPETUS_PORT" in env:  # the image's defaults: every interface, on the port the manifests use
            assert settings.port == 8080 and settings.host == "0.0.0.0"
    assert k8s_env()["IMPETUS_REDIS_URL"].startswith("redis://impetus-redis:6379")
    assert compose()["services"]["impetus"]["environment"]["IMPETUS_REDIS_URL"].startswith("redis://redis:6379")


def test_ports_probes_and_grace_periods_match_the_server() -> None:
    spec = k8s("Deployment")["spec"]["template"]["spec"]
    c = container()
    env, settings = k8s_env(), settings_from(k8s_env())
    port = c["ports"][0]
    assert port["containerPort"] == settings.port == int(env["IMPETUS_PORT"])
    service = k8s("Service")["spec"]
    assert service["ports"][0]["targetPort"] == port["name"] and service["sessionAffinity"] == "ClientIP"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/health/ready"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] in PROBE_PATHS  # open without a key, never rate-limited
        assert c[probe]["httpGet"]["port"] == port["name"]
    assert any(m["mountPath"] == str(settings.models_dir) for m in c["volumeMounts"])
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    # Kubernetes' grace covers the preStop pause, the drain and Gunicorn's 10 s after it.
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + settings.shutdown_grace + 10
    stop = compose()["services"]["impetus"]["stop_grace_period"]
    assert int(stop.removesuffix("s")) > settings.shutdown_grace + 10
    # The model budget is set below the memory limit (the server reads the node's RAM, not the limit).
    limit = c["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") and settings.memory_budget < int(limit[:-2]) << 30
    assert 0 < settings.memory_budget


def test_compose_runs_two_replicas_with_redis_and_nginx() -> None:
    services = compose()["services"]
    assert services["impetus"]["deploy"]["replicas"] == 2
    assert {"impetus", "redis", "nginx"} <= set(services)
    assert services["impetus"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in services["nginx"]["volumes"]
    assert "/health/ready" in " ".join(services["impetus"]["healthcheck"]["test"])
    conf = (DEPLOY / "nginx.conf").read_text()
    assert re.search(r"upstream impetus_socketio \{\s*ip_hash;", conf)  # sticky Socket.IO
    assert "proxy_buffering off;" in conf and "proxy_set_header Upgrade $http_upgrade;" in conf
    assert all(port == "8080" for port in re.findall(r"server impetus:(\d+)", conf))
    body = re.search(r"client_max_body_size (\d+)m;", conf)
    assert body and int(body.group(1)) << 20 == Settings().max_request_bytes  # nginx enforces the server's limit
    assert "error_page 413 @request_too_large;" in conf


def test_dockerfile_matches_the_project() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    pnpm = re.search(r"^PNPM_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert pnpm and f"pnpm@{pnpm.group(1)}" in text
    mlx = re.search(r"^mlx\[cpu\]==(\S+);", (ROOT / "requirements_production.txt").read_text(), re.M)
    assert mlx and f"ARG MLX_VERSION={mlx.group(1)}" in text
    assert "ARG MLX_BACKEND=cpu" in text and 'pip install "mlx[cuda]==${MLX_VERSION}"' in text
    env = dockerfile_env()
    assert f"EXPOSE {env['IMPETUS_PORT']}" in text
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for item in source.split():
            assert (ROOT / item).exists(), f"COPY {item}: not in the repository"
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "gerdsen_ai_server" not in ignored and ".venv" in ignored


def test_probes_and_metric_answer_on_the_real_server(server: Server) -> None:
    c = container()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        r = requests.get(server.url + c[probe]["httpGet"]["path"], timeout=10)
        assert r.status_code == 200, (probe, r.text)
    metric = k8s("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    exposition = requests.get(f"{server.url}/metrics", timeout=10).text
    assert re.search(rf"^{metric} \d", exposition, re.M), f"{metric} not in /metrics"
    annotations = k8s("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and annotations["prometheus.io/port"] == "8080"


# ---- safe by default (issue 23, item 9) -------------------------------------------------------


def all_k8s() -> list[dict[str, Any]]:
    return [d for path in sorted(K8S.glob("*.yaml")) for d in documents(path)]


def test_compose_publishes_only_nginx_and_only_on_loopback() -> None:
    services = compose()["services"]
    for name, service in services.items():
        if name != "nginx":
            assert "ports" not in service, f"{name} publishes a port: only nginx, the proxy, may"
    ports = services["nginx"]["ports"]
    assert ports and all(str(p).startswith("127.0.0.1:") for p in ports), ports  # not every interface
    env = services["impetus"]["environment"]
    assert ":?" in env["IMPETUS_API_KEYS"]  # Compose refuses to start without keys
    for name in ("IMPETUS_ADMIN_KEYS", "IMPETUS_ALLOWED_HOSTS", "IMPETUS_RATE_LIMIT"):
        assert env[name].startswith(f"${{{name}:"), name  # passed through from the operator's environment
    rate = env["IMPETUS_RATE_LIMIT"].removeprefix("${IMPETUS_RATE_LIMIT:-").removesuffix("}")
    assert Settings(rate_limit=rate).rate_limit  # a limit by default, and a valid one


def test_kubernetes_stays_inside_the_cluster_behind_the_ingress() -> None:
    for doc in all_k8s():
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
            assert not any("nodePort" in port for port in doc["spec"]["ports"])
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            pod = doc["spec"]["template"]["spec"]
            assert not pod.get("hostNetwork") and not any(
                "hostPort" in p for c in pod["containers"] for p in c.get("ports", [])
            ), doc["metadata"]["name"]
    assert k8s("Service")["spec"]["type"] == "ClusterIP"
    ingress = k8s("Ingress")
    hosts = [rule["host"] for rule in ingress["spec"]["rules"]]
    assert hosts and set(hosts) <= {h for tls in ingress["spec"]["tls"] for h in tls["hosts"]}  # TLS for each
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/force-ssl-redirect"] == "true"
    assert int(annotations["nginx.ingress.kubernetes.io/limit-rps"]) > 0
    # Only the replicas may reach Redis (no password), where the cluster enforces NetworkPolicy.
    policy = k8s("NetworkPolicy", "impetus-redis")["spec"]
    assert policy["podSelector"]["matchLabels"] == k8s("Deployment", "impetus-redis")["spec"]["selector"]["matchLabels"]
    assert policy["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": k8s("Deployment")["spec"]["selector"]["matchLabels"]}}],
            "ports": [{"protocol": "TCP", "port": 6379}],
        }
    ]
    assert "networkpolicy.yaml" in documents(K8S / "kustomization.yaml")[0]["resources"]


def test_kubernetes_keys_come_from_a_secret_and_hosts_are_allowed() -> None:
    env = {e["name"]: e for e in container()["env"]}
    for name in ("IMPETUS_API_KEYS", "IMPETUS_ADMIN_KEYS"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"] == "impetus-api-keys"
    assert (
        env["IMPETUS_API_KEYS"]["valueFrom"]["secretKeyRef"]["key"]
        != env["IMPETUS_ADMIN_KEYS"]["valueFrom"]["secretKeyRef"]["key"]
    )
    settings = settings_from(k8s_env())
    assert settings.rate_limit
    allowed = HostAllowList(settings)
    for rule in k8s("Ingress")["spec"]["rules"]:
        assert allowed.allows(rule["host"]), rule["host"]  # the ingress's host is answered, not 421
    for name in ("impetus:8080", "impetus.default.svc.cluster.local:8080", "10.1.2.3:8080"):  # in-cluster, probes
        assert allowed.allows(name), name
    assert not allowed.allows("rebound.attacker.example")


def test_the_image_bakes_in_no_key_and_says_how_to_publish_it() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert not {k for k in dockerfile_env() if "KEY" in k}  # keys at run time, never in the image's layers
    run = re.search(r"docker run (.+?)impetus$", text.replace("\\\n#", ""), re.M | re.S)
    assert run and "-p 127.0.0.1:8080:8080" in run.group(1), "the documented run publishes on loopback only"
    assert "IMPETUS_API_KEYS" in text and "IMPETUS_ADMIN_KEYS" in text and "docs/deployment.md" in text


def test_nginx_forwards_the_host_with_its_port_and_limits_clients() -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    # The server's Host allow-list and Origin checks need the port the browser used ($host drops it).
    assert "proxy_set_header Host $http_host;" in conf and "proxy_set_header X-Forwarded-Host $http_host;" in conf
    assert "$host;" not in conf
    # nginx inherits proxy_set_header into a location only if it sets none itself: all at server level.
    for location in re.findall(r"location [^{]+\{[^}]*\}", conf):
        assert "proxy_set_header" not in location, location
    assert re.search(r"limit_req_zone \$binary_remote_addr zone=(\w+):", conf) and "limit_req zone=" in conf
    assert "limit_conn_zone $binary_remote_addr" in conf and "limit_req_status 429;" in conf
    assert "error_page 429 @too_many_requests;" in conf and "server_tokens off;" in conf
    header = re.search(r"client_header_timeout (\d+)s;", conf)
    body = re.search(r"client_body_timeout (\d+)s;", conf)
    settings = Settings()
    assert header and int(header.group(1)) <= settings.header_timeout  # slow clients stop at the proxy first
    assert body and int(body.group(1)) <= settings.read_timeout


def test_example_commands_use_keys_that_start_and_publish_on_loopback() -> None:
    texts = {path: path.read_text() for path in [*DEPLOY.rglob("*"), DOCS] if path.is_file()}
    for path, text in texts.items():
        for key in re.findall(r"IMPETUS_(?:API|ADMIN)_KEYS=([^\s\\]+)", text):
            if key.startswith(('"$(', "$(", "${", "...")):
                continue  # generated or passed through
            for one in key.strip("'\"").split(","):
                assert len(one) >= MIN_KEY_LENGTH, f"{path.name}: example key {one!r} is refused at start"
        for line in re.findall(r"^[#\s]*docker run\b.*$", text, re.M):  # the commands, not the warnings
            for published in re.findall(r"-p\s+(\S+)", line):
                assert published.startswith("127.0.0.1:"), f"{path.name}: {line.strip()}"


def test_the_docs_say_what_must_front_a_public_bind() -> None:
    text = DOCS.read_text()
    section = text.split("## Before a public bind", 1)[1].split("\n## ", 1)[0]
    for needed in (
        "TLS-terminating proxy",
        "IMPETUS_API_KEYS",
        "IMPETUS_ADMIN_KEYS",
        "IMPETUS_ALLOWED_HOSTS",
        "IMPETUS_RATE_LIMIT",
        "IMPETUS_TRUSTED_PROXIES",
        "127.0.0.1:8080",
        "ClusterIP",
    ):
        assert needed in section, needed
    for name in re.findall(r"IMPETUS_[A-Z_]+", section):
        assert name in SETTINGS, f"{name} in docs/deployment.md is not a setting"
