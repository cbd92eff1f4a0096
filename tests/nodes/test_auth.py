"""Node keys (PROTOCOL §1): creation, storage as a hash only, checking, revocation."""

from __future__ import annotations

import logging
import re

import pytest
from django.core.management import call_command, get_commands

from nodes.auth import authenticate_key, hash_key, node_key_create, node_key_revoke, redact_keys
from nodes.models import NodeKey

pytestmark = pytest.mark.django_db


def test_created_key_is_url_safe_and_stored_only_as_a_hash(caplog):
    caplog.set_level(logging.DEBUG)
    key, plain = node_key_create(name="rack-1", node_id="n-1", capabilities=["echo"])

    assert re.fullmatch(r"[A-Za-z0-9_-]{40,}", plain)
    row = NodeKey.objects.get(pk=key.pk)
    assert row.key_hash == hash_key(plain) and row.key_hash != plain
    stored = " ".join(str(v) for v in NodeKey.objects.values().get(pk=key.pk).values())
    secret = plain.split("_", 2)[2]
    assert secret not in stored
    assert all(secret not in record.getMessage() for record in caplog.records)
    assert (row.node_id, row.capabilities) == ("n-1", ["echo"])


def test_keys_are_unique():
    plains = {node_key_create(name=f"k{i}")[1] for i in range(20)}
    assert len(plains) == 20


def test_authenticate_per_node_key():
    key, plain = node_key_create(name="rack-1", node_id="n-1", capabilities=["echo", "sha256"])
    identity = authenticate_key(plain)
    assert identity is not None
    assert identity.kind == "node" and identity.key_id == key.pk
    assert identity.node_id == "n-1" and identity.capabilities == ("echo", "sha256")
    assert NodeKey.objects.get(pk=key.pk).last_used_at is not None


def test_authenticate_shared_key(settings):
    settings.APEXBRIDGE_VCP_KEY = "the-shared-key"
    identity = authenticate_key("the-shared-key")
    assert identity is not None and identity.kind == "shared"
    assert identity.node_id == "" and identity.capabilities == ()
    assert authenticate_key("the-shared-kez") is None
    settings.APEXBRIDGE_VCP_KEY = None
    assert authenticate_key("the-shared-key") is None


@pytest.mark.parametrize("presented", [None, "", "abk", "abk__", "abk_zzzz_nope", "x" * 10000, "🔑"])
def test_garbage_is_refused(presented):
    node_key_create(name="real")
    assert authenticate_key(presented) is None


def test_wrong_secret_and_other_keys_prefix_are_refused():
    _key, plain = node_key_create(name="a")
    _other, other_plain = node_key_create(name="b")
    prefix = plain.split("_")[1]
    other_secret = other_plain.split("_", 2)[2]
    assert authenticate_key(f"abk_{prefix}_{other_secret}") is None
    assert authenticate_key(plain + "x") is None
    assert authenticate_key(plain[:-1]) is None


def test_revoked_key_is_refused():
    key, plain = node_key_create(name="old")
    assert node_key_revoke(key=key) is True
    assert authenticate_key(plain) is None
    assert node_key_revoke(key=key) is False  # already revoked


def test_create_node_key_command_prints_the_key_once(capsys):
    if "create_node_key" not in get_commands():
        pytest.skip("manage.py create_node_key does not exist yet (PROTOCOL §1)")
    call_command("create_node_key", "--name", "cli", "--node-id", "cli-1", "--capability", "echo")
    out = capsys.readouterr().out
    row = NodeKey.objects.get(name="cli")
    assert row.node_id == "cli-1" and row.capabilities == ["echo"]
    keys = re.findall(r"abk_[A-Za-z0-9_-]+", out)
    assert keys, out
    identity = authenticate_key(keys[0])
    assert identity is not None and identity.key_id == row.pk


@pytest.mark.parametrize(
    "path, shown",
    [
        ("/abp-distributed-server/VCP_Key=abk_1a2b3c4d_s3cr-et_x/", "/abp-distributed-server/VCP_Key=***/"),
        ("/distributed-server/ABP_Key=shared-key", "/distributed-server/ABP_Key=***"),
        ("/ws/admin/events/?token=abc123&x=1", "/ws/admin/events/?token=***&x=1"),
        ("/abp-distributed-server/", "/abp-distributed-server/"),
        # uvicorn logs the percent-encoded path
        ("/vcp-distributed-server/VCP_Key%3Dtopsecret", "/vcp-distributed-server/VCP_Key%3D***"),
    ],
)
def test_keys_are_hidden_in_logged_paths(path, shown):
    assert redact_keys(path) == shown


def test_daphne_access_log_hides_keys():
    import io

    from daphne.access import AccessLogGenerator

    stream = io.StringIO()
    AccessLogGenerator(stream)(
        "websocket",
        "connecting",
        {"path": "/abp-distributed-server/VCP_Key=topsecret", "client": ["1.2.3.4", 5]},
    )
    assert "topsecret" not in stream.getvalue()
    assert "VCP_Key=***" in stream.getvalue()


@pytest.mark.parametrize("logger_name", ["uvicorn.error", "uvicorn.access", "granian.access"])
def test_other_servers_logs_hide_keys(logger_name, caplog):
    # uvicorn logs a refused handshake with its path on uvicorn.error, even without
    # an access log; the hub's filter is on the server's own loggers
    with caplog.at_level(logging.INFO, logger=logger_name):
        logging.getLogger(logger_name).info(
            '%s - "WebSocket %s" 403', "127.0.0.1:5", "/vcp-distributed-server/VCP_Key%3Dtopsecret"
        )
    assert "topsecret" not in caplog.text
    assert "VCP_Key%3D***" in caplog.text


def test_the_redacting_filter_lets_a_badly_formatted_record_through():
    # a logging call with the wrong arguments must not raise from the filter in the
    # caller's code; the handler reports it, as for any other logger
    from nodes.auth import RedactKeysFilter

    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "%s and %s", ("one",), None)
    assert RedactKeysFilter().filter(record) is True
    assert record.msg == "%s and %s"
