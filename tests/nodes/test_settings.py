"""Production settings (PROTOCOL §7): a hub with DJANGO_DEBUG=0 refuses to start
without a real secret key, and passes Django's deployment checks."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "APEXBRIDGE_", "DATABASE_URL", "REDIS_URL"))
    }
    clean.update(env)
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def production_key() -> str:
    return secrets.token_urlsafe(60)[:60]


@pytest.mark.parametrize(
    "secret_key",
    [None, "", "short-but-not-empty", "django-insecure-apexbridge-development-key-do-not-use-in-production"],
)
def test_debug_off_without_a_real_secret_key_does_not_start(secret_key):
    env = {"DJANGO_DEBUG": "0", "DJANGO_ALLOWED_HOSTS": "hub.example.com"}
    if secret_key is not None:
        env["DJANGO_SECRET_KEY"] = secret_key
    result = manage("check", **env)
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY" in result.stderr
    if secret_key:
        assert secret_key not in result.stderr  # the bad key is not echoed


def test_check_deploy_is_clean_in_production():
    result = manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=production_key(),
        DJANGO_ALLOWED_HOSTS="hub.example.com",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout + result.stderr


def test_production_hub_serves_plain_http_unless_told_otherwise():
    """TLS is the reverse proxy's job: no HTTPS redirect or secure-only cookies by default."""
    code = (
        "from django.conf import settings as s;"
        "print(s.DEBUG, s.SECURE_SSL_REDIRECT, s.SESSION_COOKIE_SECURE, s.ALLOWED_HOSTS)"
    )
    env = {
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": production_key(),
        "DJANGO_ALLOWED_HOSTS": "a.example,b.example",
    }
    result = manage("shell", "-c", code, **env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "False False False ['a.example', 'b.example']"

    env.update(DJANGO_SECURE_SSL_REDIRECT="1", DJANGO_SECURE_COOKIES="1")
    result = manage("shell", "-c", code, **env)
    assert result.stdout.split("\n")[-2] == "False True True ['a.example', 'b.example']"


def test_bad_integer_setting_is_a_clear_error():
    result = manage("check", APEXBRIDGE_MAX_NODES="lots")
    assert result.returncode != 0
    assert "APEXBRIDGE_MAX_NODES" in result.stderr


@pytest.mark.parametrize("value", ["many", "0,10,10", "1,2,3,4", "-5"])
def test_a_bad_gc_threshold_stops_the_hub_with_a_clear_message(value):
    result = manage("check", APEXBRIDGE_GC_THRESHOLD=value)
    assert result.returncode != 0
    assert "APEXBRIDGE_GC_THRESHOLD must be one to three positive integers" in result.stderr


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1000, 5 ,5", (1000, 5, 5)), (" 20000 ", (20000,)), ("700,10,10", (700, 10, 10))],
)
def test_a_gc_threshold_may_have_spaces_and_fewer_values(monkeypatch, value, expected):
    from apexbridge.settings import env_gc_threshold

    monkeypatch.setenv("APEXBRIDGE_GC_THRESHOLD", value)
    assert env_gc_threshold("APEXBRIDGE_GC_THRESHOLD") == expected


def test_a_hub_process_applies_the_configured_gc_threshold(settings):
    import gc

    from nodes.runtime import HubRuntime

    assert settings.APEXBRIDGE_GC_THRESHOLD == (50000, 20, 100)  # the default
    before = gc.get_threshold()
    try:
        HubRuntime()._tune_garbage_collector()
        assert gc.get_threshold() == (50000, 20, 100)
        gc.set_threshold(*before)
        settings.APEXBRIDGE_GC_THRESHOLD = ()
        HubRuntime()._tune_garbage_collector()  # empty: Python's own thresholds stay
        assert gc.get_threshold() == before
    finally:
        gc.set_threshold(*before)


def test_the_pool_and_persistent_connections_together_are_a_clear_error():
    result = manage(
        "check",
        DATABASE_URL="postgres://root@127.0.0.1:5432/unused",
        APEXBRIDGE_DB_POOL_SIZE="5",
        APEXBRIDGE_DB_CONN_MAX_AGE="60",
    )
    assert result.returncode != 0
    assert "set one of them, not both" in result.stderr


@pytest.mark.parametrize("value", ["-5", "sixty"])
def test_a_bad_persistent_connection_age_is_a_clear_error(value):
    result = manage(
        "check", DATABASE_URL="postgres://root@127.0.0.1:5432/unused", APEXBRIDGE_DB_CONN_MAX_AGE=value
    )
    assert result.returncode != 0
    assert "APEXBRIDGE_DB_CONN_MAX_AGE must be" in result.stderr
