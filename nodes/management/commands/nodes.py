"""``manage.py nodes``: a table of registered nodes and their status."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand
from django.utils import timezone

from nodes.models import NodeStatus, NodeType
from nodes.protocol import node_info_data
from nodes.selectors import node_list


def _ago(moment) -> str:
    if moment is None:
        return "never"
    seconds = int((timezone.now() - moment).total_seconds())
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


class Command(BaseCommand):
    help = "List registered nodes and their status."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--status", choices=NodeStatus.values)
        parser.add_argument("--type", choices=NodeType.values)
        parser.add_argument("--capability")
        parser.add_argument("--tag")
        parser.add_argument("--json", action="store_true", help="Print NodeInfo objects as JSON.")

    def handle(self, *args, **options) -> None:
        nodes = list(
            node_list(
                status=options["status"],
                type=options["type"],
                capability=options["capability"],
                tag=options["tag"],
            )
        )
        if options["json"]:
            self.stdout.write(json.dumps([node_info_data(node) for node in nodes], indent=2))
            return
        header = ("ID", "NAME", "TYPE", "STATUS", "CONNECTED", "DRAINING", "CAPABILITIES", "LAST HEARTBEAT")
        rows = [
            (
                node.node_id,
                node.name,
                node.type,
                node.status,
                "yes" if node.is_connected else "no",
                "yes" if node.draining else "no",
                ",".join(node.capabilities or []) or "-",
                _ago(node.last_heartbeat),
            )
            for node in nodes
        ]
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            self.stdout.write(
                "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            )
        self.stdout.write(f"{len(rows)} node(s)")
