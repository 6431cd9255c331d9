"""Writing conversations. Sync ORM functions (the async views run them on a database thread), each confined to the
given user's conversations: another user's is `ConversationNotFound`, exactly as one that does not exist."""

from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from .models import TITLE_MAX_CHARS, Conversation, Message

# A title made from the first question: its first line, this long at most.
AUTO_TITLE_CHARS = 60


class ConversationNotFound(Exception):
    def __init__(self, conversation_id):
        super().__init__(f"No conversation {conversation_id}.")
        self.conversation_id = conversation_id


@dataclass(frozen=True)
class NewMessage:
    """A message to save, already validated (streaming/gateway/conversations.py)."""

    role: str
    content: str
    model: str = ""
    request_id: str = ""
    ending: str = ""


def title_from(messages) -> str:
    """The first question's first line, whitespace collapsed and shortened: what a new conversation is called."""
    for message in messages:
        if message.role == Message.Role.USER:
            line = next((line for line in message.content.splitlines() if line.strip()), "")
            line = " ".join(line.split())
            return line if len(line) <= AUTO_TITLE_CHARS else line[: AUTO_TITLE_CHARS - 1].rstrip() + "…"
    return ""


def owned(user_id, conversation_id, for_update=False) -> Conversation:
    conversations = Conversation.objects.filter(pk=conversation_id, user_id=user_id)
    if for_update:
        conversations = conversations.select_for_update()
    conversation = conversations.first()
    if conversation is None:
        raise ConversationNotFound(conversation_id)
    return conversation


def _add(conversation, messages, now) -> list[Message]:
    return Message.objects.bulk_create([
        Message(conversation=conversation, role=m.role, content=m.content, model=m.model, request_id=m.request_id,
                ending=m.ending, created_at=now)
        for m in messages
    ])


def start(user_id, title: str, messages) -> tuple[Conversation, list[Message]]:
    """A new conversation, with its first messages (none: an empty one)."""
    now = timezone.now()
    with transaction.atomic():
        conversation = Conversation.objects.create(user_id=user_id, title=(title or title_from(messages))[:TITLE_MAX_CHARS],
                                                   created_at=now, updated_at=now)
        return conversation, _add(conversation, messages, now)


def append(user_id, conversation_id, messages) -> tuple[Conversation, list[Message]]:
    """Messages added at the end (an exchange once its answer has ended); the conversation becomes the most recent."""
    now = timezone.now()
    with transaction.atomic():
        conversation = owned(user_id, conversation_id, for_update=True)
        added = _add(conversation, messages, now)
        conversation.updated_at = now
        if not conversation.title:
            conversation.title = title_from(messages)
        conversation.save(update_fields=["updated_at", "title"])
    return conversation, added


def rename(user_id, conversation_id, title: str) -> Conversation:
    conversation = owned(user_id, conversation_id)
    conversation.title = title
    conversation.save(update_fields=["title"])
    return conversation


def delete(user_id, conversation_id) -> None:
    deleted, _ = Conversation.objects.filter(pk=conversation_id, user_id=user_id).delete()
    if not deleted:
        raise ConversationNotFound(conversation_id)
