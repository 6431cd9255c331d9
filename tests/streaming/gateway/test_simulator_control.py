"""The simulated provider's switches (`/_sim/control`, `/_sim/control/reset`) and `/_sim/stats` in a gateway process:
off unless SIMULATOR_CONTROL_TOKEN is set, and then only for `Authorization: Bearer <token>`. The standalone
simulator (`python -m streaming.simulator`, a developer tool on 127.0.0.1) keeps them open.
"""

import sys

import httpx2
import pytest

from bench.servers import start_server
from tests.support.gateways import SIMULATOR_CONTROL_TOKEN, gateway_server

pytestmark = pytest.mark.django_db(transaction=True)

ENDPOINTS = [("POST", "/control"), ("POST", "/control/reset"), ("GET", "/stats")]


def call(base_url, method, path, authorization=None):
    headers = {"Authorization": authorization} if authorization is not None else {}
    json_body = {"ttft_seconds": 0} if path == "/control" else None
    return httpx2.request(method, base_url + path, headers=headers, json=json_body, timeout=10)


def error_of(response, status):
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


@pytest.mark.parametrize("method, path", ENDPOINTS)
def test_with_a_token_set_only_its_bearer_may_use_the_switches(sim, method, path):
    for authorization in (None, "Bearer", "Bearer wrong-token", f"Bearer {SIMULATOR_CONTROL_TOKEN}x",
                          f"Bearer {SIMULATOR_CONTROL_TOKEN[:-1]}", f"Basic {SIMULATOR_CONTROL_TOKEN}"):
        assert error_of(call(sim.sim_url, method, path, authorization), 401)["code"] == "invalid_api_key"
    assert call(sim.sim_url, method, path, f"Bearer {SIMULATOR_CONTROL_TOKEN}").status_code == 200


def test_the_harness_sends_the_token(sim):
    assert sim.control(retry_after_seconds=2)["retry_after_seconds"] == 2
    assert sim.stats()["control"]["retry_after_seconds"] == 2
    sim.reset()
    assert sim.stats()["control"]["retry_after_seconds"] == 1


def test_without_a_token_the_switches_are_off_and_the_provider_still_answers(make_user):
    caller = make_user()
    with gateway_server(SIMULATOR_CONTROL_TOKEN="") as gateway:
        for method, path in ENDPOINTS:
            for authorization in (None, "Bearer", f"Bearer {SIMULATOR_CONTROL_TOKEN}"):
                assert error_of(call(gateway.sim_url, method, path, authorization), 404)["code"] == "not_found"
        response = httpx2.post(gateway.api_url + "/chat/completions", timeout=30,
                               headers={"Authorization": f"Bearer {caller.key}"},
                               json={"model": "sim-small", "max_tokens": 2,
                                     "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200, response.text


def test_the_standalone_simulator_keeps_its_switches_open():
    argv = [sys.executable, "-m", "streaming.simulator", "--host", "127.0.0.1", "--port", "{port}"]
    with start_server(argv) as simulator:
        assert call(simulator.base_url, "POST", "/control", None).status_code == 200
        assert call(simulator.base_url, "GET", "/stats", None).status_code == 200
        assert call(simulator.base_url, "POST", "/control/reset", None).status_code == 200
