"""The catalogue's admin against running gateway processes: an edit saved in the admin reaches a gateway's /v1/models
within its refresh (0.2 s in the tests), and the gateway's own dashboard shows a deployment whose breaker opened."""

import re

import httpx2
import pytest
from django.test import Client
from django.urls import reverse

from streaming.catalogue.models import Deployment, Provider, ServedModel
from tests.quotas.console.test_admin import form_data
from tests.support.gateways import eventually, gateway_server

pytestmark = pytest.mark.django_db(transaction=True)

BUSY = {"requests_per_minute": 100_000, "concurrent_streams": 100}


def model_ids(gateway, key):
    response = httpx2.get(gateway.api_url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    return [m["id"] for m in response.json()["data"]]


def ask(gateway, key, model):
    return httpx2.post(gateway.api_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=10,
                       json={"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})


def test_an_edit_in_the_admin_reaches_a_running_gateway(admin_client, make_user):
    local = Provider.objects.create(name="local", base_url="")  # the gateway's own simulated provider
    Deployment.objects.create(model=ServedModel.objects.create(name="alpha"), provider=local,
                              upstream_model="sim-small")
    caller = make_user(**BUSY)
    with gateway_server() as gateway:
        assert model_ids(gateway, caller.key) == ["alpha"]
        add = reverse("admin:streaming_servedmodel_add")
        response = admin_client.post(add, form_data(admin_client.get(add), **{
            "name": "beta", "aliases": "", "field_rules": "{}", "deployments-0-provider": str(local.pk),
            "deployments-0-upstream_model": "sim-large", "deployments-0-weight": "1",
            "deployments-0-priority": "1", "deployments-0-enabled": "on"}))
        assert response.status_code == 302
        eventually(lambda: model_ids(gateway, caller.key) == ["alpha", "beta"], timeout=5, interval=0.05)
        assert ask(gateway, caller.key, "beta").status_code == 200
        assert gateway.stats()["requests"][-1]["model"] == "sim-large"  # the deployment's name for it

        # Disabled in the admin: gone from the running gateway.
        url = reverse("admin:streaming_servedmodel_change", args=[ServedModel.objects.get(name="alpha").pk])
        admin_client.post(url, form_data(admin_client.get(url), enabled=None))
        eventually(lambda: model_ids(gateway, caller.key) == ["beta"], timeout=5, interval=0.05)
        assert ask(gateway, caller.key, "alpha").status_code == 404


def breaker_and_requests(html, name):
    row = re.search(rf'<tr data-deployment="{re.escape(name)}">(.*?)</tr>', html, re.S).group(1)
    breaker = re.search(r'<td class="breaker"><span[^>]*>([^<]+)</span>', row).group(1)
    return breaker, re.search(r'<td class="num requests">([^<]*)</td>', row).group(1)


def test_the_dashboard_shows_the_deployment_whose_breaker_opened(make_user):
    caller, operator = make_user(**BUSY), make_user(staff=True)
    # Two providers at the gateway's own simulated upstream: the failing one under its address, the other as the
    # built-in simulator (the same address, resolved per request): two deployments, two breakers.
    failing, local = Provider.objects.create(name="failing", base_url="http://set.below/v1"), \
        Provider.objects.create(name="local", base_url="")
    Deployment.objects.create(model=ServedModel.objects.create(name="broken"), provider=failing, upstream_model="m")
    Deployment.objects.create(model=ServedModel.objects.create(name="fine"), provider=local,
                              upstream_model="sim-small")
    settings = {"UPSTREAM_BREAKER_THRESHOLD": 2, "UPSTREAM_BREAKER_MIN_USERS": 1, "UPSTREAM_BREAKER_COOLDOWN": 60,
                "UPSTREAM_RETRY_MAX_ATTEMPTS": 1}
    with gateway_server(**settings) as gateway:
        Provider.objects.filter(pk=failing.pk).update(base_url=gateway.sim_url + "/v1")
        assert ask(gateway, caller.key, "fine").status_code == 200
        gateway.control(fail_500_rate=1.0)
        # Failures until the breaker opens: then the gateway refuses without asking the provider.
        codes = [ask(gateway, caller.key, "broken").json()["error"]["code"] for _ in range(3)]
        assert codes == ["upstream_error", "upstream_error", "upstream_unavailable"], codes

        # The operator's session (made here: no password to hash), on the gateway's own dashboard.
        session = Client()
        session.force_login(operator.user)
        with httpx2.Client(base_url=gateway.base_url, timeout=10, cookies={
                "sessionid": session.cookies["sessionid"].value}) as http:
            html = http.get("/admin/quotas/usage/dashboard/").text
        # Its three requests (two failed, one refused by the open breaker) are its own in the ledger.
        assert breaker_and_requests(html, "failing/m") == ("open", "3")
        assert breaker_and_requests(html, "local/sim-small") == ("closed", "1")
