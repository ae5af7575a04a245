"""Issue 17's blocker: the README's test command failed on a fresh machine (a new pytest came out
and the test extra was open-ended). What makes a fresh install reproducible is checked here:
every package `pip install -e '.[test]'` brings in is pinned in constraints.txt, the README and
`.ci/run` both install with it, `.ci/run` installs into a new virtual environment, and the README
says how to run the tests that need a peer. (The pytest plugin's test runs its project with
`-W error` and sets the option it depends on: tests/integration/test_pytest_plugin.py.)"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[2]
TEST_COMMAND = "pip install -c constraints.txt -e '.[test]' && python -m pytest"


def pins() -> dict[str, str]:
    pinned: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version and ";" not in version, f"constraints.txt: not a pin: {line!r}"
        pinned[canonicalize_name(name)] = version
    return pinned


def requirements_of_the_test_extra() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [
        Requirement(r)
        for r in (*project["dependencies"], *project["optional-dependencies"]["test"])
    ]


def closure(roots: list[Requirement]) -> set[str]:
    """Every distribution the roots need, through the installed packages' metadata, with their
    markers evaluated here (extras followed)."""
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in roots]
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen and not extras:
            continue
        seen.add(name)
        try:
            metadata = distribution(requirement.name)
        except PackageNotFoundError:
            continue  # not installed here: the pin check below still names it
        for text in metadata.requires or []:
            child = Requirement(text)
            if child.marker is not None:
                environments = [{**default_environment(), "extra": e} for e in ("", *extras)]
                if not any(child.marker.evaluate(env) for env in environments):
                    continue
            todo.append((child, frozenset(child.extras)))
    return seen


def test_issue_17_fresh_install_every_package_the_tests_install_is_pinned() -> None:
    pinned = pins()
    needed = closure(requirements_of_the_test_extra())
    assert "pytest" in needed and "schemathesis" in needed
    unpinned = sorted(needed - set(pinned) - {"postlane"})
    assert unpinned == [], f"not pinned in constraints.txt: {unpinned}"


def test_issue_17_fresh_install_the_readme_and_ci_install_with_the_constraints() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert TEST_COMMAND in readme
    assert TEST_COMMAND in ci


def test_issue_17_fresh_install_ci_runs_in_a_new_virtual_environment() -> None:
    """Nothing may come from what the CI machine has installed already."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    made = next(i for i, line in enumerate(lines) if re.match(r"python3? -m venv ", line))
    removed = next(i for i, line in enumerate(lines) if line.startswith('rm -rf "$venv"'))
    activated = next(i for i, line in enumerate(lines) if "/bin/activate" in line)
    tested = next(i for i, line in enumerate(lines) if TEST_COMMAND in line)
    assert removed < made < activated < tested
    assert "--system-site-packages" not in lines[made]


def test_issue_17_fresh_install_the_readme_says_how_to_run_the_tests_that_need_a_peer() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running the tests", 1)[1].split("\n## ", 1)[0]
    assert "POSTLANE_TEST_POSTGRES=postgresql://" in section  # the variable that enables them
    assert "python -m pytest tests/browser" in section  # the dashboard's browser tests
    assert "chromium" in section.lower()
