"""streaming/provider/client.py: a provider's own client error reaches the client as the provider worded it (scrubbed
of URLs and keys), with its `param` and a 4xx, through a real gateway and the official SDK."""

import openai
import pytest

from quotas.models import Usage
from tests.support.gateways import gateway_server, settled_row

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def gateway(dialects, django_db_setup, django_db_blocker):
    with gateway_server(OPENAI_BASE_URL=dialects.base_url + "/v1", OPENAI_API_KEY="sk-dialects",
                        SLUICE_MODELS="rejects", UPSTREAM_BREAKER_THRESHOLD=1) as running:
        yield running


@pytest.mark.parametrize("stream", [False, True])
def test_a_provider_refusal_keeps_its_message_and_param_and_hides_its_urls_and_keys(gateway, make_user, stream):
    caller = make_user()
    client = openai.OpenAI(base_url=gateway.api_url, api_key=caller.key, max_retries=0)
    for _ in range(3):  # a breaker that opens after one failure stays closed: the client's mistake is not an outage
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="rejects", messages=[{"role": "user", "content": "hi"}],
                                           stream=stream, temperature=3)
        error = refused.value
        assert error.status_code == 400 and error.code == "upstream_rejected" and error.param == "temperature"
        assert "Invalid value for 'temperature': must be at most 2" in error.message
        assert "internal.provider.example" not in error.message and "sk-proj" not in error.message
    row = settled_row(error.response.headers["x-request-id"])
    assert (row.status, row.reason, row.charged_tokens) == ("upstream_error", "upstream_rejected", 0)
    assert Usage.objects.filter(user=caller.user).count() == 3
