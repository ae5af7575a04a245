"""Settings of the test project: no apps, no middleware, postlane as the email backend.

The tests point ``POSTLANE_CONFIG`` (or ``POSTLANE_URL``, or ``POSTLANE_OUTBOX``) at their own
throwaway postlane with ``override_settings``. With ``$POSTLANE_TEST_POSTGRES`` set, a second
database alias ``postgres`` is there for the transactional-outbox test.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

SECRET_KEY = "postlane-test-project-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost"]
ROOT_URLCONF = "tests.integration.django_project.urls"
INSTALLED_APPS: list[str] = ["postlane.django"]  # manage.py postlane_events
MIDDLEWARE: list[str] = []
USE_TZ = True


def database_from_url(url: str) -> dict[str, Any]:
    """A Django ``DATABASES`` entry from a libpq URL (``postgresql://user:pw@host:port/db``)."""
    parts = urlsplit(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "OPTIONS": dict(parse_qsl(parts.query)),
    }


DATABASES: dict[str, dict[str, Any]] = {
    # the on_commit test needs transactions, not tables: an in-memory SQLite is enough
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
}
if os.environ.get("POSTLANE_TEST_POSTGRES"):
    DATABASES["postgres"] = database_from_url(os.environ["POSTLANE_TEST_POSTGRES"])

EMAIL_BACKEND = "postlane.django.EmailBackend"
DEFAULT_FROM_EMAIL = "Shop <shop@example.com>"
POSTLANE_CONFIG = None  # each test points it at its own postlane.toml
POSTLANE_DEFAULT_LANE = "normal"

#: the table the outbox sign-up view writes (a test sets it to one in its own schema)
SIGNUP_TABLE = "signups"
