"""The chat page's conversations as JSON under /api/conversations (session auth and CSRF, as /api/chat).

    GET    /api/conversations                 the user's most recent conversations (newest first)
    POST   /api/conversations                 start one: {"title"?, "messages"?}              → 201
    GET    /api/conversations/<id>            one, with its messages and each answer's token counts
    PATCH  /api/conversations/<id>            rename: {"title"}
    DELETE /api/conversations/<id>            delete it and its messages
    POST   /api/conversations/<id>/messages   add {"messages": [...]} at the end               → 201

The page saves an exchange after its answer's stream has ended (docs/demo.md explains why not the server, from the
stream). Another user's conversation answers 404, exactly as one that does not exist; bad input answers 400 in
OpenAI's error JSON, naming the field.
"""

from django.http import JsonResponse

from quotas.domain import db
from streaming.conversations import selectors, services
from streaming.conversations.models import TITLE_MAX_CHARS, Message
from streaming.errors import invalid, not_found

from .demo import session_api
from .validation import parse_body

MAX_MESSAGES_PER_REQUEST = 20
MAX_ID = 2**63 - 1  # a larger id in the URL is no conversation (and no database error)
MODEL_MAX_CHARS = 100
REQUEST_ID_MAX_CHARS = 64


@session_api(["GET", "POST"])
async def collection(request):
    user_id = request.sluice.user_id
    if request.method == "GET":
        conversations = await db.run(selectors.recent, user_id)
        return JsonResponse({"object": "list", "data": [_conversation(c) for c in conversations]})
    body = _body(request, {"title", "messages"})
    title = _title(body["title"]) if body.get("title") is not None else ""
    messages = _messages(body["messages"]) if body.get("messages") is not None else []
    conversation, added = await db.run(services.start, user_id, title, messages)
    usage = await db.run(selectors.answer_usage, user_id, [m.request_id for m in added])
    return JsonResponse(_conversation(conversation, added, usage), status=201)


@session_api(["GET", "PATCH", "DELETE"])
async def item(request, conversation_id):
    user_id = request.sluice.user_id
    if request.method == "GET":
        conversation, messages, usage = await _found(conversation_id, selectors.detail, user_id, conversation_id)
        return JsonResponse(_conversation(conversation, messages, usage))
    if request.method == "PATCH":
        body = _body(request, {"title"})
        if "title" not in body:
            raise invalid("Missing required parameter: 'title'.", param="title", code="missing_required_parameter")
        title = _title(body["title"])
        if not title:
            raise invalid("'title' must not be empty.", param="title", code="invalid_value")
        conversation = await _found(conversation_id, services.rename, user_id, conversation_id, title)
        return JsonResponse(_conversation(conversation))
    await _found(conversation_id, services.delete, user_id, conversation_id)
    return JsonResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


@session_api(["POST"])
async def messages(request, conversation_id):
    user_id = request.sluice.user_id
    body = _body(request, {"messages"})
    if "messages" not in body:
        raise invalid("Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter")
    new = _messages(body["messages"])
    if not new:
        raise invalid("'messages' must not be empty.", param="messages", code="invalid_value")
    conversation, added = await _found(conversation_id, services.append, user_id, conversation_id, new)
    usage = await db.run(selectors.answer_usage, user_id, [m.request_id for m in added])
    return JsonResponse({"object": "list", "conversation": _conversation(conversation),
                         "data": [_message(m, usage) for m in added]}, status=201)


async def _found(conversation_id, fn, *args):
    """`fn(*args)` on a database thread; the user's conversation `conversation_id` missing (or another's) → 404."""
    try:
        if conversation_id > MAX_ID:
            raise services.ConversationNotFound(conversation_id)
        return await db.run(fn, *args)
    except services.ConversationNotFound:
        raise not_found(f"No conversation {conversation_id}.", code="conversation_not_found") from None


# The JSON the page sends --------------------------------------------------------------------------------------------

def _body(request, fields):
    body = parse_body(request)
    _known(body, fields, "")
    return body


def _known(value: dict, fields, where):
    for name in value:
        if name not in fields:
            raise invalid(f"Unrecognized request argument supplied: '{where}{name}'.", param=f"{where}{name}",
                          code="unknown_parameter")


def _text(value, param, max_chars=None) -> str:
    if not isinstance(value, str):
        raise invalid(f"'{param}' must be a string.", param=param, code="invalid_type")
    if "\x00" in value:  # PostgreSQL's text cannot hold NUL
        raise invalid(f"'{param}' must not contain NUL characters.", param=param, code="invalid_value")
    if max_chars is not None and len(value) > max_chars:
        raise invalid(f"'{param}' is longer than {max_chars} characters.", param=param, code="string_above_max_length")
    return value


def _title(value) -> str:
    return " ".join(_text(value, "title", TITLE_MAX_CHARS).split())


def _messages(value) -> list:
    if not isinstance(value, list):
        raise invalid("'messages' must be an array.", param="messages", code="invalid_type")
    if len(value) > MAX_MESSAGES_PER_REQUEST:
        raise invalid(f"At most {MAX_MESSAGES_PER_REQUEST} messages at a time.", param="messages",
                      code="array_above_max_length")
    return [_message_in(message, f"messages[{i}]") for i, message in enumerate(value)]


def _message_in(value, where) -> services.NewMessage:
    if not isinstance(value, dict):
        raise invalid(f"'{where}' must be an object.", param=where, code="invalid_type")
    _known(value, {"role", "content", "model", "request_id", "ending"}, f"{where}.")
    role = value.get("role")
    if role not in Message.Role.values:
        raise invalid(f"'{where}.role' must be 'user' or 'assistant'.", param=f"{where}.role", code="invalid_value")
    content = _text(value.get("content"), f"{where}.content")
    if not content.strip():
        raise invalid(f"'{where}.content' must not be empty.", param=f"{where}.content", code="invalid_value")
    ending = _text(value.get("ending", ""), f"{where}.ending")
    if ending and (role != Message.Role.ASSISTANT or ending not in Message.Ending.values):
        raise invalid(f"'{where}.ending' must be one of {', '.join(Message.Ending.values)}, on an answer.",
                      param=f"{where}.ending", code="invalid_value")
    return services.NewMessage(
        role=role, content=content, ending=ending,
        model=_text(value.get("model", ""), f"{where}.model", MODEL_MAX_CHARS),
        request_id=_text(value.get("request_id", ""), f"{where}.request_id", REQUEST_ID_MAX_CHARS))


# The JSON the page reads --------------------------------------------------------------------------------------------

def _conversation(conversation, messages=None, usage=None) -> dict:
    data = {"id": conversation.pk, "object": "conversation", "title": conversation.title,
            "created_at": conversation.created_at.isoformat(), "updated_at": conversation.updated_at.isoformat()}
    if messages is not None:
        data["messages"] = [_message(m, usage or {}) for m in messages]
    return data


def _message(message, usage) -> dict:
    counts = usage.get(message.request_id) if message.request_id else None
    return {"id": message.pk, "object": "conversation.message", "role": message.role, "content": message.content,
            "model": message.model, "request_id": message.request_id, "ending": message.ending,
            "created_at": message.created_at.isoformat(),
            "usage": {"prompt_tokens": counts[0], "completion_tokens": counts[1]} if counts else None}
