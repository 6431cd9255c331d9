"""The catalogue's records: a provider (where and how to call), a model (the public name clients send), and its
deployments (which provider serves it under which name, with what weight and priority).

The database is the one source of truth: the admin edits it, `manage.py catalogue import` upserts into it, and
OPENAI_BASE_URL / OPENAI_API_KEY / SLUICE_MODELS only seed it while it is empty (registry.py).
"""

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.utils import timezone

from .secrets import decrypt, encrypt

NAME = RegexValidator(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,99}$",
                      "Letters, digits and . _ : / @ + - (starting with a letter or digit), at most 100 characters.")
TOKEN_LIMIT_FIELDS = [("auto", "auto (max_completion_tokens for api.openai.com, max_tokens elsewhere)"),
                      ("max_tokens", "max_tokens"), ("max_completion_tokens", "max_completion_tokens")]


def validate_aliases(value):
    # Codes of our own: a JSONField shows its "Value must be valid JSON." for an error coded `invalid`.
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise ValidationError("A list of names.", code="invalid_aliases")
    for name in value:
        try:
            NAME(name)
        except ValidationError:
            raise ValidationError(f"{name!r}: {NAME.message}", code="invalid_alias") from None


class Provider(models.Model):
    """An OpenAI-compatible server. Its key is read from an environment variable (api_key_env) or stored encrypted
    (secrets.py) and never shown again; an empty base URL is this process's own simulated provider."""

    name = models.CharField(max_length=100, unique=True, validators=[NAME])
    base_url = models.URLField(
        max_length=500, blank=True,
        help_text="For example https://api.openai.com/v1 or http://10.0.0.5:8000/v1. Empty: the built-in simulator.")
    api_key_env = models.CharField(
        max_length=100, blank=True, validators=[RegexValidator(r"^[A-Z_][A-Z0-9_]*$", "An environment variable name.")],
        help_text="The environment variable that holds the key (read by every process at each refresh).")
    api_key_encrypted = models.TextField(blank=True, editable=False)
    token_limit_field = models.CharField(max_length=32, choices=TOKEN_LIMIT_FIELDS, default="auto",
                                         help_text="The field a token limit goes in when the client set none.")
    connect_timeout = models.FloatField(null=True, blank=True, validators=[MinValueValidator(0.1)],
                                        help_text="Seconds; empty: UPSTREAM_CONNECT_TIMEOUT.")
    first_token_timeout = models.FloatField(null=True, blank=True, validators=[MinValueValidator(0.1)],
                                            help_text="Seconds; empty: UPSTREAM_FIRST_TOKEN_TIMEOUT.")
    limit_scope = models.CharField(
        max_length=16, choices=[("deployment", "each deployment"), ("provider", "the whole provider")],
        default="deployment",
        help_text="What one adaptive limit, breaker and queue guard: each model it serves (OpenAI's limits are per "
                  "model), or all of them together (one server whose models share its GPUs).")
    enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    def set_api_key(self, raw: str):
        self.api_key_encrypted = encrypt(raw) if raw else ""

    def stored_api_key(self) -> str:
        return decrypt(self.api_key_encrypted) if self.api_key_encrypted else ""

    @property
    def key_source(self) -> str:
        """Where the key comes from, for display (never the key)."""
        if self.api_key_encrypted:
            return "stored (encrypted)"
        return f"${self.api_key_env}" if self.api_key_env else "none"


class ServedModel(models.Model):
    """A model as clients name it: its public name, aliases, context length and field rules (the per-model form of
    SLUICE_FIELD_RULES: {"deny": [...], "strip": [...]})."""

    name = models.CharField(max_length=100, unique=True, validators=[NAME])
    aliases = models.JSONField(default=list, blank=True, validators=[validate_aliases],
                               help_text='Other names clients may send, e.g. ["default"].')
    context_length = models.PositiveIntegerField(null=True, blank=True)
    field_rules = models.JSONField(default=dict, blank=True,
                                   help_text='{"deny": ["logit_bias"], "strip": ["temperature"]}: fields refused '
                                             'or removed before the provider sees them.')
    enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "model"

    def __str__(self):
        return self.name

    def clean(self):
        # field_rules' shape is checked by the admin's form and the import (streaming/console/catalogue.py,
        # streaming/catalogue/files.py), with the gateway's own check.
        if self.name in (self.aliases or []):
            raise ValidationError({"aliases": "An alias cannot be the model's own name."})


class Deployment(models.Model):
    """One way to serve a model: a provider and the provider's name for it. Requests go to the enabled deployments
    of the best (lowest) priority by weight; the next priority is the fallback (routing.py)."""

    model = models.ForeignKey(ServedModel, on_delete=models.CASCADE, related_name="deployments")
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="deployments")
    upstream_model = models.CharField(max_length=200, help_text="The provider's name for the model.")
    weight = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    priority = models.PositiveIntegerField(default=1, help_text="1 first; higher numbers are fallbacks.")
    enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model__name", "priority", "-weight", "pk"]
        constraints = [models.UniqueConstraint(fields=["model", "provider", "upstream_model"],
                                               name="deployment_unique")]

    def __str__(self):
        return f"{self.provider.name}/{self.upstream_model}"


class ModelPrice(models.Model):
    """A model's price per million tokens from `effective_from` on: a change is a new row, so each request is priced
    at what applied when it started, and the history stays (the ledger row keeps the price it used)."""

    model = models.ForeignKey(ServedModel, on_delete=models.CASCADE, related_name="prices")
    effective_from = models.DateTimeField(default=timezone.now)
    input = models.DecimalField(max_digits=12, decimal_places=6, validators=[MinValueValidator(0)],
                                help_text="Per million prompt tokens, in SLUICE_CURRENCY.")
    cached_input = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True,
                                       validators=[MinValueValidator(0)],
                                       help_text="Per million prompt tokens read from the provider's cache; empty: "
                                                 "the input price.")
    cache_write = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True,
                                      validators=[MinValueValidator(0)],
                                      help_text="Per million prompt tokens written to the provider's cache; empty: "
                                                "billed at the input rate.")
    output = models.DecimalField(max_digits=12, decimal_places=6, validators=[MinValueValidator(0)],
                                 help_text="Per million completion tokens.")
    reasoning = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True,
                                    validators=[MinValueValidator(0)],
                                    help_text="Per million reasoning tokens (part of the completion's); empty: the "
                                              "output price.")

    class Meta:
        ordering = ["model__name", "-effective_from"]
        constraints = [models.UniqueConstraint(fields=["model", "effective_from"], name="one_price_per_instant")]

    def __str__(self):
        return f"{self.model.name} from {self.effective_from:%Y-%m-%d %H:%M}"
