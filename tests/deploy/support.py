"""What the deployment tests share: where the files are, how to read them, and the tools that
check them (each a real implementation: the compose specification's schema, Kubernetes' own
OpenAPI schemas, kustomize, hadolint, promtool, systemd-analyze, a container engine)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_all_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def tool(name: str) -> str | None:
    """A command next to this Python (a test extra's console script) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", 300)
    return subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped), as compose and kustomize read them."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def kubernetes_documents() -> list[dict[str, Any]]:
    """Every object of deploy/kubernetes as written (kustomization.yaml's resources, and the
    optional PodMonitor), before kustomize."""
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    docs: list[dict[str, Any]] = []
    for name in [*kustomization["resources"], "podmonitor.yaml"]:
        docs.extend(load_all_yaml(KUBERNETES / name))
    return docs


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod template) of every workload."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]


def require(name: str, why: str) -> str:
    """The tool's path, or skip naming it (only a tool the test extra or .ci/run installs is
    required under CI; the callers decide which)."""
    found = tool(name)
    if found is None:
        pytest.skip(f"{name} is not installed ({why})")
    return found
