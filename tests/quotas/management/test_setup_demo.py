"""`manage.py setup_demo` (what `./dev demo` runs each time): idempotent, and one demo API key, not one more per run."""

import io
import re

import pytest
from django.core.management import call_command
from django.utils import timezone

from quotas.models import ApiKey

pytestmark = pytest.mark.django_db


def setup_demo():
    out = io.StringIO()
    call_command("setup_demo", stdout=out)
    return out.getvalue()


def test_the_demo_key_is_issued_once_and_later_runs_say_how_to_make_another():
    first = setup_demo()
    raw = re.search(r"demo API key: (sk-sluice-\S+)", first).group(1)
    assert f"export SLUICE_KEY={raw}" in first
    again = setup_demo()
    assert "sk-sluice-" not in again
    assert "`.venv/bin/python manage.py create_api_key demo --name laptop`" in again
    assert "`.venv/bin/python manage.py changepassword demo`" in again  # hints name the venv's python
    assert ApiKey.objects.filter(name="demo").count() == 1


def test_a_revoked_demo_key_is_replaced_on_the_next_run():
    setup_demo()
    ApiKey.objects.filter(name="demo").update(revoked_at=timezone.now())
    assert "demo API key: sk-sluice-" in setup_demo()
    assert ApiKey.objects.filter(name="demo", revoked_at__isnull=True).count() == 1
