"""``INSTALLED_APPS = [..., "postlane.django"]``: brings ``manage.py postlane_events`` (the
event log as Django signals). No models, no migrations; the email backend works without it."""

from __future__ import annotations

from django.apps import AppConfig  # type: ignore[import-untyped]


class PostlaneConfig(AppConfig):  # type: ignore[misc]
    name = "postlane.django"
    label = "postlane"
    verbose_name = "postlane"
