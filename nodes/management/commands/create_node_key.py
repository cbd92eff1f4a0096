"""``manage.py create_node_key --name NAME [--node-id ID] [--capability CAP ...]``.

Prints the key once (only its hash is stored) and the URL a node connects to.
"""

from __future__ import annotations

import re

from django.core.management.base import BaseCommand, CommandError

from nodes.auth import node_key_create

NODE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class Command(BaseCommand):
    help = "Create a per-node key. The key is printed once and never stored in clear."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--name", required=True, help="What the key is for (shown in the admin).")
        parser.add_argument("--node-id", default="", help="Only this node id may register with the key.")
        parser.add_argument(
            "--capability",
            dest="capabilities",
            action="extend",
            nargs="+",
            default=[],
            metavar="CAP",
            help="Only these capabilities may be registered with the key (repeatable).",
        )
        parser.add_argument(
            "--hub", default="ws://127.0.0.1:8000", help="Hub base URL for the printed node URL."
        )

    def handle(self, *args, **options) -> None:
        name = options["name"].strip()
        if not name or len(name) > 128:
            raise CommandError("--name must be 1 to 128 characters")
        node_id = options["node_id"]
        if node_id and not NODE_ID.match(node_id):
            raise CommandError("--node-id must match [A-Za-z0-9._:-]{1,64}")
        capabilities = list(dict.fromkeys(cap.strip() for cap in options["capabilities"] if cap.strip()))
        key, plain = node_key_create(name=name, node_id=node_id, capabilities=capabilities)
        hub = options["hub"].rstrip("/")
        self.stdout.write(f"Created node key #{key.pk} {name!r} (prefix {key.prefix}).")
        if node_id:
            self.stdout.write(f"It may only register node id {node_id!r}.")
        if capabilities:
            self.stdout.write(f"It may only register capabilities: {', '.join(capabilities)}.")
        self.stdout.write("Copy the key now: it is not shown again.\n")
        self.stdout.write(f"key: {plain}")
        self.stdout.write(f"url: {hub}/abp-distributed-server/VCP_Key={plain}")
