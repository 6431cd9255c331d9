from django.apps import AppConfig


class StreamingConfig(AppConfig):
    name = "streaming"
    verbose_name = "Streaming gateway"

    def ready(self):
        from . import checks  # noqa: F401  (registers the system checks)
