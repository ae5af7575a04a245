"""Who gets in over HTTP: the rules the API and the dashboard share (postlane.auth)."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from postlane.auth import (
    SESSION_COOKIE,
    Attempts,
    Caller,
    Csrf,
    InvalidToken,
    MissingToken,
    NoAdminToken,
    NotAdmin,
    NotLocal,
    Scope,
    Session,
    Tokens,
    TooManyAttempts,
    addressed_locally,
    bearer_token,
    client_key,
    fingerprint,
    is_local,
)
from postlane.config import config_from_dict
from postlane.errors import ConfigError
from postlane.sender_bindings import SendToken

ADMIN = "admin-t0ken-for-the-tests"
SEND = "send-t0ken-for-the-tests"


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


def test_a_send_token_bound_to_senders_makes_a_caller_that_may_send_from_them_only() -> None:
    bound = SendToken("shop-t0ken-for-the-tests", ("shop.example.com", "mail.shop.example.com"))
    tokens = Tokens([ADMIN, bound.token], [SEND, bound])

    def caller(token: str) -> Caller:
        return tokens.caller(request(peer="192.0.2.7", authorization=f"Bearer {token}"))

    shop = caller(bound.token)  # listed as admin too: the lesser, send, with its senders
    assert shop == Caller(Scope.SEND, fingerprint(bound.token), bound.senders)
    assert shop.may_send_from("shop.example.com") and shop.may_send_from("Mail.Shop.Example.COM")
    assert not shop.may_send_from("other.example")
    assert not shop.may_send_from("news.shop.example.com")  # exact: subdomains are listed
    assert caller(SEND).senders is None and caller(SEND).may_send_from("other.example")
    assert caller(ADMIN).senders is None and caller(ADMIN).may_send_from("other.example")


def test_a_short_token_in_a_send_token_table_is_refused_at_start_without_showing_it() -> None:
    config = config_from_dict(
        {"http": {"send_tokens": [SEND, {"token": "short-one", "senders": ["shop.example.com"]}]}}
    )
    with pytest.raises(ConfigError) as refused:
        Tokens.from_config(config.http)
    assert refused.value.message.startswith("http.send_tokens: token 2 of 2 is 9 characters")
    assert "short-one" not in refused.value.message and "\n" not in refused.value.message


def test_without_tokens_the_api_answers_local_requests_only() -> None:
    tokens = Tokens()
    assert not tokens.configured
    assert tokens.caller(request()) == Caller(Scope.ADMIN, None)
    with pytest.raises(NotLocal):
        tokens.caller(request(peer="192.0.2.7"))
    with pytest.raises(NotLocal):
        tokens.caller(request(host="evil.example"))


def test_a_token_sent_to_a_server_without_tokens_is_said_once_never_shown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A new user's audit: a client set up with a wrong token passed unseen against a local
    server without tokens (every loopback client is admin), until production refused it.
    The server says once that it checks no token; the token is never written."""
    tokens = Tokens()
    caplog.set_level("WARNING", logger="postlane.auth")
    assert tokens.caller(request()) == Caller(Scope.ADMIN, None)
    assert caplog.records == []  # no token, nothing to say
    for _ in range(3):
        bearer = request(authorization="Bearer wrongtoken-wrongtoken")
        assert tokens.caller(bearer) == Caller(Scope.ADMIN, None)
    [said] = caplog.records
    assert "no [http] tokens are configured" in said.getMessage()
    assert "wrongtoken" not in said.getMessage()


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


def test_a_session_is_started_by_an_admin_token_only() -> None:
    tokens = Tokens([ADMIN], [SEND])
    value = tokens.login(request(), ADMIN)
    assert ADMIN not in value and value != tokens.login(request(), ADMIN)  # a new one each time
    for wrong in (SEND, "", ADMIN + "x"):
        with pytest.raises(InvalidToken):
            tokens.login(request(), wrong)


def test_the_dashboard_lets_in_an_admin_by_token_or_cookie() -> None:
    tokens = Tokens([ADMIN], [SEND])
    by_token = tokens.session(request(peer="192.0.2.7", authorization=f"Bearer {ADMIN}"))
    assert by_token == Session(fingerprint(ADMIN), browser=False)
    cookie = tokens.login(request(), ADMIN)
    by_cookie = tokens.session(request(peer="192.0.2.7", cookie=cookie))
    sid = cookie.split(".")[0]
    assert by_cookie == Session(sid, browser=True, session_id=sid)
    other = Tokens([ADMIN + "-rotated"], [SEND])
    for refused in (
        request(),  # loopback is not enough once an admin token is set
        request(cookie="forged"),
        request(cookie=cookie.rsplit(".", 1)[0] + ".00"),
        request(cookie="a.\u00b2.b"),  # a digit to str.isdigit, not to int()
    ):
        with pytest.raises(MissingToken):
            tokens.session(refused)
    with pytest.raises(NotAdmin):  # a send token is not an admin: refused, not a guess
        tokens.session(request(authorization=f"Bearer {SEND}"))
    assert tokens.attempts.failures["dashboard"] == 0
    with pytest.raises(MissingToken):
        other.session(request(cookie=cookie))  # a rotated token ends its sessions


def test_without_any_token_the_dashboard_is_for_local_requests() -> None:
    tokens = Tokens([], [])
    assert tokens.session(request()) == Session("loopback", browser=True)
    with pytest.raises(NotLocal):
        tokens.session(request(host="evil.example"))
    with pytest.raises(NotLocal):
        tokens.session(request(peer="192.0.2.7"))


def test_with_send_tokens_alone_the_dashboard_is_locked_as_the_api_is() -> None:
    """A security audit: with send tokens only, any local client (or a proxy on this host)
    got the admin dashboard without a token, while the API said 401 to everyone."""
    tokens = Tokens([], [SEND])
    for visitor in (request(), request(authorization=f"Bearer {SEND}")):
        with pytest.raises(NoAdminToken):
            tokens.session(visitor)


def test_a_csrf_token_is_bound_to_its_session_and_key() -> None:
    csrf = Csrf(b"k" * 32)
    mine = Session("aaaa", browser=True)
    token = csrf.token(mine)
    assert csrf.check(mine, token)
    assert not csrf.check(mine, "")
    assert not csrf.check(Session("bbbb", browser=True), token)
    assert not Csrf(b"j" * 32).check(mine, token)  # another store's key
    assert csrf.check(Session("aaaa", browser=False), "")  # a script with a bearer token
    unkeyed = Csrf()  # the store has not answered yet: no page has a token, no form passes
    assert unkeyed.token(mine) == "" and not unkeyed.check(mine, "")
    unkeyed.use(b"k" * 32)
    assert unkeyed.check(mine, token)


# -- audit finding 11: guessing is slowed, sessions end --------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_finding_11_a_client_failing_too_often_waits_longer_each_time() -> None:
    clock = Clock()
    attempts = Attempts(clock)
    for _ in range(Attempts.FREE):  # a few typos are free
        attempts.check("192.0.2.7", "login")
        attempts.failed("192.0.2.7", "login")
    waits = []
    for _ in range(12):
        attempts.check("192.0.2.7", "login")  # the wait is over: this one is looked at
        attempts.failed("192.0.2.7", "login")
        with pytest.raises(TooManyAttempts) as refused:
            attempts.check("192.0.2.7", "login")
        waits.append(refused.value.retry_after)
        clock.now += refused.value.retry_after
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    attempts.check("198.51.100.1", "login")  # another client is not held up
    clock.now += Attempts.FORGET + 1  # quiet for long enough: forgotten
    for _ in range(Attempts.FREE):
        attempts.failed("192.0.2.7", "login")
    attempts.check("192.0.2.7", "login")
    assert attempts.failures["login"] == 2 * Attempts.FREE + 12
    assert attempts.throttled["login"] == 12


def test_finding_11_a_wide_attack_makes_every_failing_client_wait_at_once() -> None:
    clock = Clock()
    attempts = Attempts(clock)
    for n in range(Attempts.WIDE + 1):  # one guess each from many addresses
        attempts.failed(f"10.0.{n // 250}.{n % 250}", "api")
    attempts.failed("203.0.113.5", "api")  # a newcomer's first failure now costs a wait
    with pytest.raises(TooManyAttempts):
        attempts.check("203.0.113.5", "api")
    attempts.check("198.51.100.1", "api")  # who never fails never waits
    clock.now += Attempts.WIDE_WINDOW + 1
    attempts.failed("203.0.113.99", "api")  # the wave passed: first failures are free again
    attempts.check("203.0.113.99", "api")


def test_finding_11_remembered_clients_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Attempts, "CLIENTS", 100)
    attempts = Attempts(Clock())
    for n in range(1000):
        attempts.failed(f"10.1.{n // 250}.{n % 250}", "api")
    assert attempts.remembered == 100


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),  # the same /64: the same client
        ("::ffff:192.0.2.7", "192.0.2.7"),
    ],
)
def test_finding_11_failures_are_counted_per_address_and_per_ipv6_64(peer: str, key: str) -> None:
    assert client_key(request(peer=peer)) == key


def test_finding_11_wrong_bearer_tokens_are_counted_and_then_not_looked_at() -> None:
    clock = Clock()
    tokens = Tokens([ADMIN], [SEND], clock=clock)
    for _ in range(Attempts.FREE + 1):
        with pytest.raises(InvalidToken):
            tokens.caller(request(peer="192.0.2.7", authorization="Bearer guess-guess-guess"))
    with pytest.raises(TooManyAttempts):  # the right token too: it is not even looked at
        tokens.caller(request(peer="192.0.2.7", authorization=f"Bearer {ADMIN}"))
    assert tokens.caller(request(peer="198.51.100.1", authorization=f"Bearer {ADMIN}"))
    clock.now += 1
    assert tokens.caller(request(peer="192.0.2.7", authorization=f"Bearer {ADMIN}"))


def test_finding_11_a_session_expires_and_ends_at_logout() -> None:
    clock = Clock()
    tokens = Tokens([ADMIN], clock=clock, session_lifetime=3600)
    cookie = tokens.login(request(), ADMIN)
    assert tokens.session(request(cookie=cookie)).browser
    clock.now += 3599
    assert tokens.session(request(cookie=cookie)).browser
    clock.now += 2  # absolute: however busy the session was
    with pytest.raises(MissingToken):
        tokens.session(request(cookie=cookie))
    second = tokens.login(request(), ADMIN)
    other = tokens.login(request(), ADMIN)
    tokens.logout(request(cookie=second))
    with pytest.raises(MissingToken):
        tokens.session(request(cookie=second))  # ended here, whoever kept the cookie
    assert tokens.session(request(cookie=other)).browser  # the others live on
    restarted = Tokens([ADMIN], clock=clock, session_lifetime=3600)
    assert restarted.session(request(cookie=other)).browser  # signed, not kept in memory


@pytest.mark.parametrize(
    ("http", "key"),
    [
        ({"tokens": ["short-token"]}, "http.tokens"),
        ({"tokens": ["x" * 16, "y" * 15]}, "http.tokens"),
        ({"send_tokens": ["abc"]}, "http.send_tokens"),
    ],
)
def test_finding_11_a_token_shorter_than_16_characters_is_refused_at_start(
    http: dict[str, list[str]], key: str
) -> None:
    config = config_from_dict({"http": http})
    with pytest.raises(ConfigError) as refused:
        Tokens.from_config(config.http)
    assert key in refused.value.message and "16" in refused.value.message
    for token in (*http.get("tokens", []), *http.get("send_tokens", [])):
        assert token not in refused.value.message  # never the token itself
    Tokens.from_config(config_from_dict({"http": {"tokens": ["z" * 16]}}).http)
