"""The dashboard in a real browser: headless Chromium (Debian's) driven by Playwright, against
``postlane serve`` in a subprocess on a seeded queue (see ``seed.py``).

Each test loads a page, acts the way an operator would (click, confirm), and checks what the page
says against ``postlane stats --json`` and ``postlane queue show --json``, the numbers the CLI
gives. Screenshots of every page are written to ``$POSTLANE_SCREENSHOTS`` (``docs/screenshots``
when refreshing the documentation), else to a temporary folder.

Skipped without Chromium or Playwright, except under CI, which installs both and must run them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.seed import HELD, NEWSLETTERS, Seeded, seed
from tests.processes import start_postlane

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None  # type: ignore[assignment]

if CHROMIUM is None or sync_playwright is None:
    missing = "chromium" if CHROMIUM is None else "playwright"
    if IN_CI:
        pytest.fail(
            f"{missing} is not installed, but CI must run the browser tests "
            "(apt-get install chromium; pip install -e '.[test]')",
            pytrace=False,
        )
    pytest.skip(
        f"{missing} is not installed (the dashboard's browser tests)", allow_module_level=True
    )

pytestmark = pytest.mark.timeout(180)


def run_cli(config: Path, *args: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTLANE_")}
    env["POSTLANE_CONFIG"] = str(config)
    done = subprocess.run(
        ["postlane", *args, "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    directory = tmp_path_factory.mktemp("dashboard")
    seeded = asyncio.run(seed(directory))
    env = {"POSTLANE_CONFIG": str(seeded.config)}
    with start_postlane("serve", env=env, cwd=directory, log=directory / "serve.log") as process:
        process.wait_until_blocking(
            lambda: httpx.get(seeded.http + "/readyz", timeout=1).status_code == 200,
            "postlane serve to answer /readyz",
            ignoring=(httpx.HTTPError,),
        )
        yield seeded


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield page
    context.close()
    assert errors == [], errors  # no script error, no CSP violation


SCREENSHOTS = Path(os.environ.get("POSTLANE_SCREENSHOTS", "") or "")


def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    folder = SCREENSHOTS if str(SCREENSHOTS) not in ("", ".") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def shown(page: Page, stat: str) -> int:
    return int(page.locator(f'[data-stat="{stat}"]').inner_text().replace(",", ""))


def settled(config: Path) -> dict[str, Any]:
    """``stats --json`` once nothing is ready or being sent (the worker is done for now)."""
    result: dict[str, Any] = {}

    def quiet() -> bool:
        result.update(run_cli(config, "stats"))
        return all(v["ready"] == 0 and v["sending"] == 0 for v in result["lanes"].values())

    eventually(quiet, "the worker has nothing due")
    return result


def assert_overview_matches(page: Page, stats: dict[str, Any]) -> None:
    for lane, numbers in stats["lanes"].items():
        for key in ("ready", "deferred", "sending", "held"):
            assert shown(page, f"lanes.{lane}.{key}") == numbers[key], (lane, key)
        waiting = numbers["ready"] + numbers["deferred"] + numbers["sending"]
        assert shown(page, f"lanes.{lane}.waiting") == waiting
        age = float(
            page.locator(f'[data-stat="lanes.{lane}.oldest_age_seconds"]').get_attribute(
                "data-seconds"
            )
            or "nan"
        )
        assert abs(age - numbers["oldest_age_seconds"]) < 30  # ages grow between the two reads
    for key in ("sent", "dead", "suppressed", "suppression_list"):
        assert shown(page, key) == stats[key], key


# -- the tests -----------------------------------------------------------------------------------


def test_the_overview_shows_what_stats_json_says(
    seeded: Seeded, page: Page, tmp_path: Path
) -> None:
    stats = settled(seeded.config)
    page.goto(seeded.http + "/")
    assert_overview_matches(page, stats)
    assert stats["lanes"]["low"]["deferred"] == NEWSLETTERS
    assert stats["lanes"]["normal"]["held"] == HELD
    assert page.locator("svg.chart polyline").count() >= 8  # four charts, history drawn
    expect(page.locator(".warn")).to_contain_text("slow.example")  # the pause, at a glance
    # what was heard after delivery (DSNs, complaints) is charted and summed beside the bounces
    expect(page.locator("figure.chart-box", has_text="bounced later")).to_have_count(1)
    expect(page.locator("nav.windows")).to_contain_text(
        re.compile(r"[1-9][\d,]* bounced later, [1-9][\d,]* complaints")
    )
    screenshot(page, "overview", tmp_path)

    # it stays live: a message sent meanwhile shows up without a reload (the script polls)
    run_cli(seeded.config, "send", "--from", "a@shop.example", "--to", "x@outlook.com",
            "--subject", "live", "--text", "x", "--lane", "low")  # fmt: skip
    eventually(lambda: shown(page, "sent") > stats["sent"], "the page shows the new delivery", 30)


def test_a_paused_destination_is_shown_with_its_reason_and_can_be_lifted(
    seeded: Seeded, page: Page, tmp_path: Path
) -> None:
    page.goto(seeded.http + "/destinations")
    row = page.locator('tr[data-destination="slow.example"]')
    expect(row).to_contain_text("421 4.7.0 Too many connections")
    expect(row).to_contain_text("temporary")  # its recent replies: the greylisting
    screenshot(page, "destinations", tmp_path)
    expect(row.locator("[data-state]")).to_contain_text("paused until")
    expect(row.locator("[data-reason]")).to_contain_text("421 4.7.0 Too many connections")
    # another paused destination is lifted: slow.example's pause fires the alert another test
    # reads, and the monitor in serve resolves an alert within a minute of its lift
    other = page.locator('tr[data-destination="lift.example"]')
    expect(other.locator("[data-state]")).to_contain_text("paused until")
    other.get_by_role("button", name="Lift pause").click()
    expect(page.locator(".flash")).to_contain_text("lifted the pause and slow-down on lift.example")
    expect(page.locator('tr[data-destination="lift.example"] button')).to_have_count(0)
    status = run_cli(seeded.config, "stats")["destinations"]
    assert all(d["paused_until"] is None for d in status if d["destination"] == "lift.example")
    assert any(d["paused_until"] for d in status if d["destination"] == "slow.example")


def test_issue_17_8_a_slowed_down_relay_is_its_own_row_and_can_be_lifted(
    seeded: Seeded, page: Page
) -> None:
    page.goto(seeded.http + "/destinations")
    row = page.locator('tr[data-destination="relay"]')
    expect(row).to_have_attribute("data-kind", "relay")
    expect(row.locator("[data-state]")).to_have_text("slowed down")  # not "paused"
    expect(row.locator("[data-reason]")).to_contain_text("421 4.7.28")
    expect(row).to_contain_text("4.0/s")
    expect(row).to_contain_text("counted by recipient destination")
    row.get_by_role("button", name="Lift slow-down").click()
    expect(page.locator(".flash")).to_contain_text("lifted the pause and slow-down on relay")
    expect(page.locator('tr[data-destination="relay"] button')).to_have_count(0)
    status = run_cli(seeded.config, "stats")["destinations"]
    assert all(d["rate"] is None for d in status if d["destination"] == "relay")


def test_the_queue_filters_and_pages_without_repeating(
    seeded: Seeded, page: Page, tmp_path: Path
) -> None:
    page.goto(seeded.http + "/queue")
    page.get_by_label("lane").select_option("low")
    page.get_by_role("button", name="Filter").click()
    first = page.locator("tr[data-id]").evaluate_all("rows => rows.map(r => r.dataset.id)")
    assert len(first) == 50
    screenshot(page, "queue", tmp_path)
    page.get_by_role("link", name="next page »").click()
    second = page.locator("tr[data-id]").evaluate_all("rows => rows.map(r => r.dataset.id)")
    listed = run_cli(seeded.config, "queue", "list", "--lane", "low")
    expected = [m["id"] for m in listed]
    assert first + second == expected  # arrival order, every message once, none skipped
    assert page.get_by_role("link", name="next page »").count() == 0

    page.goto(seeded.http + "/queue?domain=full.example")
    rows = page.locator("tr[data-id]")
    expect(rows.first).to_contain_text("Mailbox full")
    shown_ids = rows.evaluate_all("rows => rows.map(r => r.dataset.id)")
    listed = run_cli(seeded.config, "queue", "list", "--domain", "full.example")
    assert shown_ids == [m["id"] for m in listed][:50]  # the first page of what the CLI lists


def test_a_message_can_be_held_and_released_from_its_page(
    seeded: Seeded, page: Page, tmp_path: Path
) -> None:
    queue_id = seeded.deferred_id
    page.goto(f"{seeded.http}/queue/{queue_id}")
    recipient = page.locator('section[data-address="user0@grey.example"]')
    expect(recipient).to_contain_text("451 4.7.1 Greylisted")  # the attempt, with its reply
    expect(page.locator("table.headers")).to_contain_text("Reset your password")
    screenshot(page, "message", tmp_path)
    held_before = run_cli(seeded.config, "stats")["lanes"]["high"]["held"]

    page.get_by_role("button", name="Hold").click()
    expect(page.locator(".flash")).to_contain_text("held 1 recipient(s)")
    expect(recipient.locator(".state")).to_have_text("held")
    shown_json = run_cli(seeded.config, "queue", "show", queue_id)
    assert [r["state"] for r in shown_json["recipients"]] == ["held"]
    assert run_cli(seeded.config, "stats")["lanes"]["high"]["held"] == held_before + 1

    page.get_by_role("button", name="Release").click()
    expect(page.locator(".flash")).to_contain_text("released 1 recipient(s)")
    eventually(
        lambda: (
            run_cli(seeded.config, "queue", "show", queue_id)["recipients"][0]["state"] == "sent"
        ),
        "the released message is delivered",
    )


def test_a_dead_letter_group_is_requeued_after_a_confirmation(
    seeded: Seeded, page: Page, tmp_path: Path
) -> None:
    before = settled(seeded.config)
    page.goto(seeded.http + "/dlq")
    group = page.locator('tr[data-class="policy_block"][data-domain="blocked.example"]')
    expect(group.locator("[data-count]")).to_have_text("5")
    expect(group).to_contain_text("spamhaus")
    expect(page.locator('tr[data-class="hard_bounce"] [data-count]')).to_have_text("12")
    screenshot(page, "dead-letters", tmp_path)

    group.get_by_role("button", name="Requeue…").click()
    expect(page.locator("h1")).to_have_text("Requeue 5 recipient(s)?")
    expect(page.locator("table.counts")).to_contain_text("blocked.example")
    screenshot(page, "confirm-requeue", tmp_path)
    page.get_by_role("button", name="Requeue 5").click()
    expect(page.locator(".flash")).to_contain_text("requeued 5 recipient(s)")
    expect(page.locator('tr[data-domain="blocked.example"]')).to_have_count(0)
    expect(page.locator('tr[data-class="hard_bounce"] [data-count]')).to_have_text("12")

    after = settled(seeded.config)  # the requeued five were delivered (the relay accepts now)
    assert after["dead"] == before["dead"] - 5
    assert after["sent"] == before["sent"] + 5
    page.goto(seeded.http + "/")
    assert_overview_matches(page, after)


def test_a_delete_asks_then_hands_over_an_export_that_imports_back(
    seeded: Seeded, page: Page, tmp_path: Path
) -> None:
    page.goto(seeded.http + "/queue?domain=full.example")
    victim = page.locator("tr[data-id]").first
    queue_id = victim.get_attribute("data-id")
    victim.locator("input[type=checkbox]").check()
    page.get_by_role("button", name="Delete…").click()
    expect(page.locator("h1")).to_contain_text("Delete 1 recipient(s)?")  # the other was sent
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Delete, and download").click()
    export = tmp_path / "deleted.jsonl"
    download_info.value.save_as(export)
    [record] = [json.loads(line) for line in export.read_text().splitlines()]
    assert record["id"] == queue_id

    def addresses() -> set[str]:
        shown_json = run_cli(seeded.config, "queue", "show", str(queue_id))
        return {r["address"] for r in shown_json["recipients"]}

    assert not any(a.endswith("@full.example") for a in addresses())  # deleted; the sent one stays
    restored = subprocess.run(
        ["postlane", "queue", "import", str(export)],
        env={**os.environ, "POSTLANE_CONFIG": str(seeded.config)},
        capture_output=True,
        text=True,
    )
    assert restored.returncode == 0, restored.stderr
    assert any(a.endswith("@full.example") for a in addresses())  # back, from the export


def test_the_suppression_list_takes_additions_and_removals(
    seeded: Seeded, page: Page, tmp_path: Path
) -> None:
    page.goto(seeded.http + "/suppressions")
    expect(page.locator('tr[data-address="old0@gone.example"]')).to_contain_text("bounce")
    page.get_by_label("Address").fill("Angry@Customer.example")
    page.get_by_label("Reason").fill("asked to stop")
    page.get_by_role("button", name="Add").click()
    expect(page.locator(".flash")).to_contain_text("added")
    listed = {e["address"] for e in run_cli(seeded.config, "suppress", "list")}
    assert "angry@customer.example" in listed
    screenshot(page, "suppressions", tmp_path)
    page.locator('tr[data-address="angry@customer.example"]').get_by_role(
        "button", name="Remove"
    ).click()
    expect(page.locator(".flash")).to_contain_text("removed angry@customer.example")
    listed = {e["address"] for e in run_cli(seeded.config, "suppress", "list")}
    assert "angry@customer.example" not in listed


# -- issue 17.9: what a new user found wrong on the pages --------------------------------------


def test_issue_17_9_overview_numbers_stand_under_their_headers(seeded: Seeded, page: Page) -> None:
    page.goto(seeded.http + "/")
    offsets = page.evaluate(
        """() => {
        const right = (cell) => {
          const range = document.createRange();
          range.selectNodeContents(cell);
          return range.getBoundingClientRect().right;
        };
        const table = document.querySelector("table.lanes");
        const heads = [...table.querySelectorAll("thead th")];
        return [...table.querySelectorAll("tbody tr")].flatMap((row) =>
          [...row.children].slice(1).map((cell, i) => right(cell) - right(heads[i + 1])));
      }"""
    )
    assert len(offsets) == 3 * 7 and all(abs(o) < 2 for o in offsets), offsets


def test_issue_17_9_a_firing_alert_says_what_and_links_its_runbook(
    seeded: Seeded, page: Page
) -> None:
    page.goto(seeded.http + "/")
    alert = page.locator('[data-alert="PostlaneDestinationPausedTooLong"]')
    expect(alert).to_contain_text("Destination slow.example has been paused for 30 minutes")
    expect(alert).to_contain_text("paused throughout")  # the evaluation's detail
    link = alert.get_by_role("link", name="runbook: what to do")
    assert (link.get_attribute("href") or "").endswith("docs/runbooks/destination-paused.md")
    assert (Path(__file__).parents[2] / "docs/runbooks/destination-paused.md").is_file()


def test_issue_17_9_dead_letters_are_drawn_in_red(seeded: Seeded, page: Page) -> None:
    page.goto(seeded.http + "/")
    flow = page.locator("figure.chart-box", has_text="Per minute: recipients delivered")
    dead = flow.locator(".legend .key", has_text="dead").locator("rect")
    assert dead.get_attribute("fill") == "#b3261e"
    assert flow.locator('polyline[stroke="#b3261e"]').count() == 1


def test_issue_17_9_the_suppression_list_shows_the_reply(seeded: Seeded, page: Page) -> None:
    page.goto(seeded.http + "/suppressions")
    reply = page.locator('tr[data-address="old0@gone.example"] [data-reply]')
    expect(reply).to_contain_text("550 5.1.1")
    expect(reply).to_contain_text("User unknown")


def test_issue_17_9_internationalised_domains_read_in_unicode(seeded: Seeded, page: Page) -> None:
    page.goto(seeded.http + "/queue?lane=high&state=deferred")
    shown = page.locator("ul.rcpts .idn", has_text="leser@bücher.example")
    expect(shown).to_have_count(1)
    assert shown.get_attribute("title") == "leser@xn--bcher-kva.example"  # the stored form
    page.goto(seeded.http + "/destinations")
    link = page.get_by_role("link", name="bücher.example")
    assert link.get_attribute("href") == "/queue?domain=xn--bcher-kva.example"
    link.click()  # the filter works on the ASCII form
    expect(page.locator("tr[data-id]")).to_have_count(1)


def test_unmatched_reports_are_listed_and_readable(seeded: Seeded, page: Page) -> None:
    page.goto(seeded.http + "/feedback")
    row = page.locator("tr[data-report]").first
    expect(row).to_contain_text("auto-reply")
    expect(row).to_contain_text("an automatic reply, not a bounce")
    row.get_by_role("link").click()
    expect(page.locator("[data-raw]")).to_contain_text("Back on Monday.")


def test_suppressions_show_reason_scope_and_expiry_and_remove_by_scope(
    seeded: Seeded, page: Page
) -> None:
    page.goto(seeded.http + "/suppressions")
    page.get_by_label("Address").fill("ada@shop-customer.example")
    page.get_by_label("Scope").fill("shop.example")
    page.get_by_role("button", name="Add").click()
    row = page.locator('tr[data-address="ada@shop-customer.example"]')
    expect(row).to_have_attribute("data-scope", "shop.example")
    expect(row).to_contain_text("manual")
    expect(row).to_contain_text("never")
    row.get_by_role("button", name="Remove").click()
    expect(page.locator('tr[data-address="ada@shop-customer.example"]')).to_have_count(0)
