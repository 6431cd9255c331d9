"""The chat page's conversations under /api/conversations (streaming/gateway/conversations.py over
streaming/conversations/): per user, session-authenticated with CSRF, OpenAI error JSON for every refusal."""

import pytest
from django.test import Client

from streaming.conversations.models import Conversation, Message

pytestmark = pytest.mark.django_db(transaction=True)
PASSWORD = "a-long-test-password"
EXCHANGE = [{"role": "user", "content": "What is a sluice?\nA second line."},
            {"role": "assistant", "content": "A **gate** for water.", "model": "sim-small", "request_id": "req-1",
             "ending": "stop"}]


def signed_in(user, csrf=False):
    client = Client(enforce_csrf_checks=csrf)
    assert client.login(username=user.username, password=PASSWORD)
    return client


def post(client, path, body, **extra):
    return client.post(path, body, content_type="application/json", **extra)


def patch(client, path, body):
    return client.patch(path, body, content_type="application/json")


def error(response, status):
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"] == "application/json"
    return response.json()["error"]


def started(client, messages=EXCHANGE, **body):
    response = post(client, "/api/conversations", {"messages": messages, **body})
    assert response.status_code == 201, response.content
    return response.json()


def test_a_conversation_is_started_listed_opened_added_to_renamed_and_deleted(make_user):
    client = signed_in(make_user().user)
    assert client.get("/api/conversations").json() == {"object": "list", "data": []}

    first = started(client)
    assert first["object"] == "conversation"
    assert first["title"] == "What is a sluice?"  # the first question's first line
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    second = started(client, messages=[], title="  Empty   for now ")
    assert second["title"] == "Empty for now" and second["messages"] == []
    assert [c["id"] for c in client.get("/api/conversations").json()["data"]] == [second["id"], first["id"]]

    added = post(client, f"/api/conversations/{first['id']}/messages",
                 {"messages": [{"role": "user", "content": "And a lock?"},
                               {"role": "assistant", "content": "Two gates.", "ending": "length"}]})
    assert added.status_code == 201
    assert [m["content"] for m in added.json()["data"]] == ["And a lock?", "Two gates."]
    # Added to: now the most recent.
    assert [c["id"] for c in client.get("/api/conversations").json()["data"]] == [first["id"], second["id"]]

    opened = client.get(f"/api/conversations/{first['id']}").json()
    assert [(m["role"], m["content"], m["ending"]) for m in opened["messages"]] == [
        ("user", "What is a sluice?\nA second line.", ""), ("assistant", "A **gate** for water.", "stop"),
        ("user", "And a lock?", ""), ("assistant", "Two gates.", "length")]
    assert opened["messages"][1]["model"] == "sim-small" and opened["messages"][1]["request_id"] == "req-1"

    renamed = patch(client, f"/api/conversations/{first['id']}", {"title": "Water gates"})
    assert renamed.status_code == 200 and renamed.json()["title"] == "Water gates"
    assert client.get(f"/api/conversations/{first['id']}").json()["title"] == "Water gates"

    deleted = client.delete(f"/api/conversations/{first['id']}")
    assert deleted.json() == {"id": first["id"], "object": "conversation.deleted", "deleted": True}
    assert error(client.get(f"/api/conversations/{first['id']}"), 404)["code"] == "conversation_not_found"
    assert not Message.objects.filter(conversation_id=first["id"]).exists()
    assert [c["id"] for c in client.get("/api/conversations").json()["data"]] == [second["id"]]


def test_one_user_cannot_read_rename_add_to_or_delete_anothers_conversation(make_user):
    owner, other = make_user(), make_user()
    conversation = started(signed_in(owner.user))
    path = f"/api/conversations/{conversation['id']}"
    intruder = signed_in(other.user)

    assert intruder.get("/api/conversations").json()["data"] == []
    for response in (intruder.get(path), patch(intruder, path, {"title": "mine now"}), intruder.delete(path),
                     post(intruder, path + "/messages", {"messages": [{"role": "user", "content": "hi"}]})):
        refused = error(response, 404)  # exactly as a conversation that does not exist
        assert refused["code"] == "conversation_not_found"
        assert refused["message"] == f"No conversation {conversation['id']}."
    row = Conversation.objects.get(pk=conversation["id"])
    assert (row.user_id, row.title, row.messages.count()) == (owner.user.pk, "What is a sluice?", 2)


def test_token_counts_come_from_the_users_own_settled_ledger_rows(make_user):
    import datetime

    from quotas.models import Usage

    caller, other = make_user(), make_user()
    for request_id, user, status, prompt, completion in (("req-mine", caller, "completed", 12, 34),
                                                         ("req-running", caller, "streaming", 12, 5),
                                                         ("req-theirs", other, "completed", 1, 2)):
        Usage.objects.create(request_id=request_id, user=user.user, model="sim-small", status=status,
                             prompt_tokens=prompt, completion_tokens=completion, day=datetime.date.today(),
                             month=datetime.date.today().strftime("%Y-%m"))
    answers = [{"role": "assistant", "content": f"answer {n}", "request_id": n}
               for n in ("req-mine", "req-running", "req-theirs", "req-unknown")]
    client = signed_in(caller.user)
    conversation = started(client, messages=answers)
    expected = [{"prompt_tokens": 12, "completion_tokens": 34}, None, None, None]
    assert [m["usage"] for m in conversation["messages"]] == expected
    assert [m["usage"] for m in client.get(f"/api/conversations/{conversation['id']}").json()["messages"]] == expected


def test_the_endpoints_answer_a_signed_out_caller_401_json():
    client = Client()
    for response in (client.get("/api/conversations"), post(client, "/api/conversations", {}),
                     client.get("/api/conversations/1"), client.delete("/api/conversations/1"),
                     post(client, "/api/conversations/1/messages", {"messages": []})):
        assert error(response, 401)["code"] == "not_authenticated"


def test_writes_need_the_csrf_token(make_user):
    client = signed_in(make_user().user, csrf=True)
    assert error(post(client, "/api/conversations", {}), 403)["code"] == "csrf_failed"
    assert not Conversation.objects.exists()
    client.get("/")  # the page sets the CSRF cookie
    token = client.cookies["csrftoken"].value
    assert post(client, "/api/conversations", {}, HTTP_X_CSRFTOKEN=token).status_code == 201


BAD_STARTS = [
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content", "invalid_value"),
    ({"messages": [{"role": "user", "content": "a\u0000b"}]}, "messages[0].content", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x", "ending": "stop"}]}, "messages[0].ending", "invalid_value"),
    ({"messages": [{"role": "assistant", "content": "x", "ending": "exploded"}]}, "messages[0].ending",
     "invalid_value"),
    ({"messages": [{"role": "assistant", "content": "x", "model": "m" * 101}]}, "messages[0].model",
     "string_above_max_length"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name", "unknown_parameter"),
    ({"messages": ["hello"]}, "messages[0]", "invalid_type"),
    ({"messages": {"role": "user"}}, "messages", "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}] * 21}, "messages", "array_above_max_length"),
    ({"title": "t" * 121}, "title", "string_above_max_length"),
    ({"title": ["t"]}, "title", "invalid_type"),
    ({"owner": 1}, "owner", "unknown_parameter"),
]


@pytest.mark.parametrize("body, param, code", BAD_STARTS, ids=[case[1] + ":" + case[2] for case in BAD_STARTS])
def test_bad_input_is_refused_with_400_json_naming_the_field(make_user, body, param, code):
    client = signed_in(make_user().user)
    refused = error(post(client, "/api/conversations", body), 400)
    assert (refused["param"], refused["code"], refused["type"]) == (param, code, "invalid_request_error")
    assert not Conversation.objects.exists()


def test_bad_requests_on_a_conversation_are_4xx_json(make_user):
    client = signed_in(make_user().user)
    conversation = started(client)
    path = f"/api/conversations/{conversation['id']}"
    assert error(patch(client, path, {"title": "   "}), 400)["param"] == "title"
    assert error(patch(client, path, {}), 400)["code"] == "missing_required_parameter"
    assert error(post(client, path + "/messages", {}), 400)["code"] == "missing_required_parameter"
    assert error(post(client, path + "/messages", {"messages": []}), 400)["param"] == "messages"
    assert error(client.post(path + "/messages", "not json", content_type="text/plain"), 415)["code"] == \
        "unsupported_media_type"
    assert error(client.post(path + "/messages", "{oops", content_type="application/json"), 400)["code"] == \
        "invalid_json"
    assert error(client.put(path, {}, content_type="application/json"), 405)["code"] == "method_not_allowed"
    assert error(client.get(f"/api/conversations/{2**63}"), 404)["code"] == "conversation_not_found"
    assert error(client.get("/api/conversations/nope"), 404)["code"] == "unknown_url"
    assert Conversation.objects.get(pk=conversation["id"]).messages.count() == 2  # nothing half-done
