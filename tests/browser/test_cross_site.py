"""Audit finding 1 in a real browser: a web page the local user visits, served from another
origin, posts to ``postlane serve`` on 127.0.0.1 with no token configured (the default). It may
send "simple" requests without asking first (``fetch`` with a ``text/plain`` body, a form with
``enctype="text/plain"``); none of them may enqueue, delete or suppress anything.

Headless Chromium (Debian's) driven by Playwright, as the dashboard's browser tests; the API
and the dashboard in a ``postlane serve`` subprocess; the attacking page from a plain HTTP
server on another port, visited as ``localhost`` (another site) and as ``127.0.0.1`` (the same
site, another origin: ports do not make a site)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from postlane.client import Client
from tests.browser.seed import free_port
from tests.processes import start_postlane

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import Browser, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None  # type: ignore[assignment]

if CHROMIUM is None or sync_playwright is None:
    missing = "chromium" if CHROMIUM is None else "playwright"
    if IN_CI:
        pytest.fail(f"{missing} is not installed, but CI must run the browser tests", pytrace=False)
    pytest.skip(f"{missing} is not installed (browser tests)", allow_module_level=True)

pytestmark = pytest.mark.timeout(180)

#: the attacking page: every simple request it can make, then a text/plain form post into a
#: frame; it sets its title to "done" once all have gone out
ATTACK = """<!doctype html>
<html><head><title>cat pictures</title></head>
<body>
<iframe name="sink" id="sink"></iframe>
<form id="api" method="post" enctype="text/plain" action="{api}/v1/messages" target="sink">
<input type="hidden"
 name='{{"from": "evil@example.com", "to": ["victim@example.net"], "text": "x", "pad": "'
 value='"}}'>
</form>
<form id="dashboard" method="post" action="{api}/queue/action" target="sink">
<input type="hidden" name="action" value="delete">
<input type="hidden" name="all" value="1">
<input type="hidden" name="confirm" value="1">
<input type="hidden" name="state" value="queued">
</form>
<script>
const api = "{api}";
const message = {{from: "evil@example.com", to: ["victim@example.net"], subject: "x", text: "x"}};
const writes = [
  ["/v1/messages", message],
  ["/v1/messages/batch", {{messages: [message]}}],
  ["/v1/queue/delete", {{all: true}}],
  ["/v1/queue/hold", {{all: true}}],
  ["/v1/suppressions", {{address: "ceo@example.com", reason: "x"}}],
];
let reached = 0;
function submitted(id) {{
  return new Promise((resolve) => {{
    const frame = document.getElementById("sink");
    frame.addEventListener("load", () => resolve(), {{once: true}});
    document.getElementById(id).submit();
    setTimeout(resolve, 5000);
  }});
}}
async function attack() {{
  for (const [path, body] of writes) {{
    try {{  // a simple request: no preflight, an opaque answer
      await fetch(api + path, {{method: "POST", mode: "no-cors", body: JSON.stringify(body),
                               headers: {{"Content-Type": "text/plain"}}}});
      reached += 1;
    }} catch (e) {{}}
    try {{  // as JSON: the browser asks first (preflight), and is never told yes
      await fetch(api + path, {{method: "POST", body: JSON.stringify(body),
                               headers: {{"Content-Type": "application/json"}}}});
    }} catch (e) {{}}
  }}
  await submitted("api");
  await submitted("dashboard");
  document.title = "done " + reached;
}}
attack();
</script>
</body></html>
"""


class _Page(BaseHTTPRequestHandler):
    html = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.html)))
        self.end_headers()
        self.wfile.write(self.html)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``postlane serve`` with the default access (no token: loopback clients only), relaying
    to a port nobody listens on: mail stays waiting (deferred), for a delete or a hold to take."""
    directory = tmp_path_factory.mktemp("cross-site")
    port = free_port()
    config = directory / "postlane.toml"
    config.write_text(
        f'[store]\nurl = "sqlite:///{directory / "postlane.db"}"\n'
        f'[delivery]\nrelay = "smtp://127.0.0.1:{free_port()}"\n'
        f'[retry]\ndelays = ["1h"]\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{free_port()}"\n'
    )
    api = f"http://127.0.0.1:{port}"
    env = {"POSTLANE_CONFIG": str(config)}
    with start_postlane("serve", env=env, cwd=directory, log=directory / "serve.log") as process:
        process.wait_until_blocking(
            lambda: httpx.get(api + "/readyz", timeout=1).status_code == 200,
            "postlane serve to answer /readyz",
            ignoring=(httpx.HTTPError,),
        )
        yield api


@pytest.fixture(scope="module")
def attacker(served: str) -> Iterator[int]:
    """A web server for the attacking page, on a port of its own."""
    _Page.html = ATTACK.format(api=served).encode()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def queue_of(api: str) -> list[dict[str, Any]]:
    listed = httpx.get(api + "/v1/queue", params={"limit": 1000})  # a program: no Origin
    assert listed.status_code == 200, listed.text
    return list(listed.json())


@pytest.mark.parametrize("page_host", ["localhost", "127.0.0.1"], ids=["cross-site", "same-site"])
def test_finding_1_a_page_of_another_origin_cannot_enqueue_delete_or_suppress(
    served: str, attacker: int, browser: Browser, page_host: str
) -> None:
    with Client(served) as client:  # the API's own client still gets in
        mine = client.send(sender="app@example.com", to=["ada@example.net"], text="keep me")
    before = queue_of(served)
    assert mine.id in {m["id"] for m in before}

    context = browser.new_context()
    page = context.new_page()
    page.goto(f"http://{page_host}:{attacker}/")
    page.wait_for_function("document.title.startsWith('done')", timeout=60_000)
    reached = int(page.title().split()[1])
    context.close()

    assert reached == 5  # every simple request went out (the browser did not block them)
    after = queue_of(served)
    assert [m["id"] for m in after] == [m["id"] for m in before]  # nothing enqueued or deleted
    assert not any(r["state"] == "held" for m in after for r in m["recipients"])  # nor held
    assert not any(m["sender"] == "evil@example.com" for m in after)
    suppressed = httpx.get(served + "/v1/suppressions").json()
    assert suppressed == [], json.dumps(suppressed)


def test_finding_1_the_dashboards_own_forms_still_work(served: str, browser: Browser) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(served + "/suppressions")
    page.get_by_label("Address").fill("stop@example.org")
    page.get_by_role("button", name="Add").click()
    page.wait_for_selector(".flash")
    assert "added stop@example.org" in page.locator(".flash").inner_text()
    context.close()
    listed = {e["address"] for e in httpx.get(served + "/v1/suppressions").json()}
    assert "stop@example.org" in listed
    httpx.delete(served + "/v1/suppressions/stop@example.org").raise_for_status()
