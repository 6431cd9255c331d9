"""Reading conversations: the user's list, and one conversation with each answer's token counts.

The counts come from the ledger (quotas.Usage, by the answer's request id, the same user's rows only), not from the
page: the ledger is the truth about what a request cost. A row still streaming has no counts yet (None).
"""

from quotas.models import Usage

from .models import Conversation
from .services import owned

RECENT_LIMIT = 100


def recent(user_id, limit=RECENT_LIMIT) -> list[Conversation]:
    return list(Conversation.objects.filter(user_id=user_id).order_by("-updated_at", "-pk")[:limit])


def answer_usage(user_id, request_ids) -> dict:
    """{request_id: (prompt_tokens, completion_tokens)} of the user's settled ledger rows among `request_ids`."""
    request_ids = {r for r in request_ids if r}
    if not request_ids:
        return {}
    rows = (Usage.objects.filter(user_id=user_id, request_id__in=request_ids).exclude(status=Usage.Status.STREAMING)
            .values_list("request_id", "prompt_tokens", "completion_tokens"))
    return {request_id: (prompt, completion) for request_id, prompt, completion in rows}


def detail(user_id, conversation_id):
    """(conversation, its messages in order, their usage by request id)."""
    conversation = owned(user_id, conversation_id)
    messages = list(conversation.messages.all())
    return conversation, messages, answer_usage(user_id, [m.request_id for m in messages])
