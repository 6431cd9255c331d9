"""Sluice settings: everything that varies between deployments comes from the environment.

With nothing set, Sluice runs on SQLite, in-process counters and channel layer, and its own
simulated upstream, so a fresh machine needs no services. See README.md for the variables.
"""

import json
import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name, default=False):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_float(name, default):
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def env_int(name, default):
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


DEBUG = env_bool("DJANGO_DEBUG", False)
# No committed secret. Without DJANGO_SECRET_KEY the process gets a random key of its own (so Django
# can start far enough to run its checks), and with DEBUG off the `sluice.E001` check stops a server (and
# `check --deploy`); offline commands such as migrate run without one.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
SECRET_KEY_MISSING = not SECRET_KEY
if SECRET_KEY_MISSING:
    import secrets

    SECRET_KEY = secrets.token_urlsafe(50)
ALLOWED_HOSTS = [h.strip() for h in os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost").split(",") if h.strip()]
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()
]

INSTALLED_APPS = [
    # `streaming` before `daphne`: its runserver command serves with the backpressure server.
    "streaming",
    "quotas",
    "daphne",
    "channels",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files (admin, demo) from the app itself, async, with or without collectstatic.
    "servestatic.middleware.ServeStaticMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "streaming.gateway.middleware.ThrottleMiddleware",
]

# /v1/ (bearer tokens, no cookies) runs this shorter, async-only chain (streaming/gateway/handler.py).
API_MIDDLEWARE = ["streaming.gateway.middleware.ThrottleMiddleware"]

ROOT_URLCONF = "config.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]
ASGI_APPLICATION = "config.asgi.application"

DATABASE_URL = os.environ.get("DATABASE_URL", "")
SUPPORTED_DATABASE_SCHEMES = ("postgres", "postgresql", "pgsql", "sqlite")
# An unsupported URL falls back to SQLite here so that the `sluice.E002` check can name the problem.
_database_url = DATABASE_URL if DATABASE_URL.split(":", 1)[0] in SUPPORTED_DATABASE_SCHEMES else ""
DATABASES = {
    "default": dj_database_url.parse(_database_url or f"sqlite:///{BASE_DIR / 'db.sqlite3'}", conn_max_age=0)
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes (tests, a second server) share the file: wait for locks instead of failing.
    # WAL: readers never wait for the writer, and a commit costs no fsync of the whole file.
    DATABASES["default"]["OPTIONS"] = {"timeout": 20, "transaction_mode": "IMMEDIATE",
                                       "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"}
    # A file (not :memory:), so the gateway processes a test starts share it; one per test run.
    DATABASES["default"]["TEST"] = {"NAME": os.environ.get("SLUICE_TEST_SQLITE", f"/tmp/sluice-test-{os.getpid()}.sqlite3")}
else:
    DATABASES["default"]["TEST"] = {"NAME": f"test_sluice_{os.getpid()}"}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Threads that run the gateway's queries and keep their connections (quotas/domain/db.py): one on SQLite (a single
# writer), a few on PostgreSQL.
DB_THREADS = env_int("DB_THREADS", 1 if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3" else 4)

REDIS_URL = os.environ.get("REDIS_URL", "")
# When one Redis is not enough (docs/quotas.md): REDIS_CLUSTER=1 with REDIS_URL naming any node of a Redis Cluster;
# or REDIS_SENTINELS=host:port,host:port with REDIS_URL=redis://<master group>/<db> (django-redis's convention).
REDIS_CLUSTER = env_bool("REDIS_CLUSTER", False)


def _sentinels(value):
    """REDIS_SENTINELS as (host, port) pairs."""
    from django.core.exceptions import ImproperlyConfigured

    pairs = []
    for entry in filter(None, (e.strip() for e in value.split(","))):
        host, _, port = entry.rpartition(":")
        if not host or not port.isdigit():
            raise ImproperlyConfigured(f"REDIS_SENTINELS: '{entry}' is not host:port (e.g. 10.0.0.5:26379).")
        pairs.append((host, int(port)))
    return pairs


REDIS_SENTINELS = _sentinels(os.environ.get("REDIS_SENTINELS", ""))


def _redis_topology_errors(url, cluster, sentinels):
    """What makes REDIS_URL, REDIS_CLUSTER and REDIS_SENTINELS contradict each other (refused at start-up)."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if (cluster or sentinels) and not url:
        return ["REDIS_CLUSTER and REDIS_SENTINELS need REDIS_URL (a node of the cluster; redis://<master group>/0)."]
    if cluster and sentinels:
        return ["REDIS_CLUSTER and REDIS_SENTINELS exclude each other: a cluster fails over by itself."]
    if cluster and (parsed.scheme == "unix" or parsed.path.strip("/") not in ("", "0")):
        return ["With REDIS_CLUSTER, REDIS_URL must be a redis:// or rediss:// node, database 0 (a cluster has no "
                "other), e.g. redis://10.0.0.5:7000/0."]
    if sentinels and (parsed.scheme == "unix" or parsed.port):
        return ["With REDIS_SENTINELS, REDIS_URL names the master group, not an address: redis://mymaster/0 (the "
                "sentinels say where the master is)."]
    return []


def _redis_cache(url, cluster, sentinels):
    """Django's cache (Sluice keeps nothing in it; the counter store reads its connection settings)."""
    if cluster:
        # django-redis has no cluster client, and a plain one fails on every key another node owns.
        return {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    options = {"CLIENT_CLASS": "django_redis.client.DefaultClient"}
    if sentinels:
        options = {"CLIENT_CLASS": "django_redis.client.SentinelClient", "SENTINELS": sentinels,
                   "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory"}
    return {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": url, "OPTIONS": options}


def _channel_layer(url, cluster, sentinels):
    """channels_redis: its core layer keeps queues in keys of many slots and cannot follow a cluster's redirections,
    so on a cluster the pub/sub layer, through the node REDIS_URL names (a cluster forwards PUBLISH to every node;
    the live panel's snapshots need nothing stored). Behind Sentinel the core layer finds the master itself."""
    if cluster:
        return {"BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer", "CONFIG": {"hosts": [url]}}
    host = url
    if sentinels:
        from urllib.parse import unquote, urlparse

        parsed = urlparse(url)
        host = {"sentinels": sentinels, "master_name": unquote(parsed.hostname or ""),
                "db": int(parsed.path.strip("/") or 0)}
        host.update({k: unquote(v) for k, v in (("username", parsed.username), ("password", parsed.password)) if v})
        if parsed.scheme == "rediss":
            host["ssl"] = True
    return {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [host]}}


for _error in _redis_topology_errors(REDIS_URL, REDIS_CLUSTER, REDIS_SENTINELS):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(_error)
if REDIS_URL:
    CACHES = {"default": _redis_cache(REDIS_URL, REDIS_CLUSTER, REDIS_SENTINELS)}
    CHANNEL_LAYERS = {"default": _channel_layer(REDIS_URL, REDIS_CLUSTER, REDIS_SENTINELS)}
    SLUICE_COUNTER_STORE = "quotas.store.redis.RedisStore"
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    SLUICE_COUNTER_STORE = "quotas.store.memory.MemoryStore"
SLUICE_COUNTER_STORE = os.environ.get("SLUICE_COUNTER_STORE", SLUICE_COUNTER_STORE)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
CSRF_FAILURE_VIEW = "streaming.gateway.views.csrf_failure"
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# Serve from the apps' static folders when collectstatic has not been run (the demo, the tests).
SERVESTATIC_USE_FINDERS = env_bool("SERVESTATIC_USE_FINDERS", True)

# The upstream. No key and no base URL: the simulated upstream this same process serves.
OPENAI_API_KEY = os.environ.get("OPENAI_API_KEY", "")
OPENAI_BASE_URL = os.environ.get("OPENAI_BASE_URL", "")
# Bearer token for the simulated upstream's switches and stats (/_sim/control, /_sim/control/reset, /_sim/stats) in
# the gateway's process; empty: they are off (404). The standalone `python -m streaming.simulator` keeps them open.
SIMULATOR_CONTROL_TOKEN = os.environ.get("SIMULATOR_CONTROL_TOKEN", "")
SLUICE_MODELS = [
    m.strip() for m in os.environ.get("SLUICE_MODELS", "sim-small,sim-large").split(",") if m.strip()
]
# The catalogue of providers, models and deployments lives in the database (streaming/catalogue/, docs/operations.md
# "Providers and models"). OPENAI_BASE_URL, OPENAI_API_KEY and SLUICE_MODELS only seed it: a server's first load
# writes them as records while there are none (off: the settings serve as the catalogue while it is empty).
SLUICE_CATALOGUE_BOOTSTRAP = env_bool("SLUICE_CATALOGUE_BOOTSTRAP", True)
# Seconds a process keeps its catalogue before reloading it in the background: an admin edit reaches every process
# within this time.
SLUICE_CATALOGUE_REFRESH = env_float("SLUICE_CATALOGUE_REFRESH", 2.0)
# A request's prompt_cache_key (else its `user`) keeps it on one of a model's deployments (their prompt caches).
SLUICE_STICKY_ROUTING = env_bool("SLUICE_STICKY_ROUTING", True)
# Fernet keys (comma-separated, the first encrypts) for provider keys stored in the database; empty: one derived from
# DJANGO_SECRET_KEY (streaming/catalogue/secrets.py).
SLUICE_SECRETS_KEY = os.environ.get("SLUICE_SECRETS_KEY", "")
# The currency of the catalogue's prices and of the ledger's costs (docs/quotas.md, "Money"): a label, never converted.
SLUICE_CURRENCY = os.environ.get("SLUICE_CURRENCY", "USD")
# Request fields Sluice does not read are forwarded untouched, on every endpoint. Per model (a name or a glob such as
# "*"), an operator may deny some (400 unsupported_parameter) or strip them before forwarding, as JSON (a catalogue
# model's own field_rules apply too):
# SLUICE_FIELD_RULES='{"gpt-5*": {"deny": ["logit_bias"], "strip": ["temperature"]}}' (docs/api.md). JSON that does
# not parse is kept as its text, for the sluice.E010 check to name.
try:
    SLUICE_FIELD_RULES = json.loads(os.environ.get("SLUICE_FIELD_RULES") or "{}")
except ValueError:
    SLUICE_FIELD_RULES = os.environ["SLUICE_FIELD_RULES"]
# Where the clamped token limit goes when a client set none: "max_tokens", "max_completion_tokens" (OpenAI's reasoning
# models refuse max_tokens), or "auto": max_completion_tokens for OpenAI itself, max_tokens for any other server.
UPSTREAM_TOKEN_LIMIT_FIELD = os.environ.get("UPSTREAM_TOKEN_LIMIT_FIELD", "auto")
# Largest request body accepted under /v1/ (bytes).
SLUICE_MAX_BODY_BYTES = env_int("SLUICE_MAX_BODY_BYTES", 1_000_000)
# The most any request body may be (Django's own setting). The Daphne server refuses a larger body with 413 before
# reading it (streaming/server/intake.py); under /v1/ and /api/, config/asgi.py's intake refuses past
# SLUICE_MAX_BODY_BYTES as the body arrives, under either server.
DATA_UPLOAD_MAX_MEMORY_SIZE = max(SLUICE_MAX_BODY_BYTES, 2_621_440)
# Paths whose requests need `Authorization: Bearer`: the Daphne server answers 401 to one with a body but no such
# header before reading the body (streaming/server/intake.py).
SERVER_KEYED_PATH_PREFIXES = ("/v1/",)
# Seconds a request's body may take to arrive once its headers are in (the Daphne server answers 408 past it; a
# slow trickle resets no timer).
SERVER_BODY_TIMEOUT = env_float("SERVER_BODY_TIMEOUT", 30.0)

# Streaming and backpressure (docs/backpressure.md).
# Running streams before new requests: /v1/ requests wait at the door while the event loop lags more than this
# (streaming/gateway/loop_gate.py); 0 turns it off.
LOOP_GATE_MS = env_float("SLUICE_LOOP_GATE_MS", 25.0)
STREAM_BUFFER_BYTES = env_int("STREAM_BUFFER_BYTES", 32 * 1024)
STREAM_GLOBAL_BUFFER_BYTES = env_int("STREAM_GLOBAL_BUFFER_BYTES", 64 * 1024 * 1024)
STREAM_STALL_TIMEOUT = env_float("STREAM_STALL_TIMEOUT", 30.0)
STREAM_MAX_DURATION = env_float("STREAM_MAX_DURATION", 600.0)
STREAM_HEARTBEAT_INTERVAL = env_float("STREAM_HEARTBEAT_INTERVAL", 10.0)
# SLUICE_EVENT_LOOP (uvloop or asyncio, the Daphne server's event loop) is read by streaming/server/reactor.py, before
# these settings load, and checked by streaming/checks.py (sluice.E009).

# Upstream timeouts and retries (docs/resilience.md).
UPSTREAM_CONNECT_TIMEOUT = env_float("UPSTREAM_CONNECT_TIMEOUT", 5.0)
UPSTREAM_FIRST_TOKEN_TIMEOUT = env_float("UPSTREAM_FIRST_TOKEN_TIMEOUT", 60.0)
UPSTREAM_IDLE_TIMEOUT = env_float("UPSTREAM_IDLE_TIMEOUT", 60.0)
# Provider streams over Sluice's own HTTP/1.1 client (streaming/provider/wire.py), whose events the relay takes in
# the connection's callback; off: over aiohttp, as every other provider request (docs/performance.md, the fourth cut).
UPSTREAM_STREAMS_OVER_WIRE = env_bool("UPSTREAM_STREAMS_OVER_WIRE", True)
UPSTREAM_RETRY_DEADLINE = env_float("UPSTREAM_RETRY_DEADLINE", 20.0)
UPSTREAM_RETRY_AFTER_CAP = env_float("UPSTREAM_RETRY_AFTER_CAP", 10.0)
UPSTREAM_RETRY_MAX_ATTEMPTS = env_int("UPSTREAM_RETRY_MAX_ATTEMPTS", 10)
UPSTREAM_BACKOFF_BASE = env_float("UPSTREAM_BACKOFF_BASE", 0.2)
UPSTREAM_BACKOFF_MAX = env_float("UPSTREAM_BACKOFF_MAX", 5.0)
# The shared adaptive (AIMD) limit on concurrent upstream requests, its fair queue, and the circuit breaker.
UPSTREAM_CONCURRENCY_MIN = env_int("UPSTREAM_CONCURRENCY_MIN", 1)
UPSTREAM_CONCURRENCY_MAX = env_int("UPSTREAM_CONCURRENCY_MAX", 64)  # 0: no limit
UPSTREAM_AIMD_INCREASE = env_float("UPSTREAM_AIMD_INCREASE", 1.0)
UPSTREAM_AIMD_DECREASE_FACTOR = env_float("UPSTREAM_AIMD_DECREASE_FACTOR", 0.5)
UPSTREAM_PERMIT_TTL = env_float("UPSTREAM_PERMIT_TTL", 60.0)
UPSTREAM_QUEUE_TIMEOUT = env_float("UPSTREAM_QUEUE_TIMEOUT", 10.0)
UPSTREAM_QUEUE_MAX = env_int("UPSTREAM_QUEUE_MAX", 1000)
UPSTREAM_QUEUE_POLL_INTERVAL = env_float("UPSTREAM_QUEUE_POLL_INTERVAL", 0.05)
UPSTREAM_BREAKER_THRESHOLD = env_int("UPSTREAM_BREAKER_THRESHOLD", 5)  # 0: no breaker
UPSTREAM_BREAKER_COOLDOWN = env_float("UPSTREAM_BREAKER_COOLDOWN", 10.0)
UPSTREAM_LIMIT_FAIL_OPEN = env_bool("UPSTREAM_LIMIT_FAIL_OPEN", True)
# Fairness between users (docs/resilience.md, "Fairness"). Fair shares: a user holding its share of the limit
# yields free permits to other users that want theirs. Preemption: a stream whose client has not read for this many
# seconds gives its permit up when its user holds more than its share while another user waits (0: never). The
# shared breaker opens only on failures of at least UPSTREAM_BREAKER_MIN_USERS users (1: any failures count);
# one user's failures open that user's own breaker.
UPSTREAM_FAIR_SHARE = env_bool("UPSTREAM_FAIR_SHARE", True)
UPSTREAM_PREEMPT_AFTER = env_float("UPSTREAM_PREEMPT_AFTER", 5.0)
UPSTREAM_BREAKER_MIN_USERS = env_int("UPSTREAM_BREAKER_MIN_USERS", 2)

# Quotas (docs/quotas.md).
QUOTA_LEASE_BLOCK_TOKENS = env_int("QUOTA_LEASE_BLOCK_TOKENS", 32)
# Each further lease of a stream doubles its block, up to this (and never past its max_tokens).
QUOTA_LEASE_MAX_BLOCK_TOKENS = env_int("QUOTA_LEASE_MAX_BLOCK_TOKENS", 512)
QUOTA_SLOT_TTL = env_float("QUOTA_SLOT_TTL", 30.0)
QUOTA_RATE_FAIL_OPEN = env_bool("QUOTA_RATE_FAIL_OPEN", False)
QUOTA_CONCURRENCY_FAIL_OPEN = env_bool("QUOTA_CONCURRENCY_FAIL_OPEN", False)

# Alerts (docs/operations.md, "Alerts"), sent by `manage.py deliver_alerts`. Webhooks are signed with this secret
# (comma-separated: each one signs, so a receiver can rotate); without one, JSON webhooks wait in the outbox.
SLUICE_WEBHOOK_SECRET = os.environ.get("SLUICE_WEBHOOK_SECRET", "")
# E-mail through Django's mailers: SMTP when EMAIL_HOST is set, else the console (the demo); tests get locmem.
if os.environ.get("EMAIL_HOST"):
    MAILERS = {"default": {"BACKEND": "django.core.mail.backends.smtp.EmailBackend", "OPTIONS": {
        "host": os.environ["EMAIL_HOST"], "port": env_int("EMAIL_PORT", None),
        "username": os.environ.get("EMAIL_HOST_USER", ""), "password": os.environ.get("EMAIL_HOST_PASSWORD", ""),
        "use_tls": env_bool("EMAIL_USE_TLS", False), "use_ssl": env_bool("EMAIL_USE_SSL", False),
        "timeout": env_float("EMAIL_TIMEOUT", 10.0)}}}
else:
    MAILERS = {"default": {"BACKEND": "django.core.mail.backends.console.EmailBackend"}}
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "sluice@localhost")

# Bearer token for Prometheus at /metrics (staff sessions work too); empty: sessions only.
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")
# OpenTelemetry traces and metrics after the GenAI semantic conventions, exported over OTLP/HTTP to where the standard
# OTEL_EXPORTER_OTLP_* variables say (streaming/telemetry/otel.py; docs/operations.md, "OpenTelemetry"). Off: nothing.
SLUICE_OTEL = env_bool("SLUICE_OTEL", False)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {
        # httpx logs full URLs at INFO; keep the upstream's address out of logs.
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        "openai": {"level": "WARNING"},
    },
}
