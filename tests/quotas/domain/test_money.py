"""What a request costs (quotas/domain/money.py): exact, in nanos, never under-counted."""

from decimal import Decimal

from quotas.domain.money import Price, as_currency, cost_nanos


def test_each_kind_of_token_at_its_own_rate():
    price = Price(input=Decimal("2.50"), output=Decimal("10"), cached_input=Decimal("1.25"), reasoning=Decimal("20"))
    # 1,000 prompt tokens of which 800 cached; 300 completion tokens of which 100 reasoning.
    cost = cost_nanos(price, 1000, 300, cached_tokens=800, reasoning_tokens=100)
    assert cost == 200 * 2500 + 800 * 1250 + 200 * 10_000 + 100 * 20_000
    assert as_currency(cost) == Decimal("0.0055")


def test_missing_rates_fall_back_as_providers_bill_them():
    price = Price(input=Decimal("0.15"), output=Decimal("0.60"))
    assert cost_nanos(price, 1000, 100, cached_tokens=400, reasoning_tokens=50) == 1000 * 150 + 100 * 600
    assert cost_nanos(None, 1000, 100) is None


def test_a_fraction_of_a_nano_is_rounded_up_and_details_beyond_the_totals_are_capped():
    price = Price(input=Decimal("0.0375"), output=Decimal("0.0001"))
    assert price.per_token("input") == 38 and price.per_token("output") == 1
    # A provider reporting more cached (or reasoning) tokens than prompt (or completion) tokens: capped.
    assert cost_nanos(price, 10, 10, cached_tokens=50, reasoning_tokens=50) == 10 * 38 + 10 * 1


def test_the_ledgers_record_of_a_price_is_exact_json():
    price = Price(input=Decimal("0.15"), output=Decimal("0.6"), id=7)
    assert price.as_record() == {"id": 7, "input": "0.15", "output": "0.6", "cached_input": None, "reasoning": None}
