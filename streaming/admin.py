"""Found by Django's admin autodiscovery: the catalogue's pages live in streaming/console/."""

from .console import catalogue  # noqa: F401 (registers the providers' and models' pages)
