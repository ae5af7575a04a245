"""The systemd units, checked by systemd itself: `systemd-analyze verify` loads them as the
service manager would (unknown keys, bad values, a missing executable all show), and
`systemd-analyze security --offline` scores their hardening."""

from __future__ import annotations

import configparser
import re
import shutil
from pathlib import Path

import pytest

from postlane.config import Config, parse_duration
from tests.deploy.support import SYSTEMD, run, tool

UNITS = ("postlane.service", "postlane-worker@.service")
#: systemd-analyze security's scale: 0 (locked down) to 10 (exposed); 2 and under is "OK"
MAX_EXPOSURE = 2.0


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD / name).read_text())
    return parser


def installed_copies(tmp_path: Path) -> list[Path]:
    """The units as a host would have them, with ExecStart pointing at this environment's
    postlane (verify checks that the command exists) and the template instantiated."""
    postlane = tool("postlane")
    assert postlane is not None
    paths = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace("/opt/postlane/bin/postlane", postlane)
        target = tmp_path / name.replace("@.", "@9025.")
        target.write_text(text)
        paths.append(target)
    return paths


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package)")
    return found


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    result = run([analyze, "verify", *map(str, installed_copies(tmp_path))])
    assert result.returncode == 0, result.stderr
    # unknown keys are only warned about: there must be none
    assert result.stderr.strip() == "", result.stderr


def test_a_typo_fails_verification(tmp_path: Path) -> None:
    """So the test above proves something."""
    analyze = systemd_analyze()
    path = installed_copies(tmp_path)[0]
    path.write_text(path.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    result = run([analyze, "verify", str(path)])
    assert "Unknown key" in result.stderr and "NoNewPrivilege" in result.stderr


@pytest.mark.parametrize("index", range(len(UNITS)))
def test_units_are_hardened(tmp_path: Path, index: int) -> None:
    analyze = systemd_analyze()
    path = installed_copies(tmp_path)[index]
    result = run([analyze, "security", "--offline=yes", "--no-pager", str(path)])
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout + result.stderr)
    if found is None:
        pytest.skip(f"this systemd-analyze has no offline security check: {result.stderr[-300:]}")
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("name", UNITS)
def test_units_stop_gracefully_and_keep_to_their_state_directory(name: str) -> None:
    service = unit(name)["Service"]
    assert service["User"] == "postlane" and service["Group"] == "postlane"
    assert service["KillSignal"] == "SIGTERM"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == "postlane"
    assert service["WorkingDirectory"] == "/var/lib/postlane"
    assert service["Environment"] == "POSTLANE_CONFIG=/etc/postlane/postlane.toml"
    # systemd's SIGKILL only after postlane's own shutdown grace (the default; raise both)
    timeout = parse_duration(service["TimeoutStopSec"] + "s")
    assert timeout >= Config().delivery.shutdown_grace + 10


def test_worker_template_serves_probes_on_the_instance_port() -> None:
    service = unit("postlane-worker@.service")["Service"]
    assert service["ExecStart"] == "/opt/postlane/bin/postlane worker --metrics 127.0.0.1:%i"
    assert unit("postlane.service")["Service"]["ExecStart"] == "/opt/postlane/bin/postlane serve"
