#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""
import os
import sys


def load_dotenv(path=".env"):
    """KEY=VALUE lines from a local, git-ignored .env (`./dev demo` writes the secret key there);
    variables already set win."""
    env_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    if os.path.exists(env_file):
        with open(env_file) as lines:
            for line in lines:
                name, sep, value = line.strip().partition("=")
                if sep and name and not name.startswith("#"):
                    os.environ.setdefault(name.strip(), value.strip())


def main():
    load_dotenv()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
