"""Test settings: the project's settings with a throwaway secret (subprocess servers inherit it)."""

import os

os.environ.setdefault("DJANGO_SECRET_KEY", "tests-only-secret-key-not-for-production-0123456789")

from config.settings import *  # noqa: E402,F401,F403

# In this process, the catalogue is what the settings say unless a test writes records (tests/streaming/catalogue/):
# a first request must not write records that the test's rollback then removes behind the registry's back.
# (Gateway processes started by the tests use these settings too, and may set it: tests/support/gateways.py.)
if not os.environ.get("SLUICE_CATALOGUE_BOOTSTRAP"):
    SLUICE_CATALOGUE_BOOTSTRAP = False

# Django's advice for tests: a fast hasher (PBKDF2's 1.2 million iterations cost ~0.4 s a user, and the suite makes
# hundreds). The gateway processes the tests start read these settings too, so their logins check the same hashes.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
