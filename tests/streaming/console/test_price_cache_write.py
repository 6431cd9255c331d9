"""The admin's price inline (streaming/console/catalogue.py) takes a cache-write rate, and the audit trail keeps it
(streaming/console/audit.py)."""

from decimal import Decimal

import pytest
from django.urls import reverse

from quotas.models import AuditEntry
from streaming.catalogue.models import ServedModel
from tests.quotas.console.test_admin import form_data

pytestmark = pytest.mark.django_db


def test_a_price_with_a_cache_write_rate_is_added_and_audited(admin_client):
    model = ServedModel.objects.create(name="claude")
    url = reverse("admin:streaming_servedmodel_change", args=[model.pk])
    page = admin_client.get(url)
    assert "Per million prompt tokens written to the provider&#x27;s cache" in page.content.decode()
    assert admin_client.post(url, form_data(page, **{
        "prices-TOTAL_FORMS": "1", "prices-INITIAL_FORMS": "0", "prices-0-effective_from_0": "2026-12-24",
        "prices-0-effective_from_1": "00:00:00", "prices-0-input": "3", "prices-0-output": "15",
        "prices-0-cache_write": "3.75"})).status_code == 302
    price = model.prices.get()
    assert (price.input, price.cache_write, price.cached_input) == (Decimal("3"), Decimal("3.75"), None)
    entry = AuditEntry.objects.get(target_type="streaming.modelprice")
    assert (entry.new["cache_write"], entry.new["cached_input"]) == ("3.75", None)
