import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db.models import Q
from django.utils import timezone

from quotas.models import ApiKey, Plan, UserQuota

# How to make another key: keys are shown once, so a later run cannot print the first one again.
NEW_KEY_HINT = ".venv/bin/python manage.py create_api_key demo --name laptop"


class Command(BaseCommand):
    help = ("Create the plans, a demo user and a staff user (idempotent); print their passwords and, the first time, "
            "a demo API key.")

    def handle(self, **options):
        default, _ = Plan.objects.get_or_create(name="default", defaults={"is_default": True})
        Plan.objects.get_or_create(name="pro", defaults={
            "tokens_per_day": 2_000_000, "tokens_per_month": 30_000_000, "requests_per_minute": 600,
            "concurrent_streams": 16, "max_tokens_per_request": 8192})
        User = get_user_model()
        lines = []
        for username, staff in (("demo", False), ("admin", True)):
            user, created = User.objects.get_or_create(username=username, defaults={"is_staff": staff,
                                                                                   "is_superuser": staff})
            if created:
                password = secrets.token_urlsafe(9)
                user.set_password(password)
                user.save()
                lines.append(f"  {username:6} password: {password}")
            else:
                lines.append(f"  {username:6} (already exists; password unchanged — "
                             f"`.venv/bin/python manage.py changepassword {username}` to set one)")
            UserQuota.objects.get_or_create(user=user, defaults={"plan": default})
        self.stdout.write("Sluice demo accounts:\n" + "\n".join(lines))
        # One demo key, not one more per run: a new one only while the demo user has no usable key named "demo".
        demo = User.objects.get(username="demo")
        now = timezone.now()
        usable = ApiKey.objects.filter(user=demo, name="demo", revoked_at__isnull=True).filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        if usable.exists():
            self.stdout.write(f"  demo API key: issued before (a key is shown only once); another: `{NEW_KEY_HINT}`")
        else:
            _, raw = ApiKey.issue(demo, name="demo")
            self.stdout.write(f"  demo API key: {raw}   (shown once: `export SLUICE_KEY={raw}`)")
