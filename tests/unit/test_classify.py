"""Reply classification: a corpus of real server replies, the decisions behind the rules, parsing.

The corpus (tests/data/replies.toml, and tests/data/provider_replies.toml grown from providers'
documentation for issue 17) holds replies as providers document or send them, each with the class
the queue must act on. The targeted tests below pin the decisions that are not obvious from the
codes (plain 421, unknown 5xx, 4xx "user unknown", the judgement calls of issue 17) and the
parsing of multi-line replies.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postlane.classify import (
    ReplyClass,
    RuleSet,
    Verdict,
    classify,
    default_rules,
    explain,
    load_rules,
    parse_reply,
)
from postlane.errors import ConfigError

DATA = Path(__file__).resolve().parents[1] / "data"
#: the first corpus, and the one grown from providers' documentation for issue 17
CORPORA = (DATA / "replies.toml", DATA / "provider_replies.toml")
_UNCHECKED: Any = object()


@dataclass(frozen=True)
class Case:
    id: str
    reply: str
    cls: ReplyClass
    code: Any
    enhanced: Any
    source: str
    #: the judgement call the reply exercises (provider_replies.toml), "" when not given
    kind: str = ""
    corpus: str = ""


def _load_corpus(path: Path) -> list[Case]:
    with path.open("rb") as handle:
        entries = tomllib.load(handle)["reply"]
    return [
        Case(
            id=entry["id"],
            reply=entry["reply"],
            cls=ReplyClass(entry["class"]),
            code=entry.get("code", _UNCHECKED),
            enhanced=entry.get("enhanced", _UNCHECKED),
            source=entry.get("source", ""),
            kind=entry.get("kind", ""),
            corpus=path.name,
        )
        for entry in entries
    ]


CASES = [case for path in CORPORA for case in _load_corpus(path)]


# --- the corpus ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_real_reply_is_classified_as_expected(case: Case) -> None:
    verdict = classify(case.reply)
    assert verdict.cls == case.cls, f"decided by {explain(verdict)}"
    if case.code is not _UNCHECKED:
        assert verdict.code == case.code
    elif verdict.cls is ReplyClass.CONNECTION:
        assert verdict.code is None
    if case.enhanced is not _UNCHECKED:
        assert verdict.enhanced == (case.enhanced or None)
    assert verdict.rule


def test_issue_17_classification_the_whole_corpus_agrees_with_its_expected_classes() -> None:
    """Agreement over both corpora, measured and printed; anything below 100% fails, naming
    every reply that disagrees and the rule that decided it."""
    mismatches: list[str] = []
    by_corpus: dict[str, list[int]] = {}
    for case in CASES:
        verdict = classify(case.reply)
        tally = by_corpus.setdefault(case.corpus, [0, 0])
        tally[1] += 1
        if verdict.cls == case.cls:
            tally[0] += 1
        else:
            mismatches.append(
                f"  {case.corpus}: {case.id}: expected {case.cls}, got {explain(verdict)}"
            )
    agreed = sum(agree for agree, _ in by_corpus.values())
    report = ", ".join(f"{name} {a}/{n}" for name, (a, n) in sorted(by_corpus.items()))
    print(f"\nagreement: {agreed}/{len(CASES)} = {agreed / len(CASES):.1%} ({report})")
    print("\n".join(mismatches))
    assert not mismatches, f"{len(mismatches)} replies disagree:\n" + "\n".join(mismatches)


def test_issue_17_classification_the_provider_corpus_covers_every_judgement_call() -> None:
    provider = [case for case in CASES if case.corpus == "provider_replies.toml"]
    assert len(provider) >= 150
    kinds = {case.kind for case in provider}
    assert kinds == {
        "connection-limit",
        "receiver-temporary",
        "mailbox-limit",
        "sender-refusal",
        "disabled-recipient",
        "message-content",
        "other",
    }
    for kind in kinds - {"other"}:
        assert sum(case.kind == kind for case in provider) >= 10, kind


def test_corpus_is_large_sourced_and_covers_every_class() -> None:
    assert len(CASES) >= 110
    assert len({case.id for case in CASES}) == len(CASES), "corpus ids must be unique"
    assert all(case.source for case in CASES), "every corpus reply names where it comes from"
    assert {case.cls for case in CASES} == set(ReplyClass)
    multiline = [case for case in CASES if "\r\n" in case.reply.strip()]
    joined = [case for case in CASES if "\n" in case.reply and "\r\n" not in case.reply]
    assert len(multiline) >= 15
    assert len(joined) >= 2


def test_every_provider_rule_has_a_real_reply_in_the_corpus() -> None:
    decided_by = {classify(case.reply).rule for case in CASES}
    provider_rules = {rule.name for rule in default_rules().rules if rule.provider}
    assert provider_rules - decided_by == set()


# --- what naive "4xx retry, 5xx bounce" gets wrong ------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        # 4xx replies that are really policy blocks
        (
            "451 4.7.26 Unauthenticated email is not accepted due to domain's DMARC policy",
            "policy_block",
        ),
        ("421 4.7.0 IP not in whitelist for RCPT domain, closing connection.", "policy_block"),
        ("421 4.7.0 TLS required for RCPT domain, closing connection.", "policy_block"),
        (
            "421 4.7.1 [TS03] All messages from 192.0.2.1 will be permanently deferred",
            "policy_block",
        ),
        (
            "450 4.1.8 <a@nowhere.example>: Sender address rejected: Domain not found",
            "policy_block",
        ),
        # 5xx replies that are really rate limits
        ("550 5.4.5 Daily user sending quota exceeded.", "throttled"),
        ("550 5.7.1 Too many recipients this hour", "throttled"),
        ("554 5.7.0 Too many connections", "throttled"),
        ("550 Ip frequency limited", "throttled"),
        ("550 5.2.2 Submission quota exceeded", "throttled"),
        # a mailbox quota is a soft bounce, whatever the code
        ("552 5.2.2 <a@example.com>: mailbox quota exceeded", "soft_bounce"),
        ("550 5.1.1 <a@example.com>: Mailbox full", "soft_bounce"),
        (
            "552 5.1.1 Boite du destinataire pleine. Recipient overquota. OFR_417 [417]",
            "soft_bounce",
        ),
        # unknown recipients coded as policy or network
        ("550 5.7.1 <a@example.com>: user unknown", "hard_bounce"),
        ("550 5.4.1 Recipient address rejected: Access denied. AS(201806281)", "hard_bounce"),
        # the message itself
        ("552 5.3.4 Message size exceeds fixed limit", "message_error"),
        ("554 5.6.0 Message contains invalid header", "message_error"),
        ("550 5.6.11 SMTPSEND.BareLinefeedsAreIllegal", "message_error"),
        # temporary despite a 4.7.x code
        ("451 4.7.1 Service unavailable - try again later", "temporary"),
        # relaying refused is a configuration / policy error, never the recipient's fault
        ("554 5.7.1 <a@example.org>: Relay access denied", "policy_block"),
        # the sender, not the recipient, is unknown
        ("550 5.1.0 <me@example.com>: Sender address rejected: User unknown", "policy_block"),
        # an IP block for mailing invalid recipients says nothing about this recipient
        ("554 This IP has been blocked for mailing too many invalid recipients", "policy_block"),
    ],
)
def test_reply_wording_decides_over_the_code(reply: str, expected: str) -> None:
    verdict = classify(reply)
    assert verdict.cls == ReplyClass(expected), explain(verdict)


# --- the judgement calls of issue 17 (docs/classification.md) ------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        "421 4.3.2 Too many open connections.",
        "421 4.3.2 The maximum number of concurrent server connections has exceeded a limit",
        "450 too frequent connects from 192.0.2.1, please try again later.",
        "421 4.3.2 All server ports are busy",
        "450 4.7.1 Error: too much mail from 192.0.2.1",
        "421 Connection closed by server. Maximum message count per session reached.",
        "554 5.7.0 Too many connections from 192.0.2.1 (policy)",
        "500 The number of sessions exceeds the maximum",
    ],
)
def test_issue_17_classification_1_a_limit_on_connections_or_sessions_is_throttled(
    reply: str,
) -> None:
    assert classify(reply).cls is ReplyClass.THROTTLED, explain(classify(reply))


@pytest.mark.parametrize(
    "reply",
    [
        "421 4.7.0 Try again later, closing connection.",
        "421 4.7.0 Try again later, closing connection. (EHLO)",
        "421 Too much load; please try again later.",
    ],
)
def test_issue_17_classification_1_a_refusal_that_names_no_limit_stays_temporary(
    reply: str,
) -> None:
    assert classify(reply).cls is ReplyClass.TEMPORARY, explain(classify(reply))


@pytest.mark.parametrize(
    "reply",
    [
        "450 4.7.1 <a@example.com>: Recipient address rejected: Policy Rejection- Greylisted",
        "450 4.7.1 Client host rejected: Greylisted, see https://example.com/greylisting",
        "450 4.1.7 <me@example.com>: Sender address rejected: unverified address: "
        "Address verification in progress",
        "451 #4.4.3 Temporary error occurred during SPF verification.",
        "451 4.7.1 SPF temperror: DNS timeout for example.com",
        "451 4.7.26 DMARC policy, but temporary DNS failures prevent authentication",
        "421 4.7.0 Connection expired, try reconnecting.",
        "421 4.7.0 mx.example.com Error: too many errors",
    ],
)
def test_issue_17_classification_2_a_temporary_failure_of_the_receivers_own_check_is_temporary(
    reply: str,
) -> None:
    assert classify(reply).cls is ReplyClass.TEMPORARY, explain(classify(reply))


@pytest.mark.parametrize(
    "reply",
    [
        "550 5.1.1 <me@example.com>: Sender address rejected: User unknown in local recipient",
        "550 5.1.0 <me@example.com> sender rejected",
        "553 5.7.1 <me@example.com>: Sender address rejected: not owned by user app",
        "553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)",
        "553 sorry, your envelope sender domain must exist (#5.7.1)",
        "550 5.1.7 <me@example.com>: Sender address rejected: undeliverable address: "
        "host mx.example.com said: 550 5.1.1 User unknown",
        "550 Submitter failed to authenticate",
        "550-Verification failed for <me@example.com>\r\n550-Response: 550 Unknown user\r\n"
        "550 Sender verification failed",
        "535 5.7.139 Authentication unsuccessful, account is disabled",
    ],
)
def test_issue_17_classification_4_a_refusal_of_the_sender_never_suppresses_the_recipient(
    reply: str,
) -> None:
    assert classify(reply).cls is ReplyClass.POLICY_BLOCK, explain(classify(reply))


@given(st.sampled_from(["User unknown", "No such user", "account disabled", "mailbox full"]))
def test_issue_17_classification_4_sender_wording_decides_over_any_recipient_wording(
    recipient_words: str,
) -> None:
    verdict = classify(f"550 5.1.1 <me@example.com>: Sender address rejected: {recipient_words}")
    assert verdict.cls is ReplyClass.POLICY_BLOCK


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("550 5.2.1 <a@example.com>: mailbox disabled", "hard_bounce"),
        ("554 5.2.1 <a@example.com>: account disabled", "hard_bounce"),
        ("550 5.7.1 <a@example.com>: Recipient address rejected: account disabled", "hard_bounce"),
        ("525 5.7.13 Disabled recipient address", "hard_bounce"),
        ("550 5.0.0 Recipient suspend the service", "hard_bounce"),
        ("550 Mailbox is frozen.", "hard_bounce"),
        ("550 5.7.504 Recipient address rejected: Access denied", "hard_bounce"),
        ("450 4.2.1 <a@example.com>: Mailbox temporarily disabled", "soft_bounce"),
        ("550 5.7.1 <a@example.com>: Recipient address rejected: temporary locked", "soft_bounce"),
        ("452 4.2.2 <a@example.com>: over quota", "soft_bounce"),
        ("550 5.7.1 Your account has been disabled for sending spam", "policy_block"),
    ],
)
def test_issue_17_classification_5_a_disabled_recipient_is_hard_whatever_its_enhanced_code(
    reply: str, expected: str
) -> None:
    assert classify(reply).cls == ReplyClass(expected), explain(classify(reply))


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("550 5.7.1 Message content rejected due to detected virus", "message_error"),
        ("552 5.7.0 Our system detected an illegal attachment on your message.", "message_error"),
        ("554 5.6.0 Message body contains invalid characters", "message_error"),
        ("554 Transaction failed: Duplicate header 'DKIM-Signature'.", "message_error"),
        ("552 Message header is ridiculously long", "message_error"),
        ("500 5.6.1 Message content rejected", "message_error"),
        ("550 5.7.1 message content rejected", "policy_block"),
        ("550 5.7.1 Message content rejected, UBE, id=00000-22-225", "policy_block"),
        ("554 5.7.1 Rejected: 192.0.2.1 listed at zen.spamhaus.org (malware)", "policy_block"),
        ("554 email rejected due to security policies - MCSpamSignature.sa.2.2", "policy_block"),
    ],
)
def test_issue_17_classification_6_the_message_itself_is_a_message_error_but_spam_stays_policy(
    reply: str, expected: str
) -> None:
    assert classify(reply).cls == ReplyClass(expected), explain(classify(reply))


@pytest.mark.parametrize(
    "reply",
    [
        "552 5.2.2 <user@example.com>: mailbox full",
        "452 4.2.2 <user@example.com>: over quota",
        "522 5.2.0 Delivery failed: Over quota",
        "550 5.7.1 Email quota exceeded.",
        "550 5.7.1 <a@example.com>: Recipient address rejected: User a@example.com temporary "
        "locked. Please try again later",
    ],
)
def test_issue_17_classification_3_a_mailbox_limit_is_the_recipients_soft_bounce(
    reply: str,
) -> None:
    """Rule 3: what the recipient's mailbox sets (its size, a lock) is recipient-side and
    transient, whatever the code (5.7.1, 522, 550): soft_bounce, not policy or hard."""
    assert classify(reply).cls is ReplyClass.SOFT_BOUNCE, explain(classify(reply))


def test_issue_17_classification_3_a_size_limit_per_recipient_refuses_the_message() -> None:
    reply = "552 5.2.3 RESOLVER.RST.RecipSizeLimit; message too large for this recipient"
    assert classify(reply).cls is ReplyClass.MESSAGE_ERROR, explain(classify(reply))


#: each judgement call of issue 17: its kind in provider_replies.toml, the number and opening
#: words of its rule in docs/classification.md
JUDGEMENT_CALLS = [
    ("connection-limit", "1. **A limit on the number or rate of connections"),
    ("receiver-temporary", "2. **A temporary failure of the receiving side's own checks"),
    ("mailbox-limit", "3. **Limits the recipient's mailbox sets are recipient-side."),
    ("sender-refusal", "4. **A refusal of the sender is never the recipient's hard bounce"),
    ("disabled-recipient", "5. **A disabled recipient is a `hard_bounce` whatever"),
    ("message-content", "6. **A refusal of the message's content or structure is"),
]


@pytest.mark.parametrize(("kind", "rule"), JUDGEMENT_CALLS, ids=[k for k, _ in JUDGEMENT_CALLS])
def test_issue_17_classification_each_judgement_call_is_decided_in_the_docs_and_the_corpus_agrees(
    kind: str, rule: str
) -> None:
    docs = (Path(__file__).parents[2] / "docs" / "classification.md").read_text()
    assert rule in docs, rule
    cases = [c for c in CASES if c.corpus == "provider_replies.toml" and c.kind == kind]
    assert len(cases) >= 10, kind
    wrong = [
        f"{c.id}: expected {c.cls}, got {explain(classify(c.reply))}"
        for c in cases
        if classify(c.reply).cls != c.cls
    ]
    assert not wrong, "\n".join(wrong)


# --- the fallbacks, and the decisions they encode -------------------------------------------------


def test_plain_421_is_temporary_not_throttled() -> None:
    verdict = classify("421 mx.example.com closing connection")
    assert verdict.cls is ReplyClass.TEMPORARY
    assert verdict.rule == "code-4xx-transient"


@pytest.mark.parametrize(
    "reply",
    [
        "421 4.7.0 mx.example.com Error: too many connections from 192.0.2.1",
        "421 4.7.0 Try again later: rate limit exceeded",
        "421 4.3.2 Connection rate limit exceeded.",
    ],
)
def test_421_with_rate_wording_is_throttled(reply: str) -> None:
    assert classify(reply).cls is ReplyClass.THROTTLED


def test_4xx_user_unknown_is_temporary_because_the_server_is_not_sure() -> None:
    verdict = classify("450 4.1.1 <a@example.com>: Recipient address rejected: User unknown")
    assert verdict.cls is ReplyClass.TEMPORARY


@pytest.mark.parametrize(
    ("reply", "expected", "rule"),
    [
        ("550 see https://example.com/help", "hard_bounce", "code-550-mailbox-unavailable"),
        ("551 see https://example.com/help", "hard_bounce", "code-550-mailbox-unavailable"),
        ("553 see https://example.com/help", "hard_bounce", "code-550-mailbox-unavailable"),
        ("521 see https://example.com/help", "hard_bounce", "code-521-556-no-mail"),
        ("556 see https://example.com/help", "hard_bounce", "code-521-556-no-mail"),
        ("552 see https://example.com/help", "soft_bounce", "code-552-storage"),
        ("554 see https://example.com/help", "policy_block", "code-554-transaction-failed"),
        ("500 see https://example.com/help", "message_error", "code-50x-protocol"),
        ("555 see https://example.com/help", "message_error", "code-50x-protocol"),
        ("557 see https://example.com/help", "policy_block", "code-5xx-other"),
        ("451 see https://example.com/help", "temporary", "code-4xx-transient"),
    ],
)
def test_unexplained_reply_falls_back_on_its_basic_code(
    reply: str, expected: str, rule: str
) -> None:
    verdict = classify(reply)
    assert (verdict.cls, verdict.rule) == (ReplyClass(expected), rule)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("550 5.1.1 see https://example.com/help", "hard_bounce"),
        ("550 5.1.10 see https://example.com/help", "hard_bounce"),
        ("550 5.1.8 see https://example.com/help", "policy_block"),
        ("552 5.2.2 see https://example.com/help", "soft_bounce"),
        ("452 4.2.2 see https://example.com/help", "soft_bounce"),
        ("450 4.2.1 see https://example.com/help", "soft_bounce"),
        ("550 5.2.1 see https://example.com/help", "hard_bounce"),
        ("552 5.2.3 see https://example.com/help", "message_error"),
        ("552 5.3.4 see https://example.com/help", "message_error"),
        ("550 5.4.4 see https://example.com/help", "hard_bounce"),
        ("451 4.4.5 see https://example.com/help", "throttled"),
        ("554 5.4.6 see https://example.com/help", "message_error"),
        ("554 5.6.0 see https://example.com/help", "message_error"),
        ("452 4.5.3 see https://example.com/help", "throttled"),
        ("501 5.5.4 see https://example.com/help", "message_error"),
        ("550 5.7.1 see https://example.com/help", "policy_block"),
        ("451 4.7.1 see https://example.com/help", "policy_block"),
        ("451 4.3.0 see https://example.com/help", "temporary"),
        ("554 5.0.0 see https://example.com/help", "policy_block"),
    ],
)
def test_unexplained_reply_falls_back_on_its_enhanced_code(reply: str, expected: str) -> None:
    verdict = classify(reply)
    assert verdict.cls == ReplyClass(expected), explain(verdict)


def test_a_3xx_as_a_final_reply_is_retried() -> None:
    verdict = classify("354 Go ahead a1si2345678qkb.12 - gsmtp")
    assert (verdict.cls, verdict.code, verdict.rule) == (ReplyClass.TEMPORARY, 354, "unmatched")


@pytest.mark.parametrize(
    "reply",
    ["", "\r\n", "Connection refused", "5.1.1 user unknown", "12345 not a reply code", "600 nope"],
)
def test_a_reply_without_a_code_is_a_connection_failure(reply: str) -> None:
    verdict = classify(reply)
    assert (verdict.cls, verdict.code, verdict.enhanced) == (ReplyClass.CONNECTION, None, None)
    assert verdict.rule == "no-reply"


# --- explanations ---------------------------------------------------------------------------------


def test_verdict_names_the_rule_provider_and_reason() -> None:
    verdict = classify(
        "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
        "550 5.1.1 double-checking the recipient's email address - gsmtp"
    )
    assert verdict.rule == "gmail-no-such-user"
    assert verdict.provider == "google"
    assert explain(verdict) == (
        "hard_bounce: matched rule gmail-no-such-user "
        "(Google: the recipient's account does not exist)"
    )


def test_every_shipped_rule_explains_itself() -> None:
    rules = default_rules().rules
    assert all(rule.explanation for rule in rules)
    assert len({rule.name for rule in rules}) == len(rules)


# --- parsing --------------------------------------------------------------------------------------

GMAIL_NO_SUCH_USER_TEXT = (
    "The email account that you tried to reach does not exist. Please try\n"
    "double-checking the recipient's email address for typos or\n"
    "unnecessary spaces. For more information, go to\n"
    "https://support.google.com/mail/?p=NoSuchUser a1si123456qkb.12 - gsmtp"
)


@pytest.mark.parametrize(
    "reply",
    [
        # as the server writes it
        "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
        "550-5.1.1 double-checking the recipient's email address for typos or\r\n"
        "550-5.1.1 unnecessary spaces. For more information, go to\r\n"
        "550 5.1.1  https://support.google.com/mail/?p=NoSuchUser a1si123456qkb.12 - gsmtp",
        # as aiosmtplib hands it over: code once, continuation lines joined with "\n"
        "550 5.1.1 The email account that you tried to reach does not exist. Please try\n"
        "5.1.1 double-checking the recipient's email address for typos or\n"
        "5.1.1 unnecessary spaces. For more information, go to\n"
        "5.1.1  https://support.google.com/mail/?p=NoSuchUser a1si123456qkb.12 - gsmtp",
        # bare LF and bare CR line ends
        "550-5.1.1 The email account that you tried to reach does not exist. Please try\n"
        "550-5.1.1 double-checking the recipient's email address for typos or\r"
        "550-5.1.1 unnecessary spaces. For more information, go to\n"
        "550 5.1.1  https://support.google.com/mail/?p=NoSuchUser a1si123456qkb.12 - gsmtp\r\n",
    ],
    ids=["multiline-crlf", "aiosmtplib-joined", "mixed-line-ends"],
)
def test_multiline_reply_parses_to_code_enhanced_and_text(reply: str) -> None:
    assert parse_reply(reply) == (550, "5.1.1", GMAIL_NO_SUCH_USER_TEXT)
    verdict = classify(reply)
    assert (verdict.code, verdict.enhanced, verdict.text) == (550, "5.1.1", GMAIL_NO_SUCH_USER_TEXT)


def test_enhanced_code_comes_from_the_first_line_that_has_one() -> None:
    assert parse_reply("550-mx.example.com says\r\n550 5.1.1 <a@example.com> User unknown") == (
        550,
        "5.1.1",
        "mx.example.com says\n<a@example.com> User unknown",
    )


def test_continuation_codes_joined_into_one_line_do_not_break_a_phrase() -> None:
    # a Postfix log or a DSN shows a multi-line reply on one line, continuation codes and all
    joined = (
        "550-5.2.1 The user you are trying to contact is receiving mail at a rate that "
        "550-5.2.1 prevents additional messages from being delivered. For more "
        "550 5.2.1 information, go to https://support.google.com/mail/?p=ReceivingRatePerm"
    )
    verdict = classify(joined)
    assert (verdict.cls, verdict.rule) == (ReplyClass.THROTTLED, "gmail-receiving-too-quickly")
    assert "550-5.2.1 prevents" in verdict.text  # the reply text is kept as written
    # another server's code quoted inside the text is not the reply's own and stays
    rules = load_rules('[[rules]]\nname = "r"\nclass = "soft_bounce"\ntext = "said: 452 4.2.2 "\n')
    assert rules.classify("550 5.1.1 relay said: 452 4.2.2 over quota").rule == "r"


def test_enhanced_code_must_follow_the_code() -> None:
    assert parse_reply("550 sorry, no mailbox here by that name. (#5.1.1)") == (
        550,
        None,
        "sorry, no mailbox here by that name. (#5.1.1)",
    )


def test_hash_prefixed_enhanced_code_and_repeated_code_are_read() -> None:
    assert parse_reply("550 #5.7.1 Your access has been rejected.")[:2] == (550, "5.7.1")
    assert parse_reply("554 554 5.7.1 <a@example.com>: Access denied") == (
        554,
        "5.7.1",
        "<a@example.com>: Access denied",
    )


def test_a_code_on_a_later_line_that_differs_is_kept_as_text() -> None:
    assert parse_reply("421 4.7.0 closing\r\n250 is not my code") == (
        421,
        "4.7.0",
        "closing\n250 is not my code",
    )


_TEXT_LINE = st.text(
    alphabet=st.characters(
        codec="utf-8",
        exclude_categories=("Cc", "Cs", "Zl", "Zp"),
    ),
    min_size=1,
    max_size=60,
).filter(lambda line: line.strip() and not re.match(r"\s*(#?[2-5]\.\d|[2-5]\d\d)", line))


@given(
    # RFC 3463 enhanced codes exist for classes 2, 4 and 5 only
    code=st.integers(min_value=200, max_value=299) | st.integers(min_value=400, max_value=599),
    subject=st.integers(min_value=0, max_value=999),
    detail=st.integers(min_value=0, max_value=999),
    lines=st.lists(_TEXT_LINE, min_size=1, max_size=6),
    joined_by_aiosmtplib=st.booleans(),
)
def test_multiline_nnn_dash_x_y_z_form_parses(
    code: int, subject: int, detail: int, lines: list[str], joined_by_aiosmtplib: bool
) -> None:
    enhanced = f"{code // 100}.{subject}.{detail}"
    if joined_by_aiosmtplib:
        reply = f"{code} " + "\n".join(f"{enhanced} {line}" for line in lines)
    else:
        reply = "\r\n".join(
            f"{code}{' ' if index == len(lines) - 1 else '-'}{enhanced} {line}"
            for index, line in enumerate(lines)
        )
    expected_text = "\n".join(line.strip() for line in lines)
    assert parse_reply(reply) == (code, enhanced, expected_text)
    verdict = classify(reply)
    assert (verdict.code, verdict.enhanced, verdict.text) == (code, enhanced, expected_text)
    assert verdict.cls in ReplyClass
    if code < 300:
        assert verdict.cls is ReplyClass.DELIVERED


@given(st.text())
def test_classify_never_raises_and_always_returns_a_class(reply: str) -> None:
    verdict = classify(reply)
    assert isinstance(verdict, Verdict)
    assert verdict.cls in ReplyClass
    assert verdict.code is None or 200 <= verdict.code <= 599
    assert verdict.enhanced is None or re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", verdict.enhanced)
    assert verdict.rule
    assert (verdict.code is None) == (verdict.cls is ReplyClass.CONNECTION)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_any_text_after_a_5xx_code_is_classified_as_a_failure(text: str) -> None:
    verdict = classify("550 " + text)
    assert verdict.code == 550
    assert verdict.cls not in (ReplyClass.DELIVERED, ReplyClass.CONNECTION)


# --- the rules file -------------------------------------------------------------------------------


def test_shipped_rules_are_loaded_once() -> None:
    assert default_rules() is default_rules()


def test_2xx_is_delivered_without_consulting_any_rule() -> None:
    rules = load_rules('[[rules]]\nname = "everything"\nclass = "hard_bounce"\ncode = "2xx"\n')
    verdict = rules.classify("250 2.0.0 Ok: queued as 6C04342511E")
    assert (verdict.cls, verdict.rule) == (ReplyClass.DELIVERED, "accepted")


def test_first_matching_rule_wins_and_all_conditions_must_hold() -> None:
    rules = load_rules(
        """
        [[rules]]
        name = "quota-but-not-sending"
        class = "soft_bounce"
        code = ["5xx", "452"]
        enhanced = ["5.2.*", "4.2.2", "5.7.700-749"]
        text = ['quota']
        unless = ['sending']

        [[rules]]
        name = "any-quota"
        class = "throttled"
        text = 'quota'
        """
    )
    assert rules.classify("552 5.2.2 Quota exceeded").rule == "quota-but-not-sending"
    assert rules.classify("452 4.2.2 Quota exceeded").rule == "quota-but-not-sending"
    assert rules.classify("550 5.7.705 quota").rule == "quota-but-not-sending"
    assert rules.classify("550 5.7.750 quota").rule == "any-quota"
    assert rules.classify("550 5.2.2 Daily sending quota exceeded").rule == "any-quota"
    assert rules.classify("451 4.2.2 Quota exceeded").rule == "any-quota"
    assert rules.classify("550 Quota exceeded").rule == "any-quota"  # no enhanced code
    assert rules.classify("550 5.1.1 User unknown").rule == "unmatched"


def test_text_matches_across_wrapped_lines() -> None:
    rules = load_rules(
        '[[rules]]\nname = "r"\nclass = "throttled"\ntext = "unusual rate of mail"\n'
    )
    verdict = rules.classify("421-4.7.28 an unusual rate of\r\n421 4.7.28 mail from your IP")
    assert verdict.rule == "r"


def test_patterns_match_any_case_and_keep_their_escapes() -> None:
    rules = load_rules(
        '[[rules]]\nname = "r"\nclass = "throttled"\n'
        "text = ['\\bIB504\\b', 'USER \\S+ OVER\\W+LIMIT']\n"
    )
    assert rules.classify("550 This IP has sent too many messages. ib504").rule == "r"
    assert rules.classify("550 user kim@example.com over-limit").rule == "r"
    assert rules.classify("550 user  over limit").rule == "unmatched"  # \S+ still needs a word
    assert rules.classify("550 IB5040").rule == "unmatched"  # \b is still a word boundary


def test_rules_load_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text('[[rules]]\nname = "r"\nclass = "temporary"\ncode = "4xx"\n', encoding="utf-8")
    assert isinstance(load_rules(path), RuleSet)
    with pytest.raises(ConfigError, match="cannot read"):
        load_rules(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("rules = [", "not valid TOML"),
        ('version = 2\n[[rules]]\nname = "a"\nclass = "temporary"\ncode = "4xx"', "top-level key"),
        ("rules = 3", "array of tables"),
        ('[[rules]]\nclass = "temporary"\ncode = "4xx"', "'name'"),
        ('[[rules]]\nname = "a"\nclass = "bounce"\ncode = "4xx"', "'class' must be one of"),
        (
            '[[rules]]\nname = "a"\nclass = "temporary"\ncode = "4xx"\ntxt = "x"',
            "unknown key 'txt'",
        ),
        ('[[rules]]\nname = "a"\nclass = "temporary"', "at least one of"),
        ('[[rules]]\nname = "a"\nclass = "temporary"\ncode = "6xx"', "bad code"),
        ('[[rules]]\nname = "a"\nclass = "temporary"\ncode = "5x9-599"', "bad code"),
        ('[[rules]]\nname = "a"\nclass = "temporary"\ncode = "559-550"', "bad code range"),
        ('[[rules]]\nname = "a"\nclass = "temporary"\nenhanced = "5.7"', "bad enhanced"),
        ('[[rules]]\nname = "a"\nclass = "temporary"\nenhanced = "5.7.x-9"', "bad enhanced"),
        ('[[rules]]\nname = "a"\nclass = "temporary"\nenhanced = "5.7.9-1"', "bad enhanced"),
        ('[[rules]]\nname = "a"\nclass = "temporary"\ntext = "(unclosed"', "bad regular"),
        ('[[rules]]\nname = "a"\nclass = "temporary"\ntext = []', "non-empty list"),
        ('[[rules]]\nname = "a"\nclass = "temporary"\nprovider = 1\ncode = "4xx"', "'provider'"),
        ('[[rules]]\nname = "a"\nclass = "temporary"\nexplain = 1\ncode = "4xx"', "'explain'"),
        (
            '[[rules]]\nname = "a"\nclass = "temporary"\ncode = "4xx"\n'
            '[[rules]]\nname = "a"\nclass = "temporary"\ncode = "5xx"',
            "duplicate rule name 'a'",
        ),
    ],
)
def test_a_bad_rules_file_is_a_config_error_naming_the_problem(rules: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_rules(rules)
