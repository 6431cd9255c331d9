"""The streaming app's models, each in the sub-package that uses it."""

from .conversations.models import Conversation, Message  # noqa: F401
