"""Routing among a model's deployments, end to end: three simulator processes as providers, a real gateway process
reading the catalogue's records from the test database, the official SDK as the client.

Weights honoured over many requests; stickiness; fallback before the first byte when a deployment refuses
connections, answers 429 or 5xx; a breaker that opens for one deployment only; a mid-stream failure not retried
elsewhere; edits that reach a running gateway; the ledger names the deployment. docs/operations.md, "Providers and
models".
"""

import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest

from bench.servers import free_port, start_server
from quotas.models import AlertRule, Outbox, Usage
from streaming.catalogue.models import Deployment, Provider, ServedModel
from tests.support.gateways import METRICS_TOKEN, eventually, gateway_server, settled_row

pytestmark = pytest.mark.django_db(transaction=True)

SIMULATOR = [sys.executable, "-m", "streaming.simulator", "--port", "{port}"]
BUSY = {"requests_per_minute": 100_000, "concurrent_streams": 100}
FAST = {"UPSTREAM_BACKOFF_BASE": 0.05, "UPSTREAM_BACKOFF_MAX": 0.2, "UPSTREAM_RETRY_DEADLINE": 5,
        "UPSTREAM_RETRY_MAX_ATTEMPTS": 6}


@pytest.fixture(scope="module")
def simulators():
    with start_server(SIMULATOR) as a, start_server(SIMULATOR) as b, start_server(SIMULATOR) as c:
        https = [httpx2.Client(base_url=s.base_url, timeout=10) for s in (a, b, c)]
        try:
            yield https
        finally:
            for http in https:
                http.close()


@pytest.fixture
def sims(simulators):
    for http in simulators:
        http.post("/control/reset").raise_for_status()
    yield simulators
    for http in simulators:
        http.post("/control/reset").raise_for_status()


def provider(name, http=None, url=None, **fields):
    return Provider.objects.create(name=name, base_url=url or str(http.base_url) + "/v1", **fields)


def served(name, *deployments, **fields):
    """A model and its deployments: (provider, the provider's model name, {weight, priority, ...})."""
    model = ServedModel.objects.create(name=name, **fields)
    for where, upstream_model, *options in deployments:
        Deployment.objects.create(model=model, provider=where, upstream_model=upstream_model,
                                  **(options[0] if options else {}))
    return model


def models_of(http):
    """The model names the simulator was asked for, one per request."""
    return [r["model"] for r in http.get("/stats").json()["requests"]]


def sdk(gateway, user):
    return openai.OpenAI(base_url=gateway.api_url, api_key=user.key, max_retries=0)


def ask(client, model, **extra):
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2, **extra)


def test_requests_follow_the_weights_and_the_provider_gets_its_own_model_name(sims, make_user):
    a, b, _ = sims
    served("alpha", (provider("a", a), "a-model", {"weight": 3}), (provider("b", b), "b-model", {"weight": 1}))
    user = make_user(**BUSY)
    with gateway_server(**FAST) as gateway, ThreadPoolExecutor(8) as pool:
        client = sdk(gateway, user)
        answers = list(pool.map(lambda _: ask(client, "alpha"), range(240)))
    assert all(answer.http_response.status_code == 200 for answer in answers)
    on_a, on_b = models_of(a), models_of(b)
    assert set(on_a) == {"a-model"} and set(on_b) == {"b-model"}
    # 3 : 1 over 240 requests: 180 expected on a (σ ≈ 6.7); far from an even split (120) or from a only.
    assert len(on_a) + len(on_b) == 240 and 150 <= len(on_a) <= 210, (len(on_a), len(on_b))
    # The ledger names the model as the client did, and the deployment that served each request.
    rows = Counter(Usage.objects.filter(user=user.user).values_list("model", "deployment"))
    assert rows == {("alpha", "a/a-model"): len(on_a), ("alpha", "b/b-model"): len(on_b)}


def test_a_prompt_cache_key_or_user_keeps_a_conversation_on_one_deployment(sims, make_user):
    served("alpha", *((provider(n, h), "m") for n, h in zip("abc", sims)))
    user = make_user(**BUSY)

    def landed(**extra):
        """Where five requests with `extra` went: how many each simulator got."""
        before = [len(models_of(h)) for h in sims]
        for _ in range(5):
            assert ask(client, "alpha", **extra).http_response.status_code == 200
        return sorted(len(models_of(h)) - n for h, n in zip(sims, before))

    with gateway_server(**FAST) as gateway:
        client = sdk(gateway, user)
        for i in range(4):
            assert landed(prompt_cache_key=f"conversation-{i}") == [0, 0, 5]
        assert landed(user="someone") == [0, 0, 5]
        # Without either, the requests spread (five in one place has a chance of 3 × (1/3)^5 < 2 %: twice, 0.02 %).
        spread = landed(), landed()
        assert spread != ([0, 0, 5], [0, 0, 5]), spread


@pytest.mark.parametrize("failure", ["refused", "429", "500"])
def test_a_failing_deployment_falls_back_to_the_next_priority_before_the_first_byte(sims, make_user, failure):
    a, b, _ = sims
    first = provider("first", url=f"http://127.0.0.1:{free_port('127.0.0.1')}/v1") if failure == "refused" \
        else provider("first", a)
    served("alpha", (first, "m", {"priority": 1}), (provider("second", b), "m", {"priority": 2}))
    if failure == "429":
        a.post("/control", json={"fail_429_rate": 1.0, "retry_after_seconds": 30}).raise_for_status()
    elif failure == "500":
        a.post("/control", json={"fail_500_rate": 1.0}).raise_for_status()
    user = make_user(**BUSY)
    with gateway_server(**FAST) as gateway:
        client = sdk(gateway, user)
        for stream in (False, True):
            answer = ask(client, "alpha", stream=stream)
            assert answer.http_response.status_code == 200
            if stream:
                assert "".join(c.choices[0].delta.content or "" for c in answer.parse() if c.choices)
            row = settled_row(answer.http_response.headers["x-request-id"])
            assert (row.status, row.deployment) == ("completed", "second/m")
        # Prometheus sees the fallbacks and the streams by the catalogue's names.
        metrics = gateway.http.get(gateway.base_url + "/metrics",
                                   headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
        assert 'sluice_upstream_fallbacks_total{provider="first"} 2.0' in metrics
        assert 'sluice_streams_total{model="alpha",provider="second",status="completed"} 2.0' in metrics
    # Straight to the fallback: a Retry-After of 30 s from the first did not hold the request back.
    if failure != "refused":
        stats = a.get("/stats").json()
        assert stats["rejected_429" if failure == "429" else "rejected_5xx"] >= 2
    assert len(models_of(b)) == 2


def test_a_breaker_opens_for_one_deployment_only(sims, make_user):
    a, b, _ = sims
    pa, pb = provider("a", a), provider("b", b)
    served("broken", (pa, "m"))
    served("fine", (pb, "m"))
    served("either", (pa, "m", {"priority": 1}), (pb, "m", {"priority": 2}))
    a.post("/control", json={"fail_500_rate": 1.0}).raise_for_status()
    AlertRule.objects.create(name="on call", kind="operators", emails=["ops@example.com"])
    users = [make_user(**BUSY) for _ in range(2)]
    settings = {**FAST, "UPSTREAM_BREAKER_THRESHOLD": 3, "UPSTREAM_BREAKER_COOLDOWN": 60,
                "UPSTREAM_BREAKER_MIN_USERS": 2, "UPSTREAM_RETRY_MAX_ATTEMPTS": 1}
    with gateway_server(**settings) as gateway:
        clients = [sdk(gateway, user) for user in users]
        # Two users' requests fail at a's deployment until its breaker opens: then they are refused at once.
        codes = []
        for i in range(8):
            try:
                ask(clients[i % 2], "broken")
            except openai.APIStatusError as error:
                codes.append(error.body["code"] if isinstance(error.body, dict) else error.status_code)
        assert codes[-1] == "upstream_unavailable" and "upstream_error" in codes, codes
        attempts_at_a = a.get("/stats").json()["attempts"]
        # b's deployment is untouched; a model served by both skips a's open breaker without asking it.
        for client in clients:
            assert ask(client, "fine").http_response.status_code == 200
            answer = ask(client, "either")
            assert answer.http_response.status_code == 200
            assert settled_row(answer.http_response.headers["x-request-id"]).deployment == "b/m"
        assert a.get("/stats").json()["attempts"] == attempts_at_a
        # Operators were told, once (docs/operations.md, "Alerts"), naming the deployment.
        mails = eventually(lambda: list(Outbox.objects.filter(target="ops@example.com").values_list(
            "payload", flat=True)), timeout=5, interval=0.05)
        assert len(mails) == 1 and "a/m" in mails[0]["subject"], mails


def test_a_failure_after_the_first_byte_is_not_retried_elsewhere(sims, make_user):
    a, b, _ = sims
    served("alpha", (provider("a", a), "m", {"priority": 1}), (provider("b", b), "m", {"priority": 2}))
    a.post("/control", json={"fail_midstream_after": 3}).raise_for_status()
    user = make_user(**BUSY)
    with gateway_server(**FAST) as gateway:
        response = httpx2.post(gateway.api_url + "/chat/completions", timeout=30,
                               headers={"Authorization": f"Bearer {user.key}"},
                               json={"model": "alpha", "stream": True, "max_tokens": 20,
                                     "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200
        assert b'"code": "upstream_error"' in response.content or b'"upstream_' in response.content
        row = settled_row(response.headers["x-request-id"])
        assert (row.status, row.deployment) == ("upstream_error", "a/m") and row.completion_tokens >= 3
    assert models_of(b) == []


def test_edits_reach_a_running_gateway_and_the_models_come_from_the_catalogue(sims, make_user):
    a, b, _ = sims
    pa, pb = provider("a", a), provider("b", b)
    alpha = served("alpha", (pa, "m"), aliases=["default"])
    served("beta", (pb, "m"))
    everything, only_alpha = make_user(**BUSY), make_user(allowed_models=["alpha"], **BUSY)
    with gateway_server(**FAST) as gateway:
        client = sdk(gateway, everything)
        assert [m.id for m in client.models.list()] == ["alpha", "beta"]
        assert [m.id for m in sdk(gateway, only_alpha).models.list()] == ["alpha"]
        assert client.models.retrieve("default").id == "alpha"
        # An alias is served, and the ledger names the model.
        answer = ask(client, "default")
        assert settled_row(answer.http_response.headers["x-request-id"]).model == "alpha"
        # A new deployment, then the old one disabled: the running gateway follows within its refresh.
        Deployment.objects.create(model=alpha, provider=pb, upstream_model="m2")
        Deployment.objects.filter(provider=pa).update(enabled=False)
        eventually(lambda: ask(client, "alpha") and models_of(b)[-1:] == ["m2"], timeout=10, interval=0.1)
        served_before = len(models_of(a))
        for _ in range(5):
            ask(client, "alpha")
        assert len(models_of(a)) == served_before
        # A model removed is unknown at once to /v1/models and to requests.
        ServedModel.objects.filter(name="beta").delete()
        eventually(lambda: [m.id for m in client.models.list()] == ["alpha"], timeout=10, interval=0.1)
        with pytest.raises(openai.NotFoundError):
            ask(client, "beta")


def test_the_settings_seed_an_empty_catalogue_once_then_the_records_rule(sims, make_user):
    a, b, _ = sims
    user = make_user(**BUSY)
    seeded = {**FAST, "SLUICE_CATALOGUE_BOOTSTRAP": 1, "OPENAI_BASE_URL": str(a.base_url) + "/v1",
              "OPENAI_API_KEY": "sk-test-upstream", "SLUICE_MODELS": "x,y"}
    with gateway_server(**seeded) as gateway:
        assert ask(sdk(gateway, user), "x").http_response.status_code == 200
    assert list(Provider.objects.values_list("name", "base_url", "api_key_env", "api_key_encrypted")) == [
        ("default", str(a.base_url) + "/v1", "OPENAI_API_KEY", "")]
    assert list(ServedModel.objects.values_list("name", flat=True)) == ["x", "y"]
    assert models_of(a) == ["x"]
    # Other settings on the next start change nothing: the database is the one source of truth now.
    with gateway_server(**{**seeded, "OPENAI_BASE_URL": str(b.base_url) + "/v1", "SLUICE_MODELS": "z"}) as gateway:
        client = sdk(gateway, user)
        assert [m.id for m in client.models.list()] == ["x", "y"]
        ask(client, "y")
    assert models_of(a) == ["x", "y"] and models_of(b) == []
    assert Provider.objects.count() == 1
