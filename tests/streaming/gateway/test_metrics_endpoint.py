"""quotas/views.py: the Prometheus endpoint and who may scrape it."""


import pytest
from django.test import override_settings

from streaming.telemetry import live
from streaming.streams.buffer import StreamFigures


@pytest.fixture
def one_stream():
    live.register("req_metrics", 1, "u", "sim-small", StreamFigures(), lambda: False)
    yield
    live.unregister("req_metrics")


def test_staff_session_scrapes_with_active_streams_counted_at_scrape_time(admin_client, one_stream):
    response = admin_client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    body = response.content.decode()
    assert f"sluice_active_streams {float(len(live.active))}" in body
    for name in ("sluice_streams_total", "sluice_completion_tokens_total", "sluice_backpressure_pauses_total",
                 "sluice_refusals_total", "sluice_upstream_errors_total", "sluice_upstream_queue_length"):
        assert f"# TYPE {name.removesuffix('_total')}" in body


def test_anonymous_and_non_staff_are_refused(client, django_user_model):
    anonymous = client.get("/metrics")
    assert (anonymous.status_code, anonymous["WWW-Authenticate"]) == (401, 'Bearer realm="metrics"')
    client.force_login(django_user_model.objects.create_user("member", password="x"))
    assert client.get("/metrics").status_code == 403


@pytest.mark.django_db
def test_the_metrics_token_admits_a_scraper(client):
    assert client.get("/metrics", headers={"Authorization": "Bearer anything"}).status_code == 401  # no token set
    with override_settings(METRICS_TOKEN="scrape-me"):
        assert client.get("/metrics", headers={"Authorization": "Bearer scrape-me"}).status_code == 200
        assert client.get("/metrics", headers={"Authorization": "Bearer scrape-you"}).status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Basic scrape-me"}).status_code == 401
