"""Real hub processes for end-to-end tests.

``HubServer`` runs ``apexbridge.asgi:application`` under uvicorn (or the server
``APEXBRIDGE_TEST_SERVER`` names) on a free loopback port against its own database (a
copy of a migrated SQLite template, or a PostgreSQL database cloned from a migrated
template) and optionally Redis. Tests talk to it over real sockets: ``websockets`` for
nodes, ``urllib`` for the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import websockets

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SHARED_KEY = "e2e-shared-key-0123456789"
PG_ADMIN_URL = os.environ.get("APEXBRIDGE_TEST_PG_ADMIN_URL", "postgres://root@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("APEXBRIDGE_TEST_REDIS_URL", "redis://127.0.0.1:6379")

# Fast liveness so tests see time-outs in seconds, not minutes.
FAST_ENV = {
    "APEXBRIDGE_HEARTBEAT_INTERVAL_MS": "1000",
    "APEXBRIDGE_HEARTBEAT_TIMEOUT_MS": "3000",
    "APEXBRIDGE_HEARTBEAT_SWEEP_MS": "500",
    "APEXBRIDGE_HEARTBEAT_FLUSH_MS": "300",
    "APEXBRIDGE_PROCESS_TIMEOUT_MS": "4000",
    "APEXBRIDGE_TASK_RETRY_BACKOFF_MS": "100",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def services_available() -> bool:
    return port_open("127.0.0.1", 5432) and port_open("127.0.0.1", 6379)


def manage(env: dict[str, str], *args: str, check: bool = True, timeout: float = 120) -> str:
    completed = subprocess.run(
        [PYTHON, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and completed.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{completed.stdout}\n{completed.stderr}")
    return completed.stdout


def base_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("APEXBRIDGE_", "DATABASE_URL", "REDIS_URL"))
    }
    env.update({"DJANGO_SETTINGS_MODULE": "apexbridge.settings", "PYTHONUNBUFFERED": "1"})
    env.update({"APEXBRIDGE_VCP_KEY": SHARED_KEY, "APEXBRIDGE_LOG_LEVEL": "INFO"})
    env.update(FAST_ENV)
    env.update(extra)
    return env


# --- databases ----------------------------------------------------------------------
class Databases:
    """Migrated templates, made once per test session, copied per hub."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._sqlite_template: Path | None = None
        self._pg_template: str | None = None
        self._pg_created: list[str] = []
        self.session_tag = uuid.uuid4().hex[:8]

    def sqlite_url(self) -> str:
        if self._sqlite_template is None:
            template = self.workdir / "template.sqlite3"
            manage(base_env(DATABASE_URL=f"sqlite:///{template}"), "migrate", "--noinput")
            self._sqlite_template = template
        path = self.workdir / f"hub-{uuid.uuid4().hex[:8]}.sqlite3"
        shutil.copy(self._sqlite_template, path)
        return f"sqlite:///{path}"

    def _pg(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql)

    def postgres_url(self) -> str:
        base = PG_ADMIN_URL.rsplit("/", 1)[0]
        if self._pg_template is None:
            name = f"e2e_tpl_{self.session_tag}"
            self._pg(f'CREATE DATABASE "{name}"')
            self._pg_created.append(name)
            manage(base_env(DATABASE_URL=f"{base}/{name}"), "migrate", "--noinput")
            self._pg_template = name
        name = f"e2e_{self.session_tag}_{uuid.uuid4().hex[:6]}"
        self._pg(f'CREATE DATABASE "{name}" TEMPLATE "{self._pg_template}"')
        self._pg_created.append(name)
        return f"{base}/{name}"

    def cleanup(self) -> None:
        for name in reversed(self._pg_created):
            try:
                self._pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception:  # noqa: S112 - best effort clean-up
                continue


def redis_url_for_test() -> str:
    """A Redis database of its own (1–15), emptied, so parallel runs don't mix."""
    import redis

    # One database per pytest-xdist worker (gw0 -> 1, gw1 -> 2, …): tests of one
    # worker run one after another, so a worker may empty its own database.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    number = 1 + (int(worker) if worker.isdigit() else 0) % 15
    url = f"{REDIS_TEST_URL}/{number}"
    redis.Redis.from_url(url).flushdb()
    return url


# --- hub processes -----------------------------------------------------------------------
# The ASGI server that runs the hub: uvicorn (the default, and what `make run` and the
# docs deploy; docs/DEPLOYMENT.md says why), or daphne / granian for the server
# comparison of bench/ (granian: requirements-bench.txt).
SERVER = os.environ.get("APEXBRIDGE_TEST_SERVER", "uvicorn")


def server_command(server: str, port: int) -> list[str]:
    app = "apexbridge.asgi:application"
    commands = {
        "daphne": ["-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "--websocket_timeout", "-1", app],
        "uvicorn": [
            "-m",
            "uvicorn",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--lifespan",
            "off",
            "--ws",
            "websockets-sansio",
            "--ws-max-size",
            str(16 * 2**20),
            "--ws-ping-interval",  # as make run and docs/DEPLOYMENT.md (PROTOCOL §1.2)
            "20",
            "--ws-ping-timeout",
            "30",
            "--no-access-log",
            app,
        ],
        # asginl: ASGI without lifespan (Channels' router does not take lifespan events)
        "granian": [
            "-m",
            "granian",
            "--interface",
            "asginl",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            app,
        ],
    }
    if server not in commands:
        raise ValueError(f"unknown ASGI server {server!r}: one of {', '.join(commands)}")
    return [PYTHON, *commands[server]]


class HubServer:
    def __init__(self, env: dict[str, str], logdir: Path, name: str = "hub", server: str = SERVER) -> None:
        self.server = server
        self.env = env
        self.port = free_port()
        self.logdir = logdir
        self.name = name
        self.process: subprocess.Popen | None = None
        self.log_path = logdir / f"{name}-{self.port}.log"
        self._token: str | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def node_url(self, key: str = SHARED_KEY, prefix: str = "abp-distributed-server") -> str:
        return f"{self.ws_base}/{prefix}/VCP_Key={key}"

    def start(self, timeout: float = 30) -> None:
        log = open(self.log_path, "a")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            server_command(self.server, self.port),
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/admin/login/", timeout=1):  # noqa: S310
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start in {timeout}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 3) -> None:
        """Stop the hub; SIGKILL after ``timeout``. Daphne waits up to its
        application_close_timeout (10 s) for consumers still finishing a disconnect,
        which a test gains nothing from."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def manage(self, *args: str, check: bool = True) -> str:
        return manage(self.env, *args, check=check)

    # --- API helpers ---------------------------------------------------------------------
    def staff_token(self) -> str:
        """A DRF token of a staff user in this hub's database (created once)."""
        if self._token is None:
            code = (
                "from django.contrib.auth import get_user_model;"
                "from rest_framework.authtoken.models import Token;"
                "U=get_user_model();"
                "u,_=U.objects.get_or_create(username='e2e-staff',defaults={'is_staff':True,'is_superuser':True});"
                "u.set_password('e2e-password-123');u.save();"
                "print(Token.objects.get_or_create(user=u)[0].key)"
            )
            self._token = self.manage("shell", "-c", code).strip().splitlines()[-1]
        return self._token

    def api(
        self, method: str, path: str, body: Any = None, token: str | None = None, timeout: float = 70
    ) -> tuple[int, Any]:
        """Call the HTTP API; returns (status, parsed JSON body)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.http_url}{path}", data=data, method=method)  # noqa: S310
        request.add_header("Content-Type", "application/json")
        request.add_header("Authorization", f"Token {token or self.staff_token()}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                return error.code, json.loads(raw or b"null")
            except ValueError:
                return error.code, raw.decode(errors="replace")

    async def aapi(
        self, method: str, path: str, body: Any = None, token: str | None = None, timeout: float = 70
    ) -> tuple[int, Any]:
        return await asyncio.to_thread(self.api, method, path, body, token, timeout)


# --- a minimal node over a real socket -------------------------------------------------------
class WsNode:
    """A raw protocol node for e2e tests (the real client lives in nodes/client)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws = None
        self.ack: dict | None = None
        self.inbox: list[dict] = []

    async def connect(self, **kwargs) -> WsNode:
        self.ws = await websockets.connect(self.url, open_timeout=10, max_size=None, **kwargs)
        self.ack = await self.recv()
        return self

    async def send(self, message_type: str, data: dict | None = None) -> None:
        await self.ws.send(json.dumps({"type": message_type, "data": data or {}}))

    async def recv(self, timeout: float = 10) -> dict:
        if self.inbox:
            return self.inbox.pop(0)
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def recv_type(self, *types: str, timeout: float = 10) -> dict:
        """Next frame of one of these types; other frames are kept for later."""
        for index, message in enumerate(self.inbox):
            if message["type"] in types:
                return self.inbox.pop(index)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {types} frame within {timeout}s (inbox: {self.inbox[-5:]})")
            message = json.loads(await asyncio.wait_for(self.ws.recv(), remaining))
            if message["type"] in types:
                return message
            self.inbox.append(message)

    async def register(self, node_id: str, **fields) -> dict:
        data = {
            "nodeId": node_id,
            "name": fields.pop("name", node_id),
            "type": "worker",
            "capabilities": fields.pop("capabilities", []),
        }
        data.update(fields)
        await self.send("node_register", data)
        reply = await self.recv_type("node_registered")
        assert reply["data"]["success"], reply
        return reply

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


class AdminEvents:
    """Collects every frame of one admin events socket."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[dict] = []

    async def __aenter__(self) -> AdminEvents:
        self.ws = await websockets.connect(self.url, open_timeout=10)
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                self.events.append(json.loads(raw))

    async def __aexit__(self, *exc) -> None:
        self.reader.cancel()
        await self.ws.close()

    def of(self, event_type: str, **match) -> list[dict]:
        return [
            e
            for e in self.events
            if e["type"] == event_type and all(e["data"].get(k) == v for k, v in match.items())
        ]


async def keep_heartbeating(nodes: list[WsNode], interval_s: float = 0.5) -> None:
    while True:
        for node in nodes:
            await node.send("heartbeat", {})
        await asyncio.sleep(interval_s)


async def wait_for(predicate, timeout: float = 15, interval: float = 0.1, what: str = "condition"):
    """Poll a sync or async predicate until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last value: {last!r})")
