from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from quotas.models import ApiKey


class Command(BaseCommand):
    help = "Create an API key for USERNAME and print it once (only its hash is stored)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="A label to tell the user's keys apart.")

    def handle(self, username, name, **options):
        try:
            user = get_user_model().objects.get(username=username)
        except get_user_model().DoesNotExist:
            raise CommandError(f"No user named {username!r}. Create one with `manage.py createsuperuser` first.")
        _, raw = ApiKey.issue(user, name=name)
        self.stdout.write(raw)
