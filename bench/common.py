"""Shared code of the benchmarks: hub processes, the load-generator process, machine
information, statistics and table printing.

Hubs are the end-to-end harness's ``HubServer`` (tests/e2e/harness.py): a real hub
process (uvicorn unless ``APEXBRIDGE_TEST_SERVER`` says otherwise) on a free loopback
port with its own database. The load runs in another process (``bench/loadgen.py``,
asyncio + ``websockets``), so the hub's event loop never shares a core with the client
that measures it. Where the machine has at least two cores the hub is pinned to core 0
and the load to core 1.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.e2e.harness import (  # noqa: E402
    SERVER,
    SHARED_KEY,
    Databases,
    HubServer,
    base_env,
    redis_url_for_test,
    services_available,
)

PYTHON = sys.executable
LOADGEN = ROOT / "bench" / "loadgen.py"
CORES = os.cpu_count() or 1
HUB_CPUS = {0} if CORES >= 2 else None
LOAD_CPUS = {1} if CORES >= 2 else None
BACKENDS = ["embedded", "services", "services-pool", "services-persistent"]
BACKEND_LABELS = {
    "embedded": "SQLite, in-memory layer",
    "services": "PostgreSQL + Redis",
    "services-pool": "PostgreSQL (psycopg pool) + Redis",
    "services-persistent": "PostgreSQL (persistent connections) + Redis",
}
POOL_SIZE = 20
# A benchmark hub keeps the default (slow) liveness timings: nothing should go offline.
BENCH_ENV = {
    "APEXBRIDGE_HEARTBEAT_INTERVAL_MS": "30000",
    "APEXBRIDGE_HEARTBEAT_TIMEOUT_MS": "90000",
    "APEXBRIDGE_HEARTBEAT_SWEEP_MS": "5000",
    "APEXBRIDGE_HEARTBEAT_FLUSH_MS": "2000",
    "APEXBRIDGE_PROCESS_TIMEOUT_MS": "20000",
    "APEXBRIDGE_LOG_LEVEL": "WARNING",
    "APEXBRIDGE_MAX_NODES": "100000",
    # DEBUG off, as in production: with DEBUG on Django records every SQL query.
    "DJANGO_DEBUG": "0",
    "DJANGO_SECRET_KEY": "bench-" + "x" * 60,
    "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
}


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (inherited by child processes)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pin(pid: int, cpus: set[int] | None) -> None:
    """Pin every thread of a process (like ``taskset -a -p``); threads started later
    inherit the affinity of the thread that starts them."""
    if not cpus:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            continue


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


# --- machine and versions -------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    names = [
        "Django",
        "channels",
        "channels_redis",
        "daphne",
        "Twisted",
        "uvicorn",
        "granian",
        "websockets",
        "litellm",
        "psycopg",
    ]
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def machine_header(title: str) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    pinning = "hub on core 0, load on core 1" if HUB_CPUS else "not pinned (one core)"
    lines = [
        f"## {title}",
        f"machine: {CORES} cores, {cpu_model()}, {platform.system()} {platform.release()}; "
        f"load average at start {load}; {pinning}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
    ]
    return "\n".join(lines)


# --- statistics -----------------------------------------------------------------------
def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median_spread(values: Iterable[float], digits: int = 1) -> str:
    """``median (min–max)`` of several runs."""
    items = [v for v in values if v == v]  # drop NaN
    if not items:
        return "n/a"
    med = statistics.median(items)
    if len(items) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(items):.{digits}f}–{max(items):.{digits}f})"


def print_table(
    header: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()
) -> str:
    """Print (and return) a Markdown table preceded by the machine header."""
    cells = [[str(c) for c in columns]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    out = [header, ""]
    out.append("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |")
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    out.extend(f"\n{note}" if i == 0 else note for i, note in enumerate(notes))
    text = "\n".join(out)
    print(text, flush=True)
    return text


# --- in-process benchmarks -----------------------------------------------------------
def in_process_django(prefix: str, **env: str) -> Path:
    """Django in this process on a fresh SQLite database (WAL, the hub's backend) in a
    new temporary directory, ``DEBUG`` off, no PostgreSQL or Redis, no background
    loops, migrated. Returns the directory."""
    import secrets

    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.update(
        DJANGO_SETTINGS_MODULE="apexbridge.settings",
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(60),
        APEXBRIDGE_SQLITE_PATH=str(workdir / "bench.sqlite3"),
        APEXBRIDGE_LOG_LEVEL="WARNING",
        **env,
    )
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    settings.APEXBRIDGE_BACKGROUND_LOOPS = False  # no sweeps inside the measurements
    call_command("migrate", verbosity=0)
    return workdir


# --- hubs -----------------------------------------------------------------------------
class Bench:
    """Databases and hub processes of one benchmark run; ``close()`` stops them all."""

    def __init__(self) -> None:
        raise_fd_limit()
        self.workdir = Path(tempfile.mkdtemp(prefix="apexbridge-bench-"))
        self.databases = Databases(self.workdir)
        self.hubs: list[HubServer] = []
        self.server = SERVER  # APEXBRIDGE_TEST_SERVER, default uvicorn

    def hub(
        self,
        backend: str = "embedded",
        env: dict[str, str] | None = None,
        database_url: str | None = None,
        redis_url: str | None = None,
        cpus: set[int] | None = HUB_CPUS,
        server: str | None = None,
    ) -> HubServer:
        extra = dict(BENCH_ENV)
        if backend == "services-pool":  # PostgreSQL through Django's psycopg pool
            backend, extra["APEXBRIDGE_DB_POOL_SIZE"] = "services", str(POOL_SIZE)
        elif backend == "services-persistent":  # PostgreSQL, connections kept per thread
            backend, extra["APEXBRIDGE_DB_CONN_MAX_AGE"] = "services", "60"
        extra.update(env or {})
        if backend == "services":
            if not services_available():
                raise SystemExit("PostgreSQL and Redis are not reachable on 127.0.0.1")
            extra["DATABASE_URL"] = database_url or self.databases.postgres_url()
            extra["REDIS_URL"] = redis_url or redis_url_for_test()
        else:
            extra["DATABASE_URL"] = database_url or self.databases.sqlite_url()
        hub = HubServer(
            base_env(**extra), self.workdir, name=f"bench{len(self.hubs)}", server=server or self.server
        )
        hub.start(timeout=60)
        pin(hub.process.pid, cpus)
        self.hubs.append(hub)
        return hub

    def stop_hubs(self) -> None:
        for hub in self.hubs:
            hub.stop()
        self.hubs = []

    def close(self) -> None:
        """Stop the hubs, drop their databases and remove the run's directory (hub logs,
        SQLite files); ``APEXBRIDGE_BENCH_KEEP=1`` keeps the directory."""
        self.stop_hubs()
        self.databases.cleanup()
        if os.environ.get("APEXBRIDGE_BENCH_KEEP") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)


def count_nodes(hub: HubServer, status: str = "online") -> int:
    """Nodes with this status in the hub's database (read by a separate manage.py)."""
    code = f"from nodes.models import Node;print(Node.objects.filter(status={status!r}).count())"
    return int(hub.manage("shell", "-c", code).strip().splitlines()[-1])


def run_loadgen(mode: str, *args: str, cpus: set[int] | None = LOAD_CPUS, timeout: float = 900) -> dict:
    """Run ``bench/loadgen.py MODE ARGS`` in its own process; returns its JSON result."""
    process = subprocess.Popen(
        [PYTHON, str(LOADGEN), mode, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if cpus:
        try:
            os.sched_setaffinity(process.pid, cpus)
        except OSError:
            pass
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise RuntimeError(f"loadgen {mode} timed out:\n{stderr[-3000:]}") from None
    if process.returncode != 0:
        raise RuntimeError(f"loadgen {mode} failed ({process.returncode}):\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


class LoadgenProcess:
    """A load generator that keeps running while the caller measures the hub; it
    prints ``READY`` on stderr when its connections are up and stops on stdin EOF."""

    def __init__(self, mode: str, *args: str, cpus: set[int] | None = LOAD_CPUS) -> None:
        self.process = subprocess.Popen(
            [PYTHON, str(LOADGEN), mode, *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if cpus:
            try:
                os.sched_setaffinity(self.process.pid, cpus)
            except OSError:
                pass

    def wait_ready(self, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                raise RuntimeError(f"loadgen exited before READY (rc {self.process.poll()})")
            if line.startswith("READY "):
                return json.loads(line[6:])
        raise RuntimeError("loadgen not ready in time")

    def finish(self, timeout: float = 300) -> dict:
        stdout, stderr = self.process.communicate(input="", timeout=timeout)
        if self.process.returncode != 0:
            raise RuntimeError(f"loadgen failed ({self.process.returncode}):\n{stderr[-3000:]}")
        return json.loads(stdout.strip().splitlines()[-1])


__all__ = [
    "BACKENDS",
    "BACKEND_LABELS",
    "SHARED_KEY",
    "Bench",
    "LoadgenProcess",
    "count_nodes",
    "cpu_seconds",
    "machine_header",
    "median_spread",
    "percentile",
    "pin",
    "print_table",
    "rss_kib",
    "run_loadgen",
]
