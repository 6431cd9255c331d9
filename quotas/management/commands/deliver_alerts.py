import logging
import signal
import threading

from django.core.management.base import BaseCommand
from django.db import DatabaseError, close_old_connections, connections

from quotas.domain import outbox

logger = logging.getLogger("quotas.alerts")


class Command(BaseCommand):
    help = ("Send the alert outbox's due deliveries (e-mails, signed webhooks), retrying failures with backoff "
            "(docs/operations.md, 'Alerts'). Runs until SIGTERM or Ctrl-C; --once makes one pass (for cron). Any "
            "number of workers may run at once.")

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="Send what is due now, then exit.")
        parser.add_argument("--interval", type=float, default=5.0,
                            help="Seconds between looks at the outbox when there is nothing to send (default 5).")

    def handle(self, once, interval, **options):
        stop = threading.Event()
        if not once and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: stop.set())
        while True:
            try:
                outcomes = outbox.deliver_due(should_stop=stop.is_set)
            except DatabaseError:
                # The database is away: say so, drop the connection, look again after the interval.
                logger.warning("could not read the alert outbox", exc_info=True)
                connections.close_all()
                outcomes = None
            else:
                close_old_connections()
            if outcomes:
                self.stdout.write(", ".join(f"{name} {outcomes[name]}" for name in ("sent", "retry", "failed")
                                            if outcomes[name]))
            if once or stop.wait(interval):
                return
