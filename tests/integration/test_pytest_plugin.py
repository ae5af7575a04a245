"""postlane's pytest plugin as a user meets it: a project's test files using ``postlane_mail``
(and overriding ``postlane_config``), run by a separate pytest process that finds the plugin
through its entry point, as ``pip install postlane`` would set it up."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USERS_TESTS = '''
import pytest

import postlane


def send_welcome(mail, email):
    """The application code under test: it takes a postlane (sync API) and sends."""
    return mail.send(
        sender="app@example.com",
        to=[email],
        bcc=["audit@example.com"],
        subject="Welcome",
        text="Hi!",
        html="<b>Hi!</b>",
        lane="high",
        idempotency_key=f"welcome:{email}",
    )


def test_a_welcome_is_delivered_once_with_its_envelope(postlane_mail):
    first = send_welcome(postlane_mail.app, "ada@example.net")
    again = send_welcome(postlane_mail.app, "ada@example.net")
    assert again.id == first.id and again.duplicate
    assert postlane_mail.messages == []  # queued, not delivered: the worker has not run
    assert postlane_mail.deliver() == 2  # one attempt per recipient
    [message] = postlane_mail.messages
    assert message["Subject"] == "Welcome"
    assert message["To"] == "ada@example.net"
    assert "Bcc" not in message and "X-Postlane-Envelope-To" not in message
    assert message.envelope_from == "app@example.com"
    assert sorted(message.envelope_to) == ["ada@example.net", "audit@example.com"]
    assert message.get_body(("html",)).get_content().strip() == "<b>Hi!</b>"
    assert postlane_mail.app.get(first.id).lane == postlane.Lane.HIGH


def test_each_test_gets_an_empty_postlane(postlane_mail):
    assert postlane_mail.app.messages() == []
    assert postlane_mail.deliver() == 0
    assert postlane_mail.messages == []


def test_messages_keep_their_order_across_deliveries(postlane_mail):
    for n in range(3):
        postlane_mail.send(sender="app@example.com", to=[f"u{n}@example.net"], text=str(n))
        postlane_mail.deliver()
    assert [m.envelope_to for m in postlane_mail.messages] == [
        ["u0@example.net"], ["u1@example.net"], ["u2@example.net"]
    ]


@pytest.mark.asyncio
async def test_usable_from_an_async_test(postlane_mail):
    postlane_mail.send(sender="app@example.com", to=["ada@example.net"], text="from async")
    assert postlane_mail.deliver() == 1
    [message] = postlane_mail.messages
    assert message.get_content().strip() == "from async"


def test_forgetting_to_deliver_fails_plainly(postlane_mail):
    send_welcome(postlane_mail, "bob@example.org")
    assert postlane_mail.messages, "nothing delivered"
'''

OVERRIDDEN_CONFIG = """
import pytest

import postlane
from postlane.pytest_plugin import throwaway_config


@pytest.fixture
def postlane_config(tmp_path):
    return throwaway_config(tmp_path, smtp={"max_size": "2KB"})


def test_the_overridden_limit_applies(postlane_mail):
    with pytest.raises(postlane.MessageTooLarge):
        postlane_mail.send(sender="app@example.com", to=["ada@example.net"], text="x" * 5000)
    postlane_mail.send(sender="app@example.com", to=["ada@example.net"], text="small")
    postlane_mail.deliver()
    assert len(postlane_mail.messages) == 1
"""


AS_IN_PRODUCTION = """
from datetime import UTC, datetime, timedelta

import pytest

from postlane.pytest_plugin import throwaway_config


@pytest.fixture
def postlane_config(tmp_path):
    return throwaway_config(
        tmp_path,
        unsubscribe={"url": "https://mail.example.com/unsubscribe", "lanes": ["low"]},
        bounces={"domain": "bounces.example.com"},
        # a real relay (that does not exist): the plugin captures all the same
        delivery={"relay": "smtp://relay.invalid:587"},
    )


def test_a_newsletter_carries_its_unsubscribe_link_and_return_path(postlane_mail):
    postlane_mail.send(sender="news@example.com", to=["ada@example.net"], text="x", lane="low")
    postlane_mail.send(sender="app@example.com", to=["bob@example.net"], text="x", lane="high")
    assert postlane_mail.deliver() == 2
    news, reset = postlane_mail.messages
    assert news["List-Unsubscribe"].startswith("<https://mail.example.com/unsubscribe/")
    assert news["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert reset["List-Unsubscribe"] is None  # the high lane carries none
    assert news.envelope_from.startswith("b-")
    assert news.envelope_from.endswith("@bounces.example.com")


def test_scheduled_and_expiring_mail_without_waiting(postlane_mail):
    now = datetime.now(UTC)
    postlane_mail.send(
        sender="app@example.com", to=["ada@example.net"], text="reminder",
        send_at=now + timedelta(days=1),
    )
    code = postlane_mail.send(
        sender="app@example.com", to=["bob@example.net"], text="123456",
        expires_at=now + timedelta(minutes=10), send_at=now + timedelta(minutes=5),
    )
    assert postlane_mail.deliver() == 0  # nothing is due yet
    assert postlane_mail.deliver(at=now + timedelta(hours=1)) == 0  # the code expired first
    assert postlane_mail.app.get(code.id).recipients[0].state == "dead"
    assert postlane_mail.deliver(at=now + timedelta(days=1, seconds=1)) == 1
    [reminder] = postlane_mail.messages
    assert reminder.envelope_to == ["ada@example.net"]
"""


def test_the_plugin_delivers_as_production_and_travels_in_time(pytester: pytest.Pytester) -> None:
    """A day-one audit: the plugin's deliver() skipped the unsubscribe, VERP and DKIM wrappers
    production puts around the transport, and scheduled mail could only be tested by waiting."""
    pytester.makepyfile(test_production=AS_IN_PRODUCTION)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    result = pytester.runpytest_subprocess("-W", "error", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_issue_17_fresh_install_a_projects_tests_use_the_plugin_under_w_error(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_welcome=USERS_TESTS, test_limits=OVERRIDDEN_CONFIG)
    # the project's own pytest settings, as any project using pytest-asyncio has them (an unset
    # loop scope is pytest-asyncio's warning, not the plugin's)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    # a separate process: the plugin is found as users get it, through the pytest11 entry
    # point; -W error: it must not warn either
    result = pytester.runpytest_subprocess("-W", "error", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_forgetting_to_deliver_fails_plainly*",
            "*AssertionError: nothing delivered*",
        ]
    )
