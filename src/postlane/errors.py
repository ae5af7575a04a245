"""postlane's exceptions.

Every error a user can meet is a :class:`PostlaneError` carrying a message they can act on. The
CLI prints it as one line, the HTTP API answers it as JSON with a 4xx status, SMTP submission as a
5xx (or 4xx) reply::

    PostlaneError
    ├── ConfigError          a bad or unknown configuration key (names the key)
    ├── ValidationError      a message that cannot be accepted (bad address, header injection, ...)
    │   └── MessageTooLarge  over the configured max_size
    ├── IdempotencyConflict  an idempotency key reused with another payload (HTTP 409)
    ├── NotFound             no message, dead letter or suppression with that id or address
    ├── SuppressedRecipients a requeue of dead letters whose addresses are suppressed (HTTP 409)
    ├── StoreUnavailable     the store cannot be reached or is locked for too long
    └── TransportError       a relay or provider that cannot be configured or reached
"""

from __future__ import annotations


class PostlaneError(Exception):
    """Base class of every error postlane reports to a user."""

    #: A stable, machine-readable code used in JSON errors.
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(PostlaneError):
    """The configuration file or environment holds an unknown key or a bad value."""

    code = "config_error"


class ValidationError(PostlaneError):
    """A message was refused before anything was stored."""

    code = "invalid_message"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class MessageTooLarge(ValidationError):
    code = "message_too_large"


class IdempotencyConflict(PostlaneError):
    """An idempotency key its submitter already used for a different message (Stripe's rule:
    the same key with the same payload is a retry and gets the first id; with another payload it
    is a mistake, and nothing is stored)."""

    code = "idempotency_conflict"

    def __init__(self, key: str, existing_id: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used for message {existing_id} with a "
            "different payload; use a new key for a new message"
        )
        self.key = key
        self.existing_id = existing_id


class NotFound(PostlaneError):
    code = "not_found"


class SuppressedRecipients(PostlaneError):
    """A requeue of dead letters whose addresses are on the suppression list: requeued, they
    would be marked ``suppressed`` at once and never attempted. Nothing was requeued; lift
    their suppression with the requeue (``unsuppress``), or remove them from the list first."""

    code = "suppressed_recipients"

    def __init__(self, addresses: list[str] | tuple[str, ...]) -> None:
        self.addresses = tuple(addresses)
        shown = ", ".join(self.addresses[:5])
        if len(self.addresses) > 5:
            shown += f" and {len(self.addresses) - 5} more"
        super().__init__(
            f"{len(self.addresses)} of these dead letters are on the suppression list ({shown}): "
            "requeued, they would be marked suppressed and never attempted; nothing was "
            "requeued. Requeue with unsuppress to lift their suppression, or remove them from "
            "the list first"
        )


class StoreUnavailable(PostlaneError):
    """The store could not be opened or answered with an error the caller cannot fix."""

    code = "store_unavailable"


class NoQueue(StoreUnavailable):
    """The store named does not exist (a SQLite file, postlane's tables in a database), and
    this caller may not make it: an operator's command, or a guess of ``./postlane.db`` without
    a configuration file. Front doors add how to name the right one their own way."""


class StoreFull(StoreUnavailable):
    """The store's disk (or SQLite's page limit) is full: nothing more can be written until
    room is made. Still :class:`StoreUnavailable` to every caller (HTTP 503, the same code);
    SMTP says ``452 4.3.1`` (insufficient system storage) as Postfix does."""


class TransportError(PostlaneError):
    code = "transport_error"


def kind_of(value: object) -> str:
    """What a refused value is, for an error: ``None``, ``int``, ``list``, ..."""
    return "None" if value is None else type(value).__name__


def quoted(value: object, most: int = 40) -> str:
    """A refused value as an error shows it: its repr, cut to ``most`` characters (a value
    the client sent may be any length, and the error goes back to it, and to the log)."""
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."
