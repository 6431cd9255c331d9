from django.apps import AppConfig

from .server import reactor

# Before daphne's app is imported (it installs Twisted's reactor on asyncio's stock loop): see streaming/server/reactor.py.
reactor.install()


class StreamingConfig(AppConfig):
    name = "streaming"
    verbose_name = "Streaming gateway"

    def ready(self):
        from quotas.domain import catalogue

        from . import checks  # noqa: F401  (registers the system checks)
        from .console import sources
        from .server import shutdown
        from .streams import relay

        # SIGTERM: once the drain time is up, the streams still running end with an error event and are settled.
        if relay.end_all not in shutdown.hooks:
            shutdown.hooks.append(relay.end_all)
        # Plans' models and the dashboard's deployments come from the catalogue (quotas cannot import it).
        catalogue.set_source(sources.model_names, sources.deployments)
