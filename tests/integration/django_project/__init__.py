"""A minimal real Django project whose email goes through postlane (tests/integration/test_django.py
drives it with django.test.Client)."""
