"""postlane: a durable outbound email queue.

import postlane

mail = postlane.Postlane()                      # postlane.toml, or SQLite in the cwd
result = mail.send(sender="app@example.com", to=["ada@example.net"],
                   subject="Welcome", text="Hello Ada", lane="high")
print(result.id, result.duplicate)
"""

from postlane.app import AsyncPostlane
from postlane.blocking import Postlane
from postlane.classify import ReplyClass, Verdict, classify
from postlane.client import AsyncClient, Client
from postlane.config import Config, load_config
from postlane.errors import (
    ConfigError,
    IdempotencyConflict,
    MessageTooLarge,
    NotFound,
    PostlaneError,
    StoreUnavailable,
    TransportError,
    ValidationError,
)
from postlane.message import Lane, Message, RecipientState
from postlane.mime import Attachment
from postlane.records import Cancelled, EnqueueResult, Selector

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncPostlane",
    "Attachment",
    "Cancelled",
    "Client",
    "Config",
    "ConfigError",
    "EnqueueResult",
    "IdempotencyConflict",
    "Lane",
    "Message",
    "MessageTooLarge",
    "NotFound",
    "Postlane",
    "PostlaneError",
    "RecipientState",
    "ReplyClass",
    "Selector",
    "StoreUnavailable",
    "TransportError",
    "ValidationError",
    "Verdict",
    "classify",
    "load_config",
]
