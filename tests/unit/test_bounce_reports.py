"""Reading bounces, complaints and automatic replies: the samples of tests/data/feedback (their
sources are in its README) each read as the format they are, and each recipient's diagnostic
classifies as a synchronous reply with the same words would. Bad input has an outcome, never
an exception."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postlane.classify import ReplyClass, classify
from postlane.feedback.reports import Action, RecipientStatus, ReportKind, parse_report

DATA = Path(__file__).parent.parent / "data" / "feedback"


def sample(name: str) -> bytes:
    """A sample as it arrives over SMTP: CRLF line ends."""
    return (DATA / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


#: name -> (kind, [(action, address, class)], the original's Message-ID)
BOUNCES = {
    "postfix-failed.eml": (
        ReportKind.DSN,
        [(Action.FAILED, "nobody@example.net", ReplyClass.HARD_BOUNCE)],
        "<m1@shop.example>",
    ),
    "postfix-delayed.eml": (
        ReportKind.DSN,
        [(Action.DELAYED, "slow@example.net", ReplyClass.SOFT_BOUNCE)],
        "<m2@shop.example>",
    ),
    "rfc3464-failed.eml": (  # failed after days of timeouts: the class of the last reply
        ReportKind.DSN,
        [(Action.FAILED, "louisl@larry.slip.example.edu", ReplyClass.TEMPORARY)],
        "<199407022110.RAA21312@shop.example>",
    ),
    "rfc3464-delayed.eml": (
        ReportKind.DSN,
        [(Action.DELAYED, "ada@mailbox.example.org", ReplyClass.SOFT_BOUNCE)],
        "<receipt-1@shop.example>",
    ),
    "rfc3464-multiple.eml": (
        ReportKind.DSN,
        [
            (Action.FAILED, "arathib@vnet.example.com", ReplyClass.HARD_BOUNCE),
            (Action.DELAYED, "johnh@hpnjld.example.com", ReplyClass.TEMPORARY),
            (Action.FAILED, "wsnell@sdcc13.example.edu", ReplyClass.HARD_BOUNCE),
        ],
        "<199407081321.JAA13162@shop.example>",
    ),
    "gmail-dsn.eml": (
        ReportKind.DSN,
        [(Action.FAILED, "erin@gmail.example", ReplyClass.HARD_BOUNCE)],
        "<reset-3@shop.example>",
    ),
    "microsoft-365-dsn.eml": (
        ReportKind.DSN,
        [(Action.FAILED, "dave@contoso.example", ReplyClass.HARD_BOUNCE)],
        "<welcome-9@shop.example>",
    ),
    "qmail-failure.eml": (
        ReportKind.PLAIN,
        [(Action.FAILED, "ada@mailbox.example", ReplyClass.HARD_BOUNCE)],
        "<order-42@shop.example>",
    ),
    "qmail-remote.eml": (
        ReportKind.PLAIN,
        [(Action.FAILED, "bob@corp.example", ReplyClass.HARD_BOUNCE)],
        "<order-43@shop.example>",
    ),
    "exim-failure.eml": (
        ReportKind.PLAIN,
        [(Action.FAILED, "ada@mailbox.example", ReplyClass.HARD_BOUNCE)],
        "<order-44@shop.example>",
    ),
    "exim-delay.eml": (
        ReportKind.PLAIN,
        [(Action.DELAYED, "ada@mailbox.example", ReplyClass.SOFT_BOUNCE)],
        None,
    ),
    "microsoft-ndr-text.eml": (
        ReportKind.PLAIN,
        [(Action.FAILED, "carol@corp.example", ReplyClass.HARD_BOUNCE)],
        "<order-45@shop.example>",
    ),
    "gmail-text-failure.eml": (
        ReportKind.PLAIN,
        [(Action.FAILED, "frank@corp.example", ReplyClass.POLICY_BLOCK)],
        "<order-46@shop.example>",
    ),
    "yahoo-failure.eml": (
        ReportKind.PLAIN,
        [(Action.FAILED, "grace@yahoo.example", ReplyClass.HARD_BOUNCE)],
        "<order-47@shop.example>",
    ),
    "sendmail-failure.eml": (
        ReportKind.PLAIN,
        [(Action.FAILED, "heidi@uni.example", ReplyClass.HARD_BOUNCE)],
        "<order-48@shop.example>",
    ),
    "microsoft-delay-text.eml": (  # Outlook's delay notice: still trying, nobody bounced
        ReportKind.PLAIN,
        [(Action.DELAYED, "ivan@corp.example", ReplyClass.TEMPORARY)],
        "<order-53@shop.example>",
    ),
    "malformed-mime.eml": (  # an unclosed boundary and a base64 delivery-status part
        ReportKind.DSN,
        [(Action.FAILED, "mallory@broken.example", ReplyClass.HARD_BOUNCE)],
        "<order-52@shop.example>",
    ),
}


@pytest.mark.parametrize("name", sorted(BOUNCES))
def test_each_bounce_sample_reads_as_its_format_with_each_recipients_class(name: str) -> None:
    kind, expected, message_id = BOUNCES[name]
    report = parse_report(sample(name))
    assert report.kind is kind, report.note
    read = [
        (status.action, status.recipient, classify(status.reply()).cls)
        for status in report.recipients
    ]
    assert read == expected
    assert report.message_id == message_id


def test_the_diagnostic_keeps_the_remote_servers_words() -> None:
    [status] = parse_report(sample("postfix-failed.eml")).recipients
    assert status.status == "5.1.1" and status.remote_mta == "127.0.0.1"
    assert status.reply() == (
        "550 5.1.1 <nobody@example.net>: Recipient address rejected: "
        "User unknown in local recipient table"
    )
    [ndr] = parse_report(sample("microsoft-ndr-text.eml")).recipients
    assert ndr.reply() == (
        "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
    )
    [qmail] = parse_report(sample("qmail-failure.eml")).recipients
    assert qmail.status == "5.1.1" and "no mailbox here by that name" in qmail.reply()
    # Gmail's multi-line reply folded into one field: its lines' text, as a synchronous reply
    [gmail] = parse_report(sample("gmail-dsn.eml")).recipients
    assert gmail.reply() == (
        "550 5.1.1 The email account that you tried to reach does not exist. Please try "
        "double-checking the recipient's email address for typos or unnecessary spaces. For "
        "more information, go to https://support.google.example/mail/?p=NoSuchUser "
        "a1si12345qkb.123 - gsmtp"
    )


def test_a_status_without_a_diagnostic_gets_a_code_that_suppresses_nobody_by_accident() -> None:
    assert RecipientStatus(Action.FAILED, status="5.1.1").reply() == "550 5.1.1"
    assert RecipientStatus(Action.FAILED, status="5.4.6").reply() == "554 5.4.6"
    assert classify(RecipientStatus(Action.FAILED).reply()).cls is ReplyClass.POLICY_BLOCK
    assert RecipientStatus(Action.DELAYED).reply() == "451"
    with_status = RecipientStatus(Action.FAILED, status="5.1.1", diagnostic="550 User unknown")
    assert with_status.reply() == "550 5.1.1 User unknown"
    explained = RecipientStatus(Action.FAILED, status="5.4.4", diagnostic="Host not found")
    assert classify(explained.reply()).cls is ReplyClass.HARD_BOUNCE


def test_an_original_recipient_is_read_from_its_xtext() -> None:
    dsn = sample("postfix-failed.eml").replace(
        b"Original-Recipient: rfc822;nobody@example.net",
        b"Original-Recipient: rfc822;No+2Bbody@Example.NET",
    )
    [status] = parse_report(dsn).recipients
    assert status.addresses == ("no+body@example.net", "nobody@example.net")


@pytest.mark.parametrize(
    ("name", "feedback_type", "recipients", "is_complaint", "message_id"),
    [
        ("rfc5965-abuse.eml", "abuse", ("ada@mailbox.example.com",), True,
         "<deals-2005-03-08.7@shop.example>"),
        ("arf-redacted.eml", "abuse", ("redacted@mailbox.example",), True,
         "<spring-sale-1@shop.example>"),
        ("arf-not-spam.eml", "not-spam", ("ada@mailbox.example.com",), False,
         "<deals-2@shop.example>"),
        ("rfc6591-auth-failure.eml", "auth-failure", ("ada@mailbox.example.net",), False,
         "<receipt-2@shop.example>"),
    ],
)  # fmt: skip
def test_feedback_reports_say_what_kind_and_about_whom(
    name: str,
    feedback_type: str,
    recipients: tuple[str, ...],
    is_complaint: bool,
    message_id: str,
) -> None:
    report = parse_report(sample(name))
    assert report.kind is ReportKind.ARF
    assert report.complaint is not None
    assert report.complaint.feedback_type == feedback_type
    assert report.complaint.recipients == recipients
    assert report.complaint.is_complaint is is_complaint
    assert report.message_id == message_id


@pytest.mark.parametrize(
    ("name", "signal"),
    [
        ("autoreply-outlook.eml", "subject"),
        ("autoreply-vacation.eml", "Auto-Submitted: auto-replied"),
        ("autoreply-cpanel.eml", "x-autoreply"),
    ],
)
def test_automatic_replies_are_understood_and_are_not_bounces(name: str, signal: str) -> None:
    report = parse_report(sample(name))
    assert report.kind is ReportKind.AUTO_REPLY
    assert report.note == signal
    assert report.recipients == ()


def test_a_bounce_that_says_auto_replied_is_still_a_bounce() -> None:
    # Exim and Postfix mark their bounces Auto-Submitted: auto-replied, as RFC 3834 asks
    assert parse_report(sample("exim-failure.eml")).kind is ReportKind.PLAIN
    assert parse_report(sample("postfix-failed.eml")).kind is ReportKind.DSN


def test_a_human_reply_is_neither_a_bounce_nor_an_automatic_reply() -> None:
    assert parse_report(sample("human-reply.eml")).kind is ReportKind.UNKNOWN


def test_headers_that_are_not_utf8_are_read_with_replacement_characters() -> None:
    report = parse_report(sample("malformed-mime.eml"))
    assert "Undeliverable" in report.subject and "\ufffd" in report.subject
    report.subject.encode("utf-8")  # no lone surrogates left


_UTF8_DSN = (
    "From: MAILER-DAEMON@mx.example\r\nTo: b-7-x@bounce.example\r\nMIME-Version: 1.0\r\n"
    "Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n"
    "--B\r\nContent-Type: text/plain\r\n\r\nUnzustellbar\r\n"
    "--B\r\nContent-Type: {status_type}\r\n\r\nReporting-MTA: dns; mx.example\r\n\r\n"
    "Final-Recipient: {address_type}; j\u00f6rg@dest.example\r\nAction: failed\r\n"
    "Status: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 Empf\u00e4nger unbekannt\r\n\r\n"
    "--B\r\nContent-Type: {headers_type}\r\n\r\nMessage-ID: <m1@shop.example>\r\n"
    "To: j\u00f6rg@dest.example\r\n\r\n--B--\r\n"
)


@pytest.mark.parametrize(
    ("status_type", "address_type", "headers_type"),
    [
        ("message/delivery-status", "rfc822", "text/rfc822-headers"),
        ("message/global-delivery-status", "utf-8", "message/global-headers"),  # RFC 6533
    ],
)
def test_a_utf8_dsn_keeps_its_words_and_its_address(
    status_type: str, address_type: str, headers_type: str
) -> None:
    """8-bit UTF-8 in a DSN's fields (SMTPUTF8, RFC 6533) is read as UTF-8: the address can be
    matched, the diagnostic says what the server said."""
    content = _UTF8_DSN.format(
        status_type=status_type, address_type=address_type, headers_type=headers_type
    ).encode("utf-8")
    report = parse_report(content)
    [status] = report.recipients
    assert status.recipient == "j\u00f6rg@dest.example"
    assert status.diagnostic == "550 5.1.1 Empf\u00e4nger unbekannt"
    assert report.message_id == "<m1@shop.example>"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\xff" * 100,
        b"Content-Type: multipart/report; boundary=x\r\n\r\n--x\r\n",
        b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\nno boundary at all",
        b"Content-Type: message/delivery-status\r\n\r\nAction: exploded\r\nStatus: 9.9.9\r\n",
        b"Subject: " + b"A" * 100_000 + b"\r\n\r\nbody",
    ],
)
def test_broken_input_has_an_outcome_and_never_raises(content: bytes) -> None:
    report = parse_report(content)
    assert report.kind in set(ReportKind)


def test_an_unknown_dsn_action_is_read_as_failed() -> None:
    content = (
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n\r\n"
        b"Final-Recipient: rfc822; a@b.example\r\nAction: exploded\r\n\r\n--b--\r\n"
    )
    [status] = parse_report(content).recipients
    assert status.action is Action.FAILED


def test_only_the_head_of_a_huge_report_is_parsed() -> None:
    head = sample("postfix-failed.eml")
    huge = head.replace(b"\r\nHello\r\n", b"\r\n" + b"x" * 76 * 400_000 + b"\r\n")
    assert len(huge) > 25_000_000
    report = parse_report(huge)
    assert report.kind is ReportKind.DSN and report.recipients[0].recipient == "nobody@example.net"


def test_a_report_whose_status_part_is_past_the_head_read_is_not_guessed_from_its_prose() -> None:
    """A 2 MB first part, then the delivery status (5.1.1): what is read is a bounce's prose
    without its status; its class would be a guess (it was read as a policy block)."""
    notice = sample("postfix-failed.eml")
    boundary = b"--BD3862226C4.1796196203/postfix.test\r\nContent-Description: Delivery report"
    at = notice.index(boundary)
    huge = notice[:at] + b"x" * 76 * 30_000 + b"\r\n" + notice[at:]
    assert len(huge) > 2_000_000
    report = parse_report(huge)
    assert report.kind is ReportKind.UNREADABLE and "status part" in report.note


def test_a_header_in_a_charset_named_in_8_bit_is_read_as_it_is() -> None:
    """Found by the fuzz test below: an encoded word whose charset name holds a non-ASCII byte
    raised CharsetError out of parse_report (and out of its own fallback, which reads the
    Subject again), so the bounce listener could neither keep nor refuse the report."""
    raw = b"From: MAILER-DAEMON@x.example\r\nSubject: =?x-unknown\xff?q?abc?=\r\n\r\nbody\r\n"
    report = parse_report(raw)
    assert report.kind is not ReportKind.DSN and "x-unknown" in report.subject


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(p.name for p in DATA.glob("*.eml"))),
    cut=st.integers(min_value=0, max_value=4000),
    junk=st.binary(max_size=200),
    at=st.integers(min_value=0, max_value=4000),
)
def test_mangled_samples_never_raise(name: str, cut: int, junk: bytes, at: int) -> None:
    content = sample(name)
    mangled = content[:at] + junk + content[at:][: max(0, cut)]
    report = parse_report(mangled)
    assert report.kind in set(ReportKind)
    for status in report.recipients:
        classify(status.reply())
