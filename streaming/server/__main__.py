"""Production entry point: Daphne's command line, serving with HTTP backpressure.

    python -m streaming.server -b 0.0.0.0 -p 8000 config.asgi:application

Takes every ``daphne`` argument; only the server class differs (see backpressure.py).
"""

from streaming.server.backpressure import BackpressureServer  # isort:skip  (installs the asyncio reactor first)

import sys

from daphne.cli import CommandLineInterface


class BackpressureCommandLineInterface(CommandLineInterface):
    server_class = BackpressureServer


def main(argv=None):
    BackpressureCommandLineInterface().run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
