"""This process's catalogue: loaded from the database, kept for SLUICE_CATALOGUE_REFRESH seconds, then reloaded in
the background while requests go on with the one they have (so an admin edit reaches every process within that time,
and no request waits for it). An edit saved in this process applies at its next request (the signals below).

While the database holds no provider, the catalogue is what the settings say (snapshot.from_settings); on a server's
first load, those records are written (SLUICE_CATALOGUE_BOOTSTRAP), after which the database alone is the truth.
"""

import asyncio
import logging
import time

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models.signals import post_delete, post_save

from .models import Deployment, ModelPrice, Provider, ServedModel
from .snapshot import Catalogue, bootstrap_provider, from_records, from_settings, settings_key

logger = logging.getLogger(__name__)


class _State:
    catalogue: Catalogue | None = None
    loaded_at = -float("inf")
    settings_key = None
    refreshing: asyncio.Task | None = None


_state = _State()


def invalidate(**_):
    """The next request loads the catalogue afresh (an edit in this process, a test's new records)."""
    _state.catalogue = None
    _state.loaded_at = -float("inf")


for _model in (Provider, ServedModel, Deployment, ModelPrice):
    post_save.connect(invalidate, sender=_model, dispatch_uid=f"catalogue-{_model.__name__}-saved")
    post_delete.connect(invalidate, sender=_model, dispatch_uid=f"catalogue-{_model.__name__}-deleted")


def load() -> Catalogue:
    """Read the records (four queries); bootstrap them from the settings first if there are none."""
    providers = list(Provider.objects.all())
    if not providers and settings.SLUICE_CATALOGUE_BOOTSTRAP:
        bootstrap()
        providers = list(Provider.objects.all())
    if not providers:
        return from_settings()
    return from_records(providers, list(ServedModel.objects.all()),
                        list(Deployment.objects.select_related("provider")), list(ModelPrice.objects.all()))


def bootstrap() -> bool:
    """Write the settings' provider and models as records, if the catalogue is empty. Several processes starting at
    once: one writes, the others find its records."""
    if Provider.objects.exists():
        return False
    spec = bootstrap_provider()
    try:
        with transaction.atomic():
            provider = Provider.objects.create(**spec)
            for name in dict.fromkeys(settings.SLUICE_MODELS):
                model = ServedModel.objects.create(name=name)
                Deployment.objects.create(model=model, provider=provider, upstream_model=name)
    except IntegrityError:
        return False
    logger.info("catalogue bootstrapped from the settings: provider %s, models %s", spec["name"],
                ", ".join(settings.SLUICE_MODELS))
    return True


def _fresh(catalogue):
    _state.catalogue = catalogue
    _state.loaded_at = time.monotonic()
    _state.settings_key = settings_key()
    return catalogue


def _usable(now):
    catalogue = _state.catalogue
    if catalogue is None:
        return None
    # Built from the settings: rebuilt when they change (tests override them), without a query.
    if catalogue.source == "settings" and _state.settings_key != settings_key():
        return None
    return catalogue


async def current() -> Catalogue:
    now = time.monotonic()
    catalogue = _usable(now)
    if catalogue is None:
        return _fresh(await sync_to_async(load)())
    if now - _state.loaded_at > settings.SLUICE_CATALOGUE_REFRESH:
        task = _state.refreshing
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            _state.refreshing = asyncio.ensure_future(_refresh())
    return catalogue


async def _refresh():
    try:
        _fresh(await sync_to_async(load)())
    except Exception:  # the database is down: keep serving the catalogue we have, try again at the next request
        logger.warning("the catalogue could not be reloaded; the last one stays in use", exc_info=True)
        _state.loaded_at = time.monotonic()


def current_sync() -> Catalogue:
    """For synchronous code (the admin, management commands): loaded afresh when stale."""
    catalogue = _usable(time.monotonic())
    if catalogue is None or time.monotonic() - _state.loaded_at > settings.SLUICE_CATALOGUE_REFRESH:
        catalogue = _fresh(load())
    return catalogue
