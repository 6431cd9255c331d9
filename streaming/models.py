"""The streaming app's models, each in the sub-package that uses it."""

from .catalogue.models import Deployment, ModelPrice, Provider, ServedModel  # noqa: F401
from .conversations.models import Conversation, Message  # noqa: F401
