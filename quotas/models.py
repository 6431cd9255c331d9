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
from django.core.validators import MinValueValidator
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
    budget_per_day = models.DecimalField(
        max_digits=15, decimal_places=6, null=True, blank=True, validators=[MinValueValidator(0)],
        help_text="Money a user may spend a day, in SLUICE_CURRENCY, on priced models; empty: no budget.")
    budget_per_month = models.DecimalField(
        max_digits=15, decimal_places=6, null=True, blank=True, validators=[MinValueValidator(0)],
        help_text="Money a user may spend a month, in SLUICE_CURRENCY, on priced models; empty: no budget.")
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
    budget_per_day = models.DecimalField(max_digits=15, decimal_places=6, null=True, blank=True,
                                         validators=[MinValueValidator(0)], help_text="Blank: the plan's budget.")
    budget_per_month = models.DecimalField(max_digits=15, decimal_places=6, null=True, blank=True,
                                           validators=[MinValueValidator(0)], help_text="Blank: the plan's budget.")
    allowed_models = models.JSONField(null=True, blank=True, validators=[validate_model_names])
    suspended = models.BooleanField(default=False)
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone],
                                help_text="Daily and monthly windows start at midnight here.")

    class Meta:
        verbose_name = "user quota"

    def __str__(self):
        return f"{self.user} on {self.plan}"


def _budget_field(help_text):
    return models.DecimalField(max_digits=15, decimal_places=6, null=True, blank=True,
                               validators=[MinValueValidator(0)], help_text=help_text)


class Team(models.Model):
    """A pool of tokens and money shared by its members (docs/quotas.md, "Teams and keys"): a key that names the team
    spends from its pool, from the member's cap in it, and from the user's own limits, all at once."""

    name = models.CharField(max_length=100, unique=True)
    tokens_per_day = models.PositiveBigIntegerField(null=True, blank=True, help_text="Empty: no token pool a day.")
    tokens_per_month = models.PositiveBigIntegerField(null=True, blank=True, help_text="Empty: no token pool a month.")
    budget_per_day = _budget_field("Money the team may spend a day, in SLUICE_CURRENCY; empty: no daily budget.")
    budget_per_month = _budget_field("Money the team may spend a month, in SLUICE_CURRENCY; empty: no monthly budget.")
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone],
                                help_text="The team's daily and monthly windows start at midnight here.")
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, through="TeamMembership", related_name="teams")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class TeamMembership(models.Model):
    """A user in a team, with optional caps on what they may spend of its pool."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="team_memberships")
    budget_per_day = _budget_field("The most this member may spend of the team's pool a day; empty: no cap.")
    budget_per_month = _budget_field("The most this member may spend of the team's pool a month; empty: no cap.")
    joined_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "team member"
        ordering = ["team", "user"]
        constraints = [models.UniqueConstraint(fields=["team", "user"], name="one_membership_per_team")]

    def __str__(self):
        return f"{self.user} in {self.team}"


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
    allowed_models = models.JSONField(
        null=True, blank=True, validators=[validate_model_names],
        help_text="The models this key may use, among its user's; empty: every model the user's plan allows.")
    team = models.ForeignKey(
        Team, null=True, blank=True, on_delete=models.PROTECT, related_name="api_keys",
        help_text="The team whose pool this key spends from (its user must be a member); empty: a personal key.")
    budget_per_day = _budget_field("The most this key may spend a day (in its user's time zone); empty: no limit.")
    budget_per_month = _budget_field("The most this key may spend a month (in its user's time zone); empty: no limit.")

    class Meta:
        verbose_name = "API key"

    def clean(self):
        super().clean()
        if self.team_id and self.user_id and not TeamMembership.objects.filter(team_id=self.team_id,
                                                                                user_id=self.user_id).exists():
            raise ValidationError({"team": "The key's user is not a member of this team."})

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
    team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage",
                             help_text="The team whose pool it spent from (its key's), if any.")
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
    cache_write_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="Of the prompt tokens, those the provider wrote to its cache (billed at the "
                                         "cache-write price where the model has one).")
    cost_nanos = models.BigIntegerField(
        null=True, blank=True,
        help_text="What it cost, in 10⁻⁹ of the currency (SLUICE_CURRENCY), at `price`; empty: the model has no price.")
    price = models.JSONField(null=True, blank=True,
                             help_text="The model's price per million tokens that the cost used (input, cached input, "
                                       "output, reasoning).")
    reserved_nanos = models.BigIntegerField(
        null=True, blank=True, help_text="While in progress, at a priced model: the most it may still cost (10⁻⁹ of the "
                                         "currency), what a money window rebuilt from the ledger holds for it.")
    charged_nanos = models.BigIntegerField(
        null=True, blank=True, help_text="What counted against the user's money budgets (10⁻⁹ of the currency): its "
                                         "cost, except what a budget no longer allowed; empty: an unpriced model.")
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
            models.Index(fields=["team", "started_at"]),
            models.Index(fields=["api_key", "started_at"]),
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


# Threshold alerts (docs/operations.md, "Alerts"): rules, the events they fired (once each), and the outbox of
# deliveries that `manage.py deliver_alerts` sends.

# The windows a rule can watch: "<measure>_<period>", tokens or money (a budget's); quotas/domain/alerts.py evaluates
# any measured window of any scope (a user, a team, a key).
ALERT_WINDOWS = ("tokens_day", "tokens_month", "money_day", "money_month")


def default_alert_thresholds():
    return [50, 80, 100]


def default_alert_windows():
    return list(ALERT_WINDOWS)


def validate_alert_thresholds(value):
    if (not isinstance(value, list) or not value
            or not all(isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 100 for t in value)):
        raise ValidationError("Enter a list of percentages from 1 to 100, e.g. [50, 80, 100].",
                              code="invalid_thresholds")


def validate_alert_windows(value):
    if not isinstance(value, list) or not value or not all(w in ALERT_WINDOWS for w in value):
        raise ValidationError(f"Enter a list of windows among {list(ALERT_WINDOWS)}.", code="invalid_windows")


def validate_email_list(value):
    from django.core.validators import validate_email

    if not isinstance(value, list) or not all(isinstance(address, str) for address in value):
        raise ValidationError('Enter a list of e-mail addresses, e.g. ["ops@example.com"].', code="invalid_emails")
    for address in value:
        validate_email(address)


class AlertRule(models.Model):
    """Whom to tell when a scope's usage crosses a threshold of a window's limit (or, for operators, when the
    counter store is down or a deployment's breaker opens)."""

    class Kind(models.TextChoices):
        USER = "user", "one user"
        TEAM = "team", "one team's pool"
        PLAN = "plan", "every user of a plan"
        EVERYONE = "everyone", "every user"
        OPERATORS = "operators", "operators (counter store down, breaker open)"

    class WebhookFormat(models.TextChoices):
        JSON = "json", "JSON (signed)"
        SLACK = "slack", 'Slack-compatible ({"text": …})'

    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.USER)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                             related_name="alert_rules", help_text="For a rule of one user.")
    plan = models.ForeignKey(Plan, null=True, blank=True, on_delete=models.CASCADE, related_name="alert_rules",
                             help_text="For a rule of a plan's users.")
    team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.CASCADE, related_name="alert_rules",
                             help_text="For a rule of a team's pool.")
    thresholds = models.JSONField(default=default_alert_thresholds, validators=[validate_alert_thresholds],
                                  help_text="Percentages of the window's limit, e.g. [50, 80, 100]: each fires once "
                                            "per window.")
    windows = models.JSONField(default=default_alert_windows, validators=[validate_alert_windows],
                               help_text=f"Which windows to watch, among {list(ALERT_WINDOWS)}.")
    emails = models.JSONField(default=list, blank=True, validators=[validate_email_list],
                              help_text='E-mail addresses to tell, e.g. ["ops@example.com"].')
    webhook_url = models.URLField(max_length=500, blank=True, help_text="A URL to POST each alert to.")
    webhook_format = models.CharField(max_length=8, choices=WebhookFormat.choices, default=WebhookFormat.JSON)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "id"]
        constraints = [
            models.CheckConstraint(
                condition=(models.Q(kind="user", user__isnull=False, plan__isnull=True, team__isnull=True)
                           | models.Q(kind="plan", plan__isnull=False, user__isnull=True, team__isnull=True)
                           | models.Q(kind="team", team__isnull=False, user__isnull=True, plan__isnull=True)
                           | models.Q(kind__in=["everyone", "operators"], user__isnull=True, plan__isnull=True,
                                      team__isnull=True)),
                name="alert_rule_scope_matches_kind"),
        ]

    def __str__(self):
        return self.name

    def clean(self):
        super().clean()
        if self.kind == self.Kind.USER and not self.user_id:
            raise ValidationError({"user": "A rule of one user names the user."})
        if self.kind == self.Kind.PLAN and not self.plan_id:
            raise ValidationError({"plan": "A rule of a plan names the plan."})
        if self.kind == self.Kind.TEAM and not self.team_id:
            raise ValidationError({"team": "A rule of a team names the team."})
        if self.kind != self.Kind.USER:
            self.user = None
        if self.kind != self.Kind.PLAN:
            self.plan = None
        if self.kind != self.Kind.TEAM:
            self.team = None
        if not self.emails and not self.webhook_url:
            raise ValidationError("Give at least one e-mail address or a webhook URL.")


class AlertEvent(models.Model):
    """A rule's threshold crossed in one window of one scope: at most one row each (the unique constraint), so an
    alert fires once however many streams and processes cross the line at once. The next window has a new key: the
    rule is armed again at the window's reset."""

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="events")
    scope = models.CharField(max_length=200, help_text='Whose usage: "user:42" (an operator alert: "operator:…").')
    window_key = models.CharField(max_length=100, help_text='Which window: "tokens_day:2026-12-05", '
                                                            '"tokens_month:2026-12"; an operator alert\'s 10 minutes.')
    threshold = models.PositiveSmallIntegerField(help_text="Percent of the limit (0 for an operator alert).")
    fired_at = models.DateTimeField(default=timezone.now, db_index=True)
    used = models.BigIntegerField(null=True, blank=True)
    limit = models.BigIntegerField(null=True, blank=True)
    message = models.TextField(blank=True)

    class Meta:
        ordering = ["-fired_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["rule", "scope", "window_key", "threshold"],
                                               name="alert_fires_once")]

    def __str__(self):
        return f"{self.rule}: {self.scope} {self.window_key} {self.threshold} %"


class Outbox(models.Model):
    """One delivery of an alert (an e-mail to one address, one webhook POST), sent by `manage.py deliver_alerts`:
    retried with backoff until sent or out of attempts. All its state is here, so a worker restart loses nothing."""

    class Channel(models.TextChoices):
        EMAIL = "email", "e-mail"
        WEBHOOK = "webhook", "webhook (JSON, signed)"
        SLACK = "slack", "webhook (Slack-compatible)"

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        SENT = "sent", "sent"
        FAILED = "failed", "failed"

    event = models.ForeignKey(AlertEvent, null=True, blank=True, on_delete=models.SET_NULL, related_name="deliveries")
    channel = models.CharField(max_length=8, choices=Channel.choices)
    target = models.CharField(max_length=500, help_text="The e-mail address or the webhook URL.")
    payload = models.JSONField(help_text="The JSON body (a webhook), or the subject and text (an e-mail).")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_error = models.TextField(blank=True, help_text="Why the last attempt failed (no secrets: URLs are cut to "
                                                        "their host).")
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "outbox message"
        verbose_name_plural = "outbox"
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="outbox_due")]

    def __str__(self):
        return f"{self.get_channel_display()} #{self.pk} ({self.status})"
