"""The admin's "Test connection" (streaming/console/connection.py) against a real simulator process: it lists the
provider's models and times the first token of a one-token answer; a refused connection is reported as one, in
Sluice's words, with no key, address or stack trace."""

import sys

import httpx2
import pytest
from django.urls import reverse

from bench.servers import free_port, start_server
from streaming.catalogue.models import Deployment, Provider, ServedModel

pytestmark = pytest.mark.django_db

SIMULATOR = [sys.executable, "-m", "streaming.simulator", "--port", "{port}"]
KEY = "sk-test-connection-0123456789abcdef"


@pytest.fixture(scope="module")
def simulator():
    with start_server(SIMULATOR) as server:
        yield server


def shown(response):
    return [(m.level_tag, m.message) for m in response.context["messages"]]


def test_a_provider_lists_its_models_and_its_first_token_time(admin_client, simulator):
    provider = Provider.objects.create(name="sim", base_url=simulator.base_url + "/v1")
    provider.set_api_key(KEY)
    provider.save()
    Deployment.objects.create(model=ServedModel.objects.create(name="small"), provider=provider,
                              upstream_model="sim-small")
    response = admin_client.post(reverse("admin:streaming_provider_changelist"),
                                 {"action": "test_connection", "_selected_action": [provider.pk]}, follow=True)
    [(level, message)] = shown(response)
    assert level == "success", message
    assert message.startswith("sim: 2 model(s): sim-small, sim-large; first token of sim-small in ")
    assert message.endswith(" ms.") and KEY not in response.content.decode()
    requests = httpx2.get(simulator.base_url + "/stats").json()["requests"]
    # One streamed request, of one token, named as a connection test.
    [(model, stream, tokens, request_id)] = [(r["model"], r["stream"], r["tokens_sent"], r["client_request_id"])
                                             for r in requests]
    assert (model, stream, tokens) == ("sim-small", True, 1) and request_id.startswith("sluice-test-")

    # The same from the provider's own page (its button posts here), back to that page.
    url = reverse("admin:streaming_provider_test", args=[provider.pk])
    response = admin_client.post(url, follow=True)
    assert response.redirect_chain[-1][0] == reverse("admin:streaming_provider_change", args=[provider.pk])
    assert shown(response)[0][0] == "success" and 'id="test-connection"' in response.content.decode()


def test_a_refused_connection_is_reported_cleanly(admin_client):
    port = free_port()
    provider = Provider.objects.create(name="down", base_url=f"http://127.0.0.1:{port}/v1")
    Deployment.objects.create(model=ServedModel.objects.create(name="m"), provider=provider, upstream_model="m")
    response = admin_client.post(reverse("admin:streaming_provider_test", args=[provider.pk]), follow=True)
    [(level, message)] = shown(response)
    assert level == "error"
    assert message == ("down: GET /models failed: Could not reach the upstream provider. (upstream_unreachable); "
                       "chat completion of m failed: Could not reach the upstream provider. (upstream_unreachable).")
    assert str(port) not in message and "Traceback" not in response.content.decode()


def test_a_stored_key_the_secrets_key_cannot_open_is_reported(admin_client, settings):
    from cryptography.fernet import Fernet

    provider = Provider.objects.create(name="rotated", base_url="http://127.0.0.1:9/v1")
    provider.set_api_key(KEY)
    provider.save()
    settings.SLUICE_SECRETS_KEY = Fernet.generate_key().decode()  # the old key dropped from the list
    response = admin_client.post(reverse("admin:streaming_provider_test", args=[provider.pk]), follow=True)
    assert shown(response) == [("error", "rotated: A stored provider key cannot be decrypted with SLUICE_SECRETS_KEY. "
                                         "Enter the key again, or put the secrets key it was stored with back in "
                                         "SLUICE_SECRETS_KEY.")]
