"""``manage.py runserver``: Daphne's development server, with HTTP backpressure.

The ``streaming`` app is listed before ``daphne`` in INSTALLED_APPS, so this command wins over Daphne's.
"""

from daphne.management.commands.runserver import Command as DaphneRunserverCommand

from streaming.server.backpressure import BackpressureServer


class Command(DaphneRunserverCommand):
    server_cls = BackpressureServer
