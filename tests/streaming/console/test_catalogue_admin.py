"""streaming/console/catalogue.py: providers, models and deployments in the admin, as an operator uses them (the test
client): the key written once, stored encrypted and never shown again, nor in the audit trail; every change audited;
the field rules checked as the gateway checks them; plans and the ledger choosing among the catalogue's models."""

import json
from decimal import Decimal

import pytest
from django.urls import reverse

from quotas.models import AuditEntry, Plan
from streaming.catalogue.models import Deployment, ModelPrice, Provider, ServedModel
from tests.quotas.console.test_admin import form_data

pytestmark = pytest.mark.django_db

Action = AuditEntry.Action
KEY, OTHER_KEY = "sk-live-first-0123456789abcdef", "sk-live-second-fedcba9876543210"


def pages(client, provider):
    """Every admin page that shows a provider or its audit entries."""
    return [client.get(reverse("admin:streaming_provider_changelist")),
            client.get(reverse("admin:streaming_provider_change", args=[provider.pk])),
            client.get(reverse("admin:streaming_provider_history", args=[provider.pk])),
            client.get(reverse("admin:quotas_auditentry_changelist")),
            *(client.get(reverse("admin:quotas_auditentry_change", args=[e.pk])) for e in AuditEntry.objects.all())]


def add_provider(client, **fields):
    add = client.get(reverse("admin:streaming_provider_add"))
    return client.post(reverse("admin:streaming_provider_add"), form_data(add, **{
        "name": "vllm", "base_url": "http://10.0.0.5:8000/v1", **fields}))


def change_provider(client, provider, **fields):
    url = reverse("admin:streaming_provider_change", args=[provider.pk])
    return client.post(url, form_data(client.get(url), **fields))


def test_a_key_is_stored_encrypted_never_shown_again_and_never_audited(admin_client, admin_user):
    assert add_provider(admin_client, api_key=KEY).status_code == 302
    provider = Provider.objects.get(name="vllm")
    assert provider.api_key_encrypted and KEY not in provider.api_key_encrypted
    assert provider.stored_api_key() == KEY
    change = admin_client.get(reverse("admin:streaming_provider_change", args=[provider.pk]))
    assert "stored (encrypted)" in change.content.decode()
    assert 'name="api_key"' in change.content.decode()  # a write-only field, empty

    # Blank on edit keeps the stored key; a new one replaces it; the checkbox clears it.
    assert change_provider(admin_client, provider, first_token_timeout="30").status_code == 302
    provider.refresh_from_db()
    assert (provider.stored_api_key(), provider.first_token_timeout) == (KEY, 30.0)
    assert change_provider(admin_client, provider, api_key=OTHER_KEY).status_code == 302
    provider.refresh_from_db()
    assert provider.stored_api_key() == OTHER_KEY
    for response in pages(admin_client, provider):
        assert response.status_code == 200
        assert KEY not in response.content.decode() and OTHER_KEY not in response.content.decode()
    assert change_provider(admin_client, provider, clear_api_key="on", api_key_env="VLLM_KEY").status_code == 302
    provider.refresh_from_db()
    assert (provider.api_key_encrypted, provider.key_source) == ("", "$VLLM_KEY")

    entries = list(AuditEntry.objects.filter(target_type="streaming.provider").order_by("at", "id"))
    assert [e.action for e in entries] == [Action.CREATED, Action.LIMITS_CHANGED, Action.LIMITS_CHANGED,
                                           Action.LIMITS_CHANGED]
    assert all(e.actor == admin_user and e.target_repr == "vllm" for e in entries)
    assert entries[0].new["key_source"] == "stored (encrypted)"
    assert (entries[1].old, entries[1].new) == ({"first_token_timeout": None}, {"first_token_timeout": "30.0"})
    assert entries[2].new == {"key_source": "stored (encrypted): replaced"}
    assert entries[3].new == {"api_key_env": "VLLM_KEY", "key_source": "$VLLM_KEY"}
    logged = json.dumps([[e.old, e.new, e.target_repr] for e in entries])
    assert KEY not in logged and OTHER_KEY not in logged


def test_without_a_usable_secrets_key_the_form_says_so(admin_client, settings):
    settings.SLUICE_SECRETS_KEY = "not-a-fernet-key"
    response = add_provider(admin_client, api_key=KEY)
    assert response.status_code == 200  # the form again, with the reason
    assert "The key cannot be stored" in response.content.decode() and "SLUICE_SECRETS_KEY" in response.content.decode()
    assert KEY not in response.content.decode()
    assert not Provider.objects.exists() and not AuditEntry.objects.exists()
    # A key from an environment variable needs no secrets key.
    assert add_provider(admin_client, api_key_env="VLLM_KEY").status_code == 302


def test_a_model_and_its_deployments_are_checked_and_every_change_audited(admin_client):
    a, b = (Provider.objects.create(name=name, base_url=f"http://{name}.test/v1") for name in "ab")
    ServedModel.objects.create(name="other", aliases=["fast"])
    add_url = reverse("admin:streaming_servedmodel_add")
    fields = {"name": "qwen", "aliases": "default, fast", "field_rules": '{"deny": "logit_bias"}',
              "deployments-0-provider": str(a.pk), "deployments-0-upstream_model": "Qwen/Qwen3-32B",
              "deployments-0-weight": "3", "deployments-0-priority": "1", "deployments-0-enabled": "on"}
    response = admin_client.post(add_url, form_data(admin_client.get(add_url), **fields))
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert errors["aliases"] == ["Already a model's name or alias: fast (other)."]
    assert errors["field_rules"] == ["'deny' must be a list of field names."]
    assert "Saved changes reach every gateway process within" in response.content.decode()

    fields.update(aliases="default", field_rules='{"deny": ["logit_bias"], "strip": ["temperature"]}')
    assert admin_client.post(add_url, form_data(admin_client.get(add_url), **fields)).status_code == 302
    model = ServedModel.objects.get(name="qwen")
    assert (model.aliases, model.field_rules) == (["default"], {"deny": ["logit_bias"], "strip": ["temperature"]})
    first = model.deployments.get()

    # A second deployment added, the first one's weight changed; then the first removed.
    url = reverse("admin:streaming_servedmodel_change", args=[model.pk])
    admin_client.post(url, form_data(admin_client.get(url), **{
        "deployments-0-weight": "5", "deployments-TOTAL_FORMS": "2", "deployments-1-provider": str(b.pk),
        "deployments-1-upstream_model": "qwen/qwen3-32b", "deployments-1-weight": "1",
        "deployments-1-priority": "2", "deployments-1-enabled": "on"}))
    assert sorted(model.deployments.values_list("upstream_model", "weight", "priority")) == [
        ("Qwen/Qwen3-32B", 5, 1), ("qwen/qwen3-32b", 1, 2)]
    admin_client.post(url, form_data(admin_client.get(url), **{"deployments-0-DELETE": "on"}))
    assert list(model.deployments.values_list("upstream_model", flat=True)) == ["qwen/qwen3-32b"]

    entries = [(e.action, e.target_type, e.target_repr, e.old, e.new)
               for e in AuditEntry.objects.order_by("at", "id")]
    assert entries[0][:3] == (Action.CREATED, "streaming.servedmodel", "qwen")
    assert entries[0][4]["aliases"] == ["default"]
    assert entries[1][:3] == (Action.CREATED, "streaming.deployment", "a/Qwen/Qwen3-32B")
    assert entries[1][4] == {"model": "qwen", "provider": "a", "upstream_model": "Qwen/Qwen3-32B", "weight": 3,
                             "priority": 1, "enabled": True}
    assert sorted(entries[2:4], key=str) == sorted([
        (Action.CREATED, "streaming.deployment", "b/qwen/qwen3-32b", None,
         {"model": "qwen", "provider": "b", "upstream_model": "qwen/qwen3-32b", "weight": 1, "priority": 2,
          "enabled": True}),
        (Action.LIMITS_CHANGED, "streaming.deployment", "a/Qwen/Qwen3-32B", {"weight": 3}, {"weight": 5})], key=str)
    assert entries[4][:3] == (Action.REMOVED, "streaming.deployment", "a/Qwen/Qwen3-32B")
    assert entries[4][3]["weight"] == 5 and AuditEntry.objects.get(action=Action.REMOVED).target_id == str(first.pk)

    # Removing the model removes (and audits) its deployments with it.
    delete = reverse("admin:streaming_servedmodel_delete", args=[model.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 302
    assert not Deployment.objects.exists()
    removed = AuditEntry.objects.filter(action=Action.REMOVED).order_by("id")
    assert [e.target_repr for e in removed] == ["a/Qwen/Qwen3-32B", "b/qwen/qwen3-32b", "qwen"]


def test_plans_and_the_ledger_offer_the_catalogues_models(admin_client):
    provider = Provider.objects.create(name="a", base_url="http://a.test/v1")
    for name in ("qwen", "llama"):
        Deployment.objects.create(model=ServedModel.objects.create(name=name), provider=provider, upstream_model=name)
    ServedModel.objects.create(name="undeployed")  # no deployment: unknown to clients, not offered
    plan = Plan.objects.create(name="team", allowed_models=["sim-small"])
    page = admin_client.get(reverse("admin:quotas_plan_change", args=[plan.pk]))
    choices = page.context["adminform"].form.fields["allowed_models"].choices
    assert choices == [("llama", "llama"), ("qwen", "qwen"), ("sim-small", "sim-small (not configured)")]
    response = admin_client.post(reverse("admin:quotas_plan_change", args=[plan.pk]),
                                 form_data(page, allowed_models=["qwen"]))
    assert response.status_code == 302 and Plan.objects.get(pk=plan.pk).allowed_models == ["qwen"]
    ledger = admin_client.get(reverse("admin:quotas_usage_changelist"))
    model_filter = next(f for f in ledger.context["cl"].filter_specs if getattr(f, "parameter_name", "") == "model")
    assert [value for value, _ in model_filter.lookup_choices] == ["llama", "qwen"]


def test_a_price_is_added_never_edited_and_audited(admin_client):
    model = ServedModel.objects.create(name="qwen")
    old = ModelPrice.objects.create(model=model, input=Decimal("1"), output=Decimal("2"))
    url = reverse("admin:streaming_servedmodel_change", args=[model.pk])
    page = admin_client.get(url)
    assert "Prices per million tokens, in USD" in page.content.decode()
    # The stored price is shown, not offered as a form; a new one is added beside it.
    assert admin_client.post(url, form_data(page, **{
        "prices-TOTAL_FORMS": "1", "prices-INITIAL_FORMS": "0", "prices-0-effective_from_0": "2026-12-24",
        "prices-0-effective_from_1": "00:00:00", "prices-0-input": "0.15", "prices-0-output": "0.60",
        "prices-0-cached_input": "0.075"})).status_code == 302
    assert list(model.prices.order_by("effective_from").values_list("input", "output", "cached_input")) == [
        (Decimal("1"), Decimal("2"), None), (Decimal("0.15"), Decimal("0.6"), Decimal("0.075"))]
    old.refresh_from_db()
    assert (old.input, old.output) == (Decimal("1"), Decimal("2"))
    entry = AuditEntry.objects.get(target_type="streaming.modelprice")
    assert (entry.action, entry.new["input"], entry.new["model"]) == (Action.CREATED, "0.15", "qwen")
