"""Test settings: the project's settings with a throwaway secret (subprocess servers inherit it)."""

import os

os.environ.setdefault("DJANGO_SECRET_KEY", "tests-only-secret-key-not-for-production-0123456789")

from config.settings import *  # noqa: E402,F401,F403
