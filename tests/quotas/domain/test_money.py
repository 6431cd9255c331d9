"""What a request costs (quotas/domain/money.py): exact, in nanos, never under-counted."""

from decimal import Decimal

from quotas.domain.money import Price, as_currency, cost_nanos, price_from_record


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
    assert price.as_record() == {"id": 7, "input": "0.15", "output": "0.6", "cached_input": None, "reasoning": None,
                                 "cache_write": None}


def test_cache_writes_are_part_of_the_prompt_at_their_own_rate():
    # Anthropic's way: writing to the cache costs 1.25 times the input rate, reading from it a tenth.
    price = Price(input=Decimal("3"), output=Decimal("15"), cached_input=Decimal("0.3"), cache_write=Decimal("3.75"))
    assert price.per_token("cache_write") == 3750
    # 1,000 prompt tokens: 600 read from the cache, 300 written to it, the other 100 at the input rate.
    cost = cost_nanos(price, 1000, 50, cached_tokens=600, cache_write_tokens=300)
    assert cost == 100 * 3000 + 600 * 300 + 300 * 3750 + 50 * 15_000
    assert as_currency(cost) == Decimal("0.002355")


def test_cache_writes_without_their_own_rate_are_billed_at_the_input_rate():
    price = Price(input=Decimal("3"), output=Decimal("15"), cached_input=Decimal("0.3"))
    assert price.per_token("cache_write") == price.per_token("input") == 3000
    assert cost_nanos(price, 1000, 0, cached_tokens=600, cache_write_tokens=300) == 400 * 3000 + 600 * 300


def test_cached_and_written_tokens_never_exceed_the_prompt():
    price = Price(input=Decimal("1"), output=Decimal("1"), cached_input=Decimal("0.1"), cache_write=Decimal("2"))
    # More written than the prompt: all of it at the cache-write rate, nothing at the input rate.
    assert cost_nanos(price, 10, 0, cache_write_tokens=50) == 10 * 2000
    # Cached and written together beyond the prompt: the cached tokens first, the rest of the prompt as written.
    assert cost_nanos(price, 10, 0, cached_tokens=7, cache_write_tokens=7) == 7 * 100 + 3 * 2000
    assert cost_nanos(price, 10, 0, cached_tokens=12, cache_write_tokens=5) == 10 * 100


def test_the_ledgers_record_keeps_the_cache_write_rate_and_older_records_still_load():
    price = Price(input=Decimal("3"), output=Decimal("15"), cache_write=Decimal("3.75"), id=4)
    assert price.as_record()["cache_write"] == "3.75"
    assert price_from_record(price.as_record()) == price
    # A row priced before the rate existed: no such key, billed at the input rate as it was then.
    older = price_from_record({"id": 2, "input": "3", "output": "15", "cached_input": "0.3", "reasoning": None})
    assert older == Price(input=Decimal("3"), output=Decimal("15"), cached_input=Decimal("0.3"), id=2)
    assert older.cache_write is None and older.per_token("cache_write") == 3000
