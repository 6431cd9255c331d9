"""Cache-write prices (issue 18, item 1): a provider reporting prompt tokens written to its cache has them billed at
the model's cache-write rate, recorded in the ledger row beside the cached tokens. A real gateway process reading the
catalogue's records, its own simulated provider reporting the writes (`cache_write_tokens`, as OpenRouter does)."""

from decimal import Decimal

import openai
import pytest

from streaming.catalogue.models import Deployment, ModelPrice, Provider, ServedModel
from tests.support.gateways import gateway_server, settled_row

pytestmark = pytest.mark.django_db(transaction=True)


def test_cache_writes_are_recorded_and_billed_at_their_own_rate(make_user):
    simulator = Provider.objects.create(name="simulator", base_url="")
    model = ServedModel.objects.create(name="sim-small")
    Deployment.objects.create(model=model, provider=simulator, upstream_model="sim-small")
    ModelPrice.objects.create(model=model, input=Decimal("3"), cached_input=Decimal("0.3"),
                              cache_write=Decimal("3.75"), output=Decimal("15"))
    user = make_user()
    with gateway_server() as gateway:
        gateway.control(cached_tokens=2, cache_write_tokens=3)
        client = openai.OpenAI(base_url=gateway.api_url, api_key=user.key, max_retries=0)
        raw = client.responses.with_raw_response.create(
            model="sim-small", instructions="Be brief.", input="hello there", max_output_tokens=4)
        usage = raw.parse().usage
        row = settled_row(raw.headers["x-request-id"])
    assert (usage.input_tokens_details.cached_tokens, usage.input_tokens_details.cache_write_tokens) == (2, 3)
    assert (row.status, row.usage_reported, row.prompt_tokens) == ("completed", True, usage.input_tokens)
    assert (row.cached_tokens, row.cache_write_tokens, row.completion_tokens) == (2, 3, 4)
    assert row.prompt_tokens > 5  # some tokens left at the input rate
    assert row.price["cache_write"] == "3.750000"
    assert row.cost_nanos == (row.prompt_tokens - 5) * 3000 + 2 * 300 + 3 * 3750 + 4 * 15_000
