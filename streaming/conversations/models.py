"""A chat page user's conversations and their messages.

Answers are saved by the page once their stream has ended (docs/demo.md, "Conversations"); an answer keeps the
request id of its ledger row, which is where its token counts are read from (selectors.py).
"""

from django.conf import settings
from django.db import models
from django.utils import timezone

TITLE_MAX_CHARS = 120


class Conversation(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    title = models.CharField(max_length=TITLE_MAX_CHARS, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["user", "-updated_at"], name="conversation_recent")]

    def __str__(self):
        return self.title or f"conversation {self.pk}"


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    class Ending(models.TextChoices):
        """How an answer ended, as the page saw it."""

        STOP = "stop", "complete"
        LENGTH = "length", "at its max tokens"
        QUOTA = "quota", "at what the quota had left"
        STOPPED = "stopped", "stopped by the user"
        CUT = "cut", "cut at the quota"
        ERROR = "error", "ended by an error"
        INTERRUPTED = "interrupted", "connection dropped"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField()
    model = models.CharField(max_length=100, blank=True)
    request_id = models.CharField(max_length=64, blank=True, help_text="An answer's ledger row (quotas.Usage).")
    ending = models.CharField(max_length=16, choices=Ending.choices, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]

    def __str__(self):
        return f"{self.role}: {self.content[:40]}"
