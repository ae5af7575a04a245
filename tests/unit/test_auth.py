"""Who gets in over HTTP: the rules the API and the dashboard share (postlane.auth)."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from postlane.auth import (
    SESSION_COOKIE,
    Caller,
    Csrf,
    InvalidToken,
    MissingToken,
    NotLocal,
    Scope,
    Session,
    Tokens,
    addressed_locally,
    bearer_token,
    fingerprint,
    is_local,
    session_value,
)

ADMIN = "admin-t0ken"
SEND = "send-t0ken"


def request(
    host: str = "127.0.0.1:8025",
    peer: str = "127.0.0.1",
    authorization: str | None = None,
    cookie: str | None = None,
) -> Request:
    headers = [(b"host", host.encode())]
    if authorization is not None:
        headers.append((b"authorization", authorization.encode()))
    if cookie is not None:
        headers.append((b"cookie", f"{SESSION_COOKIE}={cookie}".encode()))
    return Request({"type": "http", "method": "GET", "headers": headers, "client": (peer, 5555)})


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("localhost", True),
        ("localhost:8025", True),
        ("LOCALHOST:8025", True),
        ("app.localhost:8025", True),
        ("127.0.0.1:8025", True),
        ("127.8.9.10", True),
        ("[::1]:8025", True),
        ("[::1]", True),
        ("evil.example", False),
        ("evil.example:8025", False),
        ("localhost.evil.example", False),
        ("192.0.2.7:8025", False),
        ("", False),
    ],
)
def test_the_host_header_must_name_this_machine(host: str, local: bool) -> None:
    assert addressed_locally(request(host=host)) is local


@pytest.mark.parametrize(
    ("peer", "host", "local"),
    [
        ("127.0.0.1", "localhost:8025", True),
        ("::1", "[::1]:8025", True),
        ("192.0.2.7", "localhost:8025", False),  # a remote peer, whatever it says
        ("127.0.0.1", "evil.example:8025", False),  # DNS rebinding: loopback, but not ours
    ],
)
def test_local_means_a_loopback_peer_addressing_this_machine(
    peer: str, host: str, local: bool
) -> None:
    assert is_local(request(host=host, peer=peer)) is local


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer   ", None),
        (None, None),
    ],
)
def test_bearer_tokens_are_read_from_the_authorization_header(
    header: str | None, token: str | None
) -> None:
    assert bearer_token(request(authorization=header)) == token


def test_tokens_have_the_scope_they_were_configured_with() -> None:
    tokens = Tokens([ADMIN], [SEND])
    assert tokens.scope_of(ADMIN) is Scope.ADMIN
    assert tokens.scope_of(SEND) is Scope.SEND
    assert tokens.scope_of("nope") is None
    assert Tokens([ADMIN], [ADMIN]).scope_of(ADMIN) is Scope.SEND  # listed twice: the lesser


def test_without_tokens_the_api_answers_local_requests_only() -> None:
    tokens = Tokens()
    assert not tokens.configured
    assert tokens.caller(request()) == Caller(Scope.ADMIN, None)
    with pytest.raises(NotLocal):
        tokens.caller(request(peer="192.0.2.7"))
    with pytest.raises(NotLocal):
        tokens.caller(request(host="evil.example"))


def test_with_tokens_the_api_wants_a_known_bearer_token() -> None:
    tokens = Tokens([ADMIN], [SEND])
    with pytest.raises(MissingToken):
        tokens.caller(request())  # even from loopback
    with pytest.raises(InvalidToken):
        tokens.caller(request(authorization="Bearer nope"))
    assert tokens.caller(request(authorization=f"Bearer {ADMIN}")) == Caller(
        Scope.ADMIN, fingerprint(ADMIN)
    )
    send = tokens.caller(request(peer="192.0.2.7", authorization=f"Bearer {SEND}"))
    assert send == Caller(Scope.SEND, fingerprint(SEND))
    assert send.submitter is not None and SEND not in send.submitter


def test_a_session_cookie_is_derived_from_an_admin_token_only() -> None:
    tokens = Tokens([ADMIN], [SEND])
    value = tokens.login(ADMIN)
    assert value == session_value(ADMIN) and ADMIN not in value
    assert tokens.login(SEND) is None and tokens.login("") is None
    assert session_value(ADMIN) != session_value(ADMIN + "x")


def test_the_dashboard_lets_in_an_admin_by_token_or_cookie() -> None:
    tokens = Tokens([ADMIN], [SEND])
    by_token = tokens.session(request(peer="192.0.2.7", authorization=f"Bearer {ADMIN}"))
    assert by_token == Session(session_value(ADMIN)[:16], browser=False)
    by_cookie = tokens.session(request(peer="192.0.2.7", cookie=session_value(ADMIN)))
    assert by_cookie == Session(session_value(ADMIN)[:16], browser=True)
    for refused in (
        request(),  # loopback is not enough once an admin token is set
        request(authorization=f"Bearer {SEND}"),  # a send token is not an admin
        request(cookie=session_value(SEND)),
        request(cookie="forged"),
    ):
        with pytest.raises(MissingToken):
            tokens.session(refused)


def test_without_an_admin_token_the_dashboard_is_for_local_requests() -> None:
    tokens = Tokens([], [SEND])  # send tokens alone keep the API locked, not the dashboard
    assert tokens.session(request()) == Session("loopback", browser=True)
    with pytest.raises(NotLocal):
        tokens.session(request(host="evil.example"))
    with pytest.raises(NotLocal):
        tokens.session(request(peer="192.0.2.7", authorization=f"Bearer {SEND}"))


def test_a_csrf_token_is_bound_to_its_session_and_key() -> None:
    csrf = Csrf(b"k" * 32)
    mine = Session("aaaa", browser=True)
    token = csrf.token(mine)
    assert csrf.check(mine, token)
    assert not csrf.check(mine, "")
    assert not csrf.check(Session("bbbb", browser=True), token)
    assert not Csrf(b"j" * 32).check(mine, token)  # a restart makes a new key
    assert csrf.check(Session("aaaa", browser=False), "")  # a script with a bearer token
