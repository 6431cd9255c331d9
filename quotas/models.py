"""Plans, per-user quota records, API keys and the usage ledger.

The ledger is the truth about tokens spent; the counter store (Redis or in-process) is a cache of
it that can be rebuilt (docs/quotas.md).
"""

import hashlib
import hmac
import secrets
import zoneinfo

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone



def validate_timezone(value):
    """An IANA zone name the installed tz database knows (validated, not frozen into a migration as choices)."""
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValidationError(f"'{value}' is not a time zone name, e.g. Europe/Paris or UTC.", code="invalid_timezone")


def validate_model_names(value):
    """allowed_models: a list of model names. Anything else (a number, a string) would be refused at every request of
    the plan (quotas/domain/policy.py fails closed on it)."""
    if not isinstance(value, list) or not all(isinstance(name, str) and name for name in value):
        raise ValidationError('Enter a list of model names, e.g. ["sim-small"] (empty: every configured model).',
                              code="invalid_model_names")


class Plan(models.Model):
    name = models.CharField(max_length=64, unique=True)
    tokens_per_day = models.PositiveBigIntegerField(default=200_000)
    tokens_per_month = models.PositiveBigIntegerField(default=3_000_000)
    requests_per_minute = models.PositiveIntegerField(default=60)
    concurrent_streams = models.PositiveIntegerField(default=4)
    max_tokens_per_request = models.PositiveIntegerField(default=4096)
    allowed_models = models.JSONField(
        default=list, blank=True, validators=[validate_model_names],
        help_text="Model names this plan may use; empty means every configured model."
    )
    is_default = models.BooleanField(default=False, help_text="The plan of every user without a quota record.")

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["is_default"], condition=models.Q(is_default=True), name="one_default_plan")
        ]

    def __str__(self):
        return self.name


class UserQuota(models.Model):
    """A user's plan, with optional per-user overrides (blank = the plan's value)."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="quota")
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="quotas")
    tokens_per_day = models.PositiveBigIntegerField(null=True, blank=True)
    tokens_per_month = models.PositiveBigIntegerField(null=True, blank=True)
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    concurrent_streams = models.PositiveIntegerField(null=True, blank=True)
    max_tokens_per_request = models.PositiveIntegerField(null=True, blank=True)
    allowed_models = models.JSONField(null=True, blank=True, validators=[validate_model_names])
    suspended = models.BooleanField(default=False)
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone],
                                help_text="Daily and monthly windows start at midnight here.")

    class Meta:
        verbose_name = "user quota"

    def __str__(self):
        return f"{self.user} on {self.plan}"


def hash_key(raw: str) -> str:
    # Keys are 256-bit random strings, so a plain SHA-256 is enough (no need for a slow KDF).
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiKey(models.Model):
    PREFIX = "sk-sluice-"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=24, editable=False, help_text="The key's first characters, to tell keys apart.")
    hashed_key = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"

    def __str__(self):
        return f"{self.prefix}… ({self.name or 'unnamed'})"

    @classmethod
    def issue(cls, user, name="", expires_at=None):
        """Create a key; returns (ApiKey, raw_key). The raw key is never stored and shown only now."""
        key = cls(user=user, name=name, expires_at=expires_at)
        raw = key.set_new_key()
        key.save(force_insert=True)
        return key, raw

    def set_new_key(self) -> str:
        """Give this (unsaved) key a new random secret; returns it. Only its hash and prefix are kept."""
        raw = self.PREFIX + secrets.token_urlsafe(32)
        self.prefix = raw[: len(self.PREFIX) + 6]
        self.hashed_key = hash_key(raw)
        return raw

    def matches(self, raw: str) -> bool:
        return hmac.compare_digest(self.hashed_key, hash_key(raw))

    @property
    def is_active(self):
        now = timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class Usage(models.Model):
    """The ledger: one row per admitted or refused request, written at admission and settled once."""

    class Status(models.TextChoices):
        STREAMING = "streaming", "in progress"
        COMPLETED = "completed", "completed"
        QUOTA_EXHAUSTED = "quota_exhausted", "cut at the quota"
        CLIENT_DISCONNECTED = "client_disconnected", "client disconnected"
        CLIENT_STALLED = "client_stalled", "client stalled"
        UPSTREAM_ERROR = "upstream_error", "upstream error"
        STORE_UNAVAILABLE = "store_unavailable", "counter store unavailable"
        WORKER_LOST = "worker_lost", "serving process lost"
        REJECTED = "rejected", "rejected"

    request_id = models.CharField(max_length=64, unique=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="usage")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage")
    model = models.CharField(max_length=100)
    deployment = models.CharField(max_length=300, blank=True,
                                  help_text="The deployment that served it (provider/provider's model name).")
    status = models.CharField(max_length=24, choices=Status.choices, default=Status.STREAMING)
    reason = models.CharField(max_length=64, blank=True, help_text="For refusals and errors: the error code.")
    started_at = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)
    stream = models.BooleanField(default=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    reserved_tokens = models.PositiveIntegerField(default=0, help_text="The most this request may still be charged while in progress.")
    usage_reported = models.BooleanField(default=False, help_text="True: the upstream reported the counts; false: metered here.")
    # What the provider's usage details say (blank: it did not report them): prompt tokens it served from its cache,
    # and completion tokens spent on reasoning (counted in completion_tokens, streamed or not).
    cached_tokens = models.PositiveIntegerField(null=True, blank=True,
                                                help_text="Of the prompt tokens, those the provider read from its cache.")
    reasoning_tokens = models.PositiveIntegerField(null=True, blank=True,
                                                   help_text="Of the completion tokens, those spent on reasoning.")
    cost_nanos = models.BigIntegerField(
        null=True, blank=True,
        help_text="What it cost, in 10⁻⁹ of the currency (SLUICE_CURRENCY), at `price`; empty: the model has no price.")
    price = models.JSONField(null=True, blank=True,
                             help_text="The model's price per million tokens that the cost used (input, cached input, "
                                       "output, reasoning).")
    charged_tokens = models.PositiveIntegerField(
        default=0, help_text="What counted against the user's windows: the tokens above, except what a provider reported "
                             "beyond what the windows still allowed (docs/quotas.md, 'What is charged').")
    heartbeat_at = models.DateTimeField(
        null=True, blank=True, help_text="While streaming: the serving process's last sign of life (its progress is in "
                                         "completion_tokens). A row silent for long is settled by another process.")
    time_to_first_token_ms = models.PositiveIntegerField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    bytes_sent = models.PositiveBigIntegerField(default=0)
    backpressure_pauses = models.PositiveIntegerField(default=0)
    paused_ms = models.PositiveIntegerField(default=0)
    peak_buffered_bytes = models.PositiveIntegerField(default=0)
    # Which calendar windows (in the user's timezone) this row counts towards.
    counted = models.BooleanField(default=True, help_text="False once an operator reset the window it belongs to.")
    day = models.DateField()
    month = models.CharField(max_length=7)

    class Meta:
        verbose_name_plural = "usage"
        indexes = [
            models.Index(fields=["user", "day"]),
            models.Index(fields=["user", "month"]),
            models.Index(fields=["-started_at"]),
            models.Index(fields=["status", "started_at"]),
        ]

    def __str__(self):
        return self.request_id

    @property
    def total_tokens(self):
        return self.prompt_tokens + self.completion_tokens


class DailyUsage(models.Model):
    """Rollup per user × model × day (UTC), for charts and fast admin aggregates."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="daily_usage")
    model = models.CharField(max_length=100)
    date = models.DateField()
    requests = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    refusals = models.PositiveIntegerField(default=0)
    upstream_errors = models.PositiveIntegerField(default=0)

    class Meta:
        verbose_name_plural = "daily usage"
        constraints = [models.UniqueConstraint(fields=["user", "model", "date"], name="one_rollup_per_day")]
        indexes = [models.Index(fields=["date"])]


class AuditEntry(models.Model):
    """Who changed an operator-controlled setting, when, and from what to what (docs/operations.md)."""

    class Action(models.TextChoices):
        CREATED = "created", "created"
        LIMITS_CHANGED = "limits_changed", "limits changed"
        PLAN_CHANGED = "plan_changed", "plan changed"
        SUSPENDED = "suspended", "suspended"
        UNSUSPENDED = "unsuspended", "unsuspended"
        REMOVED = "removed", "removed"
        WINDOW_RESET = "window_reset", "window reset"
        KEY_CREATED = "key_created", "API key created"
        KEY_REVOKED = "key_revoked", "API key revoked"
        KEY_DELETED = "key_deleted", "API key deleted"

    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    at = models.DateTimeField(default=timezone.now, db_index=True)
    action = models.CharField(max_length=24, choices=Action.choices)
    target_type = models.CharField(max_length=64)
    target_id = models.CharField(max_length=64)
    target_repr = models.CharField(max_length=200)
    old = models.JSONField(null=True, blank=True)
    new = models.JSONField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "audit entries"
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["target_type", "target_id"])]

    def __str__(self):
        return f"{self.get_action_display()}: {self.target_repr}"

    @classmethod
    def entry(cls, actor, action, target, old=None, new=None):
        """An unsaved entry about `target` (a model instance), for `save()` or `bulk_create`."""
        return cls(actor=actor, action=action, target_type=target._meta.label_lower, target_id=str(target.pk),
                   target_repr=str(target)[:200], old=old, new=new)

    @staticmethod
    def values(obj, fields):
        """The fields' values as JSON (a related object by its name)."""
        values = {name: getattr(obj, name) for name in fields}
        return {name: v if v is None or isinstance(v, (bool, int, str, list, dict)) else str(v)
                for name, v in values.items()}

    @classmethod
    def for_save(cls, actor, before, after, fields):
        """The entry for saving `after` over `before` (None: created); None when no field in `fields` changed."""
        if before is None:
            return cls.entry(actor, cls.Action.CREATED, after, new=cls.values(after, fields))
        old, new = cls.values(before, fields), cls.values(after, fields)
        changed = [name for name in fields if old[name] != new[name]]
        if not changed:
            return None
        if changed == ["suspended"]:
            action = cls.Action.SUSPENDED if after.suspended else cls.Action.UNSUSPENDED
        else:
            action = cls.Action.PLAN_CHANGED if changed == ["plan"] else cls.Action.LIMITS_CHANGED
        return cls.entry(actor, action, after, {n: old[n] for n in changed}, {n: new[n] for n in changed})
