"""Settings for the ApexBridge hub, read only from environment variables (PROTOCOL §7).

With nothing set the hub runs on the embedded defaults: SQLite (WAL, IMMEDIATE
transactions) and the in-memory channel layer. ``DATABASE_URL`` switches to
PostgreSQL and ``REDIS_URL`` to channels-redis.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

# litellm must never reach the network at import time (no provider is reachable here,
# and a production hub should not depend on GitHub to start).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from exc


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from exc


def env_list(name: str) -> list[str]:
    value = os.environ.get(name) or ""
    return [item.strip() for item in value.split(",") if item.strip()]


def env_gc_threshold(name: str) -> tuple[int, ...]:
    """``"50000,20,100"``: one to three positive integers for ``gc.set_threshold``."""
    items = env_list(name)
    try:
        values = tuple(int(item) for item in items)
    except ValueError:
        values = ()
    if items and (not values or len(values) > 3 or min(values) < 1):
        raise ImproperlyConfigured(
            f"{name} must be one to three positive integers separated by commas "
            f"(gc.set_threshold), got {os.environ.get(name)!r}"
        )
    return values


DEBUG = env_bool("DJANGO_DEBUG", True)
_DEV_SECRET_KEY = "django-insecure-apexbridge-development-key-do-not-use-in-production"
SECRET_KEY = env_str("DJANGO_SECRET_KEY", _DEV_SECRET_KEY)
if not DEBUG and (SECRET_KEY == _DEV_SECRET_KEY or len(SECRET_KEY) < 50):
    raise ImproperlyConfigured(
        "DJANGO_DEBUG=0 needs a real DJANGO_SECRET_KEY (at least 50 random characters)."
    )
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS") or (
    ["localhost", "127.0.0.1", "[::1]", "testserver"] if DEBUG else []
)
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI assets served locally: the hub works offline
    "nodes",
    "llmproxy",
    "quotas",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "apexbridge.urls"
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
WSGI_APPLICATION = None
ASGI_APPLICATION = "apexbridge.asgi.application"

# --- Database -------------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
else:
    DATABASES = {
        "default": {
            # Django's SQLite backend plus an in-process write queue (see its docstring).
            "ENGINE": "apexbridge.db.sqlite3",
            "NAME": env_str("APEXBRIDGE_SQLITE_PATH", str(BASE_DIR / "db.sqlite3")),
        }
    }
# Persistent connections (PostgreSQL only, opt-in): every thread that touches the
# database is a long-lived one (the consumers' database thread, the HTTP request
# threads of apexbridge/threads.py, which close theirs when they end), so a thread
# reuses its connection instead of opening one per unit of work (~2.5 ms here), until
# it is APEXBRIDGE_DB_CONN_MAX_AGE seconds old (checked at the start and end of each
# unit of work), checked with an empty query before each reuse (CONN_HEALTH_CHECKS).
# TCP keepalives and a user timeout make a connection to a server that vanished (a
# fail-over to another host) fail within seconds, not after the kernel's ~15 min of
# retransmissions; a reconnect gives up after 5 s.
APEXBRIDGE_DB_CONN_MAX_AGE = env_int("APEXBRIDGE_DB_CONN_MAX_AGE", 0)
DATABASES["default"]["CONN_MAX_AGE"] = 0
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and APEXBRIDGE_DB_CONN_MAX_AGE > 0:
    DATABASES["default"]["CONN_MAX_AGE"] = APEXBRIDGE_DB_CONN_MAX_AGE
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    _options = DATABASES["default"].setdefault("OPTIONS", {})
    for _name, _value in {
        "connect_timeout": 5,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": 15000,
    }.items():
        _options.setdefault(_name, _value)
elif APEXBRIDGE_DB_CONN_MAX_AGE < 0:
    raise ImproperlyConfigured(
        f"APEXBRIDGE_DB_CONN_MAX_AGE must be 0 or more, got {APEXBRIDGE_DB_CONN_MAX_AGE}"
    )
# PostgreSQL: Django's psycopg pool (one per process), off unless
# APEXBRIDGE_DB_POOL_SIZE > 0. Under ASGI every unit of work opens and closes a
# connection (CONN_MAX_AGE = 0); with the pool that is a checkout instead of a TCP
# connection + authentication (docs/BENCHMARKS.md). The price: while PostgreSQL is
# down, each unit of work waits APEXBRIDGE_DB_POOL_TIMEOUT for a connection before it
# fails, where without the pool it fails at once (docs/DEPLOYMENT.md).
APEXBRIDGE_DB_POOL_SIZE = env_int("APEXBRIDGE_DB_POOL_SIZE", 0)
if APEXBRIDGE_DB_POOL_SIZE > 0 and APEXBRIDGE_DB_CONN_MAX_AGE > 0:
    raise ImproperlyConfigured(
        "APEXBRIDGE_DB_POOL_SIZE and APEXBRIDGE_DB_CONN_MAX_AGE are two ways to reuse PostgreSQL "
        "connections: set one of them, not both (docs/DEPLOYMENT.md)"
    )
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and APEXBRIDGE_DB_POOL_SIZE > 0:
    # Each connection is checked as it is handed out (one empty query): after a
    # PostgreSQL restart the dead idle ones are dropped instead of failing a request.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": min(2, APEXBRIDGE_DB_POOL_SIZE),
        "max_size": APEXBRIDGE_DB_POOL_SIZE,
        "timeout": env_float("APEXBRIDGE_DB_POOL_TIMEOUT", 3.0),
        "max_idle": 300,  # idle connections closed after 5 min, down to min_size
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["ENGINE"] = "apexbridge.db.sqlite3"  # a sqlite:// DATABASE_URL
if DATABASES["default"]["ENGINE"] == "apexbridge.db.sqlite3":
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            # IMMEDIATE takes the write lock at BEGIN, so concurrent writers queue on
            # busy_timeout instead of failing with "database is locked" mid-transaction.
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": ("PRAGMA journal_mode=WAL;PRAGMA synchronous=NORMAL;PRAGMA busy_timeout=20000;"),
        }
    )
    # Tests use a file, not the shared-cache in-memory database: that one fails at
    # once with "database table is locked" when a second thread writes, instead of
    # waiting on busy_timeout as the real (file) database does.
    DATABASES["default"].setdefault("TEST", {}).setdefault(
        "NAME", str(BASE_DIR / "var" / f"test-{os.getpid()}.sqlite3")
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channel layer ---------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL")
# Every key the hub keeps in Redis starts with this prefix (channel layer and quota
# buckets), so several hubs, or several test runs, can share one Redis server.
APEXBRIDGE_REDIS_PREFIX = env_str("APEXBRIDGE_REDIS_PREFIX", "apexbridge")
if os.environ.get("PYTEST_XDIST_WORKER"):  # test workers sharing one Redis: keys of their own
    APEXBRIDGE_REDIS_PREFIX += f"-{os.environ['PYTEST_XDIST_WORKER']}"
APEXBRIDGE_QUOTA_REDIS_PREFIX = f"{APEXBRIDGE_REDIS_PREFIX}:quota:"
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # A pool large enough for connection bursts: redis-py 8 raises
                # MaxConnectionsError at 100 connections by default.
                "hosts": [
                    {
                        "address": REDIS_URL,
                        "max_connections": 1000,
                        # redis-py 8 defaults socket_timeout to 5 s, which aborts the
                        # layer's blocking BZPOPMIN (5 s) and kills consumers with
                        # TimeoutError (django/channels_redis#422): wait longer than it.
                        "socket_timeout": 30,
                        "socket_connect_timeout": 5,
                        "socket_keepalive": True,
                    }
                ],
                "prefix": f"{APEXBRIDGE_REDIS_PREFIX}:asgi",
                "capacity": env_int("APEXBRIDGE_CHANNEL_CAPACITY", 5000),
                "expiry": 60,
                "group_expiry": 86400 * 7,
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            # channels' in-memory layer with a cheaper expiry sweep (apexbridge/layers.py)
            "BACKEND": "apexbridge.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": env_int("APEXBRIDGE_CHANNEL_CAPACITY", 5000), "expiry": 60},
        }
    }

# --- Auth, i18n, static ----------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
LOGIN_URL = "admin:login"

# --- Security (production) -------------------------------------------------------
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", False)
SESSION_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SESSION_COOKIE_HTTPONLY = True
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 0)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# TLS is the reverse proxy's job (PROTOCOL §7): these deploy checks are opt-in settings.
SILENCED_SYSTEM_CHECKS = [] if DEBUG else ["security.W004", "security.W008", "security.W012", "security.W016"]

# --- REST framework --------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "nodes.api.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "EXCEPTION_HANDLER": "apexbridge.exceptions.api_exception_handler",
    "DEFAULT_THROTTLE_RATES": {"login": env_str("APEXBRIDGE_LOGIN_THROTTLE", "10/min")},
}
SPECTACULAR_SETTINGS = {
    "TITLE": "ApexBridge hub API",
    "DESCRIPTION": "Admin and task API of the ApexBridge hub (see PROTOCOL.md §6).",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Node and task statuses are both "status" fields: name their enums explicitly
    # (otherwise drf_spectacular.W001 makes `check --deploy` unclean).
    "ENUM_NAME_OVERRIDES": {
        "NodeStatusEnum": "nodes.models.NodeStatus",
        "TaskStatusEnum": "nodes.models.TaskStatus",
    },
}

# --- Logging ---------------------------------------------------------------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("APEXBRIDGE_LOG_LEVEL", "INFO")},
    "loggers": {
        "LiteLLM": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
    },
}

# --- ApexBridge (PROTOCOL §7) ----------------------------------------------------
HUB_VERSION = "0.1.0"
APEXBRIDGE_VCP_KEY = env_str("APEXBRIDGE_VCP_KEY")
APEXBRIDGE_HEARTBEAT_INTERVAL_MS = env_int("APEXBRIDGE_HEARTBEAT_INTERVAL_MS", 30000)
APEXBRIDGE_HEARTBEAT_TIMEOUT_MS = env_int("APEXBRIDGE_HEARTBEAT_TIMEOUT_MS", 90000)
APEXBRIDGE_HEARTBEAT_SWEEP_MS = env_int("APEXBRIDGE_HEARTBEAT_SWEEP_MS", 5000)
# How often buffered heartbeats are written (coalesced) to the database.
APEXBRIDGE_HEARTBEAT_FLUSH_MS = env_int("APEXBRIDGE_HEARTBEAT_FLUSH_MS", 2000)
# A hub process that has not beaten for this long is dead: its nodes go offline.
APEXBRIDGE_PROCESS_TIMEOUT_MS = env_int("APEXBRIDGE_PROCESS_TIMEOUT_MS", 20000)
APEXBRIDGE_TASK_DEFAULT_TIMEOUT_MS = env_int("APEXBRIDGE_TASK_DEFAULT_TIMEOUT_MS", 60000)
APEXBRIDGE_TASK_MAX_RETRIES = env_int("APEXBRIDGE_TASK_MAX_RETRIES", 3)
APEXBRIDGE_TASK_RETRY_BACKOFF_MS = env_int("APEXBRIDGE_TASK_RETRY_BACKOFF_MS", 1000)
APEXBRIDGE_TASK_RETRY_BACKOFF_MAX_MS = env_int("APEXBRIDGE_TASK_RETRY_BACKOFF_MAX_MS", 30000)
# How old the connected-node rows a dispatch pass starts from may be (nodes/node_rows.py);
# 0 reads them for every pass.
APEXBRIDGE_DISPATCH_NODE_ROWS_MS = env_int("APEXBRIDGE_DISPATCH_NODE_ROWS_MS", 1000)
APEXBRIDGE_MAX_NODES = env_int("APEXBRIDGE_MAX_NODES", 10000)
APEXBRIDGE_MAX_FRAME_BYTES = env_int("APEXBRIDGE_MAX_FRAME_BYTES", 1048576)
APEXBRIDGE_MAX_PROTOCOL_ERRORS = env_int("APEXBRIDGE_MAX_PROTOCOL_ERRORS", 100)
APEXBRIDGE_NODE_LOG_CAP = env_int("APEXBRIDGE_NODE_LOG_CAP", 1000)
# Days to keep LLMRequestLog rows and finished tasks (nodes/retention.py); 0 keeps them forever.
APEXBRIDGE_LLM_LOG_RETENTION_DAYS = env_int("APEXBRIDGE_LLM_LOG_RETENTION_DAYS", 30)
APEXBRIDGE_TASK_RETENTION_DAYS = env_int("APEXBRIDGE_TASK_RETENTION_DAYS", 30)
# Python's garbage-collector thresholds in hub processes ("700,10,10" is Python's own).
# Collections walk the heap with the GIL held: with Python's thresholds they were most
# of the heartbeat ack tail (docs/BENCHMARKS.md, session 4).
APEXBRIDGE_GC_THRESHOLD = env_gc_threshold("APEXBRIDGE_GC_THRESHOLD") or (50000, 20, 100)

APEXBRIDGE_LLM_MODEL = env_str("APEXBRIDGE_LLM_MODEL")
APEXBRIDGE_LLM_MODELS = env_list("APEXBRIDGE_LLM_MODELS")
APEXBRIDGE_LLM_API_BASE = env_str("APEXBRIDGE_LLM_API_BASE")
APEXBRIDGE_LLM_API_KEY = env_str("APEXBRIDGE_LLM_API_KEY")
APEXBRIDGE_LLM_TIMEOUT_MS = env_int("APEXBRIDGE_LLM_TIMEOUT_MS", 120000)
APEXBRIDGE_LLM_MAX_RETRIES = env_int("APEXBRIDGE_LLM_MAX_RETRIES", 0)

APEXBRIDGE_QUOTA_MAX_REQUESTS_PER_MINUTE = env_int("APEXBRIDGE_QUOTA_MAX_REQUESTS_PER_MINUTE", 30)
APEXBRIDGE_QUOTA_BURST_MULTIPLIER = env_float("APEXBRIDGE_QUOTA_BURST_MULTIPLIER", 2)
APEXBRIDGE_QUOTA_MAX_TOKENS_PER_DAY = env_int("APEXBRIDGE_QUOTA_MAX_TOKENS_PER_DAY", 200000)
APEXBRIDGE_QUOTA_MAX_CONCURRENT_STREAMS = env_int("APEXBRIDGE_QUOTA_MAX_CONCURRENT_STREAMS", 3)
