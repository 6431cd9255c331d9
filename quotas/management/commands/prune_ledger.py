from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from quotas.domain import retention


class Command(BaseCommand):
    help = ("Delete settled ledger rows older than the kept months (docs/operations.md, 'Ledger retention'): the "
            "current UTC month and --keep-months before it stay, as does every row still streaming; the daily "
            "roll-ups (the dashboard's charts) are never deleted. Safe to run from cron while serving.")

    def add_arguments(self, parser):
        parser.add_argument("--keep-months", type=int, default=3,
                            help="Whole months kept before the current one (default 3, at least 1).")
        parser.add_argument("--dry-run", action="store_true", help="Count what would go; delete nothing.")

    def handle(self, keep_months, dry_run, **options):
        try:
            before = retention.cutoff(keep_months, timezone.now())
        except ValueError as error:
            raise CommandError(f"--keep-months {keep_months}: {error}.") from None
        if dry_run:
            count = retention.prunable(before).count()
            self.stdout.write(f"{count} ledger rows started before {before.isoformat()} would be deleted.")
            return
        count = retention.prune(before)
        self.stdout.write(f"{count} ledger rows started before {before.isoformat()} deleted.")
