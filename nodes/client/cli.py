"""Command line of the node client, shared by ``python -m nodes.client`` and
``python manage.py runnode`` (PROTOCOL §8): options, logging, signals, restart."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from typing import Any

from .demo_tools import register_demo_tools
from .errors import RegistrationError
from .node import RESTART, Node
from .wire import redactor

logger = logging.getLogger("apexbridge.node")

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 2, 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--hub",
        default=env("APEXBRIDGE_HUB_URL", "ws://127.0.0.1:8000"),
        help="hub address, ws://HOST:PORT (default $APEXBRIDGE_HUB_URL or ws://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--key",
        default=env("APEXBRIDGE_NODE_KEY") or env("APEXBRIDGE_VCP_KEY"),
        help="node key (default $APEXBRIDGE_NODE_KEY, then $APEXBRIDGE_VCP_KEY; "
        "the environment keeps it out of `ps`)",
    )
    parser.add_argument("--name", default=env("APEXBRIDGE_NODE_NAME") or socket.gethostname())
    parser.add_argument(
        "--node-id", dest="node_id", help="fixed node id (default: remembered in the state file)"
    )
    parser.add_argument("--type", dest="node_type", choices=["worker", "companion"], default="worker")
    parser.add_argument("--capability", dest="capabilities", action="append", default=[], help="repeatable")
    parser.add_argument("--tag", dest="tags", action="append", default=[], help="repeatable")
    parser.add_argument("--max-concurrent", dest="max_concurrent", type=int, default=1)
    parser.add_argument(
        "--state-file",
        dest="state_file",
        help="where the node id is kept (default ~/.apexbridge/node-NAME.json)",
    )
    parser.add_argument(
        "--shutdown-grace",
        dest="shutdown_grace",
        type=float,
        default=30.0,
        help="seconds running tasks get to finish on shutdown before they are handed back",
    )
    parser.add_argument("--log-level", dest="log_level", default=env("APEXBRIDGE_LOG_LEVEL", "INFO"))


def configure_logging(level_name: str) -> None:
    level = logging.getLevelName(level_name.upper())
    if not isinstance(level, int):
        level = logging.INFO
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(level)
    for handler in root.handlers:
        if redactor not in handler.filters:
            handler.addFilter(redactor)
    logging.getLogger("apexbridge.node").setLevel(level)


def build_node(options: dict[str, Any]) -> Node:
    node = Node(
        options["name"],
        key=options["key"],
        hub=options["hub"],
        node_id=options.get("node_id"),
        node_type=options.get("node_type") or "worker",
        capabilities=options.get("capabilities") or [],
        tags=options.get("tags") or [],
        max_concurrent=options.get("max_concurrent") or 1,
        state_file=options.get("state_file"),
        shutdown_grace=options.get("shutdown_grace", 30.0),
    )
    register_demo_tools(node)
    return node


async def serve(node: Node) -> str:
    """Run the node until it stops; SIGINT/SIGTERM stop it gracefully (twice: at once)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, node.request_stop)
    try:
        return await node.run()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def run_node(options: dict[str, Any]) -> int:
    configure_logging(options.get("log_level") or "INFO")
    if not options.get("key"):
        logger.error("No node key: pass --key or set APEXBRIDGE_NODE_KEY")
        return EXIT_USAGE
    try:
        node = build_node(options)
        outcome = asyncio.run(serve(node))
    except RegistrationError as exc:
        logger.error("The hub refused this node: %s", exc)
        return EXIT_REFUSED
    except ValueError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    if outcome == RESTART:
        restart()
    logger.info("Node stopped (%s)", outcome)
    return EXIT_OK


def restart() -> None:
    """Replace this process by a fresh copy of itself (same pid, same command line); the
    state file gives it the same node id."""
    logger.info("Restarting: %s", " ".join(redactor.redact(arg) for arg in sys.orig_argv))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)  # noqa: S606 (re-runs our own command line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nodes.client", description="Run an ApexBridge node serving the demo tools."
    )
    add_arguments(parser)
    return run_node(vars(parser.parse_args(argv)))
