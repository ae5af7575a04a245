"""Classify a server's reply into one of the contract's response classes.

``classify(reply)`` takes a whole reply as the server wrote it and returns a :class:`Verdict`:
the class the queue acts on, the basic and enhanced status codes, the reply text without its code
prefixes, and the name of the rule that decided, so ``postlane classify`` can explain itself.

Why rules and not ``4xx -> retry, 5xx -> bounce``: providers do not use the codes the way RFC 5321
and RFC 3463 intend. Gmail rate-limits with 421 *and* with ``550 5.4.5``; Yandex answers an unknown
user with ``550 5.7.1 No such user!``; Orange reports a full mailbox as ``552 5.1.1``; Microsoft
reports an unknown recipient as ``550 5.4.1 ... Access denied``. The wording is what tells them
apart, so the wording is matched first and the codes only decide when no wording rule matched.

Parsing
    Lines may end in CRLF, LF or CR. The code is the three digits (``2xx``-``5xx``) that start the
    first line. Later lines may repeat it (``550-...`` / ``550 ...``) or not (aiosmtplib joins
    continuation lines with ``"\\n"`` after stripping their codes); a repeated code is stripped
    either way. The enhanced code is the first ``X.Y.Z`` (optionally ``#X.Y.Z``) found right after
    the code on any line; leading enhanced codes are stripped from every line. A reply without a
    code (empty, or an error such as ``Connection refused``) is class ``connection``.

Evaluation
    1. no code at all -> ``connection`` (rule ``no-reply``);
    2. 2xx -> ``delivered`` (rule ``accepted``), without looking at any rule;
    3. the rules of ``postlane/data/reply_rules.toml`` in file order; the first match wins;
    4. nothing matched (a 3xx, or a rules file without fallbacks) -> ``temporary``
       (rule ``unmatched``): retrying is the one answer that loses no mail.

The rules file
    An array of tables, one per rule, evaluated top to bottom::

        [[rules]]
        name = "gmail-no-such-user"          # unique; shown by `postlane classify`
        class = "hard_bounce"                # one of the eight classes
        provider = "google"                  # optional label, used in the explanation
        explain = "Google: the recipient's account does not exist"
        code = ["5xx"]                       # optional: "550", "5xx", "55x" or "550-554"
        enhanced = ["5.1.1"]                 # optional: "5.1.1", "5.7.*", "*.2.2", "5.7.700-749"
        text = ['email account that you tried to reach does not exist']
        unless = ['sender']                  # optional: the rule does not match if any matches

    Every condition given must hold (``code``, ``enhanced``, ``text``, ``unless``); within a list
    any one entry is enough. ``text`` and ``unless`` are Python regular expressions searched,
    case-insensitively, in the reply text (its first 8192 characters) with its lines joined and
    runs of whitespace collapsed to one space, so a phrase wrapped over two lines still matches;
    copies of the reply's own code left inside the text when a log or a DSN joined a multi-line
    reply into one line ("... Please try 550-5.1.1 double-checking ...") are removed first.
    A rule with an ``enhanced`` condition never matches a reply without an enhanced code. A rule
    needs at least one of ``code``, ``enhanced`` or ``text``. Put specific rules above general
    ones; the file ends with fallbacks on the enhanced code (RFC 3463), then on the basic code
    (RFC 5321).

    :func:`load_rules` reads another file in the same format, for tests and for users who extend
    the shipped rules (copy the file, add rules above the fallbacks).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache, partial
from importlib import resources
from pathlib import Path
from typing import Any

from postlane.errors import ConfigError

__all__ = [
    "ReplyClass",
    "ReplyRule",
    "RuleSet",
    "Verdict",
    "classify",
    "default_rules",
    "explain",
    "load_rules",
    "parse_reply",
]


class ReplyClass(StrEnum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    THROTTLED = "throttled"
    CONNECTION = "connection"
    SOFT_BOUNCE = "soft_bounce"
    HARD_BOUNCE = "hard_bounce"
    POLICY_BLOCK = "policy_block"
    MESSAGE_ERROR = "message_error"


@dataclass(frozen=True)
class Verdict:
    cls: ReplyClass
    code: int | None
    enhanced: str | None
    #: the reply's text without the code prefixes, lines joined by "\n"
    text: str = ""
    #: the name of the rule that decided the class (for `postlane classify` to explain itself)
    rule: str = ""
    #: the provider the deciding rule was written for ("google", "microsoft", ...), if any
    provider: str | None = None
    #: one sentence saying why the rule decided so
    explanation: str = ""


def explain(verdict: Verdict) -> str:
    """One line for humans: which rule decided and why, e.g. for ``postlane classify``."""
    why = f" ({verdict.explanation})" if verdict.explanation else ""
    return f"{verdict.cls}: matched rule {verdict.rule}{why}"


def one_line(verdict: Verdict, limit: int = 200) -> str:
    """The reply on one line, its codes first and its text's lines joined (a provider's
    multi-line 421 made four log lines and no code), at most ``limit`` characters: what a
    destination's pause or slow-down gives as its reason."""
    codes = " ".join(str(part) for part in (verdict.code, verdict.enhanced) if part)
    text = " ".join(verdict.text.split())
    return " ".join(part for part in (codes, text) if part)[:limit]


# --- parsing ----------------------------------------------------------------------------------

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CODE = re.compile(r"([2-5][0-9][0-9])(?:[ \t-]+|$)")
_ENHANCED = re.compile(r"#?([245])\.([0-9]{1,3})\.([0-9]{1,3})(?:\s+|$)")

#: Rules match against at most this many characters of the reply text.
_MATCH_LIMIT = 8192

_NO_REPLY = "no-reply"
_ACCEPTED = "accepted"
_UNMATCHED = "unmatched"


#: A reply's own code repeated inside its text, as continuation lines read once a log or a DSN
#: has joined them with spaces: "... Please try 550-5.1.1 double-checking ...".
_EMBEDDED_CODE = re.compile(
    r"(?<!\S)([2-5][0-9][0-9])(?:-(?:#?[245]\.[0-9]{1,3}\.[0-9]{1,3}(?!\S))?"
    r"| #?[245]\.[0-9]{1,3}\.[0-9]{1,3}(?!\S))"
)


def _flat_text(text: str, code: int) -> str:
    """The text rules match: one line, whitespace collapsed, lower-cased (see _fold_case).

    It is no longer than any real reply needs (a hostile server cannot make matching slow), and
    copies of the reply's own code left inside the text by continuation lines joined with spaces
    ("550-5.1.1", "550 5.1.1", "554-") are removed, so a phrase wrapped across them still
    matches. The reply text a :class:`Verdict` carries is left as the server wrote it.
    """
    flat = " ".join(text[:_MATCH_LIMIT].split()).lower()
    digits = str(code)
    if digits not in flat:
        return flat
    stripped = _EMBEDDED_CODE.sub(
        lambda match: "" if match.group(1) == digits else match.group(0), flat
    )
    return " ".join(stripped.split())


@dataclass(frozen=True)
class _ParsedReply:
    code: int | None
    enhanced: tuple[int, int, int] | None
    text: str


def parse_reply(reply: str) -> tuple[int | None, str | None, str]:
    """Split a reply into ``(code, enhanced, text)`` the way :func:`classify` reads it."""
    parsed = _parse(reply)
    return parsed.code, _format_enhanced(parsed.enhanced), parsed.text


def _format_enhanced(enhanced: tuple[int, int, int] | None) -> str | None:
    return None if enhanced is None else ".".join(map(str, enhanced))


def _parse(reply: str) -> _ParsedReply:
    lines = [line.strip() for line in _LINE_BREAK.split(reply)]
    lines = [line for line in lines if line]
    if not lines:
        return _ParsedReply(None, None, "")
    first = _CODE.match(lines[0])
    if first is None:
        return _ParsedReply(None, None, "\n".join(lines))
    code_digits = first.group(1)
    enhanced: tuple[int, int, int] | None = None
    texts: list[str] = []
    for line in lines:
        # Strip the code, and a repeated copy of it ("554 554 5.7.1 ..." appears in the wild).
        while (prefix := _CODE.match(line)) is not None and prefix.group(1) == code_digits:
            line = line[prefix.end() :]
        status = _ENHANCED.match(line)
        if status is not None:
            if enhanced is None:
                enhanced = (int(status.group(1)), int(status.group(2)), int(status.group(3)))
            line = line[status.end() :]
        line = line.strip()
        if line:
            texts.append(line)
    return _ParsedReply(int(code_digits), enhanced, "\n".join(texts))


# --- rules ------------------------------------------------------------------------------------

_Range = tuple[int, int]
_RULE_KEYS = frozenset(
    {"name", "class", "provider", "explain", "code", "enhanced", "text", "unless"}
)
_CODE_PATTERN = re.compile(r"([2-5][0-9x][0-9x])(?:-([2-5][0-9][0-9]))?")
_ENHANCED_PART = re.compile(r"(\*|x|[0-9]{1,3})(?:-([0-9]{1,3}))?")


@dataclass(frozen=True)
class ReplyRule:
    """One compiled rule of the rules file."""

    name: str
    cls: ReplyClass
    provider: str | None
    explanation: str
    codes: tuple[_Range, ...] | None
    enhanced: tuple[tuple[_Range, _Range, _Range], ...] | None
    text: re.Pattern[str] | None
    unless: re.Pattern[str] | None

    def admits_class(self, digit: int) -> bool:
        """Whether a reply whose code starts with ``digit`` could match this rule."""
        if self.codes is None:
            return True
        return any(lo // 100 <= digit <= hi // 100 for lo, hi in self.codes)

    def matches(self, code: int, enhanced: tuple[int, int, int] | None, flat_text: str) -> bool:
        if self.codes is not None and not any(lo <= code <= hi for lo, hi in self.codes):
            return False
        if self.enhanced is not None and (
            enhanced is None or not any(map(partial(_within, enhanced), self.enhanced))
        ):
            return False
        if self.text is not None and self.text.search(flat_text) is None:
            return False
        return self.unless is None or self.unless.search(flat_text) is None


def _within(enhanced: tuple[int, int, int], ranges: tuple[_Range, _Range, _Range]) -> bool:
    return all(lo <= value <= hi for value, (lo, hi) in zip(enhanced, ranges, strict=True))


class RuleSet:
    """An ordered list of reply rules: the first that matches a reply decides its class."""

    def __init__(self, rules: Sequence[ReplyRule]) -> None:
        self.rules: tuple[ReplyRule, ...] = tuple(rules)
        # Rules that can match a reply of each code class, so a 4xx never tries 5xx-only rules.
        self._by_class: dict[int, tuple[ReplyRule, ...]] = {
            digit: tuple(rule for rule in self.rules if rule.admits_class(digit))
            for digit in (3, 4, 5)
        }

    def classify(self, reply: str) -> Verdict:
        """Classify one whole reply (see the module docstring for the order of evaluation)."""
        parsed = _parse(reply)
        code = parsed.code
        enhanced = _format_enhanced(parsed.enhanced)
        if code is None:
            return Verdict(
                ReplyClass.CONNECTION,
                None,
                None,
                parsed.text,
                _NO_REPLY,
                explanation="no SMTP reply code: the connection failed before the server answered",
            )
        if code < 300:
            return Verdict(
                ReplyClass.DELIVERED,
                code,
                enhanced,
                parsed.text,
                _ACCEPTED,
                explanation="2xx: the server accepted the message",
            )
        flat_text = _flat_text(parsed.text, code)
        for rule in self._by_class[code // 100]:
            if rule.matches(code, parsed.enhanced, flat_text):
                return Verdict(
                    rule.cls,
                    code,
                    enhanced,
                    parsed.text,
                    rule.name,
                    provider=rule.provider,
                    explanation=rule.explanation,
                )
        return Verdict(
            ReplyClass.TEMPORARY,
            code,
            enhanced,
            parsed.text,
            _UNMATCHED,
            explanation="no rule matched; retrying is the answer that loses no mail",
        )


def load_rules(source: str | Path) -> RuleSet:
    """Read and compile a rules file (a path, or the TOML text itself when given a ``str``).

    Raises :class:`~postlane.errors.ConfigError` naming the rule and key of any mistake.
    """
    if isinstance(source, Path):
        origin = f"reply rules {source}"
        try:
            text = source.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{origin}: cannot read the file: {exc}") from exc
    else:
        origin, text = "reply rules", source
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from exc
    unknown = set(document) - {"rules"}
    if unknown:
        raise ConfigError(f"{origin}: unknown top-level key {sorted(unknown)[0]!r}")
    entries = document.get("rules", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{origin}: 'rules' must be an array of tables ([[rules]])")
    rules: list[ReplyRule] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{origin}: rule #{index + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        rule = _compile_rule(entry, where)
        if rule.name in seen:
            raise ConfigError(f"{where}: duplicate rule name {rule.name!r}")
        seen.add(rule.name)
        rules.append(rule)
    return RuleSet(rules)


@cache
def default_rules() -> RuleSet:
    """The rules shipped in ``postlane/data/reply_rules.toml``, read and compiled once."""
    text = resources.files("postlane.data").joinpath("reply_rules.toml").read_text("utf-8")
    return load_rules(text)


def classify(reply: str) -> Verdict:
    """Classify a whole SMTP reply, as the server wrote it, with the shipped rules."""
    return default_rules().classify(reply)


# --- compiling one rule -----------------------------------------------------------------------


def _compile_rule(entry: Mapping[str, Any], where: str) -> ReplyRule:
    unknown = set(entry) - _RULE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: 'name' must be a non-empty string")
    where = f"{where} ({name})"
    class_name = entry.get("class")
    try:
        cls = ReplyClass(str(class_name))
    except ValueError:
        choices = ", ".join(c.value for c in ReplyClass)
        raise ConfigError(f"{where}: 'class' must be one of {choices}") from None
    provider = entry.get("provider")
    if provider is not None and not isinstance(provider, str):
        raise ConfigError(f"{where}: 'provider' must be a string")
    explanation = entry.get("explain", "")
    if not isinstance(explanation, str):
        raise ConfigError(f"{where}: 'explain' must be a string")
    codes = _optional_list(entry, "code", where)
    enhanced = _optional_list(entry, "enhanced", where)
    text = _optional_list(entry, "text", where)
    unless = _optional_list(entry, "unless", where)
    if codes is None and enhanced is None and text is None:
        raise ConfigError(f"{where}: needs at least one of 'code', 'enhanced' or 'text'")
    return ReplyRule(
        name=name,
        cls=cls,
        provider=provider,
        explanation=explanation,
        codes=None if codes is None else tuple(_code_range(c, where) for c in codes),
        enhanced=None if enhanced is None else tuple(_enhanced_ranges(e, where) for e in enhanced),
        text=None if text is None else _regex(text, "text", where),
        unless=None if unless is None else _regex(unless, "unless", where),
    )


def _optional_list(entry: Mapping[str, Any], key: str, where: str) -> list[str] | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key!r} must be a string or a non-empty list of strings")
    return value


def _code_range(pattern: str, where: str) -> _Range:
    match = _CODE_PATTERN.fullmatch(pattern.strip().lower())
    if match is None or (match.group(2) is not None and "x" in match.group(1)):
        raise ConfigError(f"{where}: bad code {pattern!r} (use 550, 5xx, 55x or 550-554)")
    low = int(match.group(1).replace("x", "0"))
    high = int(match.group(2) or match.group(1).replace("x", "9"))
    if high < low:
        raise ConfigError(f"{where}: bad code range {pattern!r}")
    return low, high


def _enhanced_ranges(pattern: str, where: str) -> tuple[_Range, _Range, _Range]:
    parts = pattern.strip().lower().split(".")
    ranges: list[_Range] = []
    for part in parts:
        match = _ENHANCED_PART.fullmatch(part)
        if match is None or (match.group(2) is not None and not match.group(1).isdigit()):
            ranges = []
            break
        if match.group(1) in ("*", "x"):
            ranges.append((0, 999))
        else:
            low = int(match.group(1))
            high = int(match.group(2) or low)
            ranges.append((low, high))
    if len(parts) != 3 or len(ranges) != 3 or any(lo > hi for lo, hi in ranges):
        raise ConfigError(
            f"{where}: bad enhanced code {pattern!r} (use 5.1.1, 5.7.*, *.2.2 or 5.7.700-749)"
        )
    return ranges[0], ranges[1], ranges[2]


def _regex(patterns: Iterable[str], key: str, where: str) -> re.Pattern[str]:
    folded = []
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{where}: bad regular expression in {key!r}: {exc}") from exc
        folded.append(_fold_case(pattern))
    return re.compile("|".join(f"(?:{p})" for p in folded))


def _fold_case(pattern: str) -> str:
    """Lower-case a pattern's literals, leaving escapes (``\\S``, ``\\B``, ...) alone.

    Rules are matched against the lower-cased reply text: about four times faster than
    ``re.IGNORECASE``, which matters for a function called on every delivery.
    """
    out: list[str] = []
    escaped = False
    for char in pattern:
        out.append(char if escaped else char.lower())
        escaped = not escaped and char == "\\"
    return "".join(out)
