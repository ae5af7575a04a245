"""The container image, built from the Dockerfile and run, where a container engine works.

Skipped, with the engine's own words, where none does: a Docker client with no daemon, or no
way to get the base image (a machine that reaches no container registry). That is not a
failure, in CI either: the machines this project's CI runs on have no container registry to
pull python:3.11-slim from (docs/deploy.md says what was run by hand instead). Set
POSTLANE_TEST_IMAGE_BASE to a local image of a Debian with python3 (3.11+), pip and venv to
build on it instead of python:3.11-slim.

What runs: serve with a read-only root filesystem, as the image's non-root user, answering
/readyz and its HEALTHCHECK, refusing the API without the token, delivering into the capture
folder on its volume, and stopping on SIGTERM (as PID 1) at once with exit code 0; a worker with
--metrics and its probes."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.deploy.support import ROOT, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

DEFAULT_BASE = "docker.io/library/python:3.11-slim-bookworm"
TOKEN = "image-test-token"


@dataclass
class Engine:
    path: str
    name: str

    def __call__(self, *args: str, timeout: float = 300) -> tuple[int, str]:
        result = run([self.path, *args], timeout=timeout)
        return result.returncode, (result.stdout + result.stderr).strip()


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def find_engine() -> Engine:
    reasons = []
    for name in ("podman", "docker"):
        path = shutil.which(name)
        if path is None:
            reasons.append(f"{name}: not installed")
            continue
        engine = Engine(path, name)
        code, out = engine("info", timeout=60)
        if code == 0:
            return engine
        reasons.append(f"{name} info: {_last_line(out)}")
    pytest.skip("no working container engine: " + "; ".join(reasons))


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[Engine, str]]:
    engine = find_engine()
    base = os.environ.get("POSTLANE_TEST_IMAGE_BASE", DEFAULT_BASE)
    if engine("image", "inspect", base)[0] != 0:
        code, out = engine("pull", base, timeout=600)
        if code != 0:
            pytest.skip(f"{engine.name} cannot get the base image {base}: {_last_line(out)}")
    tag = f"localhost/postlane:test-{os.getpid()}"
    build = ["build", "--build-arg", f"PYTHON_IMAGE={base}", "-t", tag, str(ROOT)]
    if engine.name == "podman":
        build[1:1] = ["--format", "docker"]  # HEALTHCHECK is Docker's format, not OCI's
    code, out = engine(*build, timeout=1200)
    assert code == 0, out[-3000:]
    yield engine, tag
    engine("rmi", "-f", tag)


@pytest.fixture
def container(image: tuple[Engine, str]) -> Iterator[tuple[Engine, str, str]]:
    engine, tag = image
    name = f"postlane-test-{os.getpid()}-{time.monotonic_ns()}"
    yield engine, tag, name
    engine("rm", "-f", name)
    engine("volume", "rm", "-f", f"{name}-data")


def _published(engine: Engine, name: str, port: int) -> str:
    code, out = engine("port", name, f"{port}/tcp")
    assert code == 0, out
    return "http://" + out.splitlines()[0].strip().replace("0.0.0.0", "127.0.0.1")


def _get(url: str, token: str | None = None, body: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait_ready(engine: Engine, name: str, url: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if _get(url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not ready within {within}s; logs:\n{engine('logs', name)[1][-3000:]}")


def _healthcheck(engine: Engine, name: str, tag: str) -> None:
    """The image's own HEALTHCHECK command, run now."""
    if engine.name == "podman":
        code, out = engine("healthcheck", "run", name)
    else:
        _, raw = engine("image", "inspect", "--format", "{{json .Config.Healthcheck.Test}}", tag)
        test = json.loads(raw)
        assert test[0] == "CMD"
        code, out = engine("exec", name, *test[1:])
    assert code == 0, out


def _stop_gracefully(engine: Engine, name: str) -> None:
    """SIGTERM, then the exit: at once (nothing in flight) and clean, well before the 45 s
    after which the engine would SIGKILL."""
    started = time.monotonic()
    code, out = engine("stop", "-t", "45", name, timeout=120)
    took = time.monotonic() - started
    assert code == 0, out
    assert took < 20, f"stop took {took:.1f}s: SIGTERM was not handled"
    _, exit_code = engine("inspect", "--format", "{{.State.ExitCode}}", name)
    assert exit_code.splitlines()[-1].strip() == "0"
    assert "postlane stopped" in engine("logs", name)[1]


def test_serve_runs_read_only_as_non_root_and_stops_on_sigterm(
    container: tuple[Engine, str, str],
) -> None:
    engine, tag, name = container
    code, out = engine(
        "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp",
        "-v", f"{name}-data:/var/lib/postlane", "-p", "127.0.0.1::8025",
        "-e", f"POSTLANE_API_TOKEN={TOKEN}", tag,
    )  # fmt: skip
    assert code == 0, out
    base = _published(engine, name, 8025)
    _wait_ready(engine, name, f"{base}/readyz")
    assert engine("exec", name, "id", "-u")[1].splitlines()[-1] == "10025"
    _healthcheck(engine, name, tag)

    message = json.dumps({"from": "app@example.com", "to": ["ada@example.net"], "text": "hi"})
    assert _get(f"{base}/v1/messages", body=message.encode())[0] == 401
    status, text = _get(f"{base}/v1/messages", TOKEN, message.encode())
    assert status == 202, text
    queue_id = json.loads(text)["id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listing = engine("exec", name, "ls", "/var/lib/postlane/capture")[1]
        if queue_id in listing:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"{queue_id} was not captured; logs:\n{engine('logs', name)[1][-3000:]}")
    _stop_gracefully(engine, name)


def test_worker_serves_its_probes_on_the_metrics_port(container: tuple[Engine, str, str]) -> None:
    engine, tag, name = container
    code, out = engine(
        "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp",
        "-v", f"{name}-data:/var/lib/postlane", "-p", "127.0.0.1::9025",
        "-e", "POSTLANE_HEALTHCHECK_URL=http://127.0.0.1:9025/readyz",
        tag, "worker", "--metrics", "0.0.0.0:9025",
    )  # fmt: skip
    assert code == 0, out
    base = _published(engine, name, 9025)
    _wait_ready(engine, name, f"{base}/readyz")
    assert _get(f"{base}/healthz")[0] == 200
    status, metrics = _get(f"{base}/metrics")
    assert status == 200 and "postlane_queue_depth" in metrics
    assert _get(f"{base}/v1/stats")[0] == 404  # probes only
    _healthcheck(engine, name, tag)
    _stop_gracefully(engine, name)
