"""docs/python-api.md's examples, run as written: the Python API's reference cannot drift from
what the code does (a day-one audit found the API documented nowhere but in the README)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration.test_client import TOKEN, LiveAPI, live_api, server_thread

__all__ = ["live_api", "server_thread"]  # the HTTP client's examples run against a live API

DOC = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_python_api_examples_run_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, live_api: LiveAPI
) -> None:
    blocks = python_blocks()
    assert len(blocks) >= 8, "the examples moved: read them again"
    here = tmp_path / "app"  # the live API's queue is tmp_path's own
    here.mkdir()
    monkeypatch.chdir(here)
    (here / "postlane.toml").write_text(
        '[store]\nurl = "sqlite:///postlane.db"\n[delivery]\nrelay = "capture://captured"\n'
    )
    namespace: dict[str, object] = {"__name__": "docs_example"}
    for block in blocks:
        if "postlane.Client(" in block:  # the server the example names is a live one here
            block = block.replace("http://127.0.0.1:8025", live_api.url)
            block = block.replace('token="..."', f"token={TOKEN!r}")
        exec(compile(block, str(DOC), "exec"), namespace)  # the doc's own code
    [sent] = live_api.messages()  # the client's example reached the live API, once
    assert [r.address for r in sent.recipients] == ["ada@example.net"]
