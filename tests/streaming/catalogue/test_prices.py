"""Prices on models (issue 18, item 1): each ledger row keeps its cost and the price it used; a price change applies
from its effective time on. A real gateway process reading the catalogue's records, its own simulated provider."""

import datetime
from decimal import Decimal

import openai
import pytest
from django.utils import timezone

from streaming.catalogue.models import Deployment, ModelPrice, Provider, ServedModel
from tests.support.gateways import eventually, gateway_server, settled_row

pytestmark = pytest.mark.django_db(transaction=True)


def test_each_row_is_priced_at_what_applied_when_it_began(make_user):
    simulator = Provider.objects.create(name="simulator", base_url="")
    model = ServedModel.objects.create(name="sim-small")
    Deployment.objects.create(model=model, provider=simulator, upstream_model="sim-small")
    ModelPrice.objects.create(model=model, effective_from=timezone.now() - datetime.timedelta(days=20),
                              input=Decimal("2.5"), output=Decimal("10"))
    user = make_user()
    with gateway_server() as gateway:
        client = openai.OpenAI(base_url=gateway.api_url, api_key=user.key, max_retries=0)

        def ask():
            answer = client.chat.completions.with_raw_response.create(
                model="sim-small", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
            return settled_row(answer.http_response.headers["x-request-id"])

        first = ask()
        assert first.cost_nanos == first.prompt_tokens * 2500 + first.completion_tokens * 10_000 > 0
        assert first.price["input"] == "2.500000" and first.price["output"] == "10.000000"
        # Mid-month, the price changes from now on (and one is scheduled for later: not applied yet).
        ModelPrice.objects.create(model=model, input=Decimal("1"), output=Decimal("4"))
        ModelPrice.objects.create(model=model, effective_from=timezone.now() + datetime.timedelta(days=3),
                                  input=Decimal("100"), output=Decimal("100"))
        second = eventually(lambda: (row := ask()).price["input"] == "1.000000" and row, timeout=10, interval=0.1)
        assert second.cost_nanos == second.prompt_tokens * 1000 + second.completion_tokens * 4000
    first.refresh_from_db()
    assert first.price["input"] == "2.500000"  # the earlier row keeps its price


def test_a_model_without_a_price_has_no_cost(sim, make_user):
    user = make_user()
    client = openai.OpenAI(base_url=sim.api_url, api_key=user.key, max_retries=0)
    answer = client.chat.completions.with_raw_response.create(
        model="sim-small", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    row = settled_row(answer.http_response.headers["x-request-id"])
    assert row.status == "completed" and row.cost_nanos is None and row.price is None
