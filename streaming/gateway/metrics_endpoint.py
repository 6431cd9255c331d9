"""Operator endpoints outside the admin: Prometheus metrics."""

import hmac

from django.conf import settings
from django.http import HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streaming.telemetry import live, metrics as sluice_metrics


async def metrics(request):
    """This process's metrics, for a staff session or `Authorization: Bearer <METRICS_TOKEN>`."""
    if not _has_metrics_token(request):
        user = await request.auser()
        if not (user.is_active and user.is_staff):
            status = 403 if user.is_authenticated else 401
            response = HttpResponse("Metrics need a staff session or the metrics token.\n", status=status,
                                    content_type="text/plain")
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    sluice_metrics.ACTIVE_STREAMS.set(len(live.active))
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)


def _has_metrics_token(request):
    token = getattr(settings, "METRICS_TOKEN", "")
    scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
    return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(offered.strip().encode(), token.encode())
