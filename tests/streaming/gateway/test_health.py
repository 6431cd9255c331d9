"""/healthz (the process is up: no database, no store) and /readyz (the database and the counter store answer),
without authentication, on real gateway processes: the session's, and ones whose database or store is unreachable.
"""

import httpx2
import pytest

from bench.servers import free_port
from tests.support.gateways import gateway_server

pytestmark = pytest.mark.django_db(transaction=True)


def json_of(response, status):
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/json"
    return response.json()


def test_a_healthy_gateway_is_live_and_ready(gateway):
    assert json_of(httpx2.get(gateway.base_url + "/healthz"), 200) == {"status": "ok"}
    ready = json_of(httpx2.get(gateway.base_url + "/readyz"), 200)
    assert ready == {"status": "ok", "checks": {"database": "ok", "counter_store": "ok"}}


def test_probes_are_answered_for_any_host_and_refuse_other_methods(gateway):
    # Load balancers probe by address (not in ALLOWED_HOSTS), and a probe must not need a session or a CSRF token.
    headers = {"Host": "10.1.2.3:8000"}
    assert json_of(httpx2.get(gateway.base_url + "/healthz", headers=headers), 200)["status"] == "ok"
    assert json_of(httpx2.get(gateway.base_url + "/readyz", headers=headers), 200)["status"] == "ok"
    assert httpx2.head(gateway.base_url + "/healthz").status_code == 200
    assert json_of(httpx2.post(gateway.base_url + "/healthz"), 405)["error"]["code"] == "method_not_allowed"


def test_a_store_that_does_not_answer_is_named():
    with gateway_server(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0") as gateway:
        assert json_of(httpx2.get(gateway.base_url + "/healthz"), 200) == {"status": "ok"}
        ready = json_of(httpx2.get(gateway.base_url + "/readyz", timeout=10), 503)
    assert ready["status"] == "unavailable"
    assert ready["checks"] == {"database": "ok", "counter_store": "unavailable"}


def test_a_database_that_does_not_answer_is_named():
    with gateway_server(DATABASE_URL=f"postgres://sluice@127.0.0.1:{free_port()}/nothing") as gateway:
        assert json_of(httpx2.get(gateway.base_url + "/healthz"), 200) == {"status": "ok"}
        ready = json_of(httpx2.get(gateway.base_url + "/readyz", timeout=10), 503)
    assert ready["status"] == "unavailable"
    assert ready["checks"] == {"database": "unavailable", "counter_store": "ok"}
