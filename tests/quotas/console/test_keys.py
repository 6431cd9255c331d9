"""quotas/console/keys.py: a new key's one-time page (shown once, its snippets work as pasted against a real gateway),
the status filter, and deletion in the audit trail."""

import subprocess
import sys
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.contrib.sessions.backends.db import SessionStore
from django.urls import reverse
from django.utils import timezone

from quotas.console import keys
from quotas.models import ApiKey, AuditEntry, Plan, UserQuota

Action = AuditEntry.Action


def issue(client, user, name="ci"):
    """The add form posted as a browser does; returns (key, the one-time page's URL)."""
    response = client.post(reverse("admin:quotas_apikey_add"), {"user": user.pk, "name": name})
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    key = ApiKey.objects.get(user=user, name=name)
    return key, response["Location"]


def test_the_session_hands_each_raw_key_over_once():
    session = SessionStore()
    keys.remember(session, 1, "sk-one")
    keys.remember(session, 2, "sk-two")  # a second tab's key, not yet shown
    assert keys.take(session, 1) == "sk-one"
    assert keys.take(session, 1) is None  # a refresh
    assert keys.take(session, 3) is None
    assert keys.take(session, 2) == "sk-two" and keys.ISSUED not in session


def test_two_keys_created_before_either_page_is_opened_are_each_shown(admin_client, make_user):
    caller = make_user()
    first, first_page = issue(admin_client, caller.user, "first")
    second, second_page = issue(admin_client, caller.user, "second")
    assert second.matches(admin_client.get(second_page).context["raw_key"])
    assert first.matches(admin_client.get(first_page).context["raw_key"])
    assert admin_client.get(first_page).context["raw_key"] is None


def test_the_page_needs_the_add_permission_and_an_existing_key(client, admin_client, make_user, django_user_model):
    key, page = issue(admin_client, make_user().user)
    viewer = django_user_model.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_apikey"))
    client.force_login(viewer)
    assert client.get(page).status_code == 403
    assert admin_client.get(reverse("admin:quotas_apikey_issued", args=[key.pk + 1000])).status_code == 404
    assert key.matches(admin_client.get(page).context["raw_key"])  # still there for its operator


def test_the_snippets_name_this_gateway_and_a_model_the_user_may_call(admin_client, make_user):
    caller = make_user()
    Plan.objects.filter(pk=caller.plan.pk).update(allowed_models=["sim-large"])
    _, page = issue(admin_client, caller.user)
    response = admin_client.get(page)
    raw, snippets = response.context["raw_key"], response.context["snippets"]
    assert snippets.model == "sim-large"
    assert snippets.curl.startswith(f"export SLUICE_KEY={raw}\ncurl -N http://testserver/v1/chat/completions")
    assert f"base_url='http://testserver/v1', api_key='{raw}'" in snippets.python
    page = response.content.decode()
    assert 'data-copy="raw-key"' in page and 'id="curl-snippet"' in page and 'id="python-snippet"' in page


@pytest.mark.parametrize("language", ["python", "curl"])
def test_the_snippets_stream_an_answer_when_pasted(sim, make_user, language):
    """Pasted as they are, into bash or Python, against a real gateway: they stream an answer."""
    sim.control(default_tokens=5)
    caller = make_user()
    snippets = keys.snippets(sim.api_url, caller.key, "sim-small")
    if language == "python":
        run = [sys.executable, "-c", snippets.python]
    else:
        run = ["bash", "-c", snippets.curl]
    result = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    if language == "python":
        assert len(result.stdout.split()) == 5
    else:
        assert result.stdout.count("data: ") >= 6 and result.stdout.rstrip().endswith("data: [DONE]")


def test_the_status_filter_tells_active_revoked_and_expired_keys_apart(admin_client, make_user):
    user = make_user().user
    now = timezone.now()
    active = ApiKey.objects.get(user=user)
    ApiKey.issue(user, name="later", expires_at=now + timedelta(days=1))
    revoked, _ = ApiKey.issue(user, name="revoked", expires_at=now - timedelta(days=1))
    ApiKey.objects.filter(pk=revoked.pk).update(revoked_at=now - timedelta(days=2))  # revoked, then expired
    ApiKey.issue(user, name="expired", expires_at=now - timedelta(seconds=1))
    url = reverse("admin:quotas_apikey_changelist")

    def names(status):
        return sorted(k.name for k in admin_client.get(url, {"status": status}).context["cl"].result_list)

    assert names("active") == sorted([active.name, "later"])
    assert names("revoked") == ["revoked"]
    assert names("expired") == ["expired"]
    page = admin_client.get(url).content.decode()
    assert page.count('sluice-badge--good"') == 2 and 'sluice-badge--bad"' in page and 'sluice-badge--muted"' in page
    assert "?status=expired" in page  # the filter's choices


def test_deleting_keys_is_audited_from_the_page_and_the_bulk_action(admin_client, make_user, operator):
    user = make_user().user
    one, _ = ApiKey.issue(user, name="one")
    two, _ = ApiKey.issue(user, name="two")
    three, _ = ApiKey.issue(user, name="three")
    response = admin_client.post(reverse("admin:quotas_apikey_delete", args=[one.pk]), {"post": "yes"})
    assert response.status_code == 302
    admin_client.post(reverse("admin:quotas_apikey_changelist"),
                      {"action": "delete_selected", "_selected_action": [two.pk, three.pk], "post": "yes"})
    assert not ApiKey.objects.filter(pk__in=[one.pk, two.pk, three.pk]).exists()
    entries = AuditEntry.objects.filter(action=Action.KEY_DELETED)
    assert {(e.target_id, e.old["name"], e.old["prefix"], e.old["user"], e.actor_id) for e in entries} == {
        (str(k.pk), k.name, k.prefix, user.username, operator.pk) for k in (one, two, three)}
    listed = admin_client.get(reverse("admin:quotas_auditentry_changelist"), {"action__exact": "key_deleted"})
    assert listed.content.decode().count("API key deleted") >= 3


@pytest.fixture
def operator(admin_user):
    return admin_user


def test_a_user_quota_record_is_not_needed_for_the_snippets(admin_client, make_user):
    # A user without a quota record is on the default plan: the snippet's model comes from it.
    user = make_user().user
    UserQuota.objects.filter(user=user).delete()
    Plan.objects.create(name="default-plan", is_default=True, allowed_models=["sim-small"])
    _, page = issue(admin_client, user)
    assert admin_client.get(page).context["snippets"].model == "sim-small"


def test_a_key_may_use_only_some_of_its_users_models(sim, admin_client, make_user):
    """Issue 18, item 2: a key's allowed models, among its plan's; the gateway's /v1/models and a request say so."""
    import httpx2

    from tests.quotas.console.test_admin import form_data

    account = make_user(allowed_models=["sim-small", "sim-large"])
    response = admin_client.post(reverse("admin:quotas_apikey_add"), {
        "user": account.user.pk, "name": "narrow", "allowed_models": ["sim-large"]})
    assert response.status_code == 302
    key = ApiKey.objects.get(name="narrow")
    raw = admin_client.session[keys.ISSUED][str(key.pk)]
    assert key.allowed_models == ["sim-large"]
    headers = {"Authorization": f"Bearer {raw}"}
    assert [m["id"] for m in httpx2.get(sim.api_url + "/models", headers=headers).json()["data"]] == ["sim-large"]
    refused = httpx2.post(sim.api_url + "/chat/completions", headers=headers, json={
        "model": "sim-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    # The user's other key is not narrowed; a key's models never widen its plan's.
    assert [m["id"] for m in httpx2.get(sim.api_url + "/models", headers={
        "Authorization": f"Bearer {account.key}"}).json()["data"]] == ["sim-small", "sim-large"]
    change = reverse("admin:quotas_apikey_change", args=[key.pk])
    admin_client.post(change, form_data(admin_client.get(change), allowed_models=["sim-large"]))
    account.plan.allowed_models = ["sim-small"]
    account.plan.save()
    assert httpx2.get(sim.api_url + "/models", headers=headers).json()["data"] == []
    entry = AuditEntry.objects.get(target_type="quotas.apikey", action=AuditEntry.Action.KEY_CREATED)
    assert entry.new["allowed_models"] == ["sim-large"]
