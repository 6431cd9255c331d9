from django.apps import AppConfig


class QuotasConfig(AppConfig):
    name = "quotas"
    verbose_name = "Quotas and usage"

    def ready(self):
        # The operators' console lives in quotas/console/ (Django's autodiscovery looks for quotas.admin).
        from .console import admin  # noqa: F401
