"""quotas/domain/keys.py: the API key look-up (a prepared query) and the caller's limits (quotas/domain/selectors.py)
give what the ORM's own objects give."""

from datetime import datetime

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from quotas.domain import keys
from quotas.domain.db import PreparedQuery
from quotas.domain.exceptions import InvalidApiKey
from quotas.domain.policy import Limits
from quotas.domain.selectors import default_plan
from quotas.models import ApiKey, Plan, UserQuota

pytestmark = pytest.mark.django_db(transaction=True)


def orm_limits(user):
    """The limits as the ORM's own objects give them (the admin's way)."""
    quota = UserQuota.objects.select_related("plan").filter(user=user).first()
    return Limits.combine(quota.plan, quota) if quota else Limits.combine(default_plan())


def test_limits_are_the_plan_with_the_users_overrides(make_user):
    caller = make_user(tokens_per_day=1000, requests_per_minute=7, allowed_models=["sim-small"])
    UserQuota.objects.filter(user=caller.user).update(tokens_per_day=2500, concurrent_streams=9, suspended=True,
                                                      timezone="Europe/Paris", allowed_models=["sim-large"])
    who = keys.authenticate.sync(caller.key)
    limits = who.limits
    assert (who.user_id, who.username) == (caller.user.pk, caller.user.username)
    assert who.key_id == ApiKey.objects.get(user=caller.user).pk
    assert limits == orm_limits(caller.user)
    assert (limits.tokens_per_day, limits.requests_per_minute, limits.concurrent_streams) == (2500, 7, 9)
    assert (limits.allowed_models, limits.suspended, limits.timezone) == (("sim-large",), True, "Europe/Paris")


def test_a_user_without_a_quota_record_gets_the_default_plan():
    user = get_user_model().objects.create_user("no-quota-user", password="a-long-test-password")
    _, raw = ApiKey.issue(user)
    Plan.objects.update(is_default=False)
    default = Plan.objects.create(name="the-default", is_default=True, tokens_per_day=123)
    limits = keys.authenticate.sync(raw).limits
    assert limits.tokens_per_day == default.tokens_per_day == 123
    assert limits == orm_limits(user)


def test_unknown_revoked_expired_keys_and_inactive_users_are_refused(make_user):
    caller = make_user()
    with pytest.raises(InvalidApiKey) as refused:
        keys.authenticate.sync("")
    assert refused.value.reason == InvalidApiKey.MISSING
    with pytest.raises(InvalidApiKey) as refused:
        keys.authenticate.sync(caller.key + "x")
    assert refused.value.reason == InvalidApiKey.INCORRECT
    get_user_model().objects.filter(pk=caller.user.pk).update(is_active=False)
    with pytest.raises(InvalidApiKey) as refused:
        keys.authenticate.sync(caller.key)
    assert refused.value.reason == InvalidApiKey.INCORRECT
    get_user_model().objects.filter(pk=caller.user.pk).update(is_active=True)
    ApiKey.objects.filter(user=caller.user).update(revoked_at=timezone.now())
    with pytest.raises(InvalidApiKey) as refused:
        keys.authenticate.sync(caller.key)
    assert refused.value.reason == InvalidApiKey.INACTIVE


def test_a_lookup_records_when_the_key_was_last_used(make_user):
    caller = make_user()
    assert ApiKey.objects.get(user=caller.user).last_used_at is None
    keys.authenticate.sync(caller.key)
    assert ApiKey.objects.get(user=caller.user).last_used_at is not None


def test_a_prepared_query_runs_with_new_parameters_and_converts_columns(make_user):
    first, second = make_user(), make_user()
    by_username = PreparedQuery(
        lambda name: get_user_model().objects.filter(username=name).values_list("pk", "date_joined"), "placeholder")
    for caller in (first, second, first):
        [(pk, joined)] = by_username.rows(caller.user.username)
        assert pk == caller.user.pk
        assert isinstance(joined, datetime) and joined == caller.user.date_joined  # SQLite stores text
    assert by_username.rows("nobody") == []


def test_a_query_whose_parameters_are_not_its_placeholders_is_refused():
    # A constant of the query's own would take a placeholder's place: running it would bind the wrong values.
    prepared = PreparedQuery(lambda name: Plan.objects.filter(name=name, tokens_per_day__gt=5), "placeholder")
    with pytest.raises(ValueError, match="placeholders"):
        prepared.rows("x")
