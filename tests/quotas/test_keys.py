"""quotas/keys.py: the API key look-up (one prepared query) gives what the ORM's own objects give."""

from datetime import datetime

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from quotas import keys, services
from quotas.db import PreparedQuery
from quotas.models import ApiKey, Plan, UserQuota
from streaming.errors import ApiError

pytestmark = pytest.mark.django_db(transaction=True)


def orm_limits(user):
    return services.limits_of(UserQuota.objects.select_related("plan").filter(user=user).first())


def test_limits_are_the_plan_with_the_users_overrides(make_user):
    caller = make_user(tokens_per_day=1000, requests_per_minute=7, allowed_models=["sim-small"])
    UserQuota.objects.filter(user=caller.user).update(tokens_per_day=2500, concurrent_streams=9, suspended=True,
                                                      timezone="Europe/Paris", allowed_models=["sim-large"])
    who, limits = keys._look_up.sync(caller.key)
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
    _, limits = keys._look_up.sync(raw)
    assert limits.tokens_per_day == default.tokens_per_day == 123
    assert limits == orm_limits(user)


def test_unknown_revoked_expired_keys_and_inactive_users_are_refused(make_user):
    caller = make_user()
    with pytest.raises(ApiError, match="Incorrect API key"):
        keys._look_up.sync(caller.key + "x")
    get_user_model().objects.filter(pk=caller.user.pk).update(is_active=False)
    with pytest.raises(ApiError, match="Incorrect API key"):
        keys._look_up.sync(caller.key)
    get_user_model().objects.filter(pk=caller.user.pk).update(is_active=True)
    ApiKey.objects.filter(user=caller.user).update(revoked_at=timezone.now())
    with pytest.raises(ApiError, match="revoked"):
        keys._look_up.sync(caller.key)


def test_a_lookup_records_when_the_key_was_last_used(make_user):
    caller = make_user()
    assert ApiKey.objects.get(user=caller.user).last_used_at is None
    keys._look_up.sync(caller.key)
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
