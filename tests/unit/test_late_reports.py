"""The reports the simulator sends after the session (stage "later" rules): what they say, read
back by the standard library's parser and by postlane's own (the one the bounce listener uses),
and how a stage "later" rule is read from a scenario."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import Message

import pytest

from postlane.classify import ReplyClass, classify
from postlane.config import BouncesConfig
from postlane.errors import ConfigError
from postlane.feedback.reports import Action, ReportKind, parse_report
from postlane.simulate import Scenario, Simulator, Stage
from postlane.simulate.feedback import ATTACH_LIMIT, Arrival, LateReport
from postlane.simulate.scenario import DEFAULT_LATER_DELAY, DEFAULT_REPORTS_TO

T0 = 1_800_000_000.0
HOST = "mx.simulator.postlane.test"
RETURN_PATH = "b-12-abcdefghijklmnop@bounces.test"
ORIGINAL = (
    b"From: Shop <app@shop.example>\r\n"
    b"To: ada@example.net\r\n"
    b"Subject: Your order\r\n"
    b"Message-ID: <order-1@shop.example>\r\n"
    b"\r\n"
    b"It shipped.\r\n"
)
GMAIL_NO_SUCH_USER = (
    "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
    "550 5.1.1 double-checking the recipient's email address for typos. x1si2 - gsmtp"
)


def arrival(content: bytes = ORIGINAL, return_path: str = RETURN_PATH) -> Arrival:
    return Arrival(return_path, content, "192.0.2.7", "out.shop.example", T0, "000000002A")


def parts_of(message: Message) -> list[Message]:
    payload = message.get_payload()
    assert isinstance(payload, list)
    return [part for part in payload if isinstance(part, Message)]


def parts(content: bytes) -> list[Message]:
    report = message_from_bytes(content, policy=policy.compat32)
    assert report.get_content_type() == "multipart/report"
    return parts_of(report)


def test_a_failed_dsn_says_action_failed_the_status_and_the_reply_with_the_headers() -> None:
    reply = "550 5.1.1 <ada@example.net>: Recipient address rejected: User unknown"
    content = LateReport.dsn(arrival(), ["ada@example.net"], [reply]).compose(HOST, T0 + 2, 1)

    report = message_from_bytes(content, policy=policy.compat32)
    assert report["To"] == f"<{RETURN_PATH}>"
    assert report["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
    assert report.get_param("report-type") == "delivery-status"
    notice, status, headers = parts(content)
    assert notice.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    status_text = content.split(b"message/delivery-status\r\n\r\n", 1)[1].decode()
    assert f"Reporting-MTA: dns; {HOST}\r\n" in status_text
    assert "Action: failed\r\nStatus: 5.1.1\r\n" in status_text
    quoted = headers.get_payload()
    assert isinstance(quoted, str)
    assert quoted.startswith(f"Return-Path: <{RETURN_PATH}>\r\n")
    assert "Message-ID: <order-1@shop.example>" in quoted and "It shipped" not in quoted

    parsed = parse_report(content)
    assert parsed.kind is ReportKind.DSN
    assert parsed.message_id == "<order-1@shop.example>"
    [recipient] = parsed.recipients
    assert (recipient.action, recipient.recipient, recipient.status) == (
        Action.FAILED, "ada@example.net", "5.1.1",
    )  # fmt: skip
    assert recipient.diagnostic == reply
    assert classify(recipient.reply()).cls is ReplyClass.HARD_BOUNCE


def test_a_4xx_reply_makes_a_delayed_dsn_and_a_multi_line_reply_is_folded() -> None:
    full = "452 4.2.2 <bo@example.net>: Recipient address rejected: Mailbox full"
    content = LateReport.dsn(
        arrival(), ["ada@example.net", "bo@example.net"], [GMAIL_NO_SUCH_USER, full]
    ).compose(HOST, T0 + 2, 1)
    parsed = parse_report(content)
    ada, bo = parsed.recipients
    assert (ada.action, ada.status) == (Action.FAILED, "5.1.1")
    assert classify(ada.reply()).cls is ReplyClass.HARD_BOUNCE
    assert "double-checking the recipient's email address" in (ada.diagnostic or "")
    assert (bo.action, bo.status) == (Action.DELAYED, "4.2.2")
    assert classify(bo.reply()).cls is ReplyClass.SOFT_BOUNCE
    assert b"Will-Retry-Until: " in content
    alone = LateReport.dsn(arrival(), ["bo@example.net"], [full]).compose(HOST, T0, 2)
    assert b"Subject: Delayed Mail (still being retried)" in alone


def test_a_reply_without_an_enhanced_code_is_given_a_status_from_its_class() -> None:
    content = LateReport.dsn(arrival(), ["a@example.net"], ["554 no"]).compose(HOST, T0, 1)
    [recipient] = parse_report(content).recipients
    assert recipient.status == "5.0.0"


def test_a_complaint_is_an_arf_abuse_report_with_the_original_and_its_return_path() -> None:
    content = LateReport.complaint(arrival(), "ada@example.net").compose(HOST, T0 + 2, 1)
    report = message_from_bytes(content, policy=policy.compat32)
    assert report["To"] == f"<{RETURN_PATH}>"
    assert report.get_param("report-type") == "feedback-report"
    _text, feedback, original = parts(content)
    assert feedback.get_content_type() == "message/feedback-report"
    fields = content.split(b"message/feedback-report\r\n\r\n", 1)[1].decode()
    assert "Feedback-Type: abuse\r\n" in fields
    assert "Original-Rcpt-To: <ada@example.net>\r\n" in fields
    assert f"Original-Mail-From: <{RETURN_PATH}>\r\n" in fields
    assert original.get_content_type() == "message/rfc822"
    [attached] = parts_of(original)
    assert attached["Return-Path"] == f"<{RETURN_PATH}>"
    assert attached["Message-ID"] == "<order-1@shop.example>"
    assert attached.get_payload() == "It shipped.\r\n"

    parsed = parse_report(content)
    assert parsed.kind is ReportKind.ARF
    assert parsed.complaint is not None and parsed.complaint.is_complaint
    assert parsed.complaint.recipients == ("ada@example.net",)
    assert parsed.message_id == "<order-1@shop.example>"


def test_a_complaint_about_a_large_message_attaches_only_its_headers() -> None:
    big = ORIGINAL + b"x" * (ATTACH_LIMIT + 1)
    content = LateReport.complaint(arrival(big), "ada@example.net").compose(HOST, T0, 1)
    *_, original = parts(content)
    assert original.get_content_type() == "text/rfc822-headers"
    assert len(content) < 10_000
    assert parse_report(content).message_id == "<order-1@shop.example>"


def test_a_message_with_bare_line_feeds_is_quoted_with_crlf() -> None:
    content = LateReport.complaint(
        arrival(ORIGINAL.replace(b"\r\n", b"\n")), "ada@example.net"
    ).compose(HOST, T0, 1)
    assert b"\n" not in content.replace(b"\r\n", b"")


# -- reading stage "later" rules ----------------------------------------------------------------


def test_a_later_rule_reports_after_a_second_or_two_unless_its_delay_says_otherwise() -> None:
    scenario = Scenario.from_dict(
        {
            "rules": [
                {"local": "a*", "stage": "later", "reply": "550 5.1.1 unknown"},
                {"local": "b*", "stage": "later", "complaint": True, "delay": "0s"},
            ]
        }
    )
    bounce, complaint = scenario.rules
    assert (bounce.stage, bounce.delay, bounce.complaint) == (
        Stage.LATER, DEFAULT_LATER_DELAY, False,
    )  # fmt: skip
    assert (complaint.stage, complaint.delay, complaint.complaint) == (Stage.LATER, None, True)
    assert scenario.reports_to == DEFAULT_REPORTS_TO


def test_reports_go_to_postlanes_default_bounce_listener_unless_told() -> None:
    assert "{}:{}".format(*DEFAULT_REPORTS_TO) == BouncesConfig().listen
    assert Scenario.from_dict({"reports_to": "[::1]:2600"}).reports_to == ("::1", 2600)


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ({"stage": "later"}, "reply"),
        ({"stage": "later", "reply": "250 2.0.0 ok"}, "reply"),
        ({"stage": "later", "drop": True}, "drop"),
        ({"stage": "later", "complaint": True, "reply": "550 5.1.1 x"}, "complaint"),
        ({"complaint": True}, "complaint"),
        ({"stage": "data", "complaint": True}, "complaint"),
        ({"stage": "later", "complaint": "yes"}, "complaint"),
    ],
)
def test_a_bad_later_rule_is_a_one_line_error_naming_the_key(
    rule: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Scenario.from_dict({"rules": [rule]}, source="s.toml")
    assert f"scenario s.toml: rules[1].{key}: " in caught.value.message
    assert "\n" not in caught.value.message


@pytest.mark.parametrize("value", ["127.0.0.1:0", "nowhere", 2526])
def test_a_bad_reports_to_is_a_one_line_error(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^scenario \(dict\): reports_to: expected "):
        Scenario.from_dict({"reports_to": value})


def test_a_simulators_bad_reports_to_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError, match=r"^reports_to: expected HOST:PORT"):
        Simulator(Scenario(name="x"), reports_to="nowhere")
    simulator = Simulator(Scenario(name="x"), reports_to="127.0.0.1:2600")
    assert simulator.scenario.reports_to == ("127.0.0.1", 2600)
