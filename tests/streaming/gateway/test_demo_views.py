"""The demo's session endpoints: sign-in, CSRF and the shared streaming path (streaming/demo.py)."""

import re

import httpx2
import pytest
from django.test import Client
from django.urls import resolve

from bench.servers import PROJECT_ROOT
from tests.support.gateways import settled_row, sse_events

pytestmark = pytest.mark.django_db(transaction=True)
PASSWORD = "a-long-test-password"
TEMPLATES = PROJECT_ROOT / "templates"


def signed_in(client, user):
    assert client.login(username=user.username, password=PASSWORD)
    return client


def test_the_page_sends_a_signed_out_visitor_to_sign_in():
    response = Client().get("/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/"


@pytest.mark.parametrize("method, path", [("get", "/api/quota"), ("post", "/api/chat")])
def test_the_api_answers_a_signed_out_caller_401_json(method, path):
    response = getattr(Client(), method)(path, data={}, content_type="application/json")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


def test_the_page_inlines_its_script_and_styles_verbatim(make_user):
    # They are included as templates: a stray template tag in them would be silently eaten.
    page = signed_in(Client(), make_user().user).get("/").content.decode()
    assert (TEMPLATES / "demo/chat.js").read_text() in page
    assert (TEMPLATES / "demo/markdown.js").read_text() in page
    assert (TEMPLATES / "demo/chats.js").read_text() in page
    assert (TEMPLATES / "demo/sluice.css").read_text() in page
    assert "sk-sluice-" not in page  # no API key in the page


def test_quota_is_the_api_quota_for_the_session_user(make_user):
    caller = make_user(tokens_per_day=500, max_tokens_per_request=64, allowed_models=["sim-small"])
    quota = signed_in(Client(), caller.user).get("/api/quota").json()
    assert quota["tokens"]["day"]["limit"] == 500
    assert quota["max_tokens_per_request"] == 64
    assert quota["models"] == ["sim-small"]


def test_chat_is_not_csrf_exempt(make_user):
    assert not getattr(resolve("/api/chat").func, "csrf_exempt", False)
    client = signed_in(Client(enforce_csrf_checks=True), make_user(requests_per_minute=3).user)
    response = client.post("/api/chat", {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]},
                           content_type="application/json")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "csrf_failed"  # JSON, like every /api/ error
    # Refused before anything was counted: a forged POST does not spend the user's request rate.
    assert client.get("/api/quota").json()["requests"]["remaining"] == 3


def sign_in_over_http(http, username):
    form = http.get("/accounts/login/").text
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form).group(1)
    response = http.post("/accounts/login/", data={"username": username, "password": PASSWORD,
                                                   "csrfmiddlewaretoken": token})
    assert response.status_code == 302 and response.headers["location"] == "/"
    return http.cookies["csrftoken"]


def test_chat_streams_through_the_api_path_with_the_csrf_header(sim, make_user):
    caller = make_user()
    body = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": False}
    with httpx2.Client(base_url=sim.base_url, timeout=10) as http:
        csrf = sign_in_over_http(http, caller.user.username)
        assert http.post("/api/chat", json=body).status_code == 403  # the session cookie alone is not enough
        response = http.post("/api/chat", json=body, headers={"X-CSRFToken": csrf})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"  # streamed even though the body said no
    events = sse_events(response.content)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]) \
        == " the quick brown"
    assert events[-1] == "[DONE]"
    row = settled_row(response.headers["x-request-id"])
    assert (row.user_id, row.api_key_id, row.status) == (caller.user.pk, None, "completed")
