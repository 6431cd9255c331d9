"""Operator input the admin must not let take a plan down (issue 15): allowed_models is picked from the configured
models and validated as a list of names, a bad stored value fails closed instead of answering 500, and search
terms with NUL characters (which PostgreSQL refuses in any text) are answered like any other.
"""

import logging

import httpx2
import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from quotas.domain.policy import Limits
from quotas.models import Plan, UserQuota
from tests.quotas.console.test_admin import form_data

pytestmark = pytest.mark.django_db(transaction=True)
BAD_VALUES = [5, "sim-small", {"sim-small": True}, [1], ["sim-small", None], [["sim-small"]]]


# At entry --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", BAD_VALUES)
def test_the_models_refuse_anything_but_a_list_of_names(value):
    plan = Plan(name="p", allowed_models=value)
    with pytest.raises(ValidationError) as refused:
        plan.full_clean()
    assert "allowed_models" in refused.value.message_dict
    quota = UserQuota(plan=Plan.objects.create(name="q"), allowed_models=value)
    with pytest.raises(ValidationError) as refused:
        quota.full_clean(exclude=["user"])
    assert "allowed_models" in refused.value.message_dict


def test_lists_of_names_and_no_override_are_valid(django_user_model):
    Plan(name="every", allowed_models=[]).full_clean()
    Plan(name="some", allowed_models=["sim-small"]).full_clean()
    user = django_user_model.objects.create(username="u")
    UserQuota(user=user, plan=Plan.objects.create(name="q"), allowed_models=None).full_clean()


def checkboxes(page, name):
    """The values of the page's checkboxes called `name`, and which are ticked."""
    import re

    inputs = re.findall(r'<input[^>]*name="%s"[^>]*>' % re.escape(name), page)
    values = [re.search(r'value="([^"]*)"', i).group(1) for i in inputs]
    return values, [v for v, i in zip(values, inputs) if " checked" in i]


def test_the_plan_form_offers_the_configured_models(admin_client, settings):
    settings.SLUICE_MODELS = ["sim-small", "sim-large", "sim-huge"]
    url = reverse("admin:quotas_plan_add")
    offered, ticked = checkboxes(admin_client.get(url).content.decode(), "allowed_models")
    assert (offered, ticked) == (["sim-small", "sim-large", "sim-huge"], [])
    response = admin_client.post(url, form_data(admin_client.get(url), name="team", allowed_models="5"))
    assert response.status_code == 200 and "allowed_models" in response.context["adminform"].form.errors
    assert not Plan.objects.filter(name="team").exists()
    response = admin_client.post(url, form_data(admin_client.get(url), name="team",
                                                allowed_models=["sim-small", "sim-huge"]))
    assert response.status_code == 302
    assert Plan.objects.get(name="team").allowed_models == ["sim-small", "sim-huge"]
    response = admin_client.post(url, form_data(admin_client.get(url), name="all"))
    assert response.status_code == 302 and Plan.objects.get(name="all").allowed_models == []


def test_a_stored_model_no_longer_configured_is_shown_and_kept(admin_client):
    plan = Plan.objects.create(name="legacy", allowed_models=["old-model"])
    url = reverse("admin:quotas_plan_change", args=[plan.pk])
    page = admin_client.get(url)
    assert checkboxes(page.content.decode(), "allowed_models") == (["sim-small", "sim-large", "old-model"],
                                                                   ["old-model"])
    # Saving another field must not widen the plan to every model by dropping the unknown name.
    assert admin_client.post(url, form_data(page, tokens_per_day="7")).status_code == 302
    plan.refresh_from_db()
    assert (plan.tokens_per_day, plan.allowed_models) == (7, ["old-model"])


def test_the_quota_form_tells_the_plans_models_from_every_model(admin_client, make_user):
    caller = make_user(allowed_models=["sim-small"])
    quota = UserQuota.objects.get(user=caller.user)
    url = reverse("admin:quotas_userquota_change", args=[quota.pk])
    offered, ticked = checkboxes(admin_client.get(url).content.decode(), "allowed_models")
    assert offered[1:] == ["sim-small", "sim-large"] and ticked == []  # nothing ticked: the plan's models
    every = offered[0]
    assert admin_client.post(url, form_data(admin_client.get(url), allowed_models=[every])).status_code == 302
    quota.refresh_from_db()
    assert quota.allowed_models == []  # every configured model, whatever the plan says
    assert checkboxes(admin_client.get(url).content.decode(), "allowed_models")[1] == [every]
    assert admin_client.post(url, form_data(admin_client.get(url), allowed_models=["sim-large"])).status_code == 302
    quota.refresh_from_db()
    assert quota.allowed_models == ["sim-large"]
    page = admin_client.get(url)
    assert admin_client.post(url, form_data(page, allowed_models=None)).status_code == 302
    quota.refresh_from_db()
    assert quota.allowed_models is None
    response = admin_client.post(url, form_data(admin_client.get(url), allowed_models=[every, "sim-large"]))
    assert response.status_code == 200 and "allowed_models" in response.context["adminform"].form.errors


def test_the_user_page_inline_offers_the_models_too(admin_client, make_user):
    caller = make_user()
    url = reverse("admin:auth_user_change", args=[caller.user.pk])
    page = admin_client.get(url)
    offered, ticked = checkboxes(page.content.decode(), "quota-0-allowed_models")
    assert offered[1:] == ["sim-small", "sim-large"] and ticked == []
    response = admin_client.post(url, form_data(page, **{"quota-0-allowed_models": ["sim-large"]}))
    assert response.status_code == 302, response.context and response.context["errors"]
    assert UserQuota.objects.get(user=caller.user).allowed_models == ["sim-large"]


# At use ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", BAD_VALUES[:3])
def test_a_bad_stored_value_allows_no_model_and_says_so(value, caplog):
    from types import SimpleNamespace

    plan = SimpleNamespace(name="typo", tokens_per_day=1, tokens_per_month=1, requests_per_minute=1,
                           concurrent_streams=1, max_tokens_per_request=1, allowed_models=value)
    with caplog.at_level(logging.WARNING, logger="quotas"):
        limits = Limits.combine(plan)
    assert not any(limits.allows_model(m, ["sim-small", "sim-large", "s"]) for m in ("sim-small", "sim-large", "s"))
    assert "allowed_models" in caplog.text
    override = SimpleNamespace(allowed_models=value, suspended=False, timezone="UTC")
    limits = Limits.combine(SimpleNamespace(**{**vars(plan), "allowed_models": []}), override)
    assert not limits.allows_model("sim-small", ["sim-small"])


def test_a_plan_with_a_bad_stored_value_answers_without_a_500(sim, make_user, admin_client):
    caller = make_user()
    Plan.objects.filter(pk=caller.plan.pk).update(allowed_models=5)  # as a shell or an old admin could store it
    headers = {"Authorization": f"Bearer {caller.key}"}
    assert httpx2.get(sim.api_url + "/models", headers=headers).json()["data"] == []
    quota = httpx2.get(sim.api_url + "/quota", headers=headers)
    assert quota.status_code == 200 and quota.json()["models"] == []
    refused = httpx2.post(sim.api_url + "/chat/completions", headers=headers, timeout=30,
                          json={"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]})
    assert (refused.status_code, refused.json()["error"]["code"]) == (404, "model_not_found")
    assert admin_client.get(reverse("admin:quotas_userquota_changelist")).status_code == 200
    assert admin_client.get(reverse("admin:quotas_plan_change", args=[caller.plan.pk])).status_code == 200


# NUL characters in search terms and filters (PostgreSQL refuses them in any text parameter: a 500) ----------


@pytest.mark.parametrize("page", ["admin:quotas_plan_changelist", "admin:quotas_userquota_changelist",
                                  "admin:quotas_apikey_changelist", "admin:quotas_usage_changelist",
                                  "admin:quotas_auditentry_changelist", "admin:auth_user_changelist"])
def test_a_nul_in_a_search_term_is_ignored(admin_client, make_user, page):
    caller = make_user()
    response = admin_client.get(reverse(page), {"q": "\x00"})
    assert response.status_code == 200
    response = admin_client.get(reverse(page), {"q": caller.user.username[:4] + "\x00"})
    assert response.status_code == 200


def test_a_nul_in_an_autocomplete_term_is_ignored(admin_client, make_user):
    caller = make_user()
    for model in ("userquota", "apikey"):
        response = admin_client.get(reverse("admin:autocomplete"), {
            "term": caller.user.username + "\x00", "app_label": "quotas", "model_name": model, "field_name": "user"})
        assert response.status_code == 200
        assert [r["text"] for r in response.json()["results"]] == [caller.user.username]


@pytest.mark.parametrize("page, params", [
    ("admin:quotas_usage_changelist", {"model": "sim\x00"}),
    ("admin:quotas_usage_changelist", {"status__exact": "\x00"}),
    ("admin:quotas_auditentry_changelist", {"action__exact": "\x00"}),
    ("admin:quotas_auditentry_changelist", {"target_type__exact": "\x00"}),
    ("admin:auth_user_changelist", {"username": "\x00"}),
])
def test_a_nul_in_a_filter_is_ignored(admin_client, page, params):
    assert admin_client.get(reverse(page), params).status_code == 200
