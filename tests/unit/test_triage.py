"""Dead-letter triage: replies grouped with their per-message details masked."""

from __future__ import annotations

from postlane.triage import normalize_reply


def test_queue_and_session_ids_are_masked_but_smtp_extensions_are_not() -> None:
    """An audit's ``dlq list`` read "the relay does not support <id> for non-ASCII
    addresses": SMTPUTF8 looked like a queue id."""
    assert normalize_reply("250 2.0.0 Ok: queued as 4FZ3Y9C0123") == "250 2.0.0 Ok: queued as <id>"
    assert normalize_reply("421 4.7.0 try later gsmtp a1b2c3d4e5") == (
        "421 4.7.0 try later gsmtp <id>"
    )
    for extension in ("SMTPUTF8", "8BITMIME", "BINARYMIME"):
        text = f"553 5.6.7 the relay does not support {extension} for non-ASCII addresses"
        assert normalize_reply(text) == text


def test_gmails_reply_id_is_masked_however_short() -> None:
    """An operator's audit: 200 identical NoSuchUser bounces from the simulator came out in 16
    dead-letter groups, their replies differing only by a short id before "- gsmtp"."""
    replies = [
        f"5.1.1 The email account that you tried to reach does not exist. {tail} - gsmtp"
        for tail in ("3sib", "6sib", "d75a77b69052e-4c1b0e3f8a1si123456qtb.271")
    ]
    assert len({normalize_reply(reply) for reply in replies}) == 1
