"""Configuration mistakes fail at start-up, naming the variable and the fix."""

from urllib.parse import urlparse

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

from streaming.server import affinity

# Sluice's own checks carry this tag too: servers run just these at start-up (config/asgi.py).
SLUICE = "sluice"


@register(Tags.security, SLUICE, deploy=True)
def check_secret_key(app_configs=None, **kwargs):
    """A server needs DJANGO_SECRET_KEY (sessions, CSRF tokens and password resets are signed with it).

    A deployment check, also run by every server at start-up (config/asgi.py): offline commands (migrate,
    makemigrations, create_api_key) sign nothing a client keeps (API keys are plain SHA-256), so they run without it.
    """
    if getattr(settings, "SECRET_KEY_MISSING", False) and not settings.DEBUG:
        return [Error(
            "DJANGO_SECRET_KEY is not set.",
            hint="Set DJANGO_SECRET_KEY to a long random string, e.g. the output of "
                 "`.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(50))'`.",
            id="sluice.E001")]
    return []


@register(Tags.security, SLUICE, deploy=False)
def check_settings(app_configs=None, **kwargs):
    errors = []
    url = settings.DATABASE_URL
    if url and urlparse(url).scheme not in settings.SUPPORTED_DATABASE_SCHEMES:
        errors.append(Error(
            f"DATABASE_URL has an unsupported scheme '{urlparse(url).scheme}'.",
            hint="Use postgres://USER@HOST:5432/NAME, or unset DATABASE_URL for SQLite.", id="sluice.E002"))
    if settings.REDIS_URL and urlparse(settings.REDIS_URL).scheme not in ("redis", "rediss", "unix"):
        errors.append(Error(
            "REDIS_URL must start with redis://, rediss:// or unix://.",
            hint="For example REDIS_URL=redis://127.0.0.1:6379/0, or unset it for the in-process store.",
            id="sluice.E003"))
    if settings.OPENAI_BASE_URL and urlparse(settings.OPENAI_BASE_URL).scheme not in ("http", "https"):
        errors.append(Error(
            "OPENAI_BASE_URL must be an http:// or https:// URL.",
            hint="For example OPENAI_BASE_URL=http://127.0.0.1:8001/v1 for a vLLM server, "
                 "or unset it to use OpenAI (with OPENAI_API_KEY) or the simulated upstream.", id="sluice.E004"))
    if "memory" in settings.SLUICE_COUNTER_STORE and not settings.DEBUG and settings.REDIS_URL == "" \
            and settings.DATABASE_URL.startswith("postgres"):
        # Several processes on one database need one shared counter store.
        errors.append(Warning(
            "PostgreSQL is configured but REDIS_URL is not: each server process would keep its own counters.",
            hint="Set REDIS_URL so that every process shares the quotas, or run a single process on SQLite.",
            id="sluice.W001"))
    if not 0 < settings.UPSTREAM_AIMD_DECREASE_FACTOR < 1:
        errors.append(Error("UPSTREAM_AIMD_DECREASE_FACTOR must be between 0 and 1.",
                            hint="Unset it to use 0.5 (the limit halves on a 429).", id="sluice.E007"))
    if settings.LOOP_GATE_MS < 0:
        errors.append(Error("SLUICE_LOOP_GATE_MS must be 0 (the loop gate off) or a positive number of milliseconds.",
                            hint="Unset it to use 25 (streaming/gateway/loop_gate.py).", id="sluice.E012"))
    errors.extend(_check_cpus())
    if settings.UPSTREAM_CONCURRENCY_MAX and settings.UPSTREAM_CONCURRENCY_MIN > settings.UPSTREAM_CONCURRENCY_MAX:
        errors.append(Error("UPSTREAM_CONCURRENCY_MIN is above UPSTREAM_CONCURRENCY_MAX.",
                            hint="Lower UPSTREAM_CONCURRENCY_MIN or raise UPSTREAM_CONCURRENCY_MAX.", id="sluice.E008"))
    errors.extend(_check_event_loop())
    for name in ("STREAM_BUFFER_BYTES", "STREAM_STALL_TIMEOUT", "STREAM_MAX_DURATION", "STREAM_HEARTBEAT_INTERVAL",
                 "QUOTA_LEASE_BLOCK_TOKENS", "QUOTA_SLOT_TTL", "UPSTREAM_FIRST_TOKEN_TIMEOUT", "UPSTREAM_IDLE_TIMEOUT",
                 "UPSTREAM_CONNECT_TIMEOUT", "UPSTREAM_PERMIT_TTL", "DB_THREADS"):
        if getattr(settings, name) <= 0:
            errors.append(Error(f"{name} must be positive.", hint=f"Unset {name} to use its default.",
                                id="sluice.E006"))
    return errors


def _check_event_loop():
    from .server import reactor

    name = reactor.event_loop_name()
    if name not in reactor.EVENT_LOOPS:
        return [Error(f"SLUICE_EVENT_LOOP is '{name}', which is not an event loop Sluice knows.",
                      hint="Use SLUICE_EVENT_LOOP=uvloop (the default) or SLUICE_EVENT_LOOP=asyncio.", id="sluice.E009")]
    if name == "uvloop" and not reactor.uvloop_available():
        return [Warning("SLUICE_EVENT_LOOP is uvloop but uvloop is not installed: the server uses asyncio's loop.",
                        hint=".venv/bin/python -m pip install -r requirements.txt, or set SLUICE_EVENT_LOOP=asyncio.",
                        id="sluice.W002")]
    return []


@register(SLUICE)
def check_chat_fields(app_configs=None, **kwargs):
    """The chat request's field rules and the token-limit field (issue 16, docs/api.md)."""
    from .gateway.validation import TOKEN_LIMIT_FIELDS, field_rules_problem

    errors = []
    if problem := field_rules_problem(settings.SLUICE_FIELD_RULES):
        errors.append(Error(
            f"SLUICE_FIELD_RULES is not valid: {problem}.",
            hint='For example SLUICE_FIELD_RULES=\'{"gpt-5*": {"deny": ["logit_bias"], "strip": ["temperature"]}}\', '
                 "or unset it to forward every field.", id="sluice.E010"))
    if settings.UPSTREAM_TOKEN_LIMIT_FIELD not in ("auto", *TOKEN_LIMIT_FIELDS):
        errors.append(Error(
            f"UPSTREAM_TOKEN_LIMIT_FIELD is '{settings.UPSTREAM_TOKEN_LIMIT_FIELD}'.",
            hint="Use auto (the default), max_tokens or max_completion_tokens.", id="sluice.E011"))
    return errors


def _check_cpus():
    """SLUICE_CPUS (a server process's CPUs, streaming/server/affinity.py) names CPUs this process may run on."""
    try:
        affinity.wanted()
    except affinity.AffinityError as exc:
        return [Error(str(exc), hint="Unset SLUICE_CPUS (no pinning) or give a CPU list this host has, e.g. "
                                     "SLUICE_CPUS=0 or SLUICE_CPUS=0-1.", id="sluice.E013")]
    return []
