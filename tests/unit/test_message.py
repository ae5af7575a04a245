from __future__ import annotations

import dataclasses
import email
from email import policy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.addresses import parse_address
from postlane.errors import MessageTooLarge, ValidationError
from postlane.message import (
    Attachment,
    Lane,
    Message,
    new_message_id,
    prepare,
    submission_fingerprint,
)

LIMIT = 1_000_000


def render(**fields: object) -> email.message.EmailMessage:
    prepared = prepare(Message(**fields), max_size=LIMIT)  # type: ignore[arg-type]
    parsed = email.message_from_bytes(prepared.content, policy=policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def test_a_simple_message_renders_with_message_id_and_date() -> None:
    prepared = prepare(
        Message(sender="App <app@example.com>", to=["ada@example.net"], subject="Hi", text="Hello"),
        max_size=LIMIT,
    )
    parsed = email.message_from_bytes(prepared.content, policy=policy.default)
    assert parsed["From"] == "App <app@example.com>"
    assert parsed["To"] == "ada@example.net"
    assert parsed["Subject"] == "Hi"
    assert parsed["Date"]
    assert parsed["Message-ID"] == prepared.message_id == f"<{prepared.id}@example.com>"
    assert prepared.sender == "app@example.com"
    assert [r.address for r in prepared.recipients] == ["ada@example.net"]
    assert b"\r\n" in prepared.content and b"\n" not in prepared.content.replace(b"\r\n", b"")


def test_bcc_is_an_envelope_recipient_and_never_a_header() -> None:
    prepared = prepare(
        Message(sender="a@example.com", to=["b@example.net"], bcc=["secret@example.org"], text="x"),
        max_size=LIMIT,
    )
    assert [r.address for r in prepared.recipients] == ["b@example.net", "secret@example.org"]
    assert b"secret@example.org" not in prepared.content
    assert b"Bcc" not in prepared.content


def test_only_bcc_gives_undisclosed_recipients() -> None:
    parsed = render(sender="a@example.com", bcc=["x@example.org"], text="x")
    assert "undisclosed" in parsed["To"]


def test_text_and_html_make_an_alternative_with_attachments() -> None:
    parsed = render(
        sender="a@example.com",
        to=["b@example.net"],
        cc=["c@example.net"],
        text="plain",
        html="<p>html</p>",
        attachments=[Attachment("r.pdf", b"%PDF-1.4", "application/pdf")],
    )
    assert parsed["Cc"] == "c@example.net"
    assert parsed.get_content_type() == "multipart/mixed"
    body = parsed.get_body(("plain",))
    assert body is not None and body.get_content().strip() == "plain"
    html = parsed.get_body(("html",))
    assert html is not None and "html" in html.get_content()
    attachments = list(parsed.iter_attachments())
    assert attachments[0].get_filename() == "r.pdf"
    assert attachments[0].get_content() == b"%PDF-1.4"


def test_non_ascii_subject_is_encoded() -> None:
    parsed = render(sender="a@example.com", to=["b@example.net"], subject="Grüße ✓", text="x")
    assert parsed["Subject"] == "Grüße ✓"


def test_recipients_are_deduplicated_case_insensitively() -> None:
    prepared = prepare(
        Message(
            sender="a@example.com",
            to=["B@Example.net", "b@example.net"],
            cc=["b@EXAMPLE.NET"],
            text="x",
        ),
        max_size=LIMIT,
    )
    assert len(prepared.recipients) == 1
    assert prepared.recipients[0].domain == "example.net"


def test_client_message_id_is_kept() -> None:
    prepared = prepare(
        Message(
            sender="a@example.com",
            to=["b@example.net"],
            text="x",
            headers={"Message-ID": "<mine@app.example>"},
        ),
        max_size=LIMIT,
    )
    assert prepared.message_id == "<mine@app.example>"


def test_a_word_too_long_for_a_header_line_still_makes_lines_of_at_most_998() -> None:
    """RFC 5322 2.1.1: plain text folds only at spaces, so a 2,000-character subject made one
    2,000-character line; as encoded words it folds anywhere, and reads back the same."""
    subject, value = "x" * 2000, "v" * 100_000
    prepared = prepare(
        Message(
            sender="a@example.com", to=["b@example.net"], subject=subject, text="x",
            headers={"X-Long": value},
        ),
        max_size=10**7,
    )  # fmt: skip
    assert max(len(line) for line in prepared.content.split(b"\r\n")) <= 998
    parsed = email.message_from_bytes(prepared.content, policy=policy.default)
    assert parsed["Subject"] == subject and parsed["X-Long"] == value
    assert prepared.subject == subject
    # ordinary text stays plain
    assert (
        b"Subject: Hello there"
        in prepare(
            Message(sender="a@example.com", to=["b@example.net"], subject="Hello there", text="x"),
            max_size=10**7,
        ).content
    )


def test_extra_headers_are_added() -> None:
    parsed = render(
        sender="a@example.com",
        to=["b@example.net"],
        text="x",
        headers={"Reply-To": "help@example.com", "List-Unsubscribe": "<mailto:u@example.com>"},
    )
    assert parsed["Reply-To"] == "help@example.com"
    assert parsed["List-Unsubscribe"] == "<mailto:u@example.com>"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"to": ["not-an-address"]}, "not a valid address"),
        ({"to": ["a@b@c.example"]}, "not a valid address"),
        ({"sender": "nobody"}, "not a valid address"),
        ({"to": []}, "no recipient"),
        ({"subject": "hi\r\nBcc: victim@example.org"}, "header injection"),
        ({"subject": "hi\nX-Evil: 1"}, "header injection"),
        ({"headers": {"X-Tag": "a\r\nBcc: v@example.org"}}, "header injection"),
        ({"headers": {"X Bad": "v"}}, "not a valid header name"),
        ({"headers": {"Bcc": "v@example.org"}}, "cannot be set"),
        ({"headers": {"From": "x@example.org"}}, "cannot be set"),
        ({"headers": {"Message-ID": "nonsense"}}, "Message-ID"),
        ({"to": ["Ada\r\n <ada@example.net>"]}, "header injection"),
        ({"lane": "urgent"}, "unknown lane"),
        ({"text": None}, "no body"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "x" * 300}, "idempotency_key"),
        ({"metadata": {"x": object()}}, "metadata"),
        ({"attachments": [Attachment("a\r\nb", b"x")]}, "header injection"),
        ({"attachments": [Attachment("a.bin", b"x", "nonsense")]}, "content type"),
    ],
)
def test_refusals_are_clear(fields: dict[str, object], match: str) -> None:
    base: dict[str, object] = {"sender": "a@example.com", "to": ["b@example.net"], "text": "hello"}
    base.update(fields)
    with pytest.raises(ValidationError, match=match):
        prepare(Message(**base), max_size=LIMIT)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("Return-Path", "the receiving server adds it from the envelope sender, RFC 5321 4.4"),
        ("return-path", "the receiving server adds it from the envelope sender, RFC 5321 4.4"),
        ("X-Postlane-Lane", "use the 'lane' field"),
        ("x-postlane-idempotency-key", "use the 'idempotency_key' field"),
        ("X-Postlane-Metadata", "use the 'metadata' field"),
        ("X-Postlane-Send-At", "use the 'send_at' field"),
        ("X-Postlane-Expires-At", "use the 'expires_at' field"),
        ("X-Postlane-Envelope-To", "X-Postlane-* headers are postlane's own"),
        ("X-POSTLANE-PRIORITY", "X-Postlane-* headers are postlane's own"),
    ],
)
def test_return_path_and_postlane_headers_are_refused_in_headers(name: str, says: str) -> None:
    """RFC 5321 4.4: the sender must not write Return-Path (the receiving server adds it);
    X-Postlane-* are postlane's control headers, read and removed by SMTP submission and the
    Django backend: in ``headers`` they would go out to every recipient."""
    message = Message(sender="a@example.com", to=["b@example.net"], text="x", headers={name: "v"})
    with pytest.raises(ValidationError) as refused:
        prepare(message, max_size=LIMIT)
    assert refused.value.field == "headers"
    assert refused.value.message.startswith(f"header {name} cannot be set in headers (")
    assert says in refused.value.message


def test_headers_that_merely_resemble_reserved_ones_are_kept() -> None:
    parsed = render(
        sender="a@example.com",
        to=["b@example.net"],
        text="x",
        headers={"X-Return-Path": "a", "X-Postlaneish": "b", "X-Mailer-Postlane-Lane": "c"},
    )
    assert (parsed["X-Return-Path"], parsed["X-Postlaneish"]) == ("a", "b")
    assert parsed["X-Mailer-Postlane-Lane"] == "c"


def test_over_max_size_is_refused() -> None:
    with pytest.raises(MessageTooLarge, match="over the limit"):
        prepare(
            Message(sender="a@example.com", to=["b@example.net"], text="x" * 2000), max_size=1000
        )


def test_too_many_recipients() -> None:
    with pytest.raises(ValidationError, match="too many recipients"):
        prepare(
            Message(
                sender="a@example.com", to=[f"u{i}@example.net" for i in range(1001)], text="x"
            ),
            max_size=LIMIT,
        )


def test_lanes_parse_case_insensitively() -> None:
    prepared = prepare(
        Message(sender="a@example.com", to=["b@example.net"], text="x", lane="HIGH"), max_size=LIMIT
    )
    assert prepared.lane is Lane.HIGH


RAW = (
    b"From: App <app@example.com>\n"
    b"To: ada@example.net\n"
    b"Bcc: hidden@example.org\n"
    b"Subject: raw one\n"
    b"\n"
    b"body line\n"
)


def test_raw_message_gets_message_id_and_crlf_and_loses_bcc() -> None:
    prepared = prepare(Message(sender="", raw=RAW), max_size=LIMIT)
    assert prepared.sender == "app@example.com"
    assert [r.address for r in prepared.recipients] == ["ada@example.net", "hidden@example.org"]
    head = prepared.content.split(b"\r\n\r\n")[0]
    assert head.startswith(b"From: App <app@example.com>\r\n")
    assert b"\r\nMessage-ID: " + prepared.message_id.encode() + b"\r\n" in head + b"\r\n"
    assert b"\r\nDate: " in head
    assert b"Bcc" not in prepared.content
    assert b"\r\nbody line\r\n" in prepared.content
    assert prepared.subject == "raw one"


def test_raw_message_keeps_its_message_id_and_envelope() -> None:
    raw = b"Message-ID: <keep@example.com>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n" + RAW
    prepared = prepare(
        Message(sender="bounce@example.com", to=["x@example.net"], raw=raw), max_size=LIMIT
    )
    assert prepared.message_id == "<keep@example.com>"
    assert prepared.content.startswith(b"Message-ID: <keep@example.com>")
    assert prepared.content.count(b"Message-ID") == 1 and prepared.content.count(b"Date:") == 1
    assert [r.address for r in prepared.recipients] == ["x@example.net"]
    assert prepared.sender == "bounce@example.com"


@pytest.mark.parametrize(
    "first",
    [
        b"From : CEO <ceo@other.example>\r\n",  # obsolete syntax: a DKIM signer's From
        b"From ceo@other.example Mon Jan  1 00:00:00 2024\r\n",  # an mbox separator line
    ],
)
def test_a_raw_header_line_that_is_no_field_is_refused(first: bytes) -> None:
    """An audit: Python's parser reads ``From :`` on the first line as an mbox separator, not
    a header, so the one-From check passed while a DKIM signer signed for other.example."""
    with pytest.raises(ValidationError, match="is no header field") as caught:
        prepare(Message(sender="app@example.com", raw=first + RAW), max_size=LIMIT)
    assert caught.value.field == "raw" and "line 1 " in caught.value.message


def test_a_raw_message_loses_its_bcc_resent_bcc_and_return_path_as_with_postfix() -> None:
    """A security audit: a Return-Path in a submitted message went out to recipients (RFC 5321
    4.4: the receiving server adds it from the envelope)."""
    raw = (
        b"Return-Path: <b-1-forged@bounces.example.com>\r\n"
        b"Resent-Bcc: secret@example.org,\r\n other@example.org\r\n" + RAW
    )
    prepared = prepare(
        Message(sender="app@example.com", to=["x@example.net"], raw=raw), max_size=LIMIT
    )
    head = prepared.content.split(b"\r\n\r\n", 1)[0].lower()
    for gone in (b"return-path", b"bcc", b"forged", b"hidden", b"secret", b"other@"):
        assert gone not in head
    assert prepared.content.endswith(b"body line\r\n")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"no header section at all", "malformed"),
        (b" folded: first\r\n\r\nbody", "malformed"),
        (b"Subject: x\r\n\r\nbody", "no sender"),
    ],
)
def test_bad_raw_messages_are_refused(raw: bytes, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        prepare(Message(sender="", to=["b@example.net"], raw=raw), max_size=LIMIT)


def test_a_raw_line_over_998_characters_is_refused_naming_it() -> None:
    """RFC 5322 2.1.1: a relay wraps a longer line (Postfix's smtp_line_length_limit), which
    breaks the DKIM signature made before it; 998 characters are taken, 999 are not."""
    head = b"From: a@example.com\r\nSubject: x\r\n\r\n"
    fits = prepare(
        Message(sender="", to=["b@example.net"], raw=head + b"a" * 998 + b"\r\n"),
        max_size=LIMIT,
    )
    assert b"a" * 998 + b"\r\n" in fits.content
    for ending in (b"\r\n", b"\n"):
        raw = head + b"short\r\n" + b"a" * 999 + ending
        with pytest.raises(ValidationError, match="line 5 of the raw message is longer than 998"):
            prepare(Message(sender="", to=["b@example.net"], raw=raw), max_size=LIMIT)


def test_a_raw_message_with_mixed_or_bare_line_ends_gets_crlf() -> None:
    for ending in (b"\n", b"\r"):
        raw = RAW.replace(b"\r\n", ending)
        prepared = prepare(Message(sender="", raw=raw), max_size=LIMIT)
        assert b"\r\nbody line\r\n" in prepared.content
        assert b"\n" not in prepared.content.replace(b"\r\n", b"")
        assert b"\r" not in prepared.content.replace(b"\r\n", b"")
    mixed = RAW.replace(b"\r\n", b"\n", 1)
    assert prepare(Message(sender="", raw=mixed), max_size=LIMIT).content.count(b"\n") == (
        prepare(Message(sender="", raw=RAW), max_size=LIMIT).content.count(b"\r\n")
    )


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (b"X-A: b\r\n" * 1996, None),  # 2,000 fields with From, To, Bcc and Subject
        (b"X-A: b\r\n" * 1997, "2,001 header fields; at most 2,000"),
        (b"X-Long: a\r\n" + (b" " + b"b" * 900 + b"\r\n") * 1100, None),  # one field, 0.99 MB
        (b"X-Long: a\r\n" + (b" " + b"b" * 900 + b"\r\n") * 1200, "header section is"),
    ],
)
def test_a_raw_header_section_past_its_limits_is_refused_before_it_is_parsed(
    extra: bytes, said: str | None
) -> None:
    """A security audit: 3,000,000 short header fields (24 MB, within the size limit) held
    the serve process's event loop for 15 s while they were parsed. A header section takes at
    most 2,000 fields and 1 MiB (Exim's header_maxsize); a long folded field is one field."""
    raw = RAW.replace(b"\n", b"\r\n").replace(b"raw one\r\n", b"raw one\r\n" + extra, 1)
    message = Message(sender="", raw=raw)
    size = 25_000_000  # the default [smtp] max_size: the limits here are the header's own
    if said is None:
        assert prepare(message, max_size=size).subject == "raw one"
        return
    with pytest.raises(ValidationError, match=said) as refused:
        prepare(message, max_size=size)
    assert refused.value.field == "raw"


def test_a_raw_messages_fingerprint_reads_its_top_header_section_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A review: the fingerprint parsed a raw message part by part, so 3,000,000 header lines
    inside one part (within the size limit, past no header limit) held the event loop 7 s when
    the message had an idempotency key. Now only the top header section is parsed (bounded by
    its limits); the body is read as bytes, its boundaries taken out, so a re-rendering with
    new boundaries is still the same submission."""
    import postlane.message as module

    parsed: list[int] = []
    real = module.BytesHeaderParser

    class Counting(real):  # type: ignore[misc, valid-type]
        def parsebytes(self, text: bytes, headersonly: bool = False) -> Any:
            parsed.append(len(text))
            return super().parsebytes(text, headersonly)

    monkeypatch.setattr(module, "BytesHeaderParser", Counting)
    whole: list[int] = []
    monkeypatch.setattr(email, "message_from_bytes", lambda raw, **_: whole.append(len(raw)))
    inner = b"a: b\r\n" * 50_000
    raw = (
        b"From: a@example.com\r\nTo: b@example.net\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="B1"\r\n\r\n'
        b"--B1\r\n" + inner + b"\r\nx\r\n--B1--\r\n"
    )
    first = prepare(Message(sender="", raw=raw, idempotency_key="k"), max_size=LIMIT)
    assert first.fingerprint is not None and first.fingerprint.startswith("raw2:")
    assert parsed and max(parsed) < 1000  # the top section (a few times), never the part's
    assert whole == []  # nor the whole message, part by part
    again = prepare(
        Message(sender="", raw=raw.replace(b"B1", b"Z9"), idempotency_key="k"), max_size=LIMIT
    )
    other = prepare(
        Message(sender="", raw=raw.replace(b"x\r\n--B1--", b"y\r\n--B1--"), idempotency_key="k"),
        max_size=LIMIT,
    )
    assert first.fingerprint == again.fingerprint != other.fingerprint


def test_raw_with_other_fields_is_refused() -> None:
    with pytest.raises(ValidationError, match="raw"):
        prepare(
            Message(sender="a@example.com", to=["b@example.net"], raw=RAW, subject="x"),
            max_size=LIMIT,
        )


def test_queue_ids_sort_by_time_and_are_unique() -> None:
    first = new_message_id(1_700_000_000.0)
    later = new_message_id(1_700_000_001.0)
    assert first < later
    assert len({new_message_id(1_700_000_000.0) for _ in range(10_000)}) == 10_000
    assert len(first) == 18 and first.isalnum()


def test_display_name_addresses_are_accepted() -> None:
    mailbox = parse_address('"Lovelace, Ada" <Ada@Example.NET>')
    assert mailbox.address == "Ada@example.net"
    assert mailbox.display_name == "Lovelace, Ada"


@given(st.text(min_size=1, max_size=40))
def test_header_values_with_line_breaks_never_render(value: str) -> None:
    message = Message(sender="a@example.com", to=["b@example.net"], text="x", subject=value)
    if len(value.splitlines()) > 1 or any(c < " " and c != "\t" for c in value):
        with pytest.raises(ValidationError):
            prepare(message, max_size=LIMIT)
    else:
        try:
            prepared = prepare(message, max_size=LIMIT)
        except ValidationError:
            return  # e.g. characters the email package refuses: refused, not rendered
        parsed = email.message_from_bytes(prepared.content, policy=policy.default)
        assert set(parsed.keys()) >= {"From", "To", "Subject", "Message-ID"}
        assert "Bcc" not in parsed


# -- the submission's fingerprint (an idempotency key reused with another payload) ---------------


def rendered(body: str, boundary: str, date: str, message_id: str) -> bytes:
    """A multipart message as a framework renders it: its own Date, Message-ID and boundary
    each time."""
    return (
        f"From: app@example.com\r\nTo: ada@example.net\r\nSubject: Receipt\r\nDate: {date}\r\n"
        f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\n{body}\r\n"
        f"--{boundary}\r\nContent-Type: text/html\r\n\r\n<p>{body}</p>\r\n--{boundary}--\r\n"
    ).encode()


def test_a_re_rendered_message_has_the_same_fingerprint() -> None:
    first = Message(sender="", raw=rendered("Total 12", "b1", "Fri, 1 Jan 2027 00:00:00 +0000",
                                            "<1@x>"))  # fmt: skip
    again = Message(sender="", raw=rendered("Total 12", "b2", "Fri, 1 Jan 2027 00:00:05 +0000",
                                            "<2@x>"))  # fmt: skip
    other = Message(sender="", raw=rendered("Total 13", "b1", "Fri, 1 Jan 2027 00:00:00 +0000",
                                            "<1@x>"))  # fmt: skip
    assert submission_fingerprint(first) == submission_fingerprint(again)
    assert submission_fingerprint(first) != submission_fingerprint(other)


def test_the_fingerprint_covers_every_part_of_a_submission_but_its_key() -> None:
    base = Message(sender="app@example.com", to=["ada@example.net"], subject="Hi", text="x",
                   idempotency_key="k", metadata={"order": 1})  # fmt: skip
    same = dataclasses.replace(base, idempotency_key="other", headers={"Date": "now"})
    assert submission_fingerprint(base) == submission_fingerprint(same)
    for change in (
        {"to": ["bob@example.net"]},
        {"cc": ["carol@example.net"]},
        {"subject": "Hello"},
        {"text": "y"},
        {"html": "<p>x</p>"},
        {"lane": "high"},
        {"metadata": {"order": 2}},
        {"headers": {"X-Campaign": "spring"}},
        {"attachments": [Attachment("a.txt", b"1")]},
    ):
        assert submission_fingerprint(dataclasses.replace(base, **change)) != (
            submission_fingerprint(base)
        ), change
    prepared = prepare(base, max_size=10**6)
    assert prepared.fingerprint == submission_fingerprint(base)
    assert (
        prepare(dataclasses.replace(base, idempotency_key=None), max_size=10**6).fingerprint is None
    )


# -- audit finding 5 and 12: what would break later reads is refused at the door ------------------

BASE: dict[str, object] = {"sender": "a@example.com", "to": ["b@example.net"], "text": "hello"}


@pytest.mark.parametrize(
    ("fields", "field", "match"),
    [
        ({"text": "a\x00b"}, "text", "NUL"),
        ({"html": "<p>\x00</p>"}, "html", "NUL"),
        ({"subject": "a\x00b"}, "subject", "NUL"),
        ({"headers": {"X-Tag": "a\x00"}}, "header X-Tag", "NUL"),
        ({"metadata": {"k": "v\x00"}}, "metadata", "NUL"),
        ({"metadata": {"k\x00": "v"}}, "metadata", "NUL"),
        ({"attachments": [Attachment("a\x00.txt", b"x")]}, "attachment filename", "NUL"),
        ({"text": "a\ud800b"}, "text", "lone surrogate"),
        ({"html": "\udfff"}, "html", "lone surrogate"),
        ({"subject": "\ud83d"}, "subject", "lone surrogate"),
        ({"metadata": {"k": ["\udc80"]}}, "metadata", "lone surrogate"),
        ({"to": ["b\ud800@example.net"]}, "to", "lone surrogate"),
        ({"sender": "a\x00@example.com"}, "from", "NUL"),
        ({"metadata": {"n": float("nan")}}, "metadata", "finite"),
        ({"metadata": {"n": [float("inf")]}}, "metadata", "finite"),
        ({"metadata": {"n": 10**5000}}, "metadata", "metadata must be JSON"),
        ({"metadata": ["not", "an", "object"]}, "metadata", "object"),
    ],
)
def test_finding_5_and_12_text_that_later_reads_cannot_show_is_refused(
    fields: dict[str, object], field: str, match: str
) -> None:
    with pytest.raises(ValidationError, match=match) as refused:
        prepare(Message(**{**BASE, **fields}), max_size=LIMIT)  # type: ignore[arg-type]
    assert refused.value.field == field


def test_finding_5_metadata_nested_deeper_than_the_limit_is_refused() -> None:
    deep: object = "leaf"
    for _ in range(100_000):  # what the audit sent: deeper than any recursion limit
        deep = {"d": deep}
    with pytest.raises(ValidationError, match="levels deep"):
        prepare(Message(**{**BASE, "metadata": {"x": deep}}), max_size=LIMIT)  # type: ignore[arg-type]
    shallow: object = "leaf"
    for _ in range(20):
        shallow = [shallow]
    prepare(Message(**{**BASE, "metadata": {"x": shallow}}), max_size=LIMIT)  # type: ignore[arg-type]


def test_finding_12_a_raw_message_with_a_nul_is_refused() -> None:
    raw = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: s\r\n\r\nbo\x00dy\r\n"
    with pytest.raises(ValidationError, match="NUL"):
        prepare(Message(sender="", raw=raw), max_size=LIMIT)
    with pytest.raises(ValidationError, match="NUL"):
        prepare(Message(sender="", raw=raw.decode()), max_size=LIMIT)
    with pytest.raises(ValidationError, match="surrogate"):
        prepare(Message(sender="", raw=raw.decode().replace("\x00", "\ud800")), max_size=LIMIT)
    prepare(Message(sender="", raw=raw.replace(b"\x00", b"")), max_size=LIMIT)


@pytest.mark.parametrize(
    ("fields", "accepted"),
    [
        ({"text": "hello"}, True),
        ({"text": ""}, False),
        ({"text": " \r\n\t"}, False),
        ({"text": None}, False),
        ({"text": "", "html": ""}, False),
        ({"text": "", "html": "<p>hi</p>"}, True),
        ({"text": "", "attachments": [Attachment("a.txt", b"x", "text/plain")]}, True),
    ],
)
def test_issue_17_7_a_message_needs_a_non_empty_body(
    fields: dict[str, object], accepted: bool
) -> None:
    message = Message(**{**BASE, **fields})  # type: ignore[arg-type]
    if accepted:
        prepare(message, max_size=LIMIT)
        return
    with pytest.raises(ValidationError, match="no body") as refused:
        prepare(message, max_size=LIMIT)
    assert refused.value.field == "text"


def test_issue_17_7_an_empty_text_beside_html_is_no_plain_part() -> None:
    parsed = render(sender="a@example.com", to=["b@example.net"], text="", html="<p>hi</p>")
    assert parsed.get_content_type() == "text/html"


@pytest.mark.parametrize(
    ("attachment", "says"),
    [
        (Attachment("b" * 3000 + ".txt", b"hi", "text/plain"), "shorten its filename"),
        (Attachment("ü" * 400, b"hi", "text/plain"), "shorten its filename"),  # RFC 2231 form
        (Attachment("x.txt", b"hi", "application/" + "x" * 3000), "shorten its content type"),
    ],
)
def test_an_attachment_whose_header_no_line_could_hold_is_refused(
    attachment: Attachment, says: str
) -> None:
    """postlane refuses raw lines over 998 characters (RFC 5322 2.1.1) but wrote them itself:
    a 3,000-character filename made a 3,016-character Content-Disposition line."""
    message = Message(
        sender="a@example.com", to=["b@example.net"], text="t", attachments=[attachment]
    )
    with pytest.raises(ValidationError, match=says) as caught:
        prepare(message, max_size=10**6)
    assert caught.value.field == "attachments" and len(caught.value.message) < 200
    fits = Attachment("b" * 900 + ".txt", b"hi", "text/plain")  # long, but one line holds it
    content = prepare(
        Message(sender="a@example.com", to=["b@example.net"], text="t", attachments=[fits]),
        max_size=10**6,
    ).content
    assert max(len(line) for line in content.split(b"\r\n")) <= 998


def test_a_raw_message_without_a_from_header_gets_its_envelope_sender_as_one() -> None:
    """RFC 5322 3.6 requires a From field and receivers refuse mail without one (and a bound
    token's From-header check had nothing to check): as Postfix's cleanup adds a missing
    From, Date and Message-ID, postlane adds the envelope sender."""
    raw = "Subject: no author\r\n\r\nhi\r\n"
    prepared = prepare(
        Message(sender="app@Example.com", to=["b@example.net"], raw=raw), max_size=10**6
    )
    parsed = email.message_from_bytes(prepared.content, policy=policy.SMTP)
    assert parsed.get_all("From") == ["app@example.com"]
    given = "From: Shop <orders@example.com>\r\n" + raw  # one given is kept as it is
    prepared = prepare(
        Message(sender="bounces@example.com", to=["b@example.net"], raw=given), max_size=10**6
    )
    parsed = email.message_from_bytes(prepared.content, policy=policy.SMTP)
    assert parsed.get_all("From") == ["Shop <orders@example.com>"]


@pytest.mark.parametrize(
    "content_type",
    ["multipart/mixed", "MULTIPART/ALTERNATIVE", "message/rfc822", "message/partial"],
)
def test_an_attachment_cannot_be_a_multipart_or_a_message_other_than_message_global(
    content_type: str,
) -> None:
    """An attachment is sent base64-encoded: a multipart so sent has no boundary, and RFC 2046
    5.2 allows message/rfc822 (and the other message types but RFC 6532's message/global)
    only 7bit, 8bit or binary."""
    fields = {"sender": "a@example.com", "to": ["b@example.net"], "text": "see attached"}
    attached = Attachment("part.bin", b"Content-Type: text/plain\r\n\r\nhi\r\n", content_type)
    with pytest.raises(ValidationError, match="cannot be an attachment") as refused:
        prepare(Message(**fields, attachments=[attached]), max_size=LIMIT)  # type: ignore[arg-type]
    assert refused.value.field == "attachments"
    fine = dataclasses.replace(attached, content_type="message/global")
    parsed = render(**fields, attachments=[fine])
    assert [part.get_content_type() for part in parsed.iter_attachments()] == ["message/global"]
